//! A reference model of the data path: what the XDP and TC programs must do
//! with a frame, written in plain Rust over byte slices from the rules
//! (parse.rs, icmp.rs and the README) rather than from the program's pointer
//! code. The differential fuzz test runs both on the same frames and compares
//! the action, the frame left behind and the counters.
//!
//! The model knows nothing the daemon wrote into the maps. It starts from
//! the configuration the test applies (the `ServiceSpec`s, the firewall
//! settings, whether stateless replies are on) and the facts of the
//! `testrun` namespace (its routes, neighbours and MTU), and works out for
//! itself what the program should do: its own round-robin rings and Maglev
//! tables ([`ring`], [`maglev`]), its own flow hash, its own round-robin
//! positions (from 0, carried across every `apply`), its own checksums
//! ([`csum`]) and resets. Backends are known by their configuration, not by
//! the daemon's ids: a backend is one *incarnation* from the apply that added
//! it (or moved it to another address) to the apply that removed it, which is
//! what the daemon's slot generations are meant to express. Rate limits
//! depend on the clock, so the model requires them off (the kernel tests
//! cover them); closed flows linger longer than a run.

use std::{collections::HashMap, net::Ipv4Addr};

use lb_common::{counter, Traffic, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use lb_userspace::{
    config::{ClosedPorts, FirewallConfig},
    dataplane::ServiceSpec,
};

use crate::testrun::{
    B1, B1_MAC, B2, B2_MAC, CLIENT, CLIENT_MAC, X0_MAC, X1_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    XDP_TX,
};

/// What the program did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: u32,
    pub frame: Vec<u8>,
    /// The outcome counter bumped (`lb_common::counter`).
    pub outcome: u32,
}

/// A flow as seen on the wire in one direction (addresses and ports in
/// network byte order, as in the frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
}

/// A tracked client flow: its backend incarnation and service.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    backend: usize,
    service: usize,
    closing: bool,
    fin_client: bool,
    fin_backend: bool,
    /// The backend's side was reset (its flows are to be reset).
    backend_reset: bool,
}

/// A flow of the transient table: half-open, or closed (lingering; the
/// model's runs are shorter than the linger).
#[derive(Debug, Clone, Copy)]
struct Pending {
    half_open: bool,
    backend: usize,
    service: usize,
    vip: [u8; 4],
    vport: [u8; 2],
}

/// A next hop as the cache holds it: valid while `generation` is current.
#[derive(Debug, Clone, Copy, Default)]
struct Hop {
    generation: u32,
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// The VIP side of a reply: from a tracked flow's reverse entry (which
/// caches the client side's hop) or from a stateless reply entry.
#[derive(Debug, Clone, Copy)]
struct Rev {
    vip: [u8; 4],
    vport: [u8; 2],
    backend: usize,
    hop: Hop,
}

#[derive(Clone, Copy)]
enum Route {
    Via {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    Local,
    NoNeigh,
    TooBig,
}

/// The MTU of every link of the testrun namespace.
const MTU: usize = 1500;

/// A service as configured.
#[derive(Debug, Clone)]
struct Svc {
    name: String,
    live: bool,
    vip: [u8; 4],
    port: [u8; 2],
    proto: u8,
    /// Source rules: (network, prefix length, allow).
    rules: Vec<(u32, u32, bool)>,
    allowlist: bool,
    reset_if_empty: bool,
    /// The hash seed of a Maglev service.
    maglev: Option<u32>,
    /// The round-robin ring, or the Maglev table, of backend incarnations.
    slots: Vec<usize>,
}

/// One incarnation of a configured backend.
#[derive(Debug, Clone)]
struct Be {
    service: usize,
    name: String,
    live: bool,
    addr: [u8; 4],
    port: [u8; 2],
    drop_flows: bool,
    reset_flows: bool,
    /// Weight 0: it takes no new flows.
    no_new_flows: bool,
    /// The data path's slot for it (see `learn_slots`): once a later
    /// incarnation holds the same slot, this one's replies are nobody's
    /// traffic (counted in the replies total only).
    slot: Option<u32>,
}

/// The data path's flow tables, as the model keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Conntrack,
    Reverse,
    Transient,
}

pub struct Model {
    services: Vec<Svc>,
    backends: Vec<Be>,
    /// The client-to-backend and backend-to-client traffic of each incarnation.
    traffic: Vec<Traffic>,
    /// Round-robin positions by service, from 0, never reset by an apply.
    rr: HashMap<usize, u64>,
    firewall: FirewallConfig,
    stateless: bool,
    /// Stateless reply entries: (backend address, port, protocol) -> VIP side.
    backend_vips: HashMap<([u8; 4], [u8; 2], u8), Rev>,
    conntrack: HashMap<Key, Tracked>,
    /// Half-open and closed flows, by client side and by reply side.
    transient: HashMap<Key, Pending>,
    reverse: HashMap<Key, Rev>,
    /// The next-hop generation, and each backend incarnation's cached hop.
    hop_generation: u32,
    hops: HashMap<usize, Hop>,
    /// Per outcome counter: how many times the model bumped it.
    pub counts: Vec<u64>,
    x0: u32,
    x1: u32,
}

impl Model {
    /// A model with no services, for frames received on `x0` (client side)
    /// or `x1` (backend side) of the testrun net.
    pub fn new(x0: u32, x1: u32) -> Model {
        Model {
            services: Vec::new(),
            backends: Vec::new(),
            traffic: Vec::new(),
            rr: HashMap::new(),
            firewall: FirewallConfig {
                deny: Vec::new(),
                closed_ports: ClosedPorts::Pass,
                icmp_echo_reply: false,
                source_new_flows_per_sec: 0,
                source_new_flows_burst: 0,
                new_flows_per_sec: 0,
                new_flows_burst: 0,
            },
            stateless: false,
            backend_vips: HashMap::new(),
            conntrack: HashMap::new(),
            transient: HashMap::new(),
            reverse: HashMap::new(),
            hop_generation: 0,
            hops: HashMap::new(),
            counts: vec![0; counter::COUNT as usize],
            x0,
            x1,
        }
    }

    /// As `Dataplane::set_firewall`.
    pub fn set_firewall(&mut self, f: &FirewallConfig) {
        assert!(
            f.source_new_flows_per_sec == 0 && f.new_flows_per_sec == 0,
            "the model has no clock: rate limits must be off"
        );
        self.firewall = f.clone();
    }

    /// As `Dataplane::set_stateless_replies`: in force from the next apply.
    pub fn set_stateless_replies(&mut self, on: bool) {
        self.stateless = on;
    }

