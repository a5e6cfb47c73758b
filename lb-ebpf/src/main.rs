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
    counter, firewall::Firewall, prefilter_bit, Backend, FlowKey, NextHop, ReverseFlow, ServiceKey,
    BACKEND_F_DROP_FLOWS, BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT, BACKEND_F_RESET_FLOWS,
    FLOW_F_BACKEND_RESET, IPPROTO_TCP, PREFILTER_BACKENDS, PREFILTER_VIPS, TRANSIENT_CLOSED,
    TRANSIENT_HALF_OPEN,
};

use crate::{
    conntrack::{Plan, STAGE_BACKEND_RESET, STAGE_ESTABLISHED, STAGE_NEW},
    forward::Kind,
    hook::{Hook, Outcome},
    maps::{BACKENDS, HOPS, PREFILTER, REVERSE, SCRATCH, SCRATCH_PLAN, SERVICES, SERVICES_BY_ID},
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
        if let Some(o) = to_vip(ctx, fw, p, &key) {
            return o;
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

/// A packet to a VIP address: its flow's backend, from the fast path (an
/// established flow) or the full path (the service, the flow tables, the
/// scheduler); then, written once for both, the route, the flow's change of
/// stage (full path only), the rewrite and the send. `None`: no service
/// takes it (the caller goes on as for any address).
#[inline(always)]
fn to_vip<H: Hook>(ctx: &H, fw: &Firewall, p: &Packet, key: &FlowKey) -> Option<Outcome> {
    // The plan of the full path (in this CPU's scratch slot), or null.
    let mut plan: *mut Plan = core::ptr::null_mut();
    let (backend_id, backend) = match established(p, key) {
        Ok(found) => found,
        Err(refused) if refused != 0 => return Some(Outcome::drop(refused)),
        Err(_) => {
            let svc_key = ServiceKey {
                vip: key.dst,
                port: key.dport,
                proto: p.proto,
                _pad: 0,
            };
            let Some(svc) = SERVICES.get_ptr(svc_key) else {
                if firewall::closed(fw, key.dst) {
                    return Some(Outcome::drop(counter::DROP_CLOSED_PORT));
                }
                return None;
            };
            // SAFETY: a live map value; the service map is replaced whole
            // (see `dataplane::apply`), never a value in place.
            let svc = unsafe { &*svc };
            plan = SCRATCH.get_ptr_mut(SCRATCH_PLAN)? as *mut Plan;
            match full_path(ctx, fw, p, key, svc, plan) {
                Ok(found) => found,
                Err(o) => return Some(o),
            }
        }
    };
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    if unsafe { (*p.ip).ttl } <= 1 {
        return Some(Outcome::pass(counter::PASS_TTL_EXPIRED));
    }
    let hop = HOPS.get(backend_id)?;
    let to = FlowKey::new(key.src, backend.addr, key.sport, backend.port, p.proto);
    let route = forward::route(ctx, hop, p.ip, &to);
    if route.kind == Kind::Unreachable {
        return Some(Outcome::drop(counter::DROP_NO_ROUTE));
    }
    let mut new_flow = false;
    if !plan.is_null() {
        // The last check that can refuse the packet is behind us: only now
        // does the flow's stage change.
        // SAFETY: this CPU's scratch slot, written by conntrack::plan.
        let refused = conntrack::commit(key, unsafe { &*plan }, backend);
        if refused != 0 {
            return Some(Outcome::drop(refused));
        }
        // SAFETY: as above.
        new_flow = unsafe { (*plan).stage } == STAGE_NEW;
    }
    let bytes = ctx.frame_len() as u64;
    nat::decrement_ttl(p.ip);
    let mut fix = nat::rewrite_dst(p, backend.addr, backend.port);
    // SAFETY: as above.
    if !plan.is_null() && unsafe { (*plan).stage } == STAGE_BACKEND_RESET {
        nat::into_reset(p, &mut fix);
        return Some(forward::send(p.eth, &route, counter::RESET_FLOW).with_fix(fix));
    }
    let sent = route.kind == Kind::Via;
    stats::traffic(backend_id, Direction::Forward { new_flow }, sent, bytes);
    Some(forward::send(p.eth, &route, counter::COUNTED).with_fix(fix))
}

/// The fast path's backend for an established flow: the flow is known, its
/// backend is the one it was scheduled on and takes its packets as usual,
/// the packet is no SYN, FIN or RST, a UDP flow is not idle past its
/// service's timeout. `Err(0)`: the full path decides (it knows every rule);
/// `Err(counter)`: refused.
#[inline(always)]
fn established(p: &Packet, key: &FlowKey) -> Result<(u32, &'static Backend), u32> {
    if p.proto == IPPROTO_TCP && (p.is_tcp_open() || p.is_tcp_close()) {
        return Err(0);
    }
    let f = conntrack::entry(key).ok_or(0u32)?;
    // SAFETY: f points at a live map value (see conntrack::touch).
    let (backend_id, generation, service, last_seen) =
        unsafe { ((*f).backend, (*f).generation, (*f).service, (*f).last_seen) };
    let b = BACKENDS.get(backend_id).ok_or(0u32)?;
    if b.generation != generation
        || b.flags & BACKEND_F_PRESENT == 0
        || b.flags & (BACKEND_F_DROP_FLOWS | BACKEND_F_RESET_FLOWS) != 0
    {
        return Err(0);
    }
    // The backend's slot is the flow's (same generation), so the service it
    // belongs to is the flow's too: a removed service's backends are gone.
    let svc = SERVICES_BY_ID.get(service).ok_or(0u32)?;
    let now = conntrack::now();
    if idle_expired(svc, p.proto, last_seen, now) {
        return Err(0);
    }
    if !firewall::service_allows(svc, key.src) {
        return Err(counter::DROP_DENIED_SERVICE);
    }
    // SAFETY: as above.
    unsafe { conntrack::touch(f, now) };
    Ok((backend_id, b))
}

/// Whether a UDP flow last seen at `last_seen` is over (idle past its
/// service's timeout).
#[inline(always)]
pub(crate) fn idle_expired(svc: &lb_common::Service, proto: u8, last_seen: u64, now: u64) -> bool {
    proto != IPPROTO_TCP
        && svc.idle_ticks != 0
        && now.wrapping_sub(last_seen) > svc.idle_ticks as u64
}

/// The full path's backend: the service's rules, where the flow stands in
/// the flow tables (or a backend for a new one: `conntrack::plan`, into
/// `plan`), and the backend's state. `Err`: the packet's outcome.
#[inline(always)]
fn full_path<H: Hook>(
    ctx: &H,
    fw: &Firewall,
    p: &Packet,
    key: &FlowKey,
    svc: &lb_common::Service,
    plan: *mut Plan,
) -> Result<(u32, &'static Backend), Outcome> {
    if !firewall::service_allows(svc, key.src) {
        return Err(Outcome::drop(counter::DROP_DENIED_SERVICE));
    }
    conntrack::plan(key, svc, fw, conntrack::facts(p), plan);
    // SAFETY: this CPU's scratch slot, every field written by plan().
    let (refused, stage, backend_id, generation, flow_flags) = unsafe {
        (
            (*plan).refused,
            (*plan).stage,
            (*plan).backend,
            (*plan).generation,
            (*plan).flow_flags,
        )
    };
    if refused != 0 {
        if refused == counter::RESET_NO_BACKEND {
            return Err(Outcome::new(reset::reset(ctx), counter::RESET_NO_BACKEND));
        }
        return Err(Outcome::drop(refused));
    }
    let Some(backend) = backend_ref(backend_id) else {
        return Err(Outcome::drop(counter::DROP_BACKEND_GONE));
    };
    if stage != STAGE_NEW {
        if generation != backend.generation {
            // The flow's backend was removed and its slot reused.
            return Err(Outcome::drop(counter::DROP_BACKEND_GONE));
        }
        if backend.flags & BACKEND_F_DROP_FLOWS != 0 {
            return Err(Outcome::drop(counter::DROP_BACKEND_DOWN));
        }
        if backend.flags & BACKEND_F_RESET_FLOWS != 0 && p.proto == IPPROTO_TCP {
            // The backend's side first (it would never learn the client was
            // reset, and keep its side open), then the client's.
            if stage == STAGE_ESTABLISHED && flow_flags & FLOW_F_BACKEND_RESET == 0 {
                // SAFETY: this CPU's scratch slot.
                unsafe { (*plan).stage = STAGE_BACKEND_RESET };
                return Ok((backend_id, backend));
            }
            return Err(Outcome::new(reset::reset(ctx), counter::RESET_FLOW));
        }
    }
    Ok((backend_id, backend))
}

/// Backend to client: put the VIP back as the source, forward. The client
/// side's next hop is cached in the flow's reverse entry by its first reply.
#[inline(always)]
fn reply<H: Hook>(ctx: &H, p: &Packet, key: &FlowKey) -> Outcome {
    let bytes = ctx.frame_len() as u64;
    let now = conntrack::now();
    let syn_ack = p.is_tcp_syn_ack();
    // The VIP side: this instance's entry of an established flow (where the
    // client side's hop is cached), else of a transient one (the handshake's
    // SYN-ACK, a lingering FIN), else the backend address's (stateless).
    let (vip, vport, backend_id);
    let mut entry: *mut ReverseFlow = core::ptr::null_mut();
    // The generation of the flow's backend (its slot may have been given to
    // another backend since).
    let generation;
    // (state, service) of a transient flow; state 0: not transient.
    let (mut t_state, mut t_service) = (0u8, 0u32);
    if let Some(rev) = REVERSE.get_ptr_mut(key) {
        // SAFETY: a live map value; read field by field.
        (vip, vport, backend_id, generation) =
            unsafe { ((*rev).vip, (*rev).vport, (*rev).backend, (*rev).generation) };
        if syn_ack && conntrack::stale_for_handshake(key, vip, vport) {
            return Outcome::pass(counter::PASS_NO_SERVICE);
        }
        entry = rev;
    } else if let Some(t) = conntrack::transient_of(key, now) {
        if syn_ack && t.state == TRANSIENT_CLOSED {
            // A new handshake on the ports of a flow that ended: not ours
            // (see stale_for_handshake).
            return Outcome::pass(counter::PASS_NO_SERVICE);
        }
        (vip, vport, backend_id, generation) = (t.vip, t.vport, t.backend, t.generation);
        (t_state, t_service) = (t.state, t.service);
    } else if let Some(rev) = conntrack::by_backend(key) {
        (vip, vport, backend_id, generation) = (rev.vip, rev.vport, rev.backend, rev.generation);
    } else {
        return Outcome::pass(counter::PASS_NO_SERVICE);
    }
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
    let (fin, rst) = (p.is_tcp_fin(), p.is_tcp_rst());
    if fin || rst {
        let e = conntrack::Ending {
            service: t_service,
            backend: backend_id,
            generation,
            _pad: 0,
        };
        end_by_backend(key, vip, vport, fin, rst, t_state, &e, now);
    }
    let fix = nat::rewrite_src(p, vip, vport);
    if BACKENDS
        .get(backend_id)
        .is_some_and(|b| b.generation == generation)
    {
        stats::traffic(backend_id, Direction::Reply, route.kind == Kind::Via, bytes);
    } else if route.kind == Kind::Via {
        // A reply of a flow whose backend's slot was given to another
        // backend since: not that one's traffic; counted in the total only.
        stats::count(counter::REPLIES);
    }
    forward::send(p.eth, &route, counter::COUNTED).with_fix(fix)
}

/// The backend ends the connection (FIN) or refuses or aborts it (RST): a
/// later SYN on these ports is a new connection, and once both sides sent
/// FIN (or at an RST) the flow is closed.
///
/// Only while the flow's backend still holds its slot (same generation):
/// a slot given to another backend since must not lend the flow its
/// address or generation (the flow's late packets would reach that one);
/// such a flow is left to be dropped as its backend's and to the LRU.
/// `transient` is the (service, backend, generation) of a transient flow,
/// whose state is `t_state` (0: not transient).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn end_by_backend(
    key: &FlowKey,
    vip: [u8; 4],
    vport: [u8; 2],
    fin: bool,
    rst: bool,
    t_state: u8,
    transient: &conntrack::Ending,
    now: u64,
) {
    let client = conntrack::client_flow(key, vip, vport);
    if t_state != 0 {
        // A transient flow: the backend refusing the handshake closes it.
        if t_state == TRANSIENT_HALF_OPEN && rst {
            if let Some(b) = backend_of(transient.backend, transient.generation) {
                let reply = conntrack::reply_key(&client, b);
                conntrack::close_transient(&client, &reply, transient, now);
            }
        }
        return;
    }
    let Some((ending, flags)) = conntrack::backend_ends(&client, fin) else {
        return;
    };
    if rst || conntrack::both_fins(flags) {
        if let Some(b) = backend_of(ending.backend, ending.generation) {
            let reply = conntrack::reply_key(&client, b);
            if conntrack::retire(&client, &reply, &ending, now) {
                stats::count(counter::FLOWS_CLOSED);
            }
        }
    }
}

/// The backend in slot `id` if it is the incarnation of `generation`.
#[inline(always)]
fn backend_of(id: u32, generation: u32) -> Option<&'static Backend> {
    backend_ref(id).filter(|b| b.generation == generation)
}

/// Whether a flow's backend (id and generation) is still there and takes
/// new flows.
#[inline(always)]
pub(crate) fn takes_new_flows_of(id: u32, generation: u32) -> bool {
    match backend_ref(id) {
        Some(b) => b.generation == generation && b.flags & BACKEND_F_NO_NEW_FLOWS == 0,
        None => false,
    }
}

/// The backend with id `id`, in place, if its slot holds one.
#[inline(always)]
pub fn backend_ref(id: u32) -> Option<&'static Backend> {
    BACKENDS
        .get(id)
        .filter(|b| b.flags & BACKEND_F_PRESENT != 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
