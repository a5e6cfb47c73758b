//! A reference model of the data path: what the XDP program must do with a
//! frame, given what its maps hold, written in plain Rust over byte slices
//! from the rules (parse.rs, icmp.rs and the README) rather than from the
//! program's pointer code. The differential fuzz test runs both on the same
//! frames and compares the action, the frame left behind and the counters.
//!
//! The model starts from the maps as the daemon wrote them (services,
//! backends, rings, Maglev tables, VIPs, firewall) and then keeps its own
//! connection and reply tables and round-robin positions, updated as the
//! program updates its maps. Route lookups follow the `testrun` namespace,
//! whose routes and neighbours are fixed. Rate limits depend on the clock, so
//! the model requires them off (the kernel tests cover them).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use lb_common::{
    checksum, counter,
    firewall::{
        Firewall, FIREWALL_F_CLOSED_DROP, FIREWALL_F_DENY_LIST, FIREWALL_F_ECHO_REPLY, RULE_ALLOW,
    },
    maglev, Backend, BackendKey, FlowKey, NextHop, ReverseFlow, Service, ServiceKey,
    BACKEND_F_DROP_FLOWS, BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT, BACKEND_F_RESET_FLOWS,
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_MAP_SIZE, RING_MAP_SIZE, RING_SIZE,
    SERVICE_F_ALLOWLIST, SERVICE_F_FIREWALL, SERVICE_F_MAGLEV, SERVICE_F_RESET_IF_EMPTY,
};
use lb_userspace::dataplane::Dataplane;

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

/// A tracked client flow.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    backend: u32,
    generation: u32,
    service: u32,
    closing: bool,
    fin_client: bool,
    fin_backend: bool,
}

/// A flow of the transient table: half-open, or closed (lingering; the
/// model's runs are shorter than the linger).
#[derive(Debug, Clone, Copy)]
struct Pending {
    half_open: bool,
    backend: u32,
    generation: u32,
    service: u32,
    vip: [u8; 4],
    vport: [u8; 2],
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

pub struct Model {
    services: HashMap<ServiceKey, Service>,
    backends: Vec<Backend>,
    rings: HashMap<u32, u32>,
    maglev: HashMap<u32, u32>,
    rr: HashMap<u32, u64>,
    vips: HashSet<[u8; 4]>,
    firewall: Firewall,
    /// (network, prefix length).
    deny: Vec<(u32, u32)>,
    /// (service id, network, prefix length, rule).
    rules: Vec<(u32, u32, u32, u32)>,
    backend_vips: HashMap<BackendKey, ReverseFlow>,
    conntrack: HashMap<FlowKey, Tracked>,
    /// Half-open and closed flows, by client side and by reply side.
    transient: HashMap<FlowKey, Pending>,
    services_by_id: HashMap<u32, Service>,
    reverse: HashMap<FlowKey, ReverseFlow>,
    /// The next-hop generation, and each backend id's cached hop.
    hop_generation: u32,
    hops: Vec<NextHop>,
    /// Per outcome counter: how many times the model bumped it.
    pub counts: Vec<u64>,
    x0: u32,
    x1: u32,
}

impl Model {
    /// A model of `dp` as it stands (its connection table empty), for frames
    /// received on `x0` (client side) or `x1` (backend side) of the testrun net.
    pub fn from_maps(dp: &Dataplane, x0: u32, x1: u32) -> Model {
        let mut m = Model {
            services: HashMap::new(),
            backends: Vec::new(),
            rings: HashMap::new(),
            maglev: HashMap::new(),
            rr: HashMap::new(),
            vips: HashSet::new(),
            firewall: Firewall::default(),
            deny: Vec::new(),
            rules: Vec::new(),
            backend_vips: HashMap::new(),
            conntrack: HashMap::new(),
            transient: HashMap::new(),
            services_by_id: HashMap::new(),
            reverse: HashMap::new(),
            hop_generation: 0,
            hops: Vec::new(),
            counts: vec![0; counter::COUNT as usize],
            x0,
            x1,
        };
        m.reload(dp);
        m
    }

