//! The planner: what to write to the maps so that they carry the services
//! asked for. It owns the bookkeeping (service, backend and Maglev ids, the
//! backends' generations, which ring half each service reads) and touches no
//! map: `plan` turns the desired services and what it knows the maps hold
//! into an ordered list of [`Write`]s, which the writer (`write.rs`) applies.
//!
//! The order is the data path's safety: a backend is written before a ring
//! names it; a ring is written into the half the data path is not reading,
//! and the service entry that switches to it comes after every ring write;
//! a departed backend's slot is cleared only after that switch. A packet
//! sees the old backend set or the new one, never a mix or an empty set.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use lb_common::{
    maglev, prefilter_bit, ring, Backend, BackendKey, NextHop, ReverseFlow, Service, ServiceKey,
    BACKEND_F_DROP_FLOWS, BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT, BACKEND_F_RESET_FLOWS,
    MAX_BACKENDS, MAX_MAGLEV_SERVICES, MAX_SERVICES, PREFILTER_BACKENDS, PREFILTER_VIPS,
    PREFILTER_WORDS, RING_SIZE, SERVICE_F_ALLOWLIST, SERVICE_F_FIREWALL, SERVICE_F_MAGLEV,
    SERVICE_F_RESET_IF_EMPTY,
};

use super::spec::{BackendSpec, ServiceSpec};
use crate::config::{Cidr, SourceRules};

/// One write to the maps. [`Planner::plan`] returns them in the order they
/// must be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// One word of the prefilter's bitmaps (VIPs, then backend addresses).
    Prefilter {
        word: u32,
        bits: u32,
    },
    /// A service id taken by a new service: its folded-in traffic and its
    /// round-robin position start at zero.
    NewService {
        id: u32,
    },
    /// A freed backend slot taken again: the traffic its last backend left
    /// is folded into that backend's service (`into`, if it still exists)
    /// and the totals, which stay monotonic.
    FoldTraffic {
        backend: u32,
        into: Option<u32>,
    },
    /// A backend slot given to a new backend: its traffic, its count of
    /// flows and its cached next hop start at zero.
    NewBackend {
        id: u32,
    },
    /// A backend slot's value (a cleared one keeps its generation).
    Backend {
        id: u32,
        value: Backend,
    },
    /// One slot of the round-robin rings.
    Ring {
        index: u32,
        backend: u32,
    },
    /// One entry of the Maglev tables.
    Maglev {
        index: u32,
        backend: u32,
    },
    /// A source rule of a service (None: removed).
    Rule {
        service: u32,
        cidr: Cidr,
        verdict: Option<u32>,
    },
    /// A service by id (what established flows read).
    ServiceById {
        id: u32,
        value: Service,
    },
    /// A service by address: the switch to the ring half just written.
    Service {
        key: ServiceKey,
        value: Service,
    },
    RemoveService {
        key: ServiceKey,
    },
    /// A VIP the firewall guards (closed ports), added or removed.
    Vip {
        vip: [u8; 4],
        present: bool,
    },
    /// A stateless reply entry (None: removed).
    BackendVip {
        key: BackendKey,
        value: Option<ReverseFlow>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("service {service}: {problem}")]
pub struct CapacityError {
    pub service: String,
    pub problem: String,
}

/// What the maps held when the program was loaded (an earlier daemon's
/// pins, or nothing): the planner starts from it.
#[derive(Debug, Default, Clone)]
pub struct Found {
    /// The service entries, by address.
    pub services: HashMap<ServiceKey, Service>,
    /// Every backend slot (present or not: generations live in free slots too).
    pub backends: Vec<Backend>,
    /// Backend slots with traffic counted.
    pub with_traffic: HashSet<u32>,
    pub prefilter: Vec<u32>,
    pub vips: HashSet<[u8; 4]>,
    pub rules: HashMap<(u32, Cidr), u32>,
    pub backend_vips: HashSet<BackendKey>,
}

/// Hands out small integer ids and takes them back.
#[derive(Debug, Default, Clone)]
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

    /// Marks `id` used (adoption); ids below it not yet used become free.
    fn claim(&mut self, id: u32) {
        if let Some(i) = self.free.iter().position(|&f| f == id) {
            self.free.remove(i);
            return;
        }
        while self.next <= id {
            if self.next != id {
                self.free.push(self.next);
            }
            self.next += 1;
        }
    }
}

/// Where a service lives in the maps.
#[derive(Debug, Clone)]
struct ServiceSlot {
    id: u32,
    key: ServiceKey,
    /// Which half (0 or 1) of its ring or table space the data path reads now.
    half: u32,
    /// Its slot in the Maglev map, for Maglev services.
    maglev_slot: Option<u32>,
    /// What each half of its Maglev space holds (empty: unknown), so a new
    /// table only writes the entries that differ.
    tables: [Vec<u32>; 2],
    /// None after adoption: written in full at the first plan.
    spec: Option<ServiceSpec>,
}

/// What an earlier daemon left that the first plan has not matched yet.
#[derive(Debug, Default, Clone)]
struct Adoption {
    services: HashMap<ServiceKey, Service>,
    /// Present backends: id and value.
    backends: Vec<(u32, Backend)>,
}

/// The planner's knowledge of the maps, and the ids it has handed out.
#[derive(Debug, Clone)]
pub struct Planner {
    services: BTreeMap<String, ServiceSlot>,
    /// (service name, backend name) -> backend id.
    backends: HashMap<(String, String), u32>,
    service_ids: Ids,
    backend_ids: Ids,
    maglev_ids: Ids,
    /// Per backend slot: how many backends have held it (see `Backend::generation`).
    generations: Vec<u32>,
    /// Freed backend slots whose traffic still counts (replies of their
    /// flows keep coming for a while) -> the service id they served, if it
    /// still exists: folded in when the slot is given again.
    retired: HashMap<u32, Option<u32>>,
    prefilter: Vec<u32>,
    vips: HashSet<[u8; 4]>,
    rules: HashMap<(u32, Cidr), u32>,
    backend_vips: HashMap<BackendKey, ReverseFlow>,
    /// Whether BACKEND_VIPS is filled (see `Dataplane::set_stateless_replies`).
    stateless_replies: bool,
    adopting: Option<Adoption>,
    /// The kernel's tick rate (idle timeouts are written in ticks).
    hz: u64,
}