    /// As `Dataplane::apply`: the services become exactly `specs`. A backend
    /// keeps its incarnation (and so its flows) while its service keeps a
    /// backend of its name at its address and port; flags and weights
    /// change in place.
    pub fn apply(&mut self, specs: &[ServiceSpec]) {
        for s in &mut self.services {
            s.live = false;
        }
        for spec in specs {
            assert!(spec.udp_idle.is_none(), "the model has no clock");
            let sid = match self.services.iter().position(|s| s.name == spec.name) {
                Some(i) => i,
                None => {
                    self.services.push(Svc {
                        name: spec.name.clone(),
                        live: false,
                        vip: [0; 4],
                        port: [0; 2],
                        proto: 0,
                        rules: Vec::new(),
                        allowlist: false,
                        reset_if_empty: false,
                        maglev: None,
                        slots: Vec::new(),
                    });
                    self.services.len() - 1
                }
            };
            let mut incarnations = Vec::new();
            for b in &spec.backends {
                let (addr, port) = (b.address.octets(), b.port.to_be_bytes());
                let found = self.backends.iter().position(|x| {
                    x.live
                        && x.service == sid
                        && x.name == b.name
                        && (x.addr, x.port) == (addr, port)
                });
                let i = found.unwrap_or_else(|| {
                    self.backends.push(Be {
                        service: sid,
                        name: b.name.clone(),
                        live: true,
                        addr,
                        port,
                        drop_flows: false,
                        reset_flows: false,
                        no_new_flows: false,
                        slot: None,
                    });
                    self.traffic.push(Traffic::default());
                    self.backends.len() - 1
                });
                let be = &mut self.backends[i];
                be.drop_flows = b.drop_flows;
                be.reset_flows = b.reset_flows;
                be.no_new_flows = b.ring_weight == 0;
                incarnations.push(i);
            }
            // Backends that left (or moved): gone.
            for (i, be) in self.backends.iter_mut().enumerate() {
                if be.service == sid && !incarnations.contains(&i) {
                    be.live = false;
                }
            }
            let weights: Vec<u32> = spec.backends.iter().map(|b| b.ring_weight).collect();
            let slots: Vec<u32> = match spec.maglev {
                None => ring::fill(&weights),
                Some((m, seed)) => {
                    let names: Vec<&str> = spec.backends.iter().map(|b| b.name.as_str()).collect();
                    maglev::table(&names, &weights, seed, m).unwrap_or_default()
                }
            };
            let mut rules: Vec<(u32, u32, bool)> = Vec::new();
            for (c, allow) in spec
                .rules
                .allow
                .iter()
                .map(|c| (c, true))
                .chain(spec.rules.deny.iter().map(|c| (c, false)))
            {
                let net = (u32::from(c.addr), c.len as u32);
                // A network listed as both: denied.
                rules.retain(|r| (r.0, r.1) != net);
                rules.push((net.0, net.1, allow));
            }
            self.services[sid] = Svc {
                name: spec.name.clone(),
                live: true,
                vip: spec.vip.octets(),
                port: spec.port.to_be_bytes(),
                proto: spec.protocol.number(),
                allowlist: !spec.rules.allow.is_empty(),
                rules,
                reset_if_empty: spec.reset_if_empty,
                maglev: spec.maglev.map(|(_, seed)| seed),
                slots: slots.iter().map(|&i| incarnations[i as usize]).collect(),
            };
        }
        // Services no longer asked for, and their backends: gone.
        for be in &mut self.backends {
            if !self.services[be.service].live {
                be.live = false;
            }
        }
        // Stateless replies: each backend address that serves one VIP.
        let mut seen: HashMap<([u8; 4], [u8; 2], u8), Vec<Rev>> = HashMap::new();
        if self.stateless {
            for (i, be) in self.backends.iter().enumerate().filter(|(_, b)| b.live) {
                let s = &self.services[be.service];
                seen.entry((be.addr, be.port, s.proto))
                    .or_default()
                    .push(Rev {
                        vip: s.vip,
                        vport: s.port,
                        backend: i,
                        hop: Hop::default(),
                    });
            }
        }
        self.backend_vips = seen
            .into_iter()
            .filter(|(_, v)| v.len() == 1)
            .map(|(k, v)| (k, v[0]))
            .collect();
    }

    /// As `Dataplane::invalidate_hops`: every cached next hop is stale.
    pub fn invalidate_hops(&mut self) {
        self.hop_generation = match self.hop_generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
    }

