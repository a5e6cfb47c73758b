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
    counter, firewall::Firewall, Backend, FlowKey, ServiceKey, BACKEND_F_DROP_FLOWS,
    BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT, BACKEND_F_RESET_FLOWS, IPPROTO_TCP,
    SERVICE_F_MAGLEV, SERVICE_F_RESET_IF_EMPTY,
};

use crate::{
    conntrack::Reverse,
    forward::Kind,
    hook::{Hook, Outcome},
    maps::{BACKENDS, SERVICES},
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
    let fw = firewall::settings();
    let outcome = decide(ctx, &fw);
    stats::count(outcome.counter);
    #[cfg(feature = "verbose-logs")]
    if outcome.verdict == hook::Verdict::Drop && stats::log_allowed() {
        aya_log_ebpf::debug!(ctx, "dropped: outcome {}", outcome.counter);
    }
    if outcome.fix.proto != 0 {
        ctx.fix_l4(&outcome.fix);
    }
    ctx.action(&outcome)
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
#[inline(always)]
fn handle<H: Hook>(ctx: &H, fw: &Firewall, p: &Packet) -> Outcome {
    let (sport, dport) = p.ports();
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    let (src, dst) = unsafe { ((*p.ip).src_addr, (*p.ip).dst_addr) };
    let key = FlowKey {
        src,
        dst,
        sport,
        dport,
        proto: p.proto,
        _pad: [0; 3],
    };
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
    reply(ctx, p, &key)
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
    let route = forward::route(
        ctx,
        p.ip,
        p.proto,
        key.src,
        backend.addr,
        (key.sport, backend.port),
    );
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
    stats::traffic(svc.id, backend_id, Direction::Forward { new_flow }, bytes);
    forward::send(p.eth, route, counter::FORWARDED).with_fix(fix)
}

/// Backend to client: put the VIP back as the source, forward.
#[inline(always)]
fn reply<H: Hook>(ctx: &H, p: &Packet, key: &FlowKey) -> Outcome {
    let bytes = ctx.frame_len() as u64;
    let Some(found) = conntrack::reverse(key) else {
        return Outcome::pass(counter::PASS_NO_SERVICE);
    };
    let rev = match found {
        Reverse::Tracked(rev) => {
            if p.is_tcp_syn_ack() && conntrack::stale_for_handshake(key, &rev) {
                return Outcome::pass(counter::PASS_NO_SERVICE);
            }
            rev
        }
        Reverse::ByBackend(rev) => rev,
    };
    let route = forward::route(ctx, p.ip, p.proto, rev.vip, key.dst, (rev.vport, key.dport));
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
    if p.is_tcp_close() {
        // The backend ends the connection (or refuses it): a later SYN
        // on these ports is a new connection.
        conntrack::mark_closing(key, &rev);
    }
    let fix = nat::rewrite_src(p, rev.vip, rev.vport);
    stats::traffic(rev.service, rev.backend, Direction::Reply, bytes);
    forward::send(p.eth, route, counter::REPLIES).with_fix(fix)
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
