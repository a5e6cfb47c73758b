//! The XDP data path. Each packet: parse -> service or reply lookup -> find or
//! pick the backend -> rewrite -> forward. Everything else passes to the kernel.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd: see select.rs")]

mod conntrack;
mod firewall;
mod forward;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reset;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    counter, firewall::Firewall, Backend, FlowKey, ServiceKey, BACKEND_F_DROP_FLOWS,
    BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT, BACKEND_F_RESET_FLOWS, IPPROTO_TCP,
    SERVICE_F_MAGLEV, SERVICE_F_RESET_IF_EMPTY,
};

use crate::{
    conntrack::Reverse,
    forward::Route,
    maps::{BACKENDS, SERVICES},
    parse::{Packet, Parsed},
    stats::Direction,
};

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    let fw = firewall::settings();
    let (action, outcome) = match parse::parse(&ctx) {
        Parsed::Pass(c) => (xdp_action::XDP_PASS, c),
        Parsed::Drop(c) => (xdp_action::XDP_DROP, c),
        Parsed::OtherIp(ip, c) => {
            // SAFETY: parse() checked the IPv4 header is inside the frame.
            let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
            if firewall::denied(&fw, src) {
                (xdp_action::XDP_DROP, counter::DROP_DENIED_GLOBAL)
            } else if c == counter::PASS_OTHER_PROTO && firewall::closed(&fw, dst) {
                (xdp_action::XDP_DROP, counter::DROP_CLOSED_PORT)
            } else {
                (xdp_action::XDP_PASS, c)
            }
        }
        Parsed::Icmp(m) => {
            // SAFETY: as above.
            if firewall::denied(&fw, unsafe { (*m.ip).src_addr }) {
                (xdp_action::XDP_DROP, counter::DROP_DENIED_GLOBAL)
            } else {
                icmp::handle(&ctx, &fw, &m)
            }
        }
        Parsed::Packet(p) => {
            // SAFETY: as above.
            if firewall::denied(&fw, unsafe { (*p.ip).src_addr }) {
                (xdp_action::XDP_DROP, counter::DROP_DENIED_GLOBAL)
            } else {
                handle(&ctx, &fw, &p)
            }
        }
    };
    stats::count(outcome);
    #[cfg(feature = "verbose-logs")]
    if action == xdp_action::XDP_DROP && stats::log_allowed() {
        aya_log_ebpf::debug!(&ctx, "dropped: outcome {}", outcome);
    }
    action
}

/// The packet's journey once its headers are known; returns the action and the
/// outcome counter to bump.
#[inline(always)]
fn handle(ctx: &XdpContext, fw: &Firewall, p: &Packet) -> (u32, u32) {
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
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let svc_key = ServiceKey {
        vip: dst,
        port: dport,
        proto: p.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(svc) = unsafe { SERVICES.get(svc_key).copied() } {
        if !firewall::service_allows(&svc, src) {
            return (xdp_action::XDP_DROP, counter::DROP_DENIED_SERVICE);
        }
        let opening = p.is_tcp_open();
        let known = conntrack::lookup(&key, opening, p.is_tcp_close())
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
                        return (xdp_action::XDP_DROP, counter::DROP_TCP_NO_FLOW);
                    }
                    stats::count(counter::FLOWS_RECOVERED);
                }
                // The SYN-flood guard, before the flow takes a table entry.
                if let Err(over) = firewall::admit_new_flow(fw, src) {
                    return (xdp_action::XDP_DROP, over);
                }
                let Some(b) = select::pick(&svc, &key) else {
                    if p.proto == IPPROTO_TCP && svc.flags & SERVICE_F_RESET_IF_EMPTY != 0 {
                        return (reset::reset(ctx), counter::RESET_NO_BACKEND);
                    }
                    return (xdp_action::XDP_DROP, counter::DROP_NO_BACKEND);
                };
                (b, None, true)
            }
        };
        let Some(backend) = backend(backend_id) else {
            return (xdp_action::XDP_DROP, counter::DROP_BACKEND_GONE);
        };
        if let Some(g) = generation {
            if g != backend.generation {
                // The flow's backend was removed and its slot reused.
                return (xdp_action::XDP_DROP, counter::DROP_BACKEND_GONE);
            }
            if backend.flags & BACKEND_F_DROP_FLOWS != 0 {
                return (xdp_action::XDP_DROP, counter::DROP_BACKEND_DOWN);
            }
            if backend.flags & BACKEND_F_RESET_FLOWS != 0 && p.proto == IPPROTO_TCP {
                return (reset::reset(ctx), counter::RESET_FLOW);
            }
        }
        if new_flow {
            if !conntrack::insert(&key, svc.id, backend_id, &backend) {
                return (xdp_action::XDP_DROP, counter::DROP_TABLE_FULL);
            }
            stats::count(counter::NEW_FLOWS);
        }
        if !nat::decrement_ttl(p.ip) {
            return (xdp_action::XDP_PASS, counter::PASS_TTL_EXPIRED);
        }
        let route = forward::route(ctx, p.ip, p.proto, src, backend.addr, (sport, backend.port));
        nat::rewrite_dst(p, backend.addr, backend.port);
        stats::traffic(svc.id, backend_id, Direction::Forward { new_flow }, bytes);
        return forward::send(ctx, p.eth, route, counter::FORWARDED);
    }
    if firewall::closed(fw, dst) {
        return (xdp_action::XDP_DROP, counter::DROP_CLOSED_PORT);
    }
    if let Some(found) = conntrack::reverse(&key) {
        let rev = match found {
            Reverse::Tracked(rev) => {
                if p.is_tcp_syn_ack() && conntrack::stale_for_handshake(&key, &rev) {
                    return (xdp_action::XDP_PASS, counter::PASS_NO_SERVICE);
                }
                rev
            }
            Reverse::ByBackend(rev) => rev,
        };
        let route = forward::route(ctx, p.ip, p.proto, rev.vip, dst, (rev.vport, dport));
        if let Route::Local = route {
            // Addressed to this host (the reply to its own health check, say):
            // not a client's reply, whatever port it comes from.
            return (xdp_action::XDP_PASS, counter::PASS_NO_SERVICE);
        }
        if let Route::TooBig = route {
            if p.dont_fragment() {
                // Passed as it came: the kernel tells the backend
                // "fragmentation needed", and it sends smaller segments
                // (path MTU discovery across the balancer).
                return (xdp_action::XDP_PASS, counter::PASS_TOO_BIG);
            }
        }
        if !nat::decrement_ttl(p.ip) {
            return (xdp_action::XDP_PASS, counter::PASS_TTL_EXPIRED);
        }
        if p.is_tcp_close() {
            // The backend ends the connection (or refuses it): a later SYN
            // on these ports is a new connection.
            conntrack::mark_closing(&key, &rev);
        }
        nat::rewrite_src(p, rev.vip, rev.vport);
        stats::traffic(rev.service, rev.backend, Direction::Reply, bytes);
        return forward::send(ctx, p.eth, route, counter::REPLIES);
    }
    (xdp_action::XDP_PASS, counter::PASS_NO_SERVICE)
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