impl Planner {
    /// A planner for maps that hold `found`. Services and backends found
    /// there are adopted by the first plan that asks for them (same ids,
    /// same generations: their flows keep going) and removed by it if it
    /// does not.
    pub fn new(found: Found, hz: u64) -> Planner {
        let mut p = Planner {
            services: BTreeMap::new(),
            backends: HashMap::new(),
            service_ids: Ids::default(),
            backend_ids: Ids::default(),
            maglev_ids: Ids::default(),
            generations: vec![0; MAX_BACKENDS as usize],
            retired: HashMap::new(),
            prefilter: found.prefilter,
            vips: found.vips,
            rules: found.rules,
            backend_vips: HashMap::new(),
            stateless_replies: false,
            adopting: None,
            hz,
        };
        p.prefilter.resize(2 * PREFILTER_WORDS as usize, 0);
        for (i, b) in found
            .backends
            .iter()
            .enumerate()
            .take(MAX_BACKENDS as usize)
        {
            p.generations[i] = b.generation;
        }
        let present: Vec<(u32, Backend)> = found
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.flags & BACKEND_F_PRESENT != 0)
            .map(|(i, b)| (i as u32, *b))
            .collect();
        // Every id found stays taken until the first plan has matched it or
        // let it go: a new service or backend must never be handed an id an
        // adopted one still holds.
        for svc in found.services.values() {
            p.service_ids.claim(svc.id);
            if svc.flags & SERVICE_F_MAGLEV != 0 {
                p.maglev_ids
                    .claim(svc.ring_base / (2 * maglev::MAX_TABLE_SIZE));
            }
        }
        for (bid, _) in &present {
            p.backend_ids.claim(*bid);
        }
        // Free slots still hold their last backend's traffic.
        for bid in found.with_traffic {
            if !present.iter().any(|(b, _)| *b == bid) {
                p.retired.insert(bid, None);
            }
        }
        // Reply entries found are rewritten or removed by the first plan.
        for k in found.backend_vips {
            p.backend_vips.insert(k, UNKNOWN_REPLY);
        }
        if !found.services.is_empty() || !present.is_empty() {
            p.adopting = Some(Adoption {
                services: found.services,
                backends: present,
            });
        }
        p
    }

    /// Un-NAT replies from single-VIP backends by their address alone (see
    /// `Dataplane::set_stateless_replies`); in force from the next plan.
    pub fn set_stateless_replies(&mut self, on: bool) {
        self.stateless_replies = on;
    }

    pub fn stateless_replies(&self) -> bool {
        self.stateless_replies
    }

    /// The writes that make the maps carry exactly `services`: services and
    /// backends added, changed and removed, each change atomic for the
    /// packets in flight. A service whose spec did not change gets none.
    pub fn plan(&mut self, services: &[ServiceSpec]) -> Result<Vec<Write>, CapacityError> {
        let mut w = Vec::new();
        // New addresses pass the prefilter before their services exist;
        // gone ones stop passing it only after their services are gone.
        self.sync_prefilter(services, true, &mut w);
        for s in services {
            let unchanged = self
                .services
                .get(&s.name)
                .is_some_and(|slot| slot.spec.as_ref() == Some(s));
            if !unchanged {
                self.plan_service(s, &mut w)?;
            }
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name, &mut w);
        }
        if let Some(a) = self.adopting.take() {
            self.forget_unadopted(a, &mut w);
        }
        self.sync_vips(services, &mut w);
        self.forget_rules_of_gone_services(&mut w);
        self.sync_backend_vips(services, &mut w);
        self.sync_prefilter(services, false, &mut w);
        Ok(w)
    }

    /// Every backend planned, with its id.
    pub fn live_backends(&self) -> impl Iterator<Item = (u32, &BackendSpec)> {
        self.services
            .values()
            .filter_map(|slot| slot.spec.as_ref())
            .flat_map(move |spec| {
                spec.backends.iter().filter_map(move |b| {
                    let bid = *self.backends.get(&(spec.name.clone(), b.name.clone()))?;
                    Some((bid, b))
                })
            })
    }

    /// Every planned service, with its id.
    pub fn live_services(&self) -> impl Iterator<Item = (u32, &ServiceSpec)> {
        self.services
            .values()
            .filter_map(|slot| Some((slot.id, slot.spec.as_ref()?)))
    }

    pub fn service_id(&self, service: &str) -> Option<u32> {
        self.services.get(service).map(|s| s.id)
    }

    pub fn backend_id(&self, service: &str, backend: &str) -> Option<u32> {
        self.backends
            .get(&(service.to_owned(), backend.to_owned()))
            .copied()
    }

    /// (service, backend) -> backend id, for every backend.
    pub fn backend_ids(&self) -> impl Iterator<Item = (&(String, String), u32)> {
        self.backends.iter().map(|(k, &v)| (k, v))
    }

    /// The generation backend slot `id` is at.
    pub fn generation(&self, id: u32) -> u32 {
        self.generations[id as usize]
    }

    /// Freed backend slots whose traffic still counts, with the service id
    /// they served if it still exists.
    pub fn retired(&self) -> impl Iterator<Item = (u32, Option<u32>)> + '_ {
        self.retired.iter().map(|(&b, &s)| (b, s))
    }

    fn plan_service(&mut self, s: &ServiceSpec, w: &mut Vec<Write>) -> Result<(), CapacityError> {
        let key = service_key(s);
        let capacity = |problem: String| CapacityError {
            service: s.name.clone(),
            problem,
        };
        let adopted = self.adopting.as_mut().and_then(|a| a.services.remove(&key));
        let (id, half, old_key, mut maglev_slot, mut tables) =
            match (self.services.get(&s.name), adopted) {
                (Some(slot), _) => (
                    slot.id,
                    1 - slot.half,
                    Some(slot.key),
                    slot.maglev_slot,
                    slot.tables.clone(),
                ),
                (None, Some(svc)) => {
                    // The earlier daemon's service: same id and counters, and
                    // the half it was not reading gets the new ring.
                    self.service_ids.claim(svc.id);
                    let (unit, slot) = if svc.flags & SERVICE_F_MAGLEV != 0 {
                        let slot = svc.ring_base / (2 * maglev::MAX_TABLE_SIZE);
                        self.maglev_ids.claim(slot);
                        (maglev::MAX_TABLE_SIZE, Some(slot))
                    } else {
                        (RING_SIZE, None)
                    };
                    let half = (svc.ring_base / unit) % 2;
                    (svc.id, 1 - half, Some(key), slot, Default::default())
                }
                (None, None) => {
                    let id = self
                        .service_ids
                        .take(MAX_SERVICES)
                        .ok_or_else(|| capacity(format!("more than {MAX_SERVICES} services")))?;
                    // Retired backends of the id's earlier service are not this one's.
                    for svc in self.retired.values_mut() {
                        if *svc == Some(id) {
                            *svc = None;
                        }
                    }
                    w.push(Write::NewService { id });
                    (id, 0, None, None, Default::default())
                }
            };
        let old_backends: HashMap<String, BackendSpec> = self
            .services
            .get(&s.name)
            .and_then(|slot| slot.spec.as_ref())
            .map(|spec| {
                spec.backends
                    .iter()
                    .map(|b| (b.name.clone(), b.clone()))
                    .collect()
            })
            .unwrap_or_default();

        // Backends first: a ring must only name backends already written.
        let mut ids = Vec::with_capacity(s.backends.len());
        // Slots of backends that moved, cleared after the switch.
        let mut departing = Vec::new();
        for b in &s.backends {
            let bkey = (s.name.clone(), b.name.clone());
            let moved = old_backends
                .get(&b.name)
                .is_some_and(|o| (o.address, o.port) != (b.address, b.port));
            if moved {
                // Same name, new address: a different server, in a slot of
                // its own (its old flows must not follow the name to the new
                // address). The live ring still names the old slot: it is
                // cleared after the switch, as a departed backend's.
                departing.extend(self.backends.remove(&bkey));
            }
            let adopted = self.adopting.as_mut().and_then(|a| {
                let i = a.backends.iter().position(|(_, v)| {
                    v.service == id
                        && v.addr == b.address.octets()
                        && v.port == b.port.to_be_bytes()
                })?;
                Some(a.backends.remove(i).0)
            });
            let (bid, fresh) = match (self.backends.get(&bkey), adopted) {
                (Some(&bid), _) => (bid, false),
                (None, Some(bid)) => {
                    // Same slot and generation: its flows keep going.
                    self.backend_ids.claim(bid);
                    self.backends.insert(bkey, bid);
                    (bid, true)
                }
                (None, None) => {
                    let bid = self
                        .backend_ids
                        .take(MAX_BACKENDS)
                        .ok_or_else(|| capacity(format!("more than {MAX_BACKENDS} backends")))?;
                    if let Some(into) = self.retired.remove(&bid) {
                        w.push(Write::FoldTraffic { backend: bid, into });
                    }
                    w.push(Write::NewBackend { id: bid });
                    self.generations[bid as usize] = self.generations[bid as usize].wrapping_add(1);
                    self.backends.insert(bkey, bid);
                    (bid, true)
                }
            };
            let unchanged = !fresh
                && old_backends
                    .get(&b.name)
                    .is_some_and(|o| backend_flags(o) == backend_flags(b));
            if !unchanged {
                let value = Backend {
                    addr: b.address.octets(),
                    port: b.port.to_be_bytes(),
                    _pad: [0; 2],
                    flags: backend_flags(b),
                    service: id,
                    generation: self.generations[bid as usize],
                };
                w.push(Write::Backend { id: bid, value });
            }
            ids.push(bid);
        }

        let weights: Vec<u32> = s.backends.iter().map(|b| b.ring_weight).collect();
        let (base, len, flags, seed) = match s.maglev {
            None => {
                if let Some(slot) = maglev_slot.take() {
                    self.maglev_ids.give_back(slot);
                }
                let mut slots = vec![0u32; RING_SIZE as usize];
                let len = ring::fill_ring(&weights, &mut slots).ok_or_else(|| {
                    capacity(format!("the weights need more than {RING_SIZE} ring slots"))
                })?;
                let base = (id * 2 + half) * RING_SIZE;
                for (i, &slot) in slots[..len].iter().enumerate() {
                    w.push(Write::Ring {
                        index: base + i as u32,
                        backend: ids[slot as usize],
                    });
                }
                (base, len as u32, 0, 0)
            }
            Some((m, seed)) => {
                let slot = match maglev_slot {
                    Some(slot) => slot,
                    None => {
                        let slot = self.maglev_ids.take(MAX_MAGLEV_SERVICES).ok_or_else(|| {
                            capacity(format!("more than {MAX_MAGLEV_SERVICES} Maglev services"))
                        })?;
                        maglev_slot = Some(slot);
                        slot
                    }
                };
                let base = (slot * 2 + half) * maglev::MAX_TABLE_SIZE;
                let names: Vec<(&[u8], u32)> = s
                    .backends
                    .iter()
                    .map(|b| (b.name.as_bytes(), b.ring_weight))
                    .collect();
                let mut table = vec![0u32; m as usize];
                let len = if maglev::fill_table(&names, seed, &mut table) {
                    for e in table.iter_mut() {
                        *e = ids[*e as usize];
                    }
                    // Only what differs from what this half holds.
                    let known = &tables[half as usize];
                    for (i, &b) in table.iter().enumerate() {
                        if known.len() != table.len() || known[i] != b {
                            w.push(Write::Maglev {
                                index: base + i as u32,
                                backend: b,
                            });
                        }
                    }
                    m
                } else {
                    // No backend can take new flows.
                    table.clear();
                    0
                };
                tables[half as usize] = table;
                (base, len, SERVICE_F_MAGLEV, seed)
            }
        };
        let firewall_flags = self.write_rules(id, &s.rules, w);
        let value = Service {
            id,
            ring_base: base,
            ring_len: len,
            flags: flags
                | firewall_flags
                | if s.reset_if_empty {
                    SERVICE_F_RESET_IF_EMPTY
                } else {
                    0
                },
            hash_seed: seed,
            idle_ticks: s
                .udp_idle
                .map_or(0, |d| ticks(d, self.hz).clamp(1, u32::MAX as u64) as u32),
        };
        // By id first: a flow scheduled by the new entry finds it there.
        w.push(Write::ServiceById { id, value });
        w.push(Write::Service { key, value });
        if let Some(old) = old_key.filter(|k| *k != key) {
            w.push(Write::RemoveService { key: old });
        }

        // Backends that left this service, or moved: after the switch,
        // nothing new picks them.
        for bid in departing {
            self.free_slot(bid, id, w);
        }
        let gone: Vec<(String, String)> = self
            .backends
            .keys()
            .filter(|(svc, b)| svc == &s.name && !s.backends.iter().any(|c| &c.name == b))
            .cloned()
            .collect();
        for bkey in gone {
            self.remove_backend(&bkey, id, w);
        }
        self.services.insert(
            s.name.clone(),
            ServiceSlot {
                id,
                key,
                half,
                maglev_slot,
                tables,
                spec: Some(s.clone()),
            },
        );
        Ok(())
    }

    fn remove_service(&mut self, name: &str, w: &mut Vec<Write>) {
        let Some(slot) = self.services.remove(name) else {
            return;
        };
        w.push(Write::RemoveService { key: slot.key });
        let gone: Vec<(String, String)> = self
            .backends
            .keys()
            .filter(|(svc, _)| svc == name)
            .cloned()
            .collect();
        for bkey in gone {
            self.remove_backend(&bkey, slot.id, w);
        }
        self.service_ids.give_back(slot.id);
        if let Some(m) = slot.maglev_slot {
            self.maglev_ids.give_back(m);
        }
    }

    /// Frees a backend's slot; its traffic is folded into its service's
    /// (`service`) when the slot is taken again.
    fn remove_backend(&mut self, bkey: &(String, String), service: u32, w: &mut Vec<Write>) {
        if let Some(bid) = self.backends.remove(bkey) {
            self.free_slot(bid, service, w);
        }
    }

    /// Clears backend slot `bid` of `service` and gives it back.
    fn free_slot(&mut self, bid: u32, service: u32, w: &mut Vec<Write>) {
        self.retired.insert(bid, Some(service));
        // The generation stays in the slot: flows that remember it must
        // never match whichever backend takes the slot next.
        let value = Backend {
            generation: self.generations[bid as usize],
            ..Backend::default()
        };
        w.push(Write::Backend { id: bid, value });
        self.backend_ids.give_back(bid);
    }

    /// Writes service `id`'s source rules (adding before removing, so a
    /// changed list never lets through what both versions deny); returns the
    /// service's firewall flags.
    fn write_rules(&mut self, id: u32, rules: &SourceRules, w: &mut Vec<Write>) -> u32 {
        let want: HashMap<Cidr, u32> = rules
            .allow
            .iter()
            .map(|c| (*c, lb_common::firewall::RULE_ALLOW))
            .chain(
                rules
                    .deny
                    .iter()
                    .map(|c| (*c, lb_common::firewall::RULE_DENY)),
            )
            .collect();
        let mut have: Vec<(Cidr, u32)> = self
            .rules
            .iter()
            .filter(|((sid, _), _)| *sid == id)
            .map(|((_, c), v)| (*c, *v))
            .collect();
        have.sort_unstable();
        let mut added: Vec<(Cidr, u32)> = want
            .iter()
            .filter(|(c, v)| !have.contains(&(**c, **v)))
            .map(|(c, v)| (*c, *v))
            .collect();
        added.sort_unstable();
        for (cidr, v) in added {
            w.push(Write::Rule {
                service: id,
                cidr,
                verdict: Some(v),
            });
            self.rules.insert((id, cidr), v);
        }
        for (cidr, _) in have {
            if !want.contains_key(&cidr) {
                w.push(Write::Rule {
                    service: id,
                    cidr,
                    verdict: None,
                });
                self.rules.remove(&(id, cidr));
            }
        }
        match (want.is_empty(), rules.allow.is_empty()) {
            (true, _) => 0,
            (false, true) => SERVICE_F_FIREWALL,
            (false, false) => SERVICE_F_FIREWALL | SERVICE_F_ALLOWLIST,
        }
    }

    /// Removes the rules of service ids no service holds any more.
    fn forget_rules_of_gone_services(&mut self, w: &mut Vec<Write>) {
        let live: HashSet<u32> = self.services.values().map(|s| s.id).collect();
        let mut gone: Vec<u32> = self
            .rules
            .keys()
            .map(|(id, _)| *id)
            .filter(|id| !live.contains(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        gone.sort_unstable();
        for id in gone {
            self.write_rules(id, &SourceRules::default(), w);
        }
    }

    /// After the first plan that follows an adoption: whatever the earlier
    /// daemon left that the services asked for do not have is removed.
    fn forget_unadopted(&mut self, a: Adoption, w: &mut Vec<Write>) {
        let mut services: Vec<(ServiceKey, Service)> = a.services.into_iter().collect();
        services.sort_unstable_by_key(|(_, s)| s.id);
        for (key, svc) in services {
            tracing::info!(
                ?key,
                "removing a service the earlier daemon had and this config does not"
            );
            w.push(Write::RemoveService { key });
            self.service_ids.give_back(svc.id);
            if svc.flags & SERVICE_F_MAGLEV != 0 {
                self.maglev_ids
                    .give_back(svc.ring_base / (2 * maglev::MAX_TABLE_SIZE));
            }
        }
        for (bid, b) in a.backends {
            self.retired.insert(bid, None);
            self.backend_ids.give_back(bid);
            let value = Backend {
                generation: b.generation,
                ..Backend::default()
            };
            w.push(Write::Backend { id: bid, value });
        }
    }

    /// Makes VIPS hold exactly the services' addresses.
    fn sync_vips(&mut self, services: &[ServiceSpec], w: &mut Vec<Write>) {
        let want: HashSet<[u8; 4]> = services.iter().map(|s| s.vip.octets()).collect();
        let mut added: Vec<[u8; 4]> = want.difference(&self.vips).copied().collect();
        let mut removed: Vec<[u8; 4]> = self.vips.difference(&want).copied().collect();
        added.sort_unstable();
        removed.sort_unstable();
        for vip in added {
            w.push(Write::Vip { vip, present: true });
        }
        for vip in removed {
            w.push(Write::Vip {
                vip,
                present: false,
            });
        }
        self.vips = want;
    }

    /// Keeps BACKEND_VIPS equal to the backends that serve exactly one VIP
    /// (empty unless stateless replies are on).
    fn sync_backend_vips(&mut self, services: &[ServiceSpec], w: &mut Vec<Write>) {
        let mut seen: HashMap<BackendKey, Vec<ReverseFlow>> = HashMap::new();
        if self.stateless_replies {
            for s in services {
                if !self.services.contains_key(&s.name) {
                    continue;
                }
                for b in &s.backends {
                    let Some(&bid) = self.backends.get(&(s.name.clone(), b.name.clone())) else {
                        continue;
                    };
                    let key = BackendKey {
                        addr: b.address.octets(),
                        port: b.port.to_be_bytes(),
                        proto: s.protocol.number(),
                        _pad: 0,
                    };
                    seen.entry(key).or_default().push(ReverseFlow {
                        vip: s.vip.octets(),
                        vport: s.port.to_be_bytes(),
                        _pad: [0; 2],
                        backend: bid,
                        generation: self.generations[bid as usize],
                        hop: NextHop::default(),
                    });
                }
            }
        }
        let want: HashMap<BackendKey, ReverseFlow> = seen
            .into_iter()
            .filter(|(_, v)| v.len() == 1)
            .map(|(k, v)| (k, v[0]))
            .collect();
        let have = std::mem::take(&mut self.backend_vips);
        let mut changed: Vec<(BackendKey, Option<ReverseFlow>)> = want
            .iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .map(|(k, v)| (*k, Some(*v)))
            .chain(
                have.keys()
                    .filter(|k| !want.contains_key(k))
                    .map(|k| (*k, None)),
            )
            .collect();
        changed.sort_unstable_by_key(|(k, v)| (v.is_none(), k.addr, k.port, k.proto));
        for (key, value) in changed {
            w.push(Write::BackendVip { key, value });
        }
        self.backend_vips = want;
    }

    /// The prefilter's words that differ: the bits of every VIP and every
    /// backend address of `services`, plus (`keep`) those set now.
    fn sync_prefilter(&mut self, services: &[ServiceSpec], keep: bool, w: &mut Vec<Write>) {
        let mut want = vec![0u32; 2 * PREFILTER_WORDS as usize];
        if keep {
            want.copy_from_slice(&self.prefilter);
        }
        let vips = services
            .iter()
            .map(|s| s.vip)
            // VIPs the firewall guards (closed ports) pass it too.
            .chain(self.vips.iter().map(|v| Ipv4Addr::from(*v)));
        let backends = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.address));
        for (half, addr) in vips
            .map(|a| (PREFILTER_VIPS, a))
            .chain(backends.map(|a| (PREFILTER_BACKENDS, a)))
        {
            let (word, bit) = prefilter_bit(addr.octets());
            want[(half + word) as usize] |= bit;
        }
        for (i, &bits) in want.iter().enumerate() {
            if bits != self.prefilter[i] {
                w.push(Write::Prefilter {
                    word: i as u32,
                    bits,
                });
            }
        }
        self.prefilter = want;
    }
}

