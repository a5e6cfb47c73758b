//! The data path, at XDP or TC ingress (`hook.rs`). Each packet: parse ->
//! service or reply lookup -> find or pick the backend -> rewrite -> forward.
//! Everything else passes to the kernel.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd: see select.rs")]

mod conntrack;
mod firewall;
mod forward;
mod hook;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reset;
mod select;
mod stats;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    counter, firewall::Firewall, prefilter_bit, Backend, FlowKey, NextHop, ServiceKey,
    BACKEND_F_DROP_FLOWS, BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT, BACKEND_F_RESET_FLOWS,
    IPPROTO_TCP, PREFILTER_BACKENDS, PREFILTER_VIPS, SERVICE_F_MAGLEV, SERVICE_F_RESET_IF_EMPTY,
};

use crate::{
    conntrack::Reverse,
    forward::Kind,
    hook::{Hook, Outcome},
    maps::{BACKENDS, HOPS, PREFILTER, SERVICES, SERVICES_BY_ID},
    parse::{Packet, Parsed},
    stats::Direction,
};

/// The data path at XDP: native on a NIC's driver, or generic.
#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    run(&ctx) as u32
}

/// The same data path at TC ingress (clsact, `sched_cls`).
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    if hook::tc_vlan_tagged(&ctx) {
        stats::count(counter::PASS_NOT_IPV4);
        return ctx.action(&Outcome::pass(counter::PASS_NOT_IPV4));
    }
    hook::tc_pull_headers(&ctx);
    run(&ctx)
}

/// One packet, at either hook: decide, count, finish the rewrite, send.
#[inline(always)]
fn run<H: Hook>(ctx: &H) -> i32 {
    let Some(fw) = firewall::settings() else {
        // Never: an array's entries always exist.
        return ctx.action(&Outcome::pass(counter::PASS_NOT_IPV4));
    };
    let outcome = decide(ctx, fw);
    if outcome.counter != counter::COUNTED {
        stats::count(outcome.counter);
    }
    #[cfg(feature = "verbose-logs")]
    if outcome.verdict == hook::Verdict::Drop && stats::log_allowed() {
        log_drop(ctx, outcome.counter);
    }
    if outcome.fix.proto != 0 {
        ctx.fix_l4(&outcome.fix);
    }
    ctx.action(&outcome)
}

/// One log line for a dropped packet (`verbose-logs`). A subprogram: the
/// log record's buffers then take a frame of their own, not the program's.
#[cfg(feature = "verbose-logs")]
#[inline(never)]
fn log_drop<H: Hook>(ctx: &H, counter: u32) {
    aya_log_ebpf::debug!(ctx, "dropped: outcome {}", counter);
}

/// What becomes of the packet: parse, the global deny list, then by kind.
#[inline(always)]
fn decide<H: Hook>(ctx: &H, fw: &Firewall) -> Outcome {
    let parsed = parse::parse(ctx);
    if let Some(ip) = parsed.ipv4() {
        // SAFETY: parse() checked the IPv4 header is inside the frame.
        if firewall::denied(fw, unsafe { (*ip).src_addr }) {
            return Outcome::drop(counter::DROP_DENIED_GLOBAL);
        }
    }
    match parsed {
        Parsed::Pass(c) => Outcome::pass(c),
        Parsed::Drop(c) => Outcome::drop(c),
        Parsed::OtherIp(ip, c) => {
            // SAFETY: as above.
            if c == counter::PASS_OTHER_PROTO && firewall::closed(fw, unsafe { (*ip).dst_addr }) {
                Outcome::drop(counter::DROP_CLOSED_PORT)
            } else {
                Outcome::pass(c)
            }
        }
        Parsed::Icmp(m) => icmp::handle(ctx, fw, &m),
        Parsed::Packet(p) => handle(ctx, fw, &p),
    }
}

