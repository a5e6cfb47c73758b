//! What the data path counts: outcomes, traffic per service and backend,
//! established flows per backend; and the walks of the connection table
//! (the UDP sweep, the census) that run off the daemon's loop.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{counter, maps as names, Flow, FlowKey, ReverseFlow, Traffic, FLOW_F_CLOSING};
use serde::Serialize;

use super::{
    maps::{map_err, Maps, Table},
    Dataplane, Result,
};

impl Dataplane {
    /// Established flows per backend, as the data path counts them when
    /// flows enter and leave the connection table: O(backends), whatever
    /// the number of flows.
    pub fn active_flows(&self) -> Result<HashMap<(String, String), u64>> {
        let mut out = HashMap::new();
        for (key, bid) in self.planner.backend_ids() {
            let n: i64 = self
                .maps
                .active
                .get(&bid, 0)
                .map_err(map_err(names::ACTIVE))?
                .iter()
                .sum();
            let gone = self
                .maps
                .active_reclaimed
                .get(&bid, 0)
                .map_err(map_err(names::ACTIVE_RECLAIMED))? as i64;
            out.insert(key.clone(), (n - gone).max(0) as u64);
        }
        Ok(out)
    }

    /// A sweep of the connection table for UDP flows idle past their
    /// service's timeout, to run off the daemon's loop (it walks the table):
    /// None when no service is UDP.
    pub fn udp_sweep(&self) -> Result<Option<UdpSweep>> {
        let idle: HashMap<u32, u64> = self
            .planner
            .live_services()
            .filter_map(|(id, spec)| Some((id, crate::clock::jiffies(spec.udp_idle?).max(1))))
            .collect();
        if idle.is_empty() {
            return Ok(None);
        }
        let backends = self
            .planner
            .live_backends()
            .map(|(bid, b)| {
                let at = (b.address.octets(), b.port.to_be_bytes());
                (bid, (self.planner.generation(bid), at))
            })
            .collect();
        Ok(Some(UdpSweep {
            conntrack: self.maps.walk_handle(Table::Conntrack)?,
            reverse: self.maps.walk_handle(Table::Reverse)?,
            idle,
            backends,
        }))
    }

    /// Takes note of flows a sweep reclaimed, per backend id.
    pub fn reclaimed(&mut self, per_backend: &HashMap<u32, u64>) -> Result<()> {
        let a = &mut self.maps.active_reclaimed;
        for (&bid, &n) in per_backend {
            let had = a.get(&bid, 0).map_err(map_err(names::ACTIVE_RECLAIMED))?;
            a.set(bid, had + n, 0)
                .map_err(map_err(names::ACTIVE_RECLAIMED))?;
        }
        Ok(())
    }

    fn backend_slot_traffic(&self, bid: u32) -> Result<Traffic> {
        Maps::traffic(&self.maps.backend_traffic, bid, names::BACKEND_TRAFFIC)
    }

    /// The outcome counters, summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let v = self
                .maps
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err(names::COUNTERS))?;
            out.insert(*name, v.iter().sum());
        }
        // Forwarded packets are counted per backend (one update per packet):
        // the totals are the live backends' plus what retired ones left.
        let mut live = Traffic::default();
        let ids = self
            .planner
            .backend_ids()
            .map(|(_, id)| id)
            .chain(self.planner.retired().map(|(id, _)| id));
        for bid in ids {
            live.add(&self.backend_slot_traffic(bid)?);
        }
        *out.entry(counter::NAMES[counter::FORWARDED as usize])
            .or_default() += live.packets;
        *out.entry(counter::NAMES[counter::REPLIES as usize])
            .or_default() += live.reply_packets;
        Ok(out)
    }

    /// Traffic of a service, summed over CPUs: its live backends' and what
    /// its removed backends left.
    pub fn service_traffic(&self, service: &str) -> Result<Traffic> {
        let Some(id) = self.planner.service_id(service) else {
            return Ok(Traffic::default());
        };
        let mut total = Maps::traffic(&self.maps.service_traffic, id, names::SERVICE_TRAFFIC)?;
        for ((svc, _), bid) in self.planner.backend_ids() {
            if svc == service {
                total.add(&self.backend_slot_traffic(bid)?);
            }
        }
        for (bid, svc) in self.planner.retired() {
            if svc == Some(id) {
                total.add(&self.backend_slot_traffic(bid)?);
            }
        }
        Ok(total)
    }

    /// Traffic of one backend of a service, summed over CPUs.
    pub fn backend_traffic(&self, service: &str, backend: &str) -> Result<Traffic> {
        match self.planner.backend_id(service, backend) {
            Some(bid) => self.backend_slot_traffic(bid),
            None => Ok(Traffic::default()),
        }
    }

    /// A handle for counting flows away from the daemon's loop: its own
    /// descriptor of the connection table, and which backend each id is now.
    pub fn census(&self) -> Result<FlowCensus> {
        Ok(FlowCensus {
            table: self.maps.walk_handle(Table::Conntrack)?,
            backends: self
                .planner
                .backend_ids()
                .map(|(k, bid)| ((bid, self.planner.generation(bid)), k.clone()))
                .collect(),
            capacity: self.conntrack_size as u64,
        })
    }
}