/// A reply entry found in the maps, not yet matched to a backend: any
/// wanted value differs from it.
const UNKNOWN_REPLY: ReverseFlow = ReverseFlow {
    vip: [0; 4],
    vport: [0; 2],
    _pad: [0; 2],
    backend: u32::MAX,
    generation: u32::MAX,
    hop: NextHop {
        generation: 0,
        ifindex: 0,
        mtu: 0,
        smac: [0; 6],
        dmac: [0; 6],
    },
};

fn service_key(s: &ServiceSpec) -> ServiceKey {
    ServiceKey {
        vip: s.vip.octets(),
        port: s.port.to_be_bytes(),
        proto: s.protocol.number(),
        _pad: 0,
    }
}

fn backend_flags(b: &BackendSpec) -> u32 {
    let mut f = BACKEND_F_PRESENT;
    if b.drop_flows {
        f |= BACKEND_F_DROP_FLOWS;
    }
    if b.reset_flows {
        f |= BACKEND_F_RESET_FLOWS;
    }
    if b.ring_weight == 0 {
        f |= BACKEND_F_NO_NEW_FLOWS;
    }
    f
}

/// `d` in ticks of a `hz` clock.
pub fn ticks(d: Duration, hz: u64) -> u64 {
    (d.as_nanos() * hz as u128 / 1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    //! The planner's writes, exactly and in order, for each kind of change
    //! the reconciler makes. No kernel: the planner touches no map.

    use super::*;
    use crate::config::Protocol;
    use lb_common::IPPROTO_TCP;
    use Write as W;

    const HZ: u64 = 250;
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    fn backend(name: &str, last: u8, weight: u32) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            address: Ipv4Addr::new(10, 0, 1, last),
            port: 8080,
            ring_weight: weight,
            drop_flows: false,
            reset_flows: false,
        }
    }

    fn web(backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            vip: VIP,
            port: 80,
            protocol: Protocol::Tcp,
            maglev: None,
            reset_if_empty: false,
            rules: SourceRules::default(),
            backends,
            udp_idle: None,
        }
    }

    fn key() -> ServiceKey {
        ServiceKey {
            vip: VIP.octets(),
            port: 80u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: 0,
        }
    }

    fn present(last: u8, flags: u32, generation: u32) -> Backend {
        Backend {
            addr: [10, 0, 1, last],
            port: 8080u16.to_be_bytes(),
            _pad: [0; 2],
            flags: BACKEND_F_PRESENT | flags,
            service: 0,
            generation,
        }
    }

    fn cleared(generation: u32) -> Backend {
        Backend {
            generation,
            ..Backend::default()
        }
    }

    fn service(ring_base: u32, ring_len: u32, flags: u32, hash_seed: u32) -> Service {
        Service {
            id: 0,
            ring_base,
            ring_len,
            flags,
            hash_seed,
            idle_ticks: 0,
        }
    }

    /// The switch to a ring or table: by id, then by address.
    fn switch(value: Service) -> [Write; 2] {
        [
            W::ServiceById { id: 0, value },
            W::Service { key: key(), value },
        ]
    }

    fn ring(base: u32, backends: &[u32]) -> Vec<Write> {
        backends
            .iter()
            .enumerate()
            .map(|(i, &b)| W::Ring {
                index: base + i as u32,
                backend: b,
            })
            .collect()
    }

    /// The prefilter word that carries `addr` in the half starting at `half`.
    fn prefilter(half: u32, addrs: &[Ipv4Addr]) -> Vec<Write> {
        let mut words: BTreeMap<u32, u32> = BTreeMap::new();
        for a in addrs {
            let (word, bit) = prefilter_bit(a.octets());
            *words.entry(half + word).or_default() |= bit;
        }
        words
            .into_iter()
            .map(|(word, bits)| W::Prefilter { word, bits })
            .collect()
    }

    fn planner() -> Planner {
        Planner::new(Found::default(), HZ)
    }

    /// A planner that has written `web` with backends a and b.
    fn with_a_and_b() -> Planner {
        let mut p = planner();
        p.plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        p
    }

    #[test]
    fn a_new_service_is_written_backends_first_and_switched_in_last() {
        let mut p = planner();
        let writes = p
            .plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        let a = Ipv4Addr::new(10, 0, 1, 1);
        let b = Ipv4Addr::new(10, 0, 1, 2);
        let mut want = prefilter(PREFILTER_VIPS, &[VIP]);
        want.extend(prefilter(PREFILTER_BACKENDS, &[a, b]));
        want.extend([
            W::NewService { id: 0 },
            W::NewBackend { id: 0 },
            W::Backend {
                id: 0,
                value: present(1, 0, 1),
            },
            W::NewBackend { id: 1 },
            W::Backend {
                id: 1,
                value: present(2, 0, 1),
            },
        ]);
        want.extend(ring(0, &[0, 1]));
        want.extend(switch(service(0, 2, 0, 0)));
        want.push(W::Vip {
            vip: VIP.octets(),
            present: true,
        });
        assert_eq!(writes, want);
        // The same services again: nothing to write.
        assert_eq!(
            p.plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])]),
            Ok(vec![])
        );
    }

    #[test]
    fn draining_a_backend_rewrites_the_idle_half_without_it_then_switches() {
        let mut p = with_a_and_b();
        let writes = p
            .plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 0)])])
            .unwrap();
        let mut want = vec![W::Backend {
            id: 1,
            value: present(2, BACKEND_F_NO_NEW_FLOWS, 1),
        }];
        want.extend(ring(RING_SIZE, &[0]));
        want.extend(switch(service(RING_SIZE, 1, 0, 0)));
        assert_eq!(writes, want);
        // Undrained: back to the first half, both backends in it.
        let writes = p
            .plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        let mut want = vec![W::Backend {
            id: 1,
            value: present(2, 0, 1),
        }];
        want.extend(ring(0, &[0, 1]));
        want.extend(switch(service(0, 2, 0, 0)));
        assert_eq!(writes, want);
    }

    #[test]
    fn reweighting_writes_only_the_ring_and_the_switch() {
        let mut p = with_a_and_b();
        let writes = p
            .plan(&[web(vec![backend("a", 1, 3), backend("b", 2, 1)])])
            .unwrap();
        let mut slots = vec![0u32; RING_SIZE as usize];
        let len = ring::fill_ring(&[3, 1], &mut slots).unwrap();
        assert_eq!(len, 4);
        assert_eq!(slots[..len].iter().filter(|&&s| s == 0).count(), 3);
        let mut want = ring(RING_SIZE, &slots[..len]);
        want.extend(switch(service(RING_SIZE, 4, 0, 0)));
        assert_eq!(writes, want);
    }

    #[test]
    fn an_added_backend_passes_the_prefilter_and_is_written_before_the_ring_names_it() {
        let mut p = with_a_and_b();
        let c = Ipv4Addr::new(10, 0, 1, 3);
        let writes = p
            .plan(&[web(vec![
                backend("a", 1, 1),
                backend("b", 2, 1),
                backend("c", 3, 1),
            ])])
            .unwrap();
        let (word, bit) = prefilter_bit(c.octets());
        let had = p.prefilter[(PREFILTER_BACKENDS + word) as usize] & !bit;
        let mut want = vec![
            W::Prefilter {
                word: PREFILTER_BACKENDS + word,
                bits: had | bit,
            },
            W::NewBackend { id: 2 },
            W::Backend {
                id: 2,
                value: present(3, 0, 1),
            },
        ];
        want.extend(ring(RING_SIZE, &[0, 1, 2]));
        want.extend(switch(service(RING_SIZE, 3, 0, 0)));
        assert_eq!(writes, want);
    }

    #[test]
    fn a_removed_backend_is_cleared_after_the_switch_and_its_slot_reused_later() {
        let mut p = with_a_and_b();
        let writes = p.plan(&[web(vec![backend("a", 1, 1)])]).unwrap();
        let b = Ipv4Addr::new(10, 0, 1, 2);
        let mut want = ring(RING_SIZE, &[0]);
        want.extend(switch(service(RING_SIZE, 1, 0, 0)));
        // After the switch: nothing new picks it. Its generation stays.
        want.push(W::Backend {
            id: 1,
            value: cleared(1),
        });
        // Its address stops passing the prefilter last.
        let (word, _) = prefilter_bit(b.octets());
        let (a_word, a_bit) = prefilter_bit(Ipv4Addr::new(10, 0, 1, 1).octets());
        want.push(W::Prefilter {
            word: PREFILTER_BACKENDS + word,
            // a's bit stays if it shares the word.
            bits: if a_word == word { a_bit } else { 0 },
        });
        assert_eq!(writes, want);

        // A new backend takes the freed slot: what the old one counted is
        // folded into the service, the slot's counts start again, and its
        // generation moves on (the old backend's flows never match it).
        let writes = p
            .plan(&[web(vec![backend("a", 1, 1), backend("d", 4, 1)])])
            .unwrap();
        let fresh: Vec<&Write> = writes
            .iter()
            .filter(|w| !matches!(w, W::Prefilter { .. }))
            .collect();
        let mut want = vec![
            W::FoldTraffic {
                backend: 1,
                into: Some(0),
            },
            W::NewBackend { id: 1 },
            W::Backend {
                id: 1,
                value: present(4, 0, 2),
            },
        ];
        want.extend(ring(0, &[0, 1]));
        want.extend(switch(service(0, 2, 0, 0)));
        assert_eq!(fresh, want.iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_backend_moved_to_another_address_is_a_new_backend_in_a_slot_of_its_own() {
        let mut p = with_a_and_b();
        let mut moved = backend("b", 9, 1);
        moved.port = 9090;
        let writes = p.plan(&[web(vec![backend("a", 1, 1), moved])]).unwrap();
        let fresh: Vec<&Write> = writes
            .iter()
            .filter(|w| !matches!(w, W::Prefilter { .. }))
            .collect();
        let mut value = present(9, 0, 1);
        value.port = 9090u16.to_be_bytes();
        // A new slot for the new server: the live ring keeps naming the old
        // one, intact, until the switch; the old slot is cleared after it.
        let mut want = vec![W::NewBackend { id: 2 }, W::Backend { id: 2, value }];
        want.extend(ring(RING_SIZE, &[0, 2]));
        want.extend(switch(service(RING_SIZE, 2, 0, 0)));
        want.push(W::Backend {
            id: 1,
            value: cleared(1),
        });
        assert_eq!(fresh, want.iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_maglev_change_writes_only_the_entries_that_differ_in_the_idle_half() {
        const M: u32 = 13;
        const SEED: u32 = 7;
        let maglev_web = |backends| ServiceSpec {
            maglev: Some((M, SEED)),
            ..web(backends)
        };
        let table = |names: &[(&[u8], u32)], ids: &[u32]| -> Vec<u32> {
            let mut t = vec![0u32; M as usize];
            assert!(maglev::fill_table(names, SEED, &mut t));
            t.iter().map(|&i| ids[i as usize]).collect()
        };
        let two = table(&[(b"a", 1), (b"b", 1)], &[0, 1]);
        let one = table(&[(b"a", 1), (b"b", 0)], &[0, 1]);
        let half1 = maglev::MAX_TABLE_SIZE;
        let entries = |base: u32, t: &[u32], only_differing_from: Option<&[u32]>| -> Vec<Write> {
            t.iter()
                .enumerate()
                .filter(|(i, b)| only_differing_from.is_none_or(|o| o[*i] != **b))
                .map(|(i, &b)| W::Maglev {
                    index: base + i as u32,
                    backend: b,
                })
                .collect()
        };

        let mut p = planner();
        let writes = p
            .plan(&[maglev_web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        let tail: Vec<Write> = writes
            .iter()
            .skip_while(|w| !matches!(w, W::Maglev { .. }))
            .cloned()
            .collect();
        let mut want = entries(0, &two, None);
        want.extend(switch(service(0, M, SERVICE_F_MAGLEV, SEED)));
        want.push(W::Vip {
            vip: VIP.octets(),
            present: true,
        });
        assert_eq!(tail, want);

        // b drained: the other half was never written, so all of it is.
        let writes = p
            .plan(&[maglev_web(vec![backend("a", 1, 1), backend("b", 2, 0)])])
            .unwrap();
        let mut want = vec![W::Backend {
            id: 1,
            value: present(2, BACKEND_F_NO_NEW_FLOWS, 1),
        }];
        want.extend(entries(half1, &one, None));
        want.extend(switch(service(half1, M, SERVICE_F_MAGLEV, SEED)));
        assert_eq!(writes, want);

        // Undrained: the first half still holds `two`; nothing differs.
        let writes = p
            .plan(&[maglev_web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        let mut want = vec![W::Backend {
            id: 1,
            value: present(2, 0, 1),
        }];
        want.extend(switch(service(0, M, SERVICE_F_MAGLEV, SEED)));
        assert_eq!(writes, want);

        // Drained again: only what differs from `one` in the second half
        // (nothing), then the switch.
        let writes = p
            .plan(&[maglev_web(vec![backend("a", 1, 1), backend("b", 2, 0)])])
            .unwrap();
        let mut want = vec![W::Backend {
            id: 1,
            value: present(2, BACKEND_F_NO_NEW_FLOWS, 1),
        }];
        want.extend(entries(half1, &one, Some(&one)));
        want.extend(switch(service(half1, M, SERVICE_F_MAGLEV, SEED)));
        assert_eq!(writes, want);
    }

    #[test]
    fn a_removed_service_goes_before_its_backends_and_its_addresses_last() {
        let mut p = with_a_and_b();
        let writes = p.plan(&[]).unwrap();
        let mut want = vec![
            W::RemoveService { key: key() },
            W::Backend {
                id: 0,
                value: cleared(1),
            },
            W::Backend {
                id: 1,
                value: cleared(1),
            },
            W::Vip {
                vip: VIP.octets(),
                present: false,
            },
        ];
        let mut cleared_words: Vec<Write> = prefilter(PREFILTER_VIPS, &[VIP])
            .into_iter()
            .chain(prefilter(
                PREFILTER_BACKENDS,
                &[Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 0, 1, 2)],
            ))
            .map(|w| match w {
                W::Prefilter { word, .. } => W::Prefilter { word, bits: 0 },
                w => w,
            })
            .collect();
        want.append(&mut cleared_words);
        // Backends of a removed service are cleared in no particular order.
        let sorted = |mut w: Vec<Write>| {
            w[1..3].sort_by_key(|w| match w {
                W::Backend { id, .. } => *id,
                _ => u32::MAX,
            });
            w
        };
        assert_eq!(sorted(writes), want);
        // Its id is free again: the next service takes it, counters reset.
        let writes = p.plan(&[web(vec![backend("a", 1, 1)])]).unwrap();
        assert!(writes.contains(&W::NewService { id: 0 }));
    }

    #[test]
    fn an_earlier_daemons_service_is_adopted_into_its_idle_half_and_the_rest_removed() {
        let mut p = with_a_and_b();
        let writes = p.plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])]);
        assert_eq!(writes, Ok(vec![]));
        // What those writes left in the maps, as a new daemon finds them.
        let mut found = Found::default();
        found.services.insert(key(), service(0, 2, 0, 0));
        found.backends = vec![present(1, 0, 1), present(2, 0, 1), present(7, 0, 3)];
        found.backends[2].service = 5;
        let mut p = Planner::new(found, HZ);
        let writes = p
            .plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        let body: Vec<&Write> = writes
            .iter()
            .filter(|w| !matches!(w, W::Prefilter { .. } | W::Vip { .. }))
            .collect();
        // Same ids, same generations (their flows keep going); the half the
        // earlier daemon was not reading gets the ring; its third backend,
        // which no service asks for, is cleared.
        let mut want = vec![
            W::Backend {
                id: 0,
                value: present(1, 0, 1),
            },
            W::Backend {
                id: 1,
                value: present(2, 0, 1),
            },
        ];
        want.extend(ring(RING_SIZE, &[0, 1]));
        want.extend(switch(service(RING_SIZE, 2, 0, 0)));
        want.push(W::Backend {
            id: 2,
            value: cleared(3),
        });
        assert_eq!(body, want.iter().collect::<Vec<_>>());
        // A new backend never gets an id an adopted one holds.
        let writes = p
            .plan(&[web(vec![
                backend("a", 1, 1),
                backend("b", 2, 1),
                backend("c", 3, 1),
            ])])
            .unwrap();
        assert!(writes.contains(&W::NewBackend { id: 2 }), "{writes:?}");
    }

    #[test]
    fn a_udp_services_idle_timeout_is_written_in_ticks() {
        let mut p = planner();
        let mut s = web(vec![backend("a", 1, 1)]);
        s.protocol = Protocol::Udp;
        s.udp_idle = Some(Duration::from_secs(60));
        let writes = p.plan(&[s]).unwrap();
        let idle: Vec<u32> = writes
            .iter()
            .filter_map(|w| match w {
                W::Service { value, .. } => Some(value.idle_ticks),
                _ => None,
            })
            .collect();
        assert_eq!(idle, vec![60 * HZ as u32]);
    }

    const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);

    /// A second service, on its own VIP and port.
    fn api(backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            name: "api".into(),
            vip: API_VIP,
            port: 443,
            ..web(backends)
        }
    }

    fn api_key() -> ServiceKey {
        ServiceKey {
            vip: API_VIP.octets(),
            port: 443u16.to_be_bytes(),
            ..key()
        }
    }

    /// The writes `keep` picks, in order.
    fn only(writes: &[Write], keep: impl Fn(&Write) -> bool) -> Vec<Write> {
        writes.iter().filter(|w| keep(w)).cloned().collect()
    }

    /// The service entry (by address) the writes switch `key` to.
    fn switched(writes: &[Write], to: ServiceKey) -> Vec<Service> {
        writes
            .iter()
            .filter_map(|w| match w {
                W::Service { key, value } if *key == to => Some(*value),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ids_are_handed_out_up_to_the_limit_taken_back_and_claimed() {
        let mut ids = Ids::default();
        assert_eq!(
            [ids.take(2), ids.take(2), ids.take(2)],
            [Some(0), Some(1), None]
        );
        ids.give_back(0);
        assert_eq!([ids.take(2), ids.take(2)], [Some(0), None]);

        // Adopting id 3 frees the ids below it that nothing holds yet.
        let mut ids = Ids::default();
        ids.claim(3);
        assert_eq!((ids.next, &ids.free[..]), (4, &[0, 1, 2][..]));
        // Adopting a free id takes it out of the free list...
        ids.claim(1);
        assert_eq!((ids.next, &ids.free[..]), (4, &[0, 2][..]));
        // ...and one already held changes nothing.
        ids.claim(3);
        assert_eq!((ids.next, &ids.free[..]), (4, &[0, 2][..]));
        assert_eq!(
            [ids.take(5), ids.take(5), ids.take(5), ids.take(5)],
            [Some(2), Some(0), Some(4), None]
        );
    }

    #[test]
    fn the_planner_reports_the_ids_and_generations_it_handed_out() {
        let mut p = planner();
        let services = [
            web(vec![backend("a", 1, 1), backend("b", 2, 1)]),
            api(vec![backend("c", 3, 1)]),
        ];
        p.plan(&services).unwrap();
        assert_eq!(
            (p.service_id("web"), p.service_id("api"), p.service_id("db")),
            (Some(0), Some(1), None)
        );
        assert_eq!(
            [
                p.backend_id("web", "a"),
                p.backend_id("web", "b"),
                p.backend_id("api", "c"),
                p.backend_id("api", "a"),
            ],
            [Some(0), Some(1), Some(2), None]
        );
        let mut ids: Vec<(String, String, u32)> = p
            .backend_ids()
            .map(|((s, b), id)| (s.clone(), b.clone(), id))
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            [
                ("api".into(), "c".into(), 2),
                ("web".into(), "a".into(), 0),
                ("web".into(), "b".into(), 1),
            ]
        );
        let live: Vec<(u32, &str)> = p
            .live_services()
            .map(|(id, s)| (id, s.name.as_str()))
            .collect();
        assert_eq!(live, [(1, "api"), (0, "web")]);
        let live: Vec<(u32, &str)> = p
            .live_backends()
            .map(|(id, b)| (id, b.name.as_str()))
            .collect();
        assert_eq!(live, [(2, "c"), (0, "a"), (1, "b")]);
        assert_eq!(p.retired().count(), 0);

        // b leaves: its slot is retired (its traffic still counts for web)
        // and keeps its generation; the next backend there is the second.
        p.plan(&[web(vec![backend("a", 1, 1)]), services[1].clone()])
            .unwrap();
        assert_eq!(p.retired().collect::<Vec<_>>(), [(1, Some(0))]);
        assert_eq!((p.generation(1), p.generation(3)), (1, 0));
        p.plan(&[
            web(vec![backend("a", 1, 1), backend("d", 4, 1)]),
            services[1].clone(),
        ])
        .unwrap();
        assert_eq!(p.retired().count(), 0);
        assert_eq!((p.backend_id("web", "d"), p.generation(1)), (Some(1), 2));
    }

    #[test]
    fn a_second_service_writes_its_own_ring_halves() {
        let mut p = planner();
        let w = p
            .plan(&[
                web(vec![backend("a", 1, 1)]),
                api(vec![backend("b", 2, 1), backend("c", 3, 1)]),
            ])
            .unwrap();
        // Service 1's halves start at 2 * RING_SIZE.
        let rings = |w: &[Write]| only(w, |w| matches!(w, W::Ring { .. }));
        let mut want = ring(0, &[0]);
        want.extend(ring(2 * RING_SIZE, &[1, 2]));
        assert_eq!(rings(&w), want);
        let api_service = |ring_base, ring_len| Service {
            id: 1,
            ..service(ring_base, ring_len, 0, 0)
        };
        assert_eq!(switched(&w, api_key()), [api_service(2 * RING_SIZE, 2)]);
        // Re-weighted: its other half.
        let w = p
            .plan(&[
                web(vec![backend("a", 1, 1)]),
                api(vec![backend("b", 2, 1), backend("c", 3, 0)]),
            ])
            .unwrap();
        assert_eq!(rings(&w), ring(3 * RING_SIZE, &[1]));
        assert_eq!(switched(&w, api_key()), [api_service(3 * RING_SIZE, 1)]);
    }

    #[test]
    fn a_second_maglev_service_writes_its_own_tables() {
        let maglev = |s: ServiceSpec| ServiceSpec {
            maglev: Some((13, 7)),
            ..s
        };
        let mut p = planner();
        let w = p
            .plan(&[
                maglev(web(vec![backend("a", 1, 1)])),
                maglev(api(vec![backend("b", 2, 1)])),
            ])
            .unwrap();
        let m = maglev::MAX_TABLE_SIZE;
        let entries = |w: &[Write]| -> Vec<u32> {
            w.iter()
                .filter_map(|w| match w {
                    W::Maglev { index, .. } => Some(*index),
                    _ => None,
                })
                .collect()
        };
        // Maglev slot 1's halves start at 2 * MAX_TABLE_SIZE.
        let want: Vec<u32> = (0..13).chain(2 * m..2 * m + 13).collect();
        assert_eq!(entries(&w), want);
        let api_service = |ring_base| Service {
            id: 1,
            ..service(ring_base, 13, SERVICE_F_MAGLEV, 7)
        };
        assert_eq!(switched(&w, api_key()), [api_service(2 * m)]);
        let w = p
            .plan(&[
                maglev(web(vec![backend("a", 1, 1)])),
                maglev(api(vec![backend("b", 2, 1), backend("c", 3, 1)])),
            ])
            .unwrap();
        assert_eq!(entries(&w), (3 * m..3 * m + 13).collect::<Vec<u32>>());
        assert_eq!(switched(&w, api_key()), [api_service(3 * m)]);
    }

    /// The earlier daemon read half 1: the ring goes to half 0. Its backends
    /// are matched by service, address and port: one at another port or
    /// another address is not adopted but cleared, and a new slot is taken.
    #[test]
    fn adoption_matches_backends_by_service_address_and_port() {
        let mut found = Found::default();
        found.services.insert(key(), service(RING_SIZE, 2, 0, 0));
        let mut other_port = present(2, 0, 1);
        other_port.port = 9999u16.to_be_bytes();
        found.backends = vec![present(1, 0, 1), other_port, present(9, 0, 1)];
        let mut p = Planner::new(found, HZ);
        let writes = p
            .plan(&[web(vec![backend("a", 1, 1), backend("b", 2, 1)])])
            .unwrap();
        let body = only(&writes, |w| {
            !matches!(w, W::Prefilter { .. } | W::Vip { .. })
        });
        let mut want = vec![
            W::Backend {
                id: 0,
                value: present(1, 0, 1),
            },
            W::NewBackend { id: 3 },
            W::Backend {
                id: 3,
                value: present(2, 0, 1),
            },
        ];
        want.extend(ring(0, &[0, 3]));
        want.extend(switch(service(0, 2, 0, 0)));
        want.extend([
            W::Backend {
                id: 1,
                value: cleared(1),
            },
            W::Backend {
                id: 2,
                value: cleared(1),
            },
        ]);
        assert_eq!(body, want);
    }

    /// An adopted Maglev service keeps its Maglev slot (1 here) and gets
    /// the half it was not reading, written in full (what it holds is
    /// unknown), whichever half that is.
    #[test]
    fn an_adopted_maglev_service_keeps_its_slot_and_takes_the_other_half() {
        let m = maglev::MAX_TABLE_SIZE;
        for (was, becomes) in [(0, 1), (1, 0)] {
            let mut found = Found::default();
            found
                .services
                .insert(key(), service((2 + was) * m, 13, SERVICE_F_MAGLEV, 7));
            found.backends = vec![present(1, 0, 1)];
            let mut p = Planner::new(found, HZ);
            let spec = ServiceSpec {
                maglev: Some((13, 7)),
                ..web(vec![backend("a", 1, 1)])
            };
            let writes = p.plan(&[spec]).unwrap();
            let base = (2 + becomes) * m;
            let want: Vec<Write> = (0..13)
                .map(|i| W::Maglev {
                    index: base + i,
                    backend: 0,
                })
                .collect();
            assert_eq!(
                only(&writes, |w| matches!(w, W::Maglev { .. })),
                want,
                "from half {was}"
            );
            assert_eq!(
                switched(&writes, key()),
                [service(base, 13, SERVICE_F_MAGLEV, 7)],
                "from half {was}"
            );
        }
    }

    /// Earlier daemons' services that the config no longer has are removed;
    /// a Maglev one gives its Maglev slot (1 here) back, a round-robin one
    /// has none to give.
    #[test]
    fn unadopted_services_are_removed_and_a_maglev_slot_given_back() {
        let m = maglev::MAX_TABLE_SIZE;
        let db_key = ServiceKey {
            vip: [10, 0, 0, 102],
            ..key()
        };
        let mut found = Found::default();
        found
            .services
            .insert(api_key(), service(3 * m, 13, SERVICE_F_MAGLEV, 7));
        found.services.insert(
            db_key,
            Service {
                id: 1,
                ..service(2 * RING_SIZE, 1, 0, 0)
            },
        );
        let mut p = Planner::new(found, HZ);
        let writes = p.plan(&[]).unwrap();
        assert_eq!(
            only(&writes, |w| matches!(w, W::RemoveService { .. })),
            [
                W::RemoveService { key: api_key() },
                W::RemoveService { key: db_key },
            ]
        );
        let maglev = |s: ServiceSpec| ServiceSpec {
            maglev: Some((13, 7)),
            ..s
        };
        let writes = p
            .plan(&[
                maglev(web(vec![backend("a", 1, 1)])),
                maglev(api(vec![backend("b", 2, 1)])),
            ])
            .unwrap();
        // Maglev slots 0 (never used) and 1 (given back) are free, as are
        // service ids 0 and 1 (both given back): the last given back is
        // taken first.
        assert_eq!(
            switched(&writes, key()),
            [Service {
                id: 1,
                ..service(2 * m, 13, SERVICE_F_MAGLEV, 7)
            }]
        );
        assert_eq!(
            switched(&writes, api_key()),
            [service(0, 13, SERVICE_F_MAGLEV, 7)]
        );
    }

    #[test]
    fn a_services_flags_and_source_rules_are_written_before_its_switch() {
        let cidr = |text| Cidr::parse(text).unwrap();
        let (allow, deny) = (
            lb_common::firewall::RULE_ALLOW,
            lb_common::firewall::RULE_DENY,
        );
        let rule = |cidr, verdict| W::Rule {
            service: 0,
            cidr,
            verdict,
        };
        let rules_and_switch =
            |w: &[Write]| only(w, |w| matches!(w, W::Rule { .. } | W::Service { .. }));
        let mut p = planner();
        let mut spec = ServiceSpec {
            maglev: Some((13, 7)),
            reset_if_empty: true,
            ..web(vec![backend("a", 1, 1)])
        };
        spec.rules.allow = vec![cidr("10.1.0.0/16")];
        spec.rules.deny = vec![cidr("10.1.2.0/24")];
        let writes = p.plan(std::slice::from_ref(&spec)).unwrap();
        let value = service(
            0,
            13,
            SERVICE_F_MAGLEV | SERVICE_F_RESET_IF_EMPTY | SERVICE_F_FIREWALL | SERVICE_F_ALLOWLIST,
            7,
        );
        assert_eq!(
            rules_and_switch(&writes),
            [
                rule(cidr("10.1.0.0/16"), Some(allow)),
                rule(cidr("10.1.2.0/24"), Some(deny)),
                W::Service { key: key(), value },
            ]
        );

        // Deny rules only: no allowlist. The new rule is added before the
        // old one goes; the one kept is not written again.
        spec.rules.allow = vec![];
        spec.rules.deny = vec![cidr("10.9.0.0/16"), cidr("10.1.2.0/24")];
        let writes = p.plan(std::slice::from_ref(&spec)).unwrap();
        let value = Service {
            ring_base: maglev::MAX_TABLE_SIZE,
            flags: SERVICE_F_MAGLEV | SERVICE_F_RESET_IF_EMPTY | SERVICE_F_FIREWALL,
            ..value
        };
        assert_eq!(
            rules_and_switch(&writes),
            [
                rule(cidr("10.9.0.0/16"), Some(deny)),
                rule(cidr("10.1.0.0/16"), None),
                W::Service { key: key(), value },
            ]
        );

        // The service removed: its rules go with it.
        let writes = p.plan(&[]).unwrap();
        assert_eq!(
            rules_and_switch(&writes),
            [
                rule(cidr("10.1.2.0/24"), None),
                rule(cidr("10.9.0.0/16"), None),
            ]
        );
    }

    #[test]
    fn a_service_moved_to_another_port_is_switched_in_then_the_old_entry_removed() {
        let mut p = with_a_and_b();
        let mut moved = web(vec![backend("a", 1, 1), backend("b", 2, 1)]);
        moved.port = 8000;
        let new_key = ServiceKey {
            port: 8000u16.to_be_bytes(),
            ..key()
        };
        let writes = p.plan(&[moved]).unwrap();
        let value = service(RING_SIZE, 2, 0, 0);
        let mut want = ring(RING_SIZE, &[0, 1]);
        want.extend([
            W::ServiceById { id: 0, value },
            W::Service {
                key: new_key,
                value,
            },
            W::RemoveService { key: key() },
        ]);
        assert_eq!(writes, want);
    }

    #[test]
    fn a_backends_flow_policies_are_its_flags() {
        let mut p = planner();
        let mut down = backend("a", 1, 0);
        down.drop_flows = true;
        let mut demoted = backend("b", 2, 1);
        demoted.reset_flows = true;
        let writes = p.plan(&[web(vec![down, demoted])]).unwrap();
        assert_eq!(
            only(&writes, |w| matches!(w, W::Backend { .. })),
            [
                W::Backend {
                    id: 0,
                    value: present(1, BACKEND_F_DROP_FLOWS | BACKEND_F_NO_NEW_FLOWS, 1),
                },
                W::Backend {
                    id: 1,
                    value: present(2, BACKEND_F_RESET_FLOWS, 1),
                },
            ]
        );
    }

    /// With stateless replies on, each backend that serves exactly one VIP
    /// gets a reply entry; one shared by two services gets none. Turned
    /// off, the entries are removed.
    #[test]
    fn stateless_reply_entries_are_kept_for_backends_of_one_vip() {
        let mut p = planner();
        assert!(!p.stateless_replies());
        p.set_stateless_replies(true);
        assert!(p.stateless_replies());
        let services = [
            web(vec![backend("a", 1, 1), backend("b", 2, 1)]),
            api(vec![backend("b", 2, 1), backend("c", 3, 1)]),
        ];
        let backend_key = |last| BackendKey {
            addr: [10, 0, 1, last],
            port: 8080u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let reply = |vip: Ipv4Addr, vport: u16, backend, generation| ReverseFlow {
            vip: vip.octets(),
            vport: vport.to_be_bytes(),
            _pad: [0; 2],
            backend,
            generation,
            hop: NextHop::default(),
        };
        let replies = |w: &[Write]| only(w, |w| matches!(w, W::BackendVip { .. }));
        let writes = p.plan(&services).unwrap();
        assert_eq!(
            replies(&writes),
            [
                W::BackendVip {
                    key: backend_key(1),
                    value: Some(reply(VIP, 80, 0, 1)),
                },
                W::BackendVip {
                    key: backend_key(3),
                    value: Some(reply(API_VIP, 443, 3, 1)),
                },
            ]
        );
        assert_eq!(replies(&p.plan(&services).unwrap()), []);
        p.set_stateless_replies(false);
        assert_eq!(
            replies(&p.plan(&services).unwrap()),
            [
                W::BackendVip {
                    key: backend_key(1),
                    value: None,
                },
                W::BackendVip {
                    key: backend_key(3),
                    value: None,
                },
            ]
        );
    }

    /// A freed service id taken by a new service: the retired backends of
    /// the old one are no longer its, and their traffic is folded into
    /// the totals only.
    #[test]
    fn a_reused_service_id_does_not_inherit_retired_traffic() {
        let mut p = with_a_and_b();
        p.plan(&[]).unwrap();
        let mut retired: Vec<_> = p.retired().collect();
        retired.sort();
        assert_eq!(retired, [(0, Some(0)), (1, Some(0))]);
        let writes = p.plan(&[api(vec![backend("c", 3, 1)])]).unwrap();
        assert!(writes.contains(&W::NewService { id: 0 }), "{writes:?}");
        let folds = only(&writes, |w| matches!(w, W::FoldTraffic { .. }));
        assert!(
            matches!(folds[..], [W::FoldTraffic { into: None, .. }]),
            "{folds:?}"
        );
    }

    #[test]
    fn too_many_ring_slots_is_refused_with_the_service_named() {
        let mut p = planner();
        let err = p
            .plan(&[web(vec![
                backend("a", 1, RING_SIZE),
                backend("b", 2, RING_SIZE - 1),
            ])])
            .unwrap_err();
        assert_eq!(err.service, "web");
        assert!(err.problem.contains("ring slots"), "{}", err.problem);
    }
}