    /// As `Dataplane::set_hops` with every backend's hop as the testrun net
    /// resolves it (none where it knows no neighbour), except those in
    /// `marked`, cached with the MAC given (one no FIB knows, so that a
    /// packet sent by the cache shows it); the others not cached at all
    /// when `only_marked`.
    pub fn cache_hops(&mut self, marked: &[(&str, &str, [u8; 6])], only_marked: bool) {
        if self.hop_generation == 0 {
            self.invalidate_hops();
        }
        let live: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].live)
            .collect();
        for i in live {
            let be = &self.backends[i];
            let svc = &self.services[be.service].name;
            let mark = marked
                .iter()
                .find(|(s, b, _)| s == svc && *b == be.name)
                .map(|m| m.2);
            let hop = match (self.neighbour(be.addr), mark) {
                (Some((ifindex, smac, dmac)), mark) if mark.is_some() || !only_marked => Hop {
                    generation: self.hop_generation,
                    ifindex,
                    smac,
                    dmac: mark.unwrap_or(dmac),
                },
                _ => Hop::default(),
            };
            self.hops.insert(i, hop);
        }
    }

    /// What `Dataplane::backend_traffic` should say: the traffic of the
    /// backend of that name the service has now.
    pub fn backend_traffic(&self, service: &str, backend: &str) -> Traffic {
        self.backends
            .iter()
            .position(|b| b.live && b.name == backend && self.services[b.service].name == service)
            .map_or_else(Traffic::default, |i| self.traffic[i])
    }

    /// What `Dataplane::service_traffic` should say: every backend the
    /// service ever had.
    pub fn service_traffic(&self, service: &str) -> Traffic {
        let mut t = Traffic::default();
        for (i, b) in self.backends.iter().enumerate() {
            if self.services[b.service].name == service {
                t.add(&self.traffic[i]);
            }
        }
        t
    }

    /// The (service, backend) names of every backend configured now.
    pub fn backend_names(&self) -> Vec<(String, String)> {
        self.backends
            .iter()
            .filter(|b| b.live)
            .map(|b| (self.services[b.service].name.clone(), b.name.clone()))
            .collect()
    }

    /// The kernel's outcome counters, summed over CPUs, as the daemon
    /// reports them (forwarded packets and replies derived from the
    /// per-backend traffic the data path counts them in).
    pub fn kernel_counts(dp: &lb_userspace::dataplane::Dataplane) -> Vec<u64> {
        let named = dp.counters().unwrap();
        (0..counter::COUNT as usize)
            .map(|i| counter::NAMES.get(i).map_or(0, |n| named[n]))
            .collect()
    }

    /// What the program must do with `frame` received on `ingress`.
    pub fn run(&mut self, frame: &[u8], ingress: u32) -> Verdict {
        let mut f = frame.to_vec();
        let (action, outcome) = self.decide(&mut f, ingress);
        self.counts[outcome as usize] += 1;
        Verdict {
            action,
            frame: f,
            outcome,
        }
    }

    /// The entries of its tables the model may read for `frame` (by the data
    /// path's key), for a run with a nearly full connection table: the
    /// kernel's LRU evicts entries the model cannot predict, so before each
    /// frame the caller asks the kernel which of these are gone and the
    /// model [`forget`](Model::forget)s them. Over-asking is harmless.
    pub fn entries_for(&self, f: &[u8]) -> Vec<(Table, lb_common::FlowKey)> {
        let mut keys = Vec::new();
        if f.len() < 34 || be16(f, 12) != 0x0800 {
            return Vec::new();
        }
        let l4 = 14 + ((f[14] & 0x0f) as usize) * 4;
        let proto = f[23];
        if l4 + 8 > f.len() {
            return Vec::new();
        }
        let key = |src, dst, sport: [u8; 2], dport: [u8; 2], proto| Key {
            src,
            dst,
            sport,
            dport,
            proto,
        };
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            keys.push(key(
                addr(f, 26),
                addr(f, 30),
                [f[l4], f[l4 + 1]],
                [f[l4 + 2], f[l4 + 3]],
                proto,
            ));
        } else if proto == IPPROTO_ICMP {
            // An error quoting a packet: its flow, either way round.
            let q = l4 + 8;
            if f.len() >= q + 28 && f[q] >> 4 == 4 {
                let ql4 = q + ((f[q] & 0x0f) as usize) * 4;
                if ql4 + 4 <= f.len() {
                    let (qsrc, qdst) = (addr(f, q + 12), addr(f, q + 16));
                    let (qs, qd) = ([f[ql4], f[ql4 + 1]], [f[ql4 + 2], f[ql4 + 3]]);
                    keys.push(key(qsrc, qdst, qs, qd, f[q + 9]));
                    keys.push(key(qdst, qsrc, qd, qs, f[q + 9]));
                }
            }
        }
        let mut out = Vec::new();
        for k in keys {
            // A reply's client flow, by whichever VIP side the model finds.
            let sides = [
                self.reverse.get(&k).map(|r| (r.vip, r.vport)),
                self.transient.get(&k).map(|t| (t.vip, t.vport)),
                self.backend_vips
                    .get(&(k.src, k.sport, k.proto))
                    .map(|r| (r.vip, r.vport)),
            ];
            for (vip, vport) in sides.into_iter().flatten() {
                let client = client_flow(&k, vip, vport);
                if self.conntrack.contains_key(&client) {
                    out.push((Table::Conntrack, client));
                }
            }
            if self.reverse.contains_key(&k) {
                out.push((Table::Reverse, k));
            }
            if self.conntrack.contains_key(&k) {
                out.push((Table::Conntrack, k));
            }
            if self.transient.contains_key(&k) {
                out.push((Table::Transient, k));
            }
        }
        out.into_iter()
            .map(|(t, k)| {
                (
                    t,
                    lb_common::FlowKey::new(k.src, k.dst, k.sport, k.dport, k.proto),
                )
            })
            .collect()
    }

    /// Forgets an entry the kernel's table no longer holds (see
    /// [`entries_for`](Model::entries_for)).
    pub fn forget(&mut self, table: Table, k: &lb_common::FlowKey) {
        let key = Key {
            src: k.src,
            dst: k.dst,
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
        };
        match table {
            Table::Conntrack => self.conntrack.remove(&key).map(|_| ()),
            Table::Reverse => self.reverse.remove(&key).map(|_| ()),
            Table::Transient => self.transient.remove(&key).map(|_| ()),
        };
    }

    fn decide(&mut self, f: &mut Vec<u8>, ingress: u32) -> (u32, u32) {
        // Ethernet.
        if f.len() < 14 || be16(f, 12) != 0x0800 {
            return (XDP_PASS, counter::PASS_NOT_IPV4);
        }
        // IPv4: a whole, valid header whose packet fits the frame.
        if f.len() < 34 {
            return (XDP_DROP, counter::DROP_MALFORMED);
        }
        let vihl = f[14];
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let tot_len = be16(f, 16) as usize;
        if vihl >> 4 != 4 || ihl < 20 || tot_len < ihl || 14 + tot_len > f.len() {
            return (XDP_DROP, counter::DROP_MALFORMED);
        }
        let src = addr(f, 26);
        let dst = addr(f, 30);
        let proto = f[23];
        let fragment = be16(f, 20) & 0x3fff != 0;
        let l4 = 14 + ihl;
        let other = |m: &Model, outcome: u32| {
            if m.denied(src) {
                (XDP_DROP, counter::DROP_DENIED_GLOBAL)
            } else if outcome == counter::PASS_OTHER_PROTO && m.closed(dst) {
                (XDP_DROP, counter::DROP_CLOSED_PORT)
            } else {
                (XDP_PASS, outcome)
            }
        };
        if fragment {
            return other(self, counter::PASS_FRAGMENT);
        }
        match proto {
            IPPROTO_TCP => {
                if f.len() < l4 + 20 || f[l4 + 12] >> 4 < 5 || tot_len < ihl + 20 {
                    return (XDP_DROP, counter::DROP_MALFORMED);
                }
            }
            IPPROTO_UDP | IPPROTO_ICMP => {
                if f.len() < l4 + 8 || tot_len < ihl + 8 {
                    return (XDP_DROP, counter::DROP_MALFORMED);
                }
            }
            _ => return other(self, counter::PASS_OTHER_PROTO),
        }
        if self.denied(src) {
            return (XDP_DROP, counter::DROP_DENIED_GLOBAL);
        }
        if proto == IPPROTO_ICMP {
            return self.icmp(f, ingress, l4, 14 + tot_len);
        }
        self.l4(f, ingress, l4)
    }

    fn denied(&self, src: [u8; 4]) -> bool {
        self.firewall
            .deny
            .iter()
            .any(|c| within(src, u32::from(c.addr), c.len as u32))
    }

    fn is_vip(&self, a: [u8; 4]) -> bool {
        self.services.iter().any(|s| s.live && s.vip == a)
    }

    fn closed(&self, dst: [u8; 4]) -> bool {
        self.firewall.closed_ports == ClosedPorts::Drop && self.is_vip(dst)
    }

    /// The service's source rules: the longest matching prefix decides; no
    /// match is allowed unless the service has allow rules.
    fn allows(&self, svc: usize, src: [u8; 4]) -> bool {
        let s = &self.services[svc];
        let best = s
            .rules
            .iter()
            .filter(|&&(net, len, _)| within(src, net, len))
            .max_by_key(|&&(_, len, _)| len);
        match best {
            Some(&(_, _, allow)) => allow,
            None => !s.allowlist,
        }
    }

    fn service_at(&self, key: &Key) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.live && (s.vip, s.port, s.proto) == (key.dst, key.dport, key.proto))
    }

    /// A TCP or UDP packet with whole headers.
    fn l4(&mut self, f: &mut Vec<u8>, ingress: u32, l4: usize) -> (u32, u32) {
        let proto = f[23];
        let key = Key {
            src: addr(f, 26),
            dst: addr(f, 30),
            sport: [f[l4], f[l4 + 1]],
            dport: [f[l4 + 2], f[l4 + 3]],
            proto,
        };
        let tcp_flags = if proto == IPPROTO_TCP { f[l4 + 13] } else { 0 };
        let (fin, syn, rst, ack) = (
            tcp_flags & 1 != 0,
            tcp_flags & 2 != 0,
            tcp_flags & 4 != 0,
            tcp_flags & 0x10 != 0,
        );
        let tcp = proto == IPPROTO_TCP;
        let opening = !tcp || (syn && !ack);
        if self.is_vip(key.dst) {
            if let Some(out) = self.for_vip(f, ingress, l4, &key, (tcp, opening, syn, fin, rst)) {
                return out;
            }
        }
        self.reply(f, ingress, l4, &key, (tcp, syn && ack, fin, rst))
    }

    /// The backend incarnation `i`, while it is configured.
    /// Takes note of the data path's slot of every live incarnation (the
    /// only thing the model learns from the control plane: which slot a
    /// removed backend's flows still name once another backend takes it).
    pub fn learn_slots(&mut self, slot_of: impl Fn(&str, &str) -> Option<u32>) {
        for b in self.backends.iter_mut().filter(|b| b.live) {
            b.slot = slot_of(&self.services[b.service].name, &b.name);
        }
    }

    /// Whether incarnation `i` still holds its slot (no later one took it).
    fn owns_slot(&self, i: usize) -> bool {
        let slot = self.backends[i].slot;
        slot.is_none() || !self.backends[i + 1..].iter().any(|x| x.slot == slot)
    }

    fn backend(&self, i: usize) -> Option<&Be> {
        self.backends.get(i).filter(|b| b.live)
    }

    fn takes_new_flows(&self, i: usize) -> bool {
        self.backend(i).is_some_and(|b| !b.no_new_flows)
    }

    /// A packet to a VIP address; None: no service takes it.
    fn for_vip(
        &mut self,
        f: &mut Vec<u8>,
        ingress: u32,
        l4: usize,
        key: &Key,
        (tcp, opening, syn, fin, rst): (bool, bool, bool, bool, bool),
    ) -> Option<(u32, u32)> {
        let key = *key;
        // The fast path: an established flow, its backend as scheduled, no
        // SYN, FIN or RST.
        let fast = (!(tcp && ((syn && opening) || fin || rst)))
            .then(|| self.conntrack.get(&key).copied())
            .flatten()
            .filter(|t| {
                self.backend(t.backend)
                    .is_some_and(|b| !b.drop_flows && !b.reset_flows)
            });
        let (bid, plan) = match fast {
            Some(t) => {
                if !self.allows(t.service, key.src) {
                    return Some((XDP_DROP, counter::DROP_DENIED_SERVICE));
                }
                (t.backend, None)
            }
            None => {
                let Some(svc) = self.service_at(&key) else {
                    if self.closed(key.dst) {
                        return Some((XDP_DROP, counter::DROP_CLOSED_PORT));
                    }
                    return None;
                };
                match self.plan(f, &key, svc, (tcp, opening)) {
                    Ok((bid, plan)) => (bid, Some(plan)),
                    Err(out) => return Some(out),
                }
            }
        };
        if f[22] <= 1 {
            return Some((XDP_PASS, counter::PASS_TTL_EXPIRED));
        }
        // (The testrun namespace routes every address the model sends to:
        // no "no route" drop happens here.)
        let b = self.backends[bid].clone();
        let hop = self.hops.get(&bid).copied().unwrap_or_default();
        let route = self.route_by(&hop, f, b.addr);
        let mut new_flow = false;
        if let Some(plan) = plan {
            new_flow = plan.stage == Stage::New;
            self.commit(&key, &plan, bid, (tcp, opening, fin, rst));
        }
        let bytes = f.len() as u64;
        decrement_ttl(f);
        if plan.is_some_and(|p| p.stage == Stage::BackendReset) {
            rewrite_into_reset(f, l4, b.addr, b.port);
            return Some(self.send(f, ingress, route, counter::RESET_FLOW));
        }
        rewrite(f, l4, Side::Destination, b.addr, b.port);
        let t = &mut self.traffic[bid];
        if let Route::Via { .. } = route {
            t.packets += 1;
            t.bytes += bytes;
        }
        if new_flow {
            t.new_flows += 1;
        }
        Some(self.send(f, ingress, route, counter::FORWARDED))
    }

    /// The full path: where the flow stands, or a backend for a new one, and
    /// the backend's state.
    fn plan(
        &mut self,
        f: &mut Vec<u8>,
        key: &Key,
        svc: usize,
        (tcp, opening): (bool, bool),
    ) -> Result<(usize, Plan), (u32, u32)> {
        if !self.allows(svc, key.src) {
            return Err((XDP_DROP, counter::DROP_DENIED_SERVICE));
        }
        let mut plan = Plan {
            stage: Stage::New,
            service: svc,
            replaced: None,
        };
        let mut known: Option<usize> = None;
        if let Some(t) = self.conntrack.get(key).copied() {
            let again = tcp && opening && (t.closing || !self.takes_new_flows(t.backend));
            if again {
                plan.replaced = Some(t.backend);
            } else {
                plan.stage = Stage::Established;
                known = Some(t.backend);
            }
        } else if tcp {
            if let Some(t) = self.transient.get(key).copied() {
                let retry = !t.half_open || !self.takes_new_flows(t.backend);
                if !(opening && retry) {
                    plan.stage = if t.half_open {
                        Stage::HalfOpen
                    } else {
                        Stage::Closed
                    };
                    plan.service = t.service;
                    known = Some(t.backend);
                }
            }
        }
        let bid = match known {
            Some(bid) => bid,
            None => {
                let maglev = self.services[svc].maglev.is_some();
                if tcp && !opening {
                    if !maglev {
                        return Err((XDP_DROP, counter::DROP_TCP_NO_FLOW));
                    }
                    self.counts[counter::FLOWS_RECOVERED as usize] += 1;
                }
                match self.pick(svc, key) {
                    Some(b) => b,
                    None => {
                        if tcp && self.services[svc].reset_if_empty {
                            return Err((reset(f), counter::RESET_NO_BACKEND));
                        }
                        return Err((XDP_DROP, counter::DROP_NO_BACKEND));
                    }
                }
            }
        };
        let Some(b) = self.backend(bid) else {
            return Err((XDP_DROP, counter::DROP_BACKEND_GONE));
        };
        if known.is_some() {
            if b.drop_flows {
                return Err((XDP_DROP, counter::DROP_BACKEND_DOWN));
            }
            if b.reset_flows && tcp {
                // The backend's side first, as a reset made of the client's
                // segment; the client's next segment is answered with one.
                let reset_yet = self.conntrack.get(key).is_some_and(|t| t.backend_reset);
                if plan.stage == Stage::Established && !reset_yet {
                    plan.stage = Stage::BackendReset;
                    return Ok((bid, plan));
                }
                return Err((reset(f), counter::RESET_FLOW));
            }
        }
        Ok((bid, plan))
    }

    /// The flow's change of stage, once the packet passed every check.
    fn commit(
        &mut self,
        key: &Key,
        plan: &Plan,
        bid: usize,
        (tcp, opening, fin, rst): (bool, bool, bool, bool),
    ) {
        let b = self.backends[bid].clone();
        let pending = |half_open| Pending {
            half_open,
            backend: bid,
            service: plan.service,
            vip: key.dst,
            vport: key.dport,
        };
        let rkey = reply_key(key, &b);
        match plan.stage {
            Stage::New => {
                if let Some(old) = plan.replaced {
                    if self.conntrack.remove(key).is_some() {
                        if let Some(ob) = self.backend(old) {
                            let k = reply_key(key, ob);
                            self.reverse.remove(&k);
                        }
                    }
                }
                if tcp && opening {
                    self.transient.insert(*key, pending(true));
                    self.transient.insert(rkey, pending(true));
                } else {
                    self.establish(key, plan.service, bid);
                }
                self.counts[counter::NEW_FLOWS as usize] += 1;
            }
            Stage::BackendReset => {
                // Closing, reset at the backend; the reply entry goes (the
                // backend may still answer on these ports, for another VIP's
                // new flow, were the reset lost).
                self.reverse.remove(&rkey);
                if let Some(t) = self.conntrack.get_mut(key) {
                    t.closing = true;
                    t.backend_reset = true;
                }
            }
            Stage::HalfOpen if rst => {
                self.transient.insert(*key, pending(false));
                self.transient.insert(rkey, pending(false));
            }
            Stage::HalfOpen if !opening => {
                self.establish(key, plan.service, bid);
                self.transient.remove(key);
                self.transient.remove(&rkey);
                self.counts[counter::FLOWS_ESTABLISHED as usize] += 1;
                if fin {
                    let t = self.conntrack.get_mut(key).unwrap();
                    t.closing = true;
                    t.fin_client = true;
                }
            }
            Stage::Established if fin || rst => {
                let t = self.conntrack.get_mut(key).unwrap();
                t.closing = true;
                t.fin_client |= fin;
                if rst || (t.fin_client && t.fin_backend) {
                    self.retire(key, bid);
                }
            }
            _ => {}
        }
    }

    fn establish(&mut self, key: &Key, service: usize, bid: usize) {
        self.conntrack.insert(
            *key,
            Tracked {
                backend: bid,
                service,
                closing: false,
                fin_client: false,
                fin_backend: false,
                backend_reset: false,
            },
        );
        let rkey = reply_key(key, &self.backends[bid]);
        self.reverse.insert(
            rkey,
            Rev {
                vip: key.dst,
                vport: key.dport,
                backend: bid,
                hop: Hop::default(),
            },
        );
    }

    /// Both FINs, or an RST: the flow leaves the established tables and
    /// lingers in the transient one.
    fn retire(&mut self, key: &Key, bid: usize) {
        let Some(t) = self.conntrack.remove(key) else {
            return;
        };
        let rkey = reply_key(key, &self.backends[bid]);
        self.reverse.remove(&rkey);
        let p = Pending {
            half_open: false,
            backend: t.backend,
            service: t.service,
            vip: key.dst,
            vport: key.dport,
        };
        self.transient.insert(*key, p);
        self.transient.insert(rkey, p);
        self.counts[counter::FLOWS_CLOSED as usize] += 1;
    }

    /// A packet from a backend address: a reply of a flow, or not ours.
    fn reply(
        &mut self,
        f: &mut [u8],
        ingress: u32,
        l4: usize,
        key: &Key,
        (tcp, syn_ack, fin, rst): (bool, bool, bool, bool),
    ) -> (u32, u32) {
        let key = *key;
        let mut transient: Option<Pending> = None;
        let rev = match self.reverse.get(&key).copied() {
            Some(rev) => {
                if tcp && syn_ack {
                    let stale = self
                        .conntrack
                        .get(&client_flow(&key, rev.vip, rev.vport))
                        .is_none_or(|t| t.closing);
                    if stale {
                        self.reverse.remove(&key);
                        return (XDP_PASS, counter::PASS_NO_SERVICE);
                    }
                }
                Some(rev)
            }
            None => match self.transient.get(&key).copied() {
                Some(t) => {
                    if tcp && syn_ack && !t.half_open {
                        return (XDP_PASS, counter::PASS_NO_SERVICE);
                    }
                    transient = Some(t);
                    Some(Rev {
                        vip: t.vip,
                        vport: t.vport,
                        backend: t.backend,
                        hop: Hop::default(),
                    })
                }
                None => self
                    .backend_vips
                    .get(&(key.src, key.sport, key.proto))
                    .copied(),
            },
        };
        let Some(rev) = rev else {
            return (XDP_PASS, counter::PASS_NO_SERVICE);
        };
        let tracked = self.reverse.contains_key(&key);
        let route = self.route_by(&rev.hop, f, key.dst);
        if let Route::Local = route {
            return (XDP_PASS, counter::PASS_NO_SERVICE);
        }
        if let Route::TooBig = route {
            if be16(f, 20) & 0x4000 != 0 {
                // Don't Fragment: passed as it came, for the kernel to tell
                // the backend.
                return (XDP_PASS, counter::PASS_TOO_BIG);
            }
        }
        let bytes = f.len() as u64;
        if !decrement_ttl(f) {
            return (XDP_PASS, counter::PASS_TTL_EXPIRED);
        }
        if let Route::Via {
            ifindex,
            smac,
            dmac,
        } = route
        {
            // The client side's hop, cached in the flow's reverse entry
            // under the generation of the lookup.
            if tracked && rev.hop.generation != self.hop_generation {
                if let Some(r) = self.reverse.get_mut(&key) {
                    r.hop = Hop {
                        generation: self.hop_generation,
                        ifindex,
                        smac,
                        dmac,
                    };
                }
            }
            if self.owns_slot(rev.backend) {
                let t = &mut self.traffic[rev.backend];
                t.reply_packets += 1;
                t.reply_bytes += bytes;
            }
        }
        if tcp && (fin || rst) {
            let client = client_flow(&key, rev.vip, rev.vport);
            match transient {
                Some(t) => {
                    if t.half_open && rst {
                        if let Some(b) = self.backend(t.backend) {
                            let p = Pending {
                                half_open: false,
                                ..t
                            };
                            let k = reply_key(&client, b);
                            self.transient.insert(client, p);
                            self.transient.insert(k, p);
                        }
                    }
                }
                None => {
                    if let Some(t) = self.conntrack.get_mut(&client) {
                        t.closing = true;
                        t.fin_backend |= fin;
                        let (done, bid) = (rst || (t.fin_client && t.fin_backend), t.backend);
                        // The flow's backend, while configured (the data
                        // path finds the backend by the flow's slot).
                        if done && self.backend(bid).is_some() {
                            self.retire(&client, bid);
                        }
                    }
                }
            }
        }
        rewrite(f, l4, Side::Source, rev.vip, rev.vport);
        self.send(f, ingress, route, counter::REPLIES)
    }

    /// A backend for a new flow of service `svc`: the next slot of its ring
    /// (the model's own position), or the Maglev table's slot of the flow.
    fn pick(&mut self, svc: usize, key: &Key) -> Option<usize> {
        let s = &self.services[svc];
        let len = s.slots.len() as u64;
        if len == 0 {
            return None;
        }
        if let Some(seed) = s.maglev {
            let h = maglev::flow_hash(key.src, key.dst, key.sport, key.dport, key.proto, seed);
            return Some(s.slots[(h as u64 % len) as usize]);
        }
        let pos = self.rr.entry(svc).or_insert(0);
        let n = *pos;
        *pos += 1;
        Some(self.services[svc].slots[(n % len) as usize])
    }

    /// The route along `hop` when it is current and the packet fits it,
    /// else the FIB's (a lookup, counted).
    fn route_by(&mut self, hop: &Hop, f: &[u8], dst: [u8; 4]) -> Route {
        if hop.generation != 0
            && hop.generation == self.hop_generation
            && be16(f, 16) as usize <= MTU
        {
            return Route::Via {
                ifindex: hop.ifindex,
                smac: hop.smac,
                dmac: hop.dmac,
            };
        }
        self.counts[counter::NEXT_HOP_LOOKUPS as usize] += 1;
        self.route(f, dst)
    }

    /// The neighbour the testrun net knows for `dst`: (interface, its MAC,
    /// the neighbour's MAC).
    fn neighbour(&self, dst: [u8; 4]) -> Option<(u32, [u8; 6], [u8; 6])> {
        let d = Ipv4Addr::from(dst);
        [
            (CLIENT, self.x0, X0_MAC, CLIENT_MAC),
            (B1, self.x1, X1_MAC, B1_MAC),
            (B2, self.x1, X1_MAC, B2_MAC),
        ]
        .iter()
        .find(|k| k.0 == d)
        .map(|k| (k.1, k.2, k.3))
    }

    /// The testrun namespace's FIB for the packet in `f`: x0 10.0.1.1/24 with
    /// the client's neighbour, x1 10.0.2.1/24 with the two backends', nothing
    /// else; a forwarded packet bigger than the MTU is too big (checked
    /// before the neighbour, as the kernel does).
    fn route(&self, f: &[u8], dst: [u8; 4]) -> Route {
        let d = Ipv4Addr::from(dst);
        let [a, b, c, last] = dst;
        if d == Ipv4Addr::new(10, 0, 1, 1) || d == Ipv4Addr::new(10, 0, 2, 1) {
            return Route::Local;
        }
        if (a, b) != (10, 0) || !(c == 1 || c == 2) || last == 255 {
            // No route, or a broadcast: the kernel does not forward it.
            return Route::Local;
        }
        if be16(f, 16) as usize > MTU {
            return Route::TooBig;
        }
        match self.neighbour(dst) {
            Some((ifindex, smac, dmac)) => Route::Via {
                ifindex,
                smac,
                dmac,
            },
            None => Route::NoNeigh,
        }
    }

    fn send(&self, f: &mut [u8], ingress: u32, route: Route, sent: u32) -> (u32, u32) {
        match route {
            Route::Via {
                ifindex,
                smac,
                dmac,
            } => {
                f[0..6].copy_from_slice(&dmac);
                f[6..12].copy_from_slice(&smac);
                (
                    if ifindex == ingress {
                        XDP_TX
                    } else {
                        XDP_REDIRECT
                    },
                    sent,
                )
            }
            Route::NoNeigh => (XDP_PASS, counter::PASS_NO_NEIGH),
            Route::TooBig => (XDP_PASS, counter::PASS_TOO_BIG),
            Route::Local => (XDP_PASS, counter::PASS_NO_SERVICE),
        }
    }

    /// ICMP: `l4` is the ICMP header's offset, `end` the IPv4 packet's end.
    fn icmp(&mut self, f: &mut [u8], ingress: u32, l4: usize, end: usize) -> (u32, u32) {
        let dst = addr(f, 30);
        let to_vip = self.is_vip(dst);
        match f[l4] {
            8 if to_vip && self.firewall.icmp_echo_reply => {
                echo_reply(f, l4);
                return (XDP_REDIRECT, counter::ICMP_ECHO_REPLIED);
            }
            3 | 11 | 12 => {
                if let Some(done) = self.icmp_error(f, ingress, l4, end, to_vip) {
                    return done;
                }
            }
            _ => {}
        }
        if to_vip && self.closed(dst) {
            return (XDP_DROP, counter::DROP_ICMP);
        }
        (XDP_PASS, counter::PASS_OTHER_PROTO)
    }

    fn icmp_error(
        &mut self,
        f: &mut [u8],
        ingress: u32,
        l4: usize,
        end: usize,
        to_vip: bool,
    ) -> Option<(u32, u32)> {
        // The quoted packet: a whole IPv4 header and 8 bytes of TCP/UDP.
        let q = l4 + 8;
        if f.len() < q + 20 {
            return None;
        }
        let qihl = ((f[q] & 0x0f) as usize) * 4;
        let qproto = f[q + 9];
        if f[q] >> 4 != 4 || qihl < 20 || !(qproto == IPPROTO_TCP || qproto == IPPROTO_UDP) {
            return None;
        }
        let ql4 = q + qihl;
        if ql4 + 8 > end {
            return None;
        }
        let (qsrc, qdst) = (addr(f, q + 12), addr(f, q + 16));
        let (qsport, qdport) = ([f[ql4], f[ql4 + 1]], [f[ql4 + 2], f[ql4 + 3]]);
        let (src, dst) = (addr(f, 26), addr(f, 30));
        let key = Key {
            src: qdst,
            dst: qsrc,
            sport: qdport,
            dport: qsport,
            proto: qproto,
        };
        let quote = Quote {
            ip: q,
            l4: ql4,
            proto: qproto,
            end,
        };
        if to_vip {
            let t = *self.conntrack.get(&key)?;
            let b = self.backend(t.backend)?.clone();
            let route = self.route(f, b.addr);
            if let Route::Local = route {
                return Some((XDP_PASS, counter::PASS_OTHER_PROTO));
            }
            if !decrement_ttl(f) {
                return Some((XDP_PASS, counter::PASS_TTL_EXPIRED));
            }
            set_addr(f, 14, 30, b.addr);
            quote.rewrite(f, l4, Side::Source, b.addr, b.port);
            return Some(self.send(f, ingress, route, counter::ICMP_TO_BACKEND));
        }
        let rev = *self.reverse.get(&key)?;
        let new_src = if src == qdst { rev.vip } else { src };
        let route = self.route(f, dst);
        if let Route::Local = route {
            return Some((XDP_PASS, counter::PASS_OTHER_PROTO));
        }
        if !decrement_ttl(f) {
            return Some((XDP_PASS, counter::PASS_TTL_EXPIRED));
        }
        set_addr(f, 14, 26, new_src);
        quote.rewrite(f, l4, Side::Destination, rev.vip, rev.vport);
        Some(self.send(f, ingress, route, counter::ICMP_TO_CLIENT))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Where the packet an ICMP error quotes lies in the frame.
struct Quote {
    ip: usize,
    l4: usize,
    proto: u8,
    end: usize,
}

impl Quote {
    /// Rewrites one end of the quoted packet and every checksum covering it:
    /// the quoted IPv4 header's, its TCP/UDP checksum when the quote reaches
    /// it, and the ICMP checksum (at `icmp` + 2) over all of them.
    fn rewrite(&self, f: &mut [u8], icmp: usize, side: Side, a: [u8; 4], port: [u8; 2]) {
        let (addr_at, port_at) = match side {
            Side::Source => (self.ip + 12, self.l4),
            Side::Destination => (self.ip + 16, self.l4 + 2),
        };
        let old_addr = addr(f, addr_at);
        let old_ip_check = [f[self.ip + 10], f[self.ip + 11]];
        let ip_check = csum::update(old_ip_check, &old_addr, &a);
        f[addr_at..addr_at + 4].copy_from_slice(&a);
        f[self.ip + 10..self.ip + 12].copy_from_slice(&ip_check);
        let mut icmp_check = csum::update([f[icmp + 2], f[icmp + 3]], &old_addr, &a);
        icmp_check = csum::update(icmp_check, &old_ip_check, &ip_check);
        let old_port = [f[port_at], f[port_at + 1]];
        f[port_at..port_at + 2].copy_from_slice(&port);
        icmp_check = csum::update(icmp_check, &old_port, &port);
        let check_at = self.l4 + if self.proto == IPPROTO_TCP { 16 } else { 6 };
        if check_at + 2 <= self.end {
            let old = [f[check_at], f[check_at + 1]];
            let new = l4_update(self.proto, old, &old_addr, &a, &old_port, &port);
            f[check_at..check_at + 2].copy_from_slice(&new);
            icmp_check = csum::update(icmp_check, &old, &new);
        }
        f[icmp + 2..icmp + 4].copy_from_slice(&icmp_check);
    }
}

/// The client flow (client to VIP) of the reply `key` (backend to client).
fn client_flow(key: &Key, vip: [u8; 4], vport: [u8; 2]) -> Key {
    Key {
        src: key.dst,
        dst: vip,
        sport: key.dport,
        dport: vport,
        proto: key.proto,
    }
}

/// The reply side's key of the client flow `key` on backend `b`.
fn reply_key(key: &Key, b: &Be) -> Key {
    Key {
        src: b.addr,
        dst: key.src,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
    }
}

/// Where a client packet's flow stands (as `conntrack::plan` says).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    New,
    Established,
    HalfOpen,
    Closed,
    /// Established on a backend whose flows are to be reset: the segment goes
    /// on to the backend as a reset.
    BackendReset,
}

