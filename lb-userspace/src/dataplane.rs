//! The only code that touches the BPF program and its maps.
//!
//! `apply` turns service specs (computed by the reconciler) into map writes. Each service's ring is
//! written into the half of its ring space the data path is not reading, and
//! then switched in by one update of the service entry, so a packet sees the
//! old backend set or the new one, never a mix or an empty set.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{xdp::XdpLinkId, ProgramError, Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfError,
};
use lb_common::{
    counter, ring, Backend, Flow, FlowKey, Service, ServiceKey, Traffic, BACKEND_F_DROP_FLOWS,
    BACKEND_F_PRESENT, FLOW_F_CLOSING, MAX_BACKENDS, MAX_SERVICES, RING_SIZE,
};
use serde::Serialize;

use crate::config::{Protocol, Scheduler, ServiceConfig, XdpMode};

/// The XDP object built by `cargo xtask build-ebpf`, embedded at build time.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// Name of the XDP function in the object.
pub const PROGRAM_NAME: &str = "lb";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot load the XDP program (are you root? is the kernel 5.15 or newer?)")]
    Load(#[source] EbpfError),
    #[error("the XDP program has no map {0} (a stale build? run `cargo xtask build-ebpf`)")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot attach XDP to {iface} in {mode} mode")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("XDP program: {0}")]
    Program(#[source] ProgramError),
    #[error("service {service}: {problem}")]
    Capacity { service: String, problem: String },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// What the maps should say about one service: its address and its backends,
/// each with the ring weight it gets (0: no new flows) and whether its
/// established flows are dropped. The reconciler computes these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Slots in the scheduling ring: 0 takes no new flows.
    pub ring_weight: u32,
    pub drop_flows: bool,
}

impl ServiceSpec {
    /// Every backend taking new flows as configured (no health or admin state).
    pub fn from_config(s: &ServiceConfig) -> ServiceSpec {
        ServiceSpec {
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            backends: s
                .backends
                .iter()
                .map(|b| BackendSpec {
                    name: b.name.clone(),
                    address: b.address,
                    port: b.port,
                    ring_weight: match s.scheduler {
                        Scheduler::RoundRobin => 1,
                        Scheduler::WeightedRoundRobin => b.weight,
                    },
                    drop_flows: false,
                })
                .collect(),
        }
    }
}

/// Where a service lives in the maps.
#[derive(Debug, Clone)]
struct ServiceSlot {
    id: u32,
    key: ServiceKey,
    /// Which ring half (0 or 1) the data path reads now.
    half: u32,
    spec: ServiceSpec,
}

/// An interface the program is attached to, and how.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub interface: String,
    pub mode: &'static str,
}

/// Hands out small integer ids and takes them back.
#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: Vec<u32>,
}

impl Ids {
    fn take(&mut self, max: u32) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }

    fn give_back(&mut self, id: u32) {
        self.free.push(id);
    }
}

/// The loaded program, its maps and what has been written to them.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<(Attachment, XdpLinkId)>,
    services: BTreeMap<String, ServiceSlot>,
    /// (service name, backend name) -> backend id.
    backends: HashMap<(String, String), u32>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Per backend slot: how many backends have held it (see `Backend::generation`).
    generations: Vec<u32>,
    nr_cpus: usize,
}

impl Dataplane {
    /// Loads the program into the kernel (verifier included) without attaching it.
    pub fn load() -> Result<Dataplane> {
        let mut ebpf = Ebpf::load(PROGRAM).map_err(DataplaneError::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::MissingMap("program lb"))?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.load().map_err(DataplaneError::Program)?;
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?;
        Ok(Dataplane {
            ebpf,
            attached: Vec::new(),
            services: BTreeMap::new(),
            backends: HashMap::new(),
            service_ids: Ids::default(),
            backend_ids: Ids::default(),
            generations: vec![0; MAX_BACKENDS as usize],
            nr_cpus,
        })
    }

    /// The program's aya-log reader (only if it was built with log statements).
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// Attaches to `iface`; in `auto` mode tries native first, then generic.
    /// Returns the mode it runs in.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<&'static str> {
        let tries: &[(AyaXdpMode, &'static str)] = match mode {
            XdpMode::Auto => &[(AyaXdpMode::Driver, "native"), (AyaXdpMode::Skb, "generic")],
            XdpMode::Native => &[(AyaXdpMode::Driver, "native")],
            XdpMode::Generic => &[(AyaXdpMode::Skb, "generic")],
        };
        let mut last = None;
        for &(aya_mode, name) in tries {
            match self.program_mut().attach(iface, aya_mode) {
                Ok(link) => {
                    let a = Attachment {
                        interface: iface.to_owned(),
                        mode: name,
                    };
                    self.attached.push((a, link));
                    return Ok(name);
                }
                Err(source) => {
                    tracing::debug!(iface, mode = name, error = %source, "attach failed");
                    last = Some(DataplaneError::Attach {
                        iface: iface.to_owned(),
                        mode: name,
                        source,
                    });
                }
            }
        }
        Err(last.expect("at least one mode is tried"))
    }