/// A backend's address and port, in network order.
type BackendAt = ([u8; 4], [u8; 2]);

/// Deletes UDP flows idle past their service's timeout (see
/// [`Dataplane::udp_sweep`]): one walk of the connection table, off the
/// daemon's loop.
pub struct UdpSweep {
    conntrack: MapData,
    reverse: MapData,
    /// Service id -> idle timeout in ticks (UDP services).
    idle: HashMap<u32, u64>,
    /// Backend id -> its generation, address and port (network order).
    backends: HashMap<u32, (u32, BackendAt)>,
}

impl UdpSweep {
    /// Deletes the idle UDP flows and their reply entries; returns how many
    /// per backend id. A flow the data path replaced meanwhile is not
    /// counted twice: only a successful delete counts. A flow of a backend
    /// whose slot was given to another since is deleted but not counted (the
    /// slot's count was zeroed for the new one), and its reply entry, whose
    /// key the slot no longer knows, is left to the table's LRU.
    pub fn run(self) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        let (Ok(mut table), Ok(mut reverse)) = (
            BpfHashMap::<_, FlowKey, Flow>::try_from(Map::LruHashMap(self.conntrack)),
            BpfHashMap::<_, FlowKey, ReverseFlow>::try_from(Map::LruHashMap(self.reverse)),
        ) else {
            return out;
        };
        let now = crate::clock::jiffies_now();
        let idle: Vec<(FlowKey, Flow)> = table
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, f)| {
                k.proto == lb_common::IPPROTO_UDP
                    && self
                        .idle
                        .get(&f.service)
                        .is_some_and(|&t| now.saturating_sub(f.last_seen) > t)
            })
            .collect();
        for (k, f) in idle {
            if table.remove(&k).is_err() {
                continue;
            }
            let Some(&(generation, (addr, port))) = self.backends.get(&f.backend) else {
                continue;
            };
            if generation != f.generation {
                continue;
            }
            let _ = reverse.remove(&FlowKey::new(addr, k.src, port, k.sport, k.proto));
            *out.entry(f.backend).or_default() += 1;
        }
        out
    }
}

/// Counts the connection table's flows (see [`Dataplane::census`]). Taking a
/// census walks the whole table, one system call per entry: seconds for a
/// full table, so it runs on a thread of its own, never in the daemon's loop.
pub struct FlowCensus {
    table: MapData,
    /// (backend id, generation) -> (service, backend).
    backends: HashMap<(u32, u32), (String, String)>,
    capacity: u64,
}

/// What a census found.
#[derive(Debug, Default, Clone)]
pub struct Census {
    /// Entries in the table (open, closing and idle flows until evicted).
    pub entries: u64,
    pub capacity: u64,
    /// Per (service, backend): flows that have not closed and saw a packet
    /// within their idle time.
    pub active: HashMap<(String, String), u64>,
}

impl FlowCensus {
    /// Walks the table once: every entry counts in `entries`; one that has
    /// not closed and saw a packet within its idle time (TCP: `tcp_idle`,
    /// UDP: `udp_idle`) counts as active for its backend.
    pub fn take(self, tcp_idle: std::time::Duration, udp_idle: std::time::Duration) -> Census {
        let mut census = Census {
            capacity: self.capacity,
            ..Census::default()
        };
        let Ok(table) = BpfHashMap::<_, FlowKey, Flow>::try_from(Map::LruHashMap(self.table))
        else {
            return census;
        };
        let now = crate::clock::jiffies_now();
        let mut by_id: HashMap<(u32, u32), u64> = HashMap::new();
        for entry in table.iter() {
            let Ok((k, f)) = entry else { continue };
            census.entries += 1;
            let idle = if k.proto == lb_common::IPPROTO_TCP {
                tcp_idle
            } else {
                udp_idle
            };
            if f.flags & FLOW_F_CLOSING != 0
                || now.saturating_sub(f.last_seen) > crate::clock::jiffies(idle)
            {
                continue;
            }
            *by_id.entry((f.backend, f.generation)).or_default() += 1;
        }
        for (id, n) in by_id {
            if let Some(key) = self.backends.get(&id) {
                census.active.insert(key.clone(), n);
            }
        }
        census
    }
}

/// Traffic counters as `lb status --json` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TrafficStatus {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl From<Traffic> for TrafficStatus {
    fn from(t: Traffic) -> Self {
        TrafficStatus {
            packets: t.packets,
            bytes: t.bytes,
            new_flows: t.new_flows,
            reply_packets: t.reply_packets,
            reply_bytes: t.reply_bytes,
        }
    }
}