    /// Reads the control plane's maps again (after an `apply`); the model's
    /// own tables (flows, replies) are kept, as the program's are.
    pub fn reload(&mut self, dp: &Dataplane) {
        let maps = dp.maps();
        let services = &maps.services;
        self.services = services.iter().map(|r| r.unwrap()).collect();
        self.services_by_id = self.services.values().map(|s| (s.id, *s)).collect();
        self.backends = maps.backends.iter().map(|r| r.unwrap()).collect();
        self.hop_generation = maps.hop_generation.get(&0, 0).unwrap();
        self.hops = maps.hops.iter().map(|r| r.unwrap()).collect();
        let (rings, tables, positions) = (&maps.rings, &maps.maglev, &maps.rr_position);
        self.rings.clear();
        self.maglev.clear();
        for s in self.services.values() {
            let (source, into, limit) = if s.flags & SERVICE_F_MAGLEV != 0 {
                (tables, &mut self.maglev, MAGLEV_MAP_SIZE)
            } else {
                (rings, &mut self.rings, RING_MAP_SIZE)
            };
            for slot in s.ring_base..(s.ring_base + s.ring_len).min(limit) {
                into.insert(slot, source.get(&slot, 0).unwrap());
            }
            self.rr.insert(s.id, positions.get(&s.id, 0).unwrap());
        }
        self.vips = maps.vips.keys().map(|k| k.unwrap()).collect();
        self.firewall = maps.firewall.get(&0, 0).unwrap();
        assert_eq!(
            (self.firewall.source_cost_ns, self.firewall.global_cost_ns),
            (0, 0),
            "the model has no clock: rate limits must be off"
        );
        self.deny = maps
            .fw_deny
            .keys()
            .map(|k| {
                let k = k.unwrap();
                (u32::from_be_bytes(k.data()), k.prefix_len())
            })
            .collect();
        self.rules = maps
            .fw_rules
            .iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                let d = k.data();
                (
                    u32::from_be_bytes(d.service),
                    u32::from_be_bytes(d.addr),
                    k.prefix_len() - 32,
                    v,
                )
            })
            .collect();
        self.backend_vips = maps.backend_vips.iter().map(|r| r.unwrap()).collect();
    }

    /// The kernel's outcome counters, summed over CPUs, as the daemon
    /// reports them (forwarded packets and replies derived from the
    /// per-backend traffic the data path counts them in).
    pub fn kernel_counts(dp: &Dataplane) -> Vec<u64> {
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
        self.firewall.flags & FIREWALL_F_DENY_LIST != 0
            && self.deny.iter().any(|&(net, len)| within(src, net, len))
    }

    fn closed(&self, dst: [u8; 4]) -> bool {
        self.firewall.flags & FIREWALL_F_CLOSED_DROP != 0 && self.vips.contains(&dst)
    }

    fn allows(&self, svc: &Service, src: [u8; 4]) -> bool {
        if svc.flags & SERVICE_F_FIREWALL == 0 {
            return true;
        }
        let best = self
            .rules
            .iter()
            .filter(|&&(id, net, len, _)| id == svc.id && within(src, net, len))
            .max_by_key(|&&(_, _, len, _)| len);
        match best {
            Some(&(_, _, _, rule)) => rule == RULE_ALLOW,
            None => svc.flags & SERVICE_F_ALLOWLIST == 0,
        }
    }

    /// A TCP or UDP packet with whole headers.
    fn l4(&mut self, f: &mut Vec<u8>, ingress: u32, l4: usize) -> (u32, u32) {
        let proto = f[23];
        let key = FlowKey {
            src: addr(f, 26),
            dst: addr(f, 30),
            sport: [f[l4], f[l4 + 1]],
            dport: [f[l4 + 2], f[l4 + 3]],
            proto,
            _pad: [0; 3],
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
        if self.maybe_vip(key.dst) {
            if let Some(out) = self.for_vip(f, ingress, l4, &key, (tcp, opening, syn, fin, rst)) {
                return out;
            }
        }
        self.reply(f, ingress, l4, &key, (tcp, syn && ack, fin, rst))
    }

    /// Whether `addr` is a VIP (the prefilter's exact meaning; its false
    /// positives change nothing).
    fn maybe_vip(&self, addr: [u8; 4]) -> bool {
        self.vips.contains(&addr) || self.services.keys().any(|k| k.vip == addr)
    }

    /// A packet to a VIP address; None: no service takes it.
    fn for_vip(
        &mut self,
        f: &mut Vec<u8>,
        ingress: u32,
        l4: usize,
        key: &FlowKey,
        (tcp, opening, syn, fin, rst): (bool, bool, bool, bool, bool),
    ) -> Option<(u32, u32)> {
        let key = *key;
        // The fast path: an established flow, its backend as scheduled, no
        // SYN, FIN or RST.
        let fast = (!(tcp && ((syn && opening) || fin || rst)))
            .then(|| self.conntrack.get(&key).copied())
            .flatten()
            .filter(|t| {
                self.backend(t.backend).is_some_and(|b| {
                    b.generation == t.generation
                        && b.flags & (BACKEND_F_DROP_FLOWS | BACKEND_F_RESET_FLOWS) == 0
                })
            });
        let (bid, b, plan) = match fast {
            Some(t) => {
                let svc = self.services_by_id[&t.service];
                if !self.allows(&svc, key.src) {
                    return Some((XDP_DROP, counter::DROP_DENIED_SERVICE));
                }
                (t.backend, self.backend(t.backend).unwrap(), None)
            }
            None => {
                let skey = ServiceKey {
                    vip: key.dst,
                    port: key.dport,
                    proto: key.proto,
                    _pad: 0,
                };
                let Some(svc) = self.services.get(&skey).copied() else {
                    if self.closed(key.dst) {
                        return Some((XDP_DROP, counter::DROP_CLOSED_PORT));
                    }
                    return None;
                };
                match self.plan(f, &key, &svc, (tcp, opening, fin, rst)) {
                    Ok((bid, b, plan)) => (bid, b, Some(plan)),
                    Err(out) => return Some(out),
                }
            }
        };
        if f[22] <= 1 {
            return Some((XDP_PASS, counter::PASS_TTL_EXPIRED));
        }
        // (The testrun namespace routes every address the model sends to:
        // no "no route" drop happens here.)
        let hop = self.hops.get(bid as usize).copied().unwrap_or_default();
        let route = self.route_by(&hop, f, b.addr);
        if let Some(plan) = plan {
            self.commit(&key, &plan, bid, &b, (tcp, opening, fin, rst));
        }
        decrement_ttl(f);
        rewrite(f, l4, Side::Destination, b.addr, b.port);
        Some(self.send(f, ingress, route, counter::FORWARDED))
    }

    /// The full path: where the flow stands, or a backend for a new one, and
    /// the backend's state.
    fn plan(
        &mut self,
        f: &mut Vec<u8>,
        key: &FlowKey,
        svc: &Service,
        (tcp, opening, _fin, _rst): (bool, bool, bool, bool),
    ) -> Result<(u32, Backend, Plan), (u32, u32)> {
        if !self.allows(svc, key.src) {
            return Err((XDP_DROP, counter::DROP_DENIED_SERVICE));
        }
        let mut plan = Plan {
            stage: Stage::New,
            service: svc.id,
            replaced: None,
        };
        let mut known: Option<(u32, u32)> = None;
        if let Some(t) = self.conntrack.get(key).copied() {
            let again = tcp
                && opening
                && (t.closing
                    || !self.backend(t.backend).is_some_and(|b| {
                        b.generation == t.generation && b.flags & BACKEND_F_NO_NEW_FLOWS == 0
                    }));
            if again {
                plan.replaced = Some(t.backend);
            } else {
                plan.stage = Stage::Established;
                known = Some((t.backend, t.generation));
            }
        } else if tcp {
            if let Some(t) = self.transient.get(key).copied() {
                let retry = !t.half_open
                    || !self.backend(t.backend).is_some_and(|b| {
                        b.generation == t.generation && b.flags & BACKEND_F_NO_NEW_FLOWS == 0
                    });
                if !(opening && retry) {
                    plan.stage = if t.half_open {
                        Stage::HalfOpen
                    } else {
                        Stage::Closed
                    };
                    plan.service = t.service;
                    known = Some((t.backend, t.generation));
                }
            }
        }
        let bid = match known {
            Some((bid, _)) => bid,
            None => {
                if tcp && !opening {
                    if svc.flags & SERVICE_F_MAGLEV == 0 {
                        return Err((XDP_DROP, counter::DROP_TCP_NO_FLOW));
                    }
                    self.counts[counter::FLOWS_RECOVERED as usize] += 1;
                }
                match self.pick(svc, key) {
                    Some(b) => b,
                    None => {
                        if tcp && svc.flags & SERVICE_F_RESET_IF_EMPTY != 0 {
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
        if let Some((_, g)) = known {
            if g != b.generation {
                return Err((XDP_DROP, counter::DROP_BACKEND_GONE));
            }
            if b.flags & BACKEND_F_DROP_FLOWS != 0 {
                return Err((XDP_DROP, counter::DROP_BACKEND_DOWN));
            }
            if b.flags & BACKEND_F_RESET_FLOWS != 0 && tcp {
                return Err((reset(f), counter::RESET_FLOW));
            }
        }
        Ok((bid, b, plan))
    }

    /// The flow's change of stage, once the packet passed every check.
    fn commit(
        &mut self,
        key: &FlowKey,
        plan: &Plan,
        bid: u32,
        b: &Backend,
        (tcp, opening, fin, rst): (bool, bool, bool, bool),
    ) {
        let pending = |half_open| Pending {
            half_open,
            backend: bid,
            generation: b.generation,
            service: plan.service,
            vip: key.dst,
            vport: key.dport,
        };
        let rkey = reply_key(key, b);
        match plan.stage {
            Stage::New => {
                if let Some(old) = plan.replaced {
                    if self.conntrack.remove(key).is_some() {
                        if let Some(ob) = self.backend(old) {
                            self.reverse.remove(&reply_key(key, &ob));
                        }
                    }
                }
                if tcp && opening {
                    self.transient.insert(*key, pending(true));
                    self.transient.insert(rkey, pending(true));
                } else {
                    self.establish(key, plan.service, bid, b);
                }
                self.counts[counter::NEW_FLOWS as usize] += 1;
            }
            Stage::HalfOpen if rst => {
                self.transient.insert(*key, pending(false));
                self.transient.insert(rkey, pending(false));
            }
            Stage::HalfOpen if !opening => {
                self.establish(key, plan.service, bid, b);
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
                    self.retire(key, b);
                }
            }
            _ => {}
        }
    }

    fn establish(&mut self, key: &FlowKey, service: u32, bid: u32, b: &Backend) {
        self.conntrack.insert(
            *key,
            Tracked {
                backend: bid,
                generation: b.generation,
                service,
                closing: false,
                fin_client: false,
                fin_backend: false,
            },
        );
        self.reverse.insert(
            reply_key(key, b),
            ReverseFlow {
                vip: key.dst,
                vport: key.dport,
                _pad: [0; 2],
                backend: bid,
                service,
                hop: Default::default(),
            },
        );
    }

    /// Both FINs, or an RST: the flow leaves the established tables and
    /// lingers in the transient one.
    fn retire(&mut self, key: &FlowKey, b: &Backend) {
        let Some(t) = self.conntrack.remove(key) else {
            return;
        };
        let rkey = reply_key(key, b);
        self.reverse.remove(&rkey);
        let p = Pending {
            half_open: false,
            backend: t.backend,
            generation: b.generation,
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
        key: &FlowKey,
        (tcp, syn_ack, fin, rst): (bool, bool, bool, bool),
    ) -> (u32, u32) {
        let key = *key;
        let proto = key.proto;
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
                    Some(ReverseFlow {
                        vip: t.vip,
                        vport: t.vport,
                        _pad: [0; 2],
                        backend: t.backend,
                        service: t.service,
                        hop: Default::default(),
                    })
                }
                None => self
                    .backend_vips
                    .get(&BackendKey {
                        addr: key.src,
                        port: key.sport,
                        proto,
                        _pad: 0,
                    })
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
                    r.hop = NextHop {
                        generation: self.hop_generation,
                        ifindex,
                        mtu: MTU as u32,
                        smac,
                        dmac,
                    };
                }
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
                                generation: b.generation,
                                ..t
                            };
                            self.transient.insert(client, p);
                            self.transient.insert(reply_key(&client, &b), p);
                        }
                    }
                }
                None => {
                    if let Some(t) = self.conntrack.get_mut(&client) {
                        t.closing = true;
                        t.fin_backend |= fin;
                        let (done, bid) = (rst || (t.fin_client && t.fin_backend), t.backend);
                        if done {
                            if let Some(b) = self.backend(bid) {
                                self.retire(&client, &b);
                            }
                        }
                    }
                }
            }
        }
        rewrite(f, l4, Side::Source, rev.vip, rev.vport);
        self.send(f, ingress, route, counter::REPLIES)
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends
            .get(id as usize)
            .copied()
            .filter(|b| b.flags & BACKEND_F_PRESENT != 0)
    }

    fn pick(&mut self, svc: &Service, key: &FlowKey) -> Option<u32> {
        let len = svc.ring_len;
        if svc.flags & SERVICE_F_MAGLEV != 0 {
            if len == 0 || len > maglev::MAX_TABLE_SIZE || svc.ring_base > MAGLEV_MAP_SIZE - len {
                return None;
            }
            let h = maglev::flow_hash(
                key.src,
                key.dst,
                key.sport,
                key.dport,
                key.proto,
                svc.hash_seed,
            );
            return self.maglev.get(&(svc.ring_base + h % len)).copied();
        }
        if len == 0 || len > RING_SIZE || svc.ring_base > RING_MAP_SIZE - RING_SIZE {
            return None;
        }
        let pos = self.rr.entry(svc.id).or_insert(0);
        let n = *pos;
        *pos += 1;
        self.rings
            .get(&(svc.ring_base + (n % len as u64) as u32))
            .copied()
    }

    /// The route along `hop` when it is current and the packet fits it,
    /// else the FIB's (a lookup, counted).
    fn route_by(&mut self, hop: &NextHop, f: &[u8], dst: [u8; 4]) -> Route {
        if hop.generation != 0
            && hop.generation == self.hop_generation
            && be16(f, 16) as u32 <= hop.mtu
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
        let known = [
            (CLIENT, self.x0, X0_MAC, CLIENT_MAC),
            (B1, self.x1, X1_MAC, B1_MAC),
            (B2, self.x1, X1_MAC, B2_MAC),
        ];
        if be16(f, 16) as usize > MTU {
            return Route::TooBig;
        }
        match known.iter().find(|k| k.0 == d) {
            Some(&(_, ifindex, smac, dmac)) => Route::Via {
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
        let to_vip = self.vips.contains(&dst);
        match f[l4] {
            8 if to_vip && self.firewall.flags & FIREWALL_F_ECHO_REPLY != 0 => {
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
        let key = FlowKey {
            src: qdst,
            dst: qsrc,
            sport: qdport,
            dport: qsport,
            proto: qproto,
            _pad: [0; 3],
        };
        let quote = Quote {
            ip: q,
            l4: ql4,
            proto: qproto,
            end,
        };
        if to_vip {
            let t = *self.conntrack.get(&key)?;
            let b = self
                .backend(t.backend)
                .filter(|b| b.generation == t.generation)?;
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
        let ip_check = checksum::replace4(old_ip_check, old_addr, a);
        f[addr_at..addr_at + 4].copy_from_slice(&a);
        f[self.ip + 10..self.ip + 12].copy_from_slice(&ip_check);
        let mut icmp_check = checksum::replace4([f[icmp + 2], f[icmp + 3]], old_addr, a);
        icmp_check = checksum::replace2(icmp_check, old_ip_check, ip_check);
        let old_port = [f[port_at], f[port_at + 1]];
        f[port_at..port_at + 2].copy_from_slice(&port);
        icmp_check = checksum::replace2(icmp_check, old_port, port);
        let check_at = self.l4 + if self.proto == IPPROTO_TCP { 16 } else { 6 };
        if check_at + 2 <= self.end {
            let old = [f[check_at], f[check_at + 1]];
            let new = if self.proto == IPPROTO_TCP {
                checksum::replace2(checksum::replace4(old, old_addr, a), old_port, port)
            } else {
                checksum::udp_replace2(checksum::udp_replace4(old, old_addr, a), old_port, port)
            };
            f[check_at..check_at + 2].copy_from_slice(&new);
            icmp_check = checksum::replace2(icmp_check, old, new);
        }
        f[icmp + 2..icmp + 4].copy_from_slice(&icmp_check);
    }
}

/// The client flow (client to VIP) of the reply `key` (backend to client).
fn client_flow(key: &FlowKey, vip: [u8; 4], vport: [u8; 2]) -> FlowKey {
    FlowKey::new(key.dst, vip, key.dport, vport, key.proto)
}

/// The reply side's key of the client flow `key` on backend `b`.
fn reply_key(key: &FlowKey, b: &Backend) -> FlowKey {
    FlowKey::new(b.addr, key.src, b.port, key.sport, key.proto)
}

/// Where a client packet's flow stands (as `conntrack::plan` says).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    New,
    Established,
    HalfOpen,
    Closed,
}

/// The full path's plan for a client packet.
#[derive(Clone, Copy)]
struct Plan {
    stage: Stage,
    service: u32,
    /// The backend of the established flow the packet replaces.
    replaced: Option<u32>,
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn addr(f: &[u8], at: usize) -> [u8; 4] {
    [f[at], f[at + 1], f[at + 2], f[at + 3]]
}

fn within(a: [u8; 4], net: u32, len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from_be_bytes(a) & mask == net
}

/// Sets the IPv4 address at `at` and updates the header checksum of the
/// header at `ip`.
fn set_addr(f: &mut [u8], ip: usize, at: usize, a: [u8; 4]) {
    let old = addr(f, at);
    let check = checksum::replace4([f[ip + 10], f[ip + 11]], old, a);
    f[at..at + 4].copy_from_slice(&a);
    f[ip + 10..ip + 12].copy_from_slice(&check);
}

fn decrement_ttl(f: &mut [u8]) -> bool {
    let (ttl, proto) = (f[22], f[23]);
    if ttl <= 1 {
        return false;
    }
    f[22] = ttl - 1;
    let check = checksum::replace2([f[24], f[25]], [ttl, proto], [ttl - 1, proto]);
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
    let tcp = f[23] == IPPROTO_TCP;
    let check_at = l4 + if tcp { 16 } else { 6 };
    let c = [f[check_at], f[check_at + 1]];
    let c = if tcp {
        checksum::replace2(checksum::replace4(c, old, a), old_port, port)
    } else {
        checksum::udp_replace2(checksum::udp_replace4(c, old, a), old_port, port)
    };
    f[check_at..check_at + 2].copy_from_slice(&c);
    f[port_at..port_at + 2].copy_from_slice(&port);
}

/// The echo reply: addresses swapped, TTL 64, type 0, MACs swapped; it leaves
/// by the interface it came in on.
fn echo_reply(f: &mut [u8], icmp: usize) {
    let (src, dst) = (addr(f, 26), addr(f, 30));
    f[26..30].copy_from_slice(&dst);
    f[30..34].copy_from_slice(&src);
    let (ttl, proto) = (f[22], f[23]);
    f[22] = 64;
    let check = checksum::replace2([f[24], f[25]], [ttl, proto], [64, proto]);
    f[24..26].copy_from_slice(&check);
    let code = f[icmp + 1];
    let check = checksum::replace2([f[icmp + 2], f[icmp + 3]], [f[icmp], code], [0, code]);
    f[icmp] = 0;
    f[icmp + 2..icmp + 4].copy_from_slice(&check);
    swap_macs(f);
}

fn swap_macs(f: &mut [u8]) {
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
}

/// The TCP reset that refuses the segment in `f` (see `lb_common::reset`):
/// bare headers, sent back by redirect; a drop when it cannot be made.
fn reset(f: &mut Vec<u8>) -> u32 {
    if f.len() < 54 || f[14] != 0x45 {
        return XDP_DROP;
    }
    let ip: [u8; 20] = f[14..34].try_into().unwrap();
    let tcp: [u8; 20] = f[34..54].try_into().unwrap();
    let tot_len = be16(f, 16) as u32;
    let doff = (tcp[12] >> 4) as u32 * 4;
    let payload = tot_len.saturating_sub(20 + doff);
    let Some((ip_out, tcp_out)) = lb_common::reset::tcp_reset(&ip, &tcp, payload) else {
        return XDP_DROP;
    };
    f.truncate(54);
    swap_macs(f);
    f[14..34].copy_from_slice(&ip_out);
    f[34..54].copy_from_slice(&tcp_out);
    XDP_REDIRECT
}