/// A TCP or UDP packet: to a service, a backend's reply, or neither.
///
/// The prefilter first: a packet to no VIP from no backend (most of what a
/// host carries besides its services) is passed without a hash lookup. To a
/// VIP, an established flow takes the fast path (one flow lookup, its
/// backend, service and next hop read from arrays); everything else, new
/// flows and the rare cases, the full path through the service table.
#[inline(always)]
fn handle<H: Hook>(ctx: &H, fw: &Firewall, p: &Packet) -> Outcome {
    let (sport, dport) = p.ports();
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    let (src, dst) = unsafe { ((*p.ip).src_addr, (*p.ip).dst_addr) };
    let key = FlowKey::new(src, dst, sport, dport, p.proto);
    if maybe(PREFILTER_VIPS, dst) {
        if let Some(o) = established(ctx, p, &key) {
            return o;
        }
        let svc_key = ServiceKey {
            vip: dst,
            port: dport,
            proto: p.proto,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once.
        if let Some(svc) = unsafe { SERVICES.get(svc_key).copied() } {
            return to_service(ctx, fw, p, &key, &svc);
        }
        if firewall::closed(fw, dst) {
            return Outcome::drop(counter::DROP_CLOSED_PORT);
        }
    }
    if maybe(PREFILTER_BACKENDS, src) {
        return reply(ctx, p, &key);
    }
    Outcome::pass(counter::PASS_NO_SERVICE)
}

/// Whether `addr` may be in the prefilter half starting at word `half`.
#[inline(always)]
fn maybe(half: u32, addr: [u8; 4]) -> bool {
    let (word, bit) = prefilter_bit(addr);
    PREFILTER.get(half + word).is_some_and(|w| *w & bit != 0)
}

/// The fast path of an established flow to a VIP: the flow is known, its
/// backend is the one it was scheduled on and takes its packets as usual,
/// the packet is no SYN and has TTL to spare. Anything else (`None`) goes
/// the full path, which knows every rule.
#[inline(always)]
fn established<H: Hook>(ctx: &H, p: &Packet, key: &FlowKey) -> Option<Outcome> {
    if p.proto == IPPROTO_TCP && p.is_tcp_open() {
        return None;
    }
    let f = conntrack::entry(key)?;
    // SAFETY: f points at a live map value (see conntrack::touch).
    let (backend_id, generation, service) =
        unsafe { ((*f).backend, (*f).generation, (*f).service) };
    let b = BACKENDS.get(backend_id)?;
    if b.generation != generation
        || b.flags & BACKEND_F_PRESENT == 0
        || b.flags & (BACKEND_F_DROP_FLOWS | BACKEND_F_RESET_FLOWS) != 0
    {
        return None;
    }
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    if unsafe { (*p.ip).ttl } <= 1 {
        return None;
    }
    // The backend's slot is the flow's (same generation), so the service it
    // belongs to is the flow's too: a removed service's backends are gone.
    let svc = SERVICES_BY_ID.get(service)?;
    if !firewall::service_allows(svc, key.src) {
        return Some(Outcome::drop(counter::DROP_DENIED_SERVICE));
    }
    let hop = HOPS.get(backend_id)?;
    let to = FlowKey::new(key.src, b.addr, key.sport, b.port, p.proto);
    let route = forward::route(ctx, hop, p.ip, &to);
    if route.kind == Kind::Unreachable {
        return Some(Outcome::drop(counter::DROP_NO_ROUTE));
    }
    let bytes = ctx.frame_len() as u64;
    // SAFETY: as above.
    unsafe { conntrack::touch(f, p.is_tcp_close()) };
    nat::decrement_ttl(p.ip);
    let fix = nat::rewrite_dst(p, b.addr, b.port);
    let sent = route.kind == Kind::Via;
    stats::traffic(
        backend_id,
        Direction::Forward { new_flow: false },
        sent,
        bytes,
    );
    Some(forward::send(p.eth, &route, counter::COUNTED).with_fix(fix))
}

/// Client to VIP: find the flow's backend or pick one, rewrite, forward.
#[inline(always)]
fn to_service<H: Hook>(
    ctx: &H,
    fw: &Firewall,
    p: &Packet,
    key: &FlowKey,
    svc: &lb_common::Service,
) -> Outcome {
    let bytes = ctx.frame_len() as u64;
    if !firewall::service_allows(svc, key.src) {
        return Outcome::drop(counter::DROP_DENIED_SERVICE);
    }
    let opening = p.is_tcp_open();
    let known = conntrack::lookup(key, opening, p.is_tcp_close())
        // A SYN for a flow whose backend takes no new flows or is gone is
        // a new connection on old ports: it is scheduled afresh.
        .filter(|k| !(p.proto == IPPROTO_TCP && opening && !takes_new_flows(k)));
    let (backend_id, generation, new_flow) = match known {
        Some(k) => (k.backend, Some(k.generation), false),
        None => {
            if p.proto == IPPROTO_TCP && !opening {
                // Mid-flow segment of a flow we do not know (evicted, or
                // it came through another balancer). Maglev knows where
                // it belongs; a round-robin service never guesses.
                if svc.flags & SERVICE_F_MAGLEV == 0 {
                    return Outcome::drop(counter::DROP_TCP_NO_FLOW);
                }
                stats::count(counter::FLOWS_RECOVERED);
            }
            // The SYN-flood guard, before the flow takes a table entry.
            if let Err(over) = firewall::admit_new_flow(fw, key.src) {
                return Outcome::drop(over);
            }
            let Some(b) = select::pick(svc, key) else {
                if p.proto == IPPROTO_TCP && svc.flags & SERVICE_F_RESET_IF_EMPTY != 0 {
                    return Outcome::new(reset::reset(ctx), counter::RESET_NO_BACKEND);
                }
                return Outcome::drop(counter::DROP_NO_BACKEND);
            };
            (b, None, true)
        }
    };
    let Some(backend) = backend(backend_id) else {
        return Outcome::drop(counter::DROP_BACKEND_GONE);
    };
    if let Some(g) = generation {
        if g != backend.generation {
            // The flow's backend was removed and its slot reused.
            return Outcome::drop(counter::DROP_BACKEND_GONE);
        }
        if backend.flags & BACKEND_F_DROP_FLOWS != 0 {
            return Outcome::drop(counter::DROP_BACKEND_DOWN);
        }
        if backend.flags & BACKEND_F_RESET_FLOWS != 0 && p.proto == IPPROTO_TCP {
            return Outcome::new(reset::reset(ctx), counter::RESET_FLOW);
        }
    }
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    if unsafe { (*p.ip).ttl } <= 1 {
        return Outcome::pass(counter::PASS_TTL_EXPIRED);
    }
    let Some(hop) = HOPS.get(backend_id) else {
        return Outcome::drop(counter::DROP_BACKEND_GONE);
    };
    let to = FlowKey::new(key.src, backend.addr, key.sport, backend.port, p.proto);
    let route = forward::route(ctx, hop, p.ip, &to);
    if route.kind == Kind::Unreachable {
        return Outcome::drop(counter::DROP_NO_ROUTE);
    }
    // The last check that can refuse the packet is behind us: only now
    // does a new flow take its table entries.
    if new_flow {
        if !conntrack::insert(key, svc.id, backend_id, &backend) {
            return Outcome::drop(counter::DROP_TABLE_FULL);
        }
        stats::count(counter::NEW_FLOWS);
    }
    nat::decrement_ttl(p.ip);
    let fix = nat::rewrite_dst(p, backend.addr, backend.port);
    let sent = route.kind == Kind::Via;
    stats::traffic(backend_id, Direction::Forward { new_flow }, sent, bytes);
    forward::send(p.eth, &route, counter::COUNTED).with_fix(fix)
}

/// Backend to client: put the VIP back as the source, forward. The client
/// side's next hop is cached in the flow's reverse entry by its first reply.
#[inline(always)]
fn reply<H: Hook>(ctx: &H, p: &Packet, key: &FlowKey) -> Outcome {
    let bytes = ctx.frame_len() as u64;
    let Some(found) = conntrack::reverse(key) else {
        return Outcome::pass(counter::PASS_NO_SERVICE);
    };
    let (vip, vport, backend, entry) = match found {
        Reverse::Tracked(rev) => {
            // SAFETY: a live map value; read field by field.
            let (vip, vport, backend) = unsafe { ((*rev).vip, (*rev).vport, (*rev).backend) };
            if p.is_tcp_syn_ack() && conntrack::stale_for_handshake(key, vip, vport) {
                return Outcome::pass(counter::PASS_NO_SERVICE);
            }
            (vip, vport, backend, rev)
        }
        Reverse::ByBackend(rev) => (rev.vip, rev.vport, rev.backend, core::ptr::null_mut()),
    };
    let cached = if entry.is_null() {
        NextHop::default()
    } else {
        // SAFETY: as above; a hop torn by a racing CPU of the same flow holds
        // the same values (both resolved it under one generation).
        unsafe { (*entry).hop }
    };
    let to = FlowKey::new(vip, key.dst, vport, key.dport, p.proto);
    let route = forward::route(ctx, &cached, p.ip, &to);
    if route.kind == Kind::Local {
        // Addressed to this host (the reply to its own health check, say):
        // not a client's reply, whatever port it comes from.
        return Outcome::pass(counter::PASS_NO_SERVICE);
    }
    if route.kind == Kind::TooBig && p.dont_fragment() {
        // Passed as it came: the kernel tells the backend "fragmentation
        // needed", and it sends smaller segments (path MTU discovery across
        // the balancer).
        return Outcome::pass(counter::PASS_TOO_BIG);
    }
    if !nat::decrement_ttl(p.ip) {
        return Outcome::pass(counter::PASS_TTL_EXPIRED);
    }
    if route.kind == Kind::Via && !entry.is_null() && route.hop.generation != cached.generation {
        // SAFETY: as above.
        unsafe { (*entry).hop = route.hop };
    }
    if p.is_tcp_close() {
        // The backend ends the connection (or refuses it): a later SYN
        // on these ports is a new connection.
        conntrack::mark_closing(key, vip, vport);
    }
    let fix = nat::rewrite_src(p, vip, vport);
    stats::traffic(backend, Direction::Reply, route.kind == Kind::Via, bytes);
    forward::send(p.eth, &route, counter::COUNTED).with_fix(fix)
}

/// Whether the tracked flow's backend is still there and takes new flows.
#[inline(always)]
fn takes_new_flows(k: &conntrack::Known) -> bool {
    match backend(k.backend) {
        Some(b) => b.generation == k.generation && b.flags & BACKEND_F_NO_NEW_FLOWS == 0,
        None => false,
    }
}

/// The backend with id `id`, if its slot holds one.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_F_PRESENT == 0 {
        return None;
    }
    Some(*b)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