/// The full path's plan for a client packet.
#[derive(Clone, Copy)]
struct Plan {
    stage: Stage,
    service: usize,
    /// The backend of the established flow the packet replaces.
    replaced: Option<usize>,
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn addr(f: &[u8], at: usize) -> [u8; 4] {
    [f[at], f[at + 1], f[at + 2], f[at + 3]]
}

fn within(a: [u8; 4], net: u32, len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from_be_bytes(a) & mask == net & mask
}

/// The TCP (or UDP) checksum after an address and a port it covers changed;
/// a UDP checksum of 0 means none and stays 0, and a computed 0 is sent as
/// 0xffff (RFC 768).
fn l4_update(
    proto: u8,
    check: [u8; 2],
    old_addr: &[u8; 4],
    new_addr: &[u8; 4],
    old_port: &[u8; 2],
    new_port: &[u8; 2],
) -> [u8; 2] {
    if proto == IPPROTO_UDP && check == [0, 0] {
        return check;
    }
    let c = csum::update(csum::update(check, old_addr, new_addr), old_port, new_port);
    if proto == IPPROTO_UDP && c == [0, 0] {
        [0xff, 0xff]
    } else {
        c
    }
}

/// Sets the IPv4 address at `at` and updates the header checksum of the
/// header at `ip`.
fn set_addr(f: &mut [u8], ip: usize, at: usize, a: [u8; 4]) {
    let old = addr(f, at);
    let check = csum::update([f[ip + 10], f[ip + 11]], &old, &a);
    f[at..at + 4].copy_from_slice(&a);
    f[ip + 10..ip + 12].copy_from_slice(&check);
}

fn decrement_ttl(f: &mut [u8]) -> bool {
    let (ttl, proto) = (f[22], f[23]);
    if ttl <= 1 {
        return false;
    }
    f[22] = ttl - 1;
    let check = csum::update([f[24], f[25]], &[ttl, proto], &[ttl - 1, proto]);
    f[24..26].copy_from_slice(&check);
    true
}

/// DNAT (`Destination`) or SNAT (`Source`) of a TCP/UDP packet whose L4
/// header is at `l4`.
fn rewrite(f: &mut [u8], l4: usize, side: Side, a: [u8; 4], port: [u8; 2]) {
    let addr_at = if side == Side::Source { 26 } else { 30 };
    let port_at = if side == Side::Source { l4 } else { l4 + 2 };
    let old = addr(f, addr_at);
    set_addr(f, 14, addr_at, a);
    let old_port = [f[port_at], f[port_at + 1]];
    let proto = f[23];
    let check_at = l4 + if proto == IPPROTO_TCP { 16 } else { 6 };
    let c = l4_update(
        proto,
        [f[check_at], f[check_at + 1]],
        &old,
        &a,
        &old_port,
        &port,
    );
    f[check_at..check_at + 2].copy_from_slice(&c);
    f[port_at..port_at + 2].copy_from_slice(&port);
}

/// DNAT of a TCP segment that goes on as a reset (RST, with ACK if it had
/// one): the checksum takes the address, then the port and the flags as one
/// merged word (RFC 1624 with `m = 0`), as the data path's hook does.
fn rewrite_into_reset(f: &mut [u8], l4: usize, a: [u8; 4], port: [u8; 2]) {
    let old = addr(f, 30);
    set_addr(f, 14, 30, a);
    let old_port = [f[l4 + 2], f[l4 + 3]];
    let old_flags = [f[l4 + 12], f[l4 + 13]];
    let new_flags = [
        old_flags[0],
        if old_flags[1] & 0x10 != 0 { 0x14 } else { 0x04 },
    ];
    let word = |w: [u8; 2]| u16::from_be_bytes(w) as u32;
    let mut merged =
        (!word(old_port) & 0xffff) + word(port) + (!word(old_flags) & 0xffff) + word(new_flags);
    while merged > 0xffff {
        merged = (merged & 0xffff) + (merged >> 16);
    }
    let at = l4 + 16;
    let c = csum::update([f[at], f[at + 1]], &old, &a);
    let c = csum::update(c, &[0, 0], &(merged as u16).to_be_bytes());
    f[at..at + 2].copy_from_slice(&c);
    f[l4 + 2..l4 + 4].copy_from_slice(&port);
    f[l4 + 12..l4 + 14].copy_from_slice(&new_flags);
}

/// The echo reply: addresses swapped, TTL 64, type 0, MACs swapped; it leaves
/// by the interface it came in on.
fn echo_reply(f: &mut [u8], icmp: usize) {
    let (src, dst) = (addr(f, 26), addr(f, 30));
    f[26..30].copy_from_slice(&dst);
    f[30..34].copy_from_slice(&src);
    let (ttl, proto) = (f[22], f[23]);
    f[22] = 64;
    let check = csum::update([f[24], f[25]], &[ttl, proto], &[64, proto]);
    f[24..26].copy_from_slice(&check);
    let code = f[icmp + 1];
    let check = csum::update([f[icmp + 2], f[icmp + 3]], &[f[icmp], code], &[0, code]);
    f[icmp] = 0;
    f[icmp + 2..icmp + 4].copy_from_slice(&check);
    swap_macs(f);
}

fn swap_macs(f: &mut [u8]) {
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
}

/// The TCP reset that refuses the segment in `f` (RFC 793, "Reset
/// Generation"), sent back by redirect: bare 20-byte IPv4 and TCP headers
/// from the address the client sent to, DF, TTL 64, IP id 0, window 0. A
/// segment that acknowledges something gets a bare RST at its ACK number;
/// any other is acknowledged in full (its data, SYN and FIN) by an RST-ACK
/// of sequence 0. A reset is never answered, and a segment with IP options
/// is dropped instead (the program cuts the frame to bare headers).
fn reset(f: &mut Vec<u8>) -> u32 {
    if f.len() < 54 || f[14] != 0x45 {
        return XDP_DROP;
    }
    let flags = f[47];
    if flags & 0x04 != 0 {
        return XDP_DROP;
    }
    let seq = u32::from_be_bytes([f[38], f[39], f[40], f[41]]);
    let ack = u32::from_be_bytes([f[42], f[43], f[44], f[45]]);
    let data = (be16(f, 16) as u32).saturating_sub(20 + (f[46] >> 4) as u32 * 4);
    let (out_seq, out_ack, out_flags) = if flags & 0x10 != 0 {
        (ack, 0, 0x04)
    } else {
        let len = data
            .wrapping_add((flags & 0x02 != 0) as u32)
            .wrapping_add((flags & 0x01 != 0) as u32);
        (0, seq.wrapping_add(len), 0x14)
    };
    let (src, dst) = (addr(f, 30), addr(f, 26));
    let (sport, dport) = ([f[36], f[37]], [f[34], f[35]]);
    f.truncate(54);
    swap_macs(f);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum::full(&ip);
    ip[10..12].copy_from_slice(&c);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport);
    tcp[2..4].copy_from_slice(&dport);
    tcp[4..8].copy_from_slice(&out_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&out_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = out_flags;
    let c = csum::pseudo_full(src, dst, IPPROTO_TCP, &tcp);
    tcp[16..18].copy_from_slice(&c);
    f[14..34].copy_from_slice(&ip);
    f[34..54].copy_from_slice(&tcp);
    XDP_REDIRECT
}

/// The Internet checksum, the model's own: RFC 1071's one's-complement sum
/// and RFC 1624's incremental update (eqn. 3). Checksums sit in the frame
/// as two bytes in network order.
pub mod csum {
    /// The one's-complement sum of `data` as 16-bit big-endian words (an
    /// odd last byte padded with zero), folded to 16 bits.
    pub fn sum(data: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for pair in data.chunks(2) {
            let hi = pair[0] as u64;
            let lo = pair.get(1).copied().unwrap_or(0) as u64;
            s += (hi << 8) | lo;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// The checksum to write over `data` (its checksum field zeroed).
    pub fn full(data: &[u8]) -> [u8; 2] {
        (!sum(data)).to_be_bytes()
    }

    /// The IPv4 pseudo-header (RFC 793/768) followed by `segment`.
    pub fn with_pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + segment.len());
        v.extend_from_slice(&src);
        v.extend_from_slice(&dst);
        v.extend_from_slice(&[0, proto]);
        v.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        v.extend_from_slice(segment);
        v
    }