    /// Detaches from every interface (also done when the Dataplane is dropped).
    pub fn detach_all(&mut self) {
        for (a, link) in std::mem::take(&mut self.attached) {
            if let Err(e) = self.program_mut().detach(link) {
                tracing::warn!(iface = %a.interface, error = %e, "detach failed");
            }
        }
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.attached.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Makes the maps carry exactly `services`: adds, updates and removes
    /// services and backends, each change atomic for the packets in flight.
    /// A service whose spec did not change is not written at all.
    pub fn apply(&mut self, services: &[ServiceSpec]) -> Result<()> {
        for s in services {
            if self
                .services
                .get(&s.name)
                .is_some_and(|slot| &slot.spec == s)
            {
                continue;
            }
            self.apply_service(s)?;
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name)?;
        }
        Ok(())
    }

    fn apply_service(&mut self, s: &ServiceSpec) -> Result<()> {
        let key = ServiceKey {
            vip: s.vip.octets(),
            port: s.port.to_be_bytes(),
            proto: s.protocol.number(),
            _pad: 0,
        };
        let (id, half, old_key) = match self.services.get(&s.name) {
            Some(slot) => (slot.id, 1 - slot.half, Some(slot.key)),
            None => {
                let id = self.service_ids.take(MAX_SERVICES).ok_or_else(|| {
                    DataplaneError::Capacity {
                        service: s.name.clone(),
                        problem: format!("more than {MAX_SERVICES} services"),
                    }
                })?;
                self.reset_counters("SERVICE_TRAFFIC", id)?;
                self.array::<u64>("RR_POSITION")?
                    .set(id, 0, 0)
                    .map_err(map_err("RR_POSITION"))?;
                (id, 0, None)
            }
        };
        let old_backends: HashMap<String, BackendSpec> = self
            .services
            .get(&s.name)
            .map(|slot| {
                slot.spec
                    .backends
                    .iter()
                    .map(|b| (b.name.clone(), b.clone()))
                    .collect()
            })
            .unwrap_or_default();

        // Backends first: a ring must only name backends that are already written.
        let mut ids = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let bkey = (s.name.clone(), b.name.clone());
            let moved = old_backends
                .get(&b.name)
                .is_some_and(|o| (o.address, o.port) != (b.address, b.port));
            if moved {
                // Same name, new address: a different server. Its old flows
                // must not follow the name to the new address.
                self.remove_backend(&bkey)?;
            }
            let (bid, fresh) = match self.backends.get(&bkey) {
                Some(&bid) => (bid, false),
                None => {
                    let bid = self.backend_ids.take(MAX_BACKENDS).ok_or_else(|| {
                        DataplaneError::Capacity {
                            service: s.name.clone(),
                            problem: format!("more than {MAX_BACKENDS} backends"),
                        }
                    })?;
                    self.reset_counters("BACKEND_TRAFFIC", bid)?;
                    self.generations[bid as usize] = self.generations[bid as usize].wrapping_add(1);
                    self.backends.insert(bkey, bid);
                    (bid, true)
                }
            };
            let unchanged = !fresh
                && old_backends
                    .get(&b.name)
                    .is_some_and(|o| o.drop_flows == b.drop_flows);
            if !unchanged {
                let value = Backend {
                    addr: b.address.octets(),
                    port: b.port.to_be_bytes(),
                    _pad: [0; 2],
                    flags: BACKEND_F_PRESENT
                        | if b.drop_flows {
                            BACKEND_F_DROP_FLOWS
                        } else {
                            0
                        },
                    generation: self.generations[bid as usize],
                };
                self.array::<Backend>("BACKENDS")?
                    .set(bid, value, 0)
                    .map_err(map_err("BACKENDS"))?;
            }
            ids.push(bid);
        }

        let weights: Vec<u32> = s.backends.iter().map(|b| b.ring_weight).collect();
        let mut slots = vec![0u32; RING_SIZE as usize];
        let len =
            ring::fill_ring(&weights, &mut slots).ok_or_else(|| DataplaneError::Capacity {
                service: s.name.clone(),
                problem: format!("the weights need more than {RING_SIZE} ring slots"),
            })?;
        let base = (id * 2 + half) * RING_SIZE;
        {
            let mut rings = self.array::<u32>("RINGS")?;
            for (i, &slot) in slots[..len].iter().enumerate() {
                rings
                    .set(base + i as u32, ids[slot as usize], 0)
                    .map_err(map_err("RINGS"))?;
            }
        }
        let value = Service {
            id,
            ring_base: base,
            ring_len: len as u32,
            flags: 0,
        };
        {
            let mut svcs = self.services_map()?;
            svcs.insert(key, value, 0).map_err(map_err("SERVICES"))?;
            if let Some(old) = old_key.filter(|k| *k != key) {
                svcs.remove(&old).map_err(map_err("SERVICES"))?;
            }
        }