    /// The TCP/UDP checksum of `segment` (its checksum field zeroed).
    pub fn pseudo_full(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> [u8; 2] {
        full(&with_pseudo(src, dst, proto, segment))
    }

    /// Whether `data`, checksum field included, sums to all ones.
    pub fn verifies(data: &[u8]) -> bool {
        sum(data) == 0xffff
    }

    /// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, for the 16-bit words of
    /// `old` (an even number of bytes) that became `new`, word by word.
    pub fn update(check: [u8; 2], old: &[u8], new: &[u8]) -> [u8; 2] {
        assert!(old.len() == new.len() && old.len().is_multiple_of(2));
        let mut hc = u16::from_be_bytes(check);
        for (m, m2) in old.chunks(2).zip(new.chunks(2)) {
            let m = u16::from_be_bytes([m[0], m[1]]);
            let m2 = u16::from_be_bytes([m2[0], m2[1]]);
            let mut s = (!hc) as u32 + (!m) as u32 + m2 as u32;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            hc = !(s as u16);
        }
        hc.to_be_bytes()
    }
}

/// Round-robin rings, the model's own: smooth weighted round robin as
/// nginx documents it (`ngx_http_upstream_get_peer`). Weights are first
/// divided by their greatest common divisor (so 2:2 is the ring of 1:1).
/// For each slot every backend's current weight grows by its weight, the
/// backend with the largest current weight takes the slot (on a tie the
/// first listed, a detail nginx leaves open: pinned here and in the tests)
/// and gives back the sum of the weights. Weight 0 takes no slot.
pub mod ring {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    /// The ring of `weights`: indices into it, one per slot.
    pub fn fill(weights: &[u32]) -> Vec<u32> {
        let g = weights.iter().copied().fold(0, gcd);
        if g == 0 {
            return Vec::new();
        }
        let w: Vec<i64> = weights.iter().map(|&x| (x / g) as i64).collect();
        let total: i64 = w.iter().sum();
        let mut current = vec![0i64; w.len()];
        let mut out = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best: Option<usize> = None;
            for i in 0..w.len() {
                if w[i] == 0 {
                    continue;
                }
                current[i] += w[i];
                if best.is_none_or(|b| current[i] > current[b]) {
                    best = Some(i);
                }
            }
            let b = best.expect("a weight is non-zero");
            current[b] -= total;
            out.push(b as u32);
        }
        out
    }
}

/// Maglev (Eisenbud et al., NSDI 2016, section 3.4), the model's own, with
/// the hash definitions the data path documents (`lb_common::maglev`):
/// a backend's permutation starts at `offset = h(name, 0x5bd1e995) % M` and
/// steps by `skip = h(name, 0x1b873593) % (M - 1) + 1`, where `h` is FNV-1a
/// (64-bit) over the name, xor the salt, xor the seed shifted left by 17,
/// through MurmurHash3's 64-bit finaliser. The table is filled in rounds,
/// backends in order; weights are credits: in each round a backend gains its
/// weight, and once its credit reaches the largest weight it spends that
/// much to take its next preferred free slot. The flow hash mixes the
/// 5-tuple with the seed (see [`flow_hash`]).
pub mod maglev {
    fn fmix64(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }

    fn name_hash(name: &str, seed: u32, salt: u64) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &c in name.as_bytes() {
            h = (h ^ c as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        fmix64(h ^ salt ^ ((seed as u64) << 17))
    }

    fn prime(m: u32) -> bool {
        m >= 2
            && (2..m)
                .take_while(|d| d * d <= m)
                .all(|d| !m.is_multiple_of(d))
    }

    /// The table of size `m` for backends `names` with `weights`: indices
    /// into them. None when `m` is not prime or no weight is above zero.
    pub fn table(names: &[&str], weights: &[u32], seed: u32, m: u32) -> Option<Vec<u32>> {
        let max = weights.iter().copied().max().unwrap_or(0) as u64;
        if max == 0 || !prime(m) {
            return None;
        }
        let m = m as u64;
        let perm: Vec<(u64, u64)> = names
            .iter()
            .map(|n| {
                (
                    name_hash(n, seed, 0x5bd1_e995) % m,
                    name_hash(n, seed, 0x1b87_3593) % (m - 1) + 1,
                )
            })
            .collect();
        let mut table: Vec<Option<u32>> = vec![None; m as usize];
        let mut next = vec![0u64; names.len()];
        let mut credit = vec![0u64; names.len()];
        let mut left = m;
        'rounds: loop {
            for i in 0..names.len() {
                credit[i] += weights[i] as u64;
                if credit[i] < max {
                    continue;
                }
                credit[i] -= max;
                let (offset, skip) = perm[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot].is_none() {
                        table[slot] = Some(i as u32);
                        break;
                    }
                }
                left -= 1;
                if left == 0 {
                    break 'rounds;
                }
            }
        }
        Some(table.into_iter().map(|e| e.unwrap()).collect())
    }