        // Backends that left this service: after the switch, nothing new picks them.
        let gone: Vec<(String, String)> = self
            .backends
            .keys()
            .filter(|(svc, b)| svc == &s.name && !s.backends.iter().any(|c| &c.name == b))
            .cloned()
            .collect();
        for bkey in gone {
            self.remove_backend(&bkey)?;
        }
        self.services.insert(
            s.name.clone(),
            ServiceSlot {
                id,
                key,
                half,
                spec: s.clone(),
            },
        );
        tracing::debug!(service = %s.name, ring = len, backends = s.backends.len(), "service written");
        Ok(())
    }

    fn remove_service(&mut self, name: &str) -> Result<()> {
        let Some(slot) = self.services.remove(name) else {
            return Ok(());
        };
        self.services_map()?
            .remove(&slot.key)
            .map_err(map_err("SERVICES"))?;
        let gone: Vec<(String, String)> = self
            .backends
            .keys()
            .filter(|(svc, _)| svc == name)
            .cloned()
            .collect();
        for bkey in gone {
            self.remove_backend(&bkey)?;
        }
        self.service_ids.give_back(slot.id);
        tracing::debug!(service = %name, "service removed");
        Ok(())
    }

    fn remove_backend(&mut self, bkey: &(String, String)) -> Result<()> {
        if let Some(bid) = self.backends.remove(bkey) {
            self.array::<Backend>("BACKENDS")?
                .set(bid, Backend::default(), 0)
                .map_err(map_err("BACKENDS"))?;
            self.backend_ids.give_back(bid);
        }
        Ok(())
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn array<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        Array::try_from(self.map(name)?).map_err(map_err(name))
    }

    fn services_map(&mut self) -> Result<BpfHashMap<&mut MapData, ServiceKey, Service>> {
        BpfHashMap::try_from(self.map("SERVICES")?).map_err(map_err("SERVICES"))
    }

    fn reset_counters(&mut self, name: &'static str, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![Traffic::default(); self.nr_cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        let mut a: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        a.set(id, zeros, 0).map_err(map_err(name))
    }

    fn traffic(&self, name: &'static str, id: u32) -> Result<Traffic> {
        let a: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        let mut total = Traffic::default();
        for t in a.get(&id, 0).map_err(map_err(name))?.iter() {
            total.add(t);
        }
        Ok(total)
    }

    /// The outcome counters, summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_ref("COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let v = a.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }

    /// Traffic of a service, summed over CPUs.
    pub fn service_traffic(&self, service: &str) -> Result<Traffic> {
        match self.services.get(service) {
            Some(slot) => self.traffic("SERVICE_TRAFFIC", slot.id),
            None => Ok(Traffic::default()),
        }
    }

    /// Traffic of one backend of a service, summed over CPUs.
    pub fn backend_traffic(&self, service: &str, backend: &str) -> Result<Traffic> {
        match self.backends.get(&(service.to_owned(), backend.to_owned())) {
            Some(&bid) => self.traffic("BACKEND_TRAFFIC", bid),
            None => Ok(Traffic::default()),
        }
    }

    /// Flows per (service, backend) in the connection table that have not
    /// closed and saw a packet within their idle time (TCP: `tcp_idle`, UDP:
    /// `udp_idle`). It walks the whole table: for status, not for hot loops.
    pub fn active_flows(
        &self,
        tcp_idle: std::time::Duration,
        udp_idle: std::time::Duration,
    ) -> Result<HashMap<(String, String), u64>> {
        let table: BpfHashMap<_, FlowKey, Flow> =
            BpfHashMap::try_from(self.map_ref("CONNTRACK")?).map_err(map_err("CONNTRACK"))?;
        let now = monotonic_ns();
        let mut by_id: HashMap<(u32, u32), u64> = HashMap::new();
        for entry in table.iter() {
            let Ok((k, f)) = entry else { continue };
            let idle = if k.proto == lb_common::IPPROTO_TCP {
                tcp_idle
            } else {
                udp_idle
            };
            if f.flags & FLOW_F_CLOSING != 0
                || now.saturating_sub(f.last_seen_ns) > idle.as_nanos() as u64
            {
                continue;
            }
            *by_id.entry((f.backend, f.generation)).or_default() += 1;
        }
        let mut out = HashMap::new();
        for (key, &bid) in &self.backends {
            if let Some(n) = by_id.get(&(bid, self.generations[bid as usize])) {
                out.insert(key.clone(), *n);
            }
        }
        Ok(out)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
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