    /// The hash of a flow as its client sent it: the addresses as one
    /// 64-bit word (source high), the ports and protocol as another
    /// (source port at bit 32, destination port at bit 16), the second
    /// mixed with the seed (at bit 40) and the golden-ratio constant, both
    /// through the finaliser; the high and low halves xored.
    pub fn flow_hash(
        src: [u8; 4],
        dst: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
        proto: u8,
        seed: u32,
    ) -> u32 {
        let addrs = (u32::from_be_bytes(src) as u64) << 32 | u32::from_be_bytes(dst) as u64;
        let ports = (u16::from_be_bytes(sport) as u64) << 32
            | (u16::from_be_bytes(dport) as u64) << 16
            | proto as u64;
        let h = fmix64(addrs ^ fmix64(ports ^ (seed as u64) << 40 ^ 0x9e37_79b9_7f4a_7c15));
        (h >> 32) as u32 ^ h as u32
    }
}

/// Full recomputation of an IPv4 frame's checksums (the model's own sum,
/// none of its incremental code): the IPv4 header's and, when the packet
/// is whole and not a fragment, the TCP, UDP or ICMP checksum; for an ICMP
/// error, the quoted header's too. A UDP checksum of 0 (none) passes.
/// `Err` says what does not verify.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 || be16(frame, 12) != 0x0800 {
        return Err("not an IPv4 frame".into());
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = be16(ip, 2) as usize;
    if ihl < 20 || tot < ihl || tot > ip.len() {
        return Err(format!(
            "IPv4 header (IHL {ihl}, total length {tot}) does not fit"
        ));
    }
    if !csum::verifies(&ip[..ihl]) {
        return Err("the IPv4 header checksum does not verify".into());
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return Ok(());
    }
    let (src, dst) = (addr(ip, 12), addr(ip, 16));
    let seg = &ip[ihl..tot];
    let pseudo = |proto| csum::with_pseudo(src, dst, proto, seg);
    match ip[9] {
        IPPROTO_TCP if seg.len() >= 20 && !csum::verifies(&pseudo(IPPROTO_TCP)) => {
            return Err("the TCP checksum does not verify".into());
        }
        // A UDP checksum of 0: none.
        IPPROTO_UDP
            if seg.len() >= 8 && seg[6..8] != [0, 0] && !csum::verifies(&pseudo(IPPROTO_UDP)) =>
        {
            return Err("the UDP checksum does not verify".into());
        }
        IPPROTO_ICMP if seg.len() >= 8 => {
            if !csum::verifies(seg) {
                return Err("the ICMP checksum does not verify".into());
            }
            let q = &seg[8..];
            if matches!(seg[0], 3 | 11 | 12) && q.len() >= 20 && q[0] >> 4 == 4 {
                let qihl = ((q[0] & 0x0f) as usize) * 4;
                if qihl >= 20 && q.len() >= qihl && !csum::verifies(&q[..qihl]) {
                    return Err("the quoted IPv4 header checksum does not verify".into());
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rings the model builds, written out: nginx's documented example
    /// (5, 1, 1 gives a a b a c a a), plain round robin, ties to the first
    /// listed, weights reduced by their common divisor, zero weights.
    #[test]
    fn rings_are_smooth_weighted_round_robin() {
        assert_eq!(ring::fill(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(ring::fill(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(ring::fill(&[2, 1]), [0, 1, 0]);
        assert_eq!(ring::fill(&[1, 2]), [1, 0, 1]);
        assert_eq!(ring::fill(&[4, 4]), [0, 1]);
        assert_eq!(ring::fill(&[3, 2]), [0, 1, 0, 1, 0]);
        assert_eq!(ring::fill(&[0, 1, 0, 1]), [1, 3]);
        assert_eq!(ring::fill(&[0, 2]), [1]);
        assert!(ring::fill(&[0, 0]).is_empty() && ring::fill(&[]).is_empty());
    }

    /// Two implementations of the documented behaviour agree: the model's
    /// rings and the daemon's (`lb_common::ring`).
    #[test]
    fn rings_agree_with_the_daemons() {
        for weights in [
            vec![1, 1],
            vec![5, 1, 1],
            vec![0, 3, 1],
            vec![2, 4, 6],
            vec![7, 0, 3, 3, 1],
            vec![10, 9, 8, 7, 6, 5, 4, 3, 2, 1],
        ] {
            let mut theirs = vec![0; 1024];
            let n = lb_common::ring::fill_ring(&weights, &mut theirs).unwrap();
            assert_eq!(ring::fill(&weights), theirs[..n], "weights {weights:?}");
        }
    }

    /// The model's Maglev tables and the daemon's (`lb_common::maglev`)
    /// agree, for a few backend sets, weights, seeds and sizes; and the
    /// model's shares follow the weights.
    #[test]
    fn maglev_tables_agree_with_the_daemons() {
        let sets: [(&[&str], &[u32]); 5] = [
            (&["b1", "b2"], &[1, 1]),
            (&["b1", "b2", "b4"], &[1, 1, 1]),
            (&["a", "b", "c", "d"], &[3, 1, 0, 2]),
            (&["only"], &[5]),
            (&["x", "y", "z"], &[1, 2, 4]),
        ];
        for (names, weights) in sets {
            for (m, seed) in [(1021, 7), (13, 0), (65_537, 42)] {
                let mine = maglev::table(names, weights, seed, m).unwrap();
                let named: Vec<(&[u8], u32)> = names
                    .iter()
                    .zip(weights)
                    .map(|(n, w)| (n.as_bytes(), *w))
                    .collect();
                let mut theirs = vec![0; m as usize];
                assert!(lb_common::maglev::fill_table(&named, seed, &mut theirs));
                assert_eq!(mine, theirs, "{names:?} {weights:?} M={m} seed={seed}");
                let total: u32 = weights.iter().sum();
                for (i, &w) in weights.iter().enumerate() {
                    let share = mine.iter().filter(|&&b| b == i as u32).count() as f64;
                    let want = m as f64 * w as f64 / total as f64;
                    assert!(
                        (share - want).abs() <= want * 0.1 + 3.0,
                        "{names:?} M={m}: {i} has {share}, wants {want}"
                    );
                }
            }
        }
        assert!(maglev::table(&["a"], &[1], 0, 12).is_none());
        assert!(maglev::table(&["a"], &[0], 0, 13).is_none());
    }

    #[test]
    fn flow_hashes_agree_with_the_data_paths() {
        for i in 0..2000u32 {
            let src = (0x0a00_0102 + i * 7919).to_be_bytes();
            let sport = (40000 + i as u16).to_be_bytes();
            for (proto, seed) in [(6, 7), (17, 0), (6, u32::MAX)] {
                assert_eq!(
                    maglev::flow_hash(src, [10, 0, 0, 101], sport, [0, 80], proto, seed),
                    lb_common::maglev::flow_hash(src, [10, 0, 0, 101], sport, [0, 80], proto, seed)
                );
            }
        }
    }

    /// RFC 1071's example, a captured IPv4 header, and incremental updates
    /// against full recomputation.
    #[test]
    fn checksums_follow_the_rfcs() {
        let words = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum::sum(&words), 0xddf2);
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(csum::verifies(&h));
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(csum::full(&h), [0xb8, 0x61]);
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..5000 {
            let mut d: Vec<u8> = (0..40).map(|_| next() as u8).collect();
            d[0..2].copy_from_slice(&[0, 0]);
            let c = csum::full(&d);
            d[0..2].copy_from_slice(&c);
            let at = 2 + 2 * (next() as usize % 17);
            let old: [u8; 4] = d[at..at + 4].try_into().unwrap();
            let new = next().to_be_bytes();
            d[at..at + 4].copy_from_slice(&new);
            let c = csum::update([d[0], d[1]], &old, &new);
            d[0..2].copy_from_slice(&c);
            assert!(csum::verifies(&d));
        }
    }
}
