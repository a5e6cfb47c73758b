//! The flow tables. Established flows live in `CONNTRACK` (client side) and
//! `REVERSE` (reply side), and leave them when they end. Flows that are not
//! established live in `TRANSIENT`, keyed by both sides: half-open (only the
//! client's SYN went through) until the client's ACK completes the handshake,
//! and closed (both FINs, or an RST) for a short linger, so that
//! retransmitted FINs and the last ACK still find their way. A SYN flood, or
//! a churn of short connections, turns over `TRANSIENT` only: an idle
//! established flow is evicted only when established flows exceed its table.
//!
//! The changes of stage (open, promote, close, retire) are subprograms, not
//! inlined: they run once or twice per connection, and inlined their locals
//! would crowd the fast path's 512-byte stack.

use aya_ebpf::helpers::generated::bpf_jiffies64;
use lb_common::{
    Backend, BackendKey, Flow, FlowKey, ReverseFlow, Transient, FLOW_F_BACKEND_RESET,
    FLOW_F_CLOSING, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, TRANSIENT_CLOSED, TRANSIENT_HALF_OPEN,
};

use crate::maps::{
    ACTIVE, BACKEND_VIPS, CONNTRACK, REVERSE, SCRATCH, SCRATCH_VALUE, SETTINGS, TRANSIENT,
};

/// The kernel's tick counter (inlined by the JIT: no call is made).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_jiffies64() }
}

/// The flow's entry in the connection table.
#[inline(always)]
pub fn entry(key: &FlowKey) -> Option<*mut Flow> {
    CONNTRACK.get_ptr_mut(key)
}

/// Marks a packet seen on an established flow: its last-seen tick (stored
/// only when it changed: a value shared by CPUs is not written per packet).
///
/// # Safety
/// `f` points at a live map value; racing writers only store whole fields,
/// and a lost update of the tick is harmless.
#[inline(always)]
pub unsafe fn touch(f: *mut Flow, now: u64) {
    if (*f).last_seen != now {
        (*f).last_seen = now;
    }
}

/// The reply side's key of the client flow `key` on backend `b`.
#[inline(always)]
pub fn reply_key(key: &FlowKey, b: &Backend) -> FlowKey {
    FlowKey::new(b.addr, key.src, b.port, key.sport, key.proto)
}

/// The client flow (client to `vip`:`vport`) of the reply `key` (backend to client).
#[inline(always)]
pub fn client_flow(key: &FlowKey, vip: [u8; 4], vport: [u8; 2]) -> FlowKey {
    FlowKey::new(key.dst, vip, key.dport, vport, key.proto)
}

/// Adds `delta` to the backend's count of established flows (this CPU's share).
#[inline(always)]
fn count_active(backend: u32, delta: i64) {
    if let Some(c) = ACTIVE.get_ptr_mut(backend) {
        // SAFETY: this CPU's slot.
        unsafe { *c += delta };
    }
}

/// Records an established flow in both directions and counts it; false if
/// the table refused it.
#[inline(never)]
pub fn establish(
    key: &FlowKey,
    service: u32,
    backend_id: u32,
    backend: &Backend,
    now: u64,
) -> bool {
    // The two values are written in this CPU's scratch slot (off the stack,
    // see maps::SCRATCH), word by word: the flow (3 words), then the reverse
    // entry (5 words), whose hop (generation 0: missing) is filled by the
    // flow's first reply (`main::reply`).
    let Some(slot) = SCRATCH.get_ptr_mut(SCRATCH_VALUE) else {
        return false;
    };
    let w = slot as *mut u64;
    let vport = u16::from_ne_bytes(key.dport) as u64;
    const _: () = assert!(core::mem::size_of::<Flow>() == 24);
    const _: () = assert!(core::mem::size_of::<ReverseFlow>() == 40);
    // SAFETY: eight stores into the slot's eight words; any bit pattern is a
    // Flow and a ReverseFlow, both 4-byte aligned (the slot is 8-aligned).
    let (flow, rev) = unsafe {
        core::ptr::write_volatile(w, backend_id as u64 | (service as u64) << 32);
        core::ptr::write_volatile(w.add(1), now);
        core::ptr::write_volatile(w.add(2), backend.generation as u64);
        core::ptr::write_volatile(w.add(3), u32::from_ne_bytes(key.dst) as u64 | vport << 32);
        core::ptr::write_volatile(
            w.add(4),
            backend_id as u64 | (backend.generation as u64) << 32,
        );
        core::ptr::write_volatile(w.add(5), 0);
        core::ptr::write_volatile(w.add(6), 0);
        core::ptr::write_volatile(w.add(7), 0);
        (&*(w as *const Flow), &*(w.add(3) as *const ReverseFlow))
    };
    if CONNTRACK.insert(key, flow, 0).is_err() {
        return false;
    }
    if REVERSE.insert(reply_key(key, backend), rev, 0).is_err() {
        let _ = CONNTRACK.remove(key);
        return false;
    }
    count_active(backend_id, 1);
    true
}

/// A transient entry of `state` for the flow `key` on backend `backend_id`,
/// written in this CPU's scratch slot (off the stack, see maps::SCRATCH).
#[inline(always)]
fn transient(
    key: &FlowKey,
    state: u8,
    service: u32,
    backend_id: u32,
    generation: u32,
    now: u64,
) -> Option<*mut Transient> {
    let slot = SCRATCH.get_ptr_mut(SCRATCH_VALUE)? as *mut Transient;
    const _: () = assert!(core::mem::size_of::<Transient>() <= 64);
    // SAFETY: the slot is 64 bytes, 8-aligned; every field is written.
    unsafe {
        (*slot).since = now;
        (*slot).backend = backend_id;
        (*slot).service = service;
        (*slot).generation = generation;
        (*slot).vip = key.dst;
        (*slot).vport = key.dport;
        (*slot).state = state;
        (*slot).reply = 0;
        (*slot)._pad = 0;
    }
    Some(slot)
}

/// The flow a closing packet ends: its service, its backend slot and the
/// generation the flow was given (the slot may have moved on since).
#[repr(C)]
pub struct Ending {
    pub service: u32,
    pub backend: u32,
    pub generation: u32,
    pub _pad: u32,
}

/// Writes the transient entry of `state` under both of the flow's keys: the
/// client side `key` and the reply side `reply`.
#[inline(always)]
fn put_transient(key: &FlowKey, reply: &FlowKey, state: u8, e: &Ending, now: u64) -> bool {
    let Some(t) = transient(key, state, e.service, e.backend, e.generation, now) else {
        return false;
    };
    // SAFETY: t points at this CPU's scratch slot; inserted by reference
    // (a copy would take stack).
    unsafe {
        let value: &Transient = &*t;
        if TRANSIENT.insert(key, value, 0).is_err() {
            return false;
        }
        (*t).reply = 1;
        let value: &Transient = &*t;
        TRANSIENT.insert(reply, value, 0).is_ok()
    }
}

/// Records a new TCP flow as half-open, by both sides; false if the table
/// refused it.
#[inline(never)]
pub fn open(key: &FlowKey, service: u32, backend_id: u32, backend: &Backend, now: u64) -> bool {
    let e = Ending {
        service,
        backend: backend_id,
        generation: backend.generation,
        _pad: 0,
    };
    put_transient(key, &reply_key(key, backend), TRANSIENT_HALF_OPEN, &e, now)
}

/// Moves a half-open flow of `service` on backend `backend_id` to the
/// connection table (its client completed the handshake); false if the table
/// refused it.
#[inline(always)]
pub fn promote(key: &FlowKey, service: u32, backend_id: u32, backend: &Backend, now: u64) -> bool {
    if !establish(key, service, backend_id, backend, now) {
        return false;
    }
    let _ = TRANSIENT.remove(key);
    let _ = TRANSIENT.remove(reply_key(key, backend));
    true
}

/// Marks a transient flow closed on both sides (an RST during the
/// handshake): it lingers, and a new SYN on its ports is a new connection.
/// `reply` is its reply side's key; the entry keeps the flow's generation.
#[inline(never)]
pub fn close_transient(key: &FlowKey, reply: &FlowKey, e: &Ending, now: u64) {
    put_transient(key, reply, TRANSIENT_CLOSED, e, now);
}

/// Whether backend slot `id` still holds the incarnation of `generation`
/// (present, or cleared and not given again: its counts are still its own).
#[inline(always)]
fn same_incarnation(id: u32, generation: u32) -> bool {
    crate::maps::BACKENDS
        .get(id)
        .is_some_and(|b| b.generation == generation)
}

/// Ends the established flow `key` (both FINs seen, or an RST): it leaves
/// the connection table and lingers in the transient one, under the flow's
/// own generation (if its backend's slot was given to another backend since,
/// its late packets must not reach that one). `reply` is its reply side's
/// key. Only the CPU whose removal succeeds counts it.
#[inline(never)]
pub fn retire(key: &FlowKey, reply: &FlowKey, e: &Ending, now: u64) -> bool {
    if CONNTRACK.remove(key).is_err() {
        return false;
    }
    let _ = REVERSE.remove(reply);
    // A slot given again had its count zeroed for its new backend.
    if same_incarnation(e.backend, e.generation) {
        count_active(e.backend, -1);
    }
    put_transient(key, reply, TRANSIENT_CLOSED, e, now);
    true
}

/// The established flow `key` on `backend` is being reset (its backend's
/// flows are to be reset), the backend's side first: the client's segment
/// goes on as a reset. The flow is closing (the client's next SYN on these
/// ports is a new connection), its next segment is answered with a reset
/// (`FLOW_F_BACKEND_RESET`), and its reply entry goes now: were the reset
/// lost, the backend keeps its side open, and when the client reuses the
/// port for another VIP the same backend serves, the backend answers that
/// SYN from the old connection; the answer must reach the client as the
/// new flow's (from its VIP), whose reset then clears the backend's side.
/// Sent from the old VIP, no client socket takes it and the connection
/// times out (found by the soak). A subprogram, off the fast path.
#[inline(never)]
pub fn reset_backend_side(key: &FlowKey, backend: &Backend) {
    if let Some(f) = entry(key) {
        // SAFETY: a live map value; setting flag bits races harmlessly.
        unsafe { (*f).flags |= FLOW_F_CLOSING | FLOW_F_BACKEND_RESET };
    }
    let _ = REVERSE.remove(reply_key(key, backend));
}

/// Ends an established flow on backend `backend_id` (of `generation`) whose
/// entry is replaced by a new flow on the same addresses and ports (a SYN
/// after FIN, a UDP flow idle past its timeout): its entries and its count
/// go. If the slot no longer holds its backend's address, the reply entry is
/// left to the table's LRU.
#[inline(never)]
pub fn replace(key: &FlowKey, backend_id: u32, generation: u32) {
    if CONNTRACK.remove(key).is_err() {
        return;
    }
    if !same_incarnation(backend_id, generation) {
        return;
    }
    if let Some(old) = crate::backend_ref(backend_id) {
        let _ = REVERSE.remove(reply_key(key, old));
    }
    count_active(backend_id, -1);
}

/// The flow's transient entry by `key` (either side), in place, if it is
/// half-open or closed within the linger. (A reference, not a copy: an
/// `Option` of a struct is copied with its undefined bytes when `None`, which
/// the verifier refuses.)
#[inline(always)]
pub fn transient_of(key: &FlowKey, now: u64) -> Option<&'static Transient> {
    // SAFETY: a live map value.
    let t = unsafe { TRANSIENT.get(key)? };
    if t.state == TRANSIENT_CLOSED {
        let linger = SETTINGS.get(0).map_or(0, |s| s.linger_ticks) as u64;
        if now.wrapping_sub(t.since) > linger {
            return None;
        }
    }
    Some(t)
}

/// Records the client's FIN (or RST) on an established flow; returns the
/// flags after it.
///
/// # Safety
/// As [`touch`].
#[inline(always)]
pub unsafe fn client_ends(f: *mut Flow, fin: bool) -> u32 {
    let add = FLOW_F_CLOSING | if fin { FLOW_F_FIN_CLIENT } else { 0 };
    (*f).flags |= add;
    (*f).flags
}

/// Records the backend's FIN or RST on the client flow `client`; returns
/// the flow's ending (service, backend id, generation) and its flags after it.
#[inline(always)]
pub fn backend_ends(client: &FlowKey, fin: bool) -> Option<(Ending, u32)> {
    let f = CONNTRACK.get_ptr_mut(client)?;
    let add = FLOW_F_CLOSING | if fin { FLOW_F_FIN_BACKEND } else { 0 };
    // SAFETY: a live map value; setting flag bits races harmlessly.
    unsafe {
        (*f).flags |= add;
        let e = Ending {
            service: (*f).service,
            backend: (*f).backend,
            generation: (*f).generation,
            _pad: 0,
        };
        Some((e, (*f).flags))
    }
}

/// Whether both sides sent FIN.
#[inline(always)]
pub fn both_fins(flags: u32) -> bool {
    flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND) == FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND
}

/// Whether a tracked reply entry belongs to a connection that is over: the
/// backend is answering a new handshake (SYN-ACK) on the same addresses and
/// ports while the client-side entry is gone or closing. That is another
/// connection (the client reusing its port to reach the backend directly, or
/// through another NAT), not a reply of ours: the stale entry is dropped.
#[inline(always)]
pub fn stale_for_handshake(key: &FlowKey, vip: [u8; 4], vport: [u8; 2]) -> bool {
    // SAFETY: the value is read at once.
    let stale = match unsafe { CONNTRACK.get(client_flow(key, vip, vport)) } {
        None => true,
        Some(f) => f.flags & FLOW_F_CLOSING != 0,
    };
    if stale {
        let _ = REVERSE.remove(key);
    }
    stale
}

/// The backend address's one VIP side (stateless reverse NAT, for flows
/// another balancer instance saw start), in place.
#[inline(always)]
pub fn by_backend(key: &FlowKey) -> Option<&'static ReverseFlow> {
    let b = BackendKey {
        addr: key.src,
        port: key.sport,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: a live map value.
    unsafe { BACKEND_VIPS.get(b) }
}

/// A client packet's facts the flow tables need (`PKT_*` bits).
pub const PKT_TCP: u32 = 1;
/// A TCP SYN without ACK (and every UDP packet): it may open a flow.
pub const PKT_OPEN: u32 = 2;
pub const PKT_FIN: u32 = 4;
pub const PKT_RST: u32 = 8;

/// Not known (or over): a new flow, if the packet may open one.
pub const STAGE_NEW: u32 = 0;
/// In the connection table.
pub const STAGE_ESTABLISHED: u32 = 1;
/// Half-open: its SYN went through, its handshake is not complete.
pub const STAGE_HALF_OPEN: u32 = 2;
/// Closed, lingering: retransmitted FINs and the last ACK go through.
pub const STAGE_CLOSED: u32 = 3;
/// Established on a backend whose flows are to be reset, the backend's side
/// not yet: this segment goes on to it as a reset (`reset_backend_side`).
pub const STAGE_BACKEND_RESET: u32 = 4;

/// Where a client packet's flow stands and what becomes of it: written by
/// [`plan`], carried out by [`commit`] once the packet passed every check.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Plan {
    /// `STAGE_*`.
    pub stage: u32,
    pub backend: u32,
    /// The flow's backend generation (not a new flow).
    pub generation: u32,
    /// The flow's service id.
    pub service: u32,
    /// The backend of an established flow this packet replaces (a SYN after
    /// FIN, a UDP flow idle past its timeout), or `u32::MAX`.
    pub replaced: u32,
    /// That flow's backend generation.
    pub replaced_generation: u32,
    /// 0, or the counter the packet is refused under (`RESET_NO_BACKEND`:
    /// answered with a reset).
    pub refused: u32,
    /// `PKT_*`.
    pub facts: u32,
    /// The flow's `FLOW_F_*` bits (an established flow).
    pub flow_flags: u32,
}

/// The packet's `PKT_*` facts.
#[inline(always)]
pub fn facts(p: &crate::parse::Packet) -> u32 {
    let mut f = 0;
    if p.proto == lb_common::IPPROTO_TCP {
        f |= PKT_TCP;
    }
    if p.is_tcp_open() {
        f |= PKT_OPEN;
    }
    if p.is_tcp_fin() {
        f |= PKT_FIN;
    }
    if p.is_tcp_rst() {
        f |= PKT_RST;
    }
    f
}

/// Where the client packet `key` of `svc` stands in the flow tables, and
/// for a new flow its backend (the SYN-flood guard and the scheduler have
/// their say here). Writes every field of `out`. A subprogram, off the fast
/// path.
#[inline(never)]
pub fn plan(
    key: &FlowKey,
    svc: &lb_common::Service,
    fw: &lb_common::firewall::Firewall,
    facts: u32,
    out: *mut Plan,
) {
    let tcp = facts & PKT_TCP != 0;
    let opening = facts & PKT_OPEN != 0;
    let now = now();
    let mut p = Plan {
        stage: STAGE_NEW,
        backend: 0,
        generation: 0,
        service: svc.id,
        replaced: u32::MAX,
        replaced_generation: 0,
        refused: 0,
        facts,
        flow_flags: 0,
    };
    if let Some(f) = entry(key) {
        // SAFETY: a live map value, read field by field.
        let (b, g, flags, last_seen) =
            unsafe { ((*f).backend, (*f).generation, (*f).flags, (*f).last_seen) };
        // A SYN after a FIN or RST, or for a backend that takes no new flows
        // (or is gone), is a new connection on old ports; so is a UDP packet
        // after its flow's idle timeout.
        let again =
            (tcp && opening && (flags & FLOW_F_CLOSING != 0 || !crate::takes_new_flows_of(b, g)))
                || crate::idle_expired(svc, key.proto, last_seen, now);
        if again {
            (p.replaced, p.replaced_generation) = (b, g);
        } else {
            (p.stage, p.backend, p.generation) = (STAGE_ESTABLISHED, b, g);
            p.flow_flags = flags;
        }
    } else if tcp {
        if let Some(t) = transient_of(key, now) {
            let retry =
                t.state == TRANSIENT_CLOSED || !crate::takes_new_flows_of(t.backend, t.generation);
            if !(opening && retry) {
                p.stage = if t.state == TRANSIENT_HALF_OPEN {
                    STAGE_HALF_OPEN
                } else {
                    STAGE_CLOSED
                };
                (p.backend, p.generation, p.service) = (t.backend, t.generation, t.service);
            }
        }
    }
    if p.stage == STAGE_NEW {
        p.refused = pick_new(key, svc, fw, tcp, opening, &mut p.backend);
    }
    // SAFETY: the caller's slot for the plan.
    unsafe { out.write(p) };
}

/// A backend for a new flow, or the counter it is refused under.
#[inline(always)]
fn pick_new(
    key: &FlowKey,
    svc: &lb_common::Service,
    fw: &lb_common::firewall::Firewall,
    tcp: bool,
    opening: bool,
    backend: &mut u32,
) -> u32 {
    use lb_common::{counter, SERVICE_F_MAGLEV, SERVICE_F_RESET_IF_EMPTY};
    if tcp && !opening {
        // Mid-flow segment of a flow we do not know (evicted, or it came
        // through another balancer). Maglev knows where it belongs; a
        // round-robin service never guesses.
        if svc.flags & SERVICE_F_MAGLEV == 0 {
            return counter::DROP_TCP_NO_FLOW;
        }
        crate::stats::count(counter::FLOWS_RECOVERED);
    }
    // The SYN-flood guard, before the flow takes a table entry.
    if let Err(over) = crate::firewall::admit_new_flow(fw, key.src) {
        return over;
    }
    match crate::select::pick(svc, key) {
        Some(b) => {
            *backend = b;
            0
        }
        None if tcp && svc.flags & SERVICE_F_RESET_IF_EMPTY != 0 => counter::RESET_NO_BACKEND,
        None => counter::DROP_NO_BACKEND,
    }
}

/// Carries out `plan` for the packet `key` on `backend`: a new flow waits
/// half-open (TCP) or is established (UDP, a flow Maglev recovered); a
/// handshake's ACK establishes its flow, an RST closes it; an established
/// flow's FINs and RSTs close it. Returns 0, or the counter the packet is
/// refused under (the table was full). A subprogram, off the fast path.
#[inline(never)]
pub fn commit(key: &FlowKey, plan: &Plan, backend: &Backend) -> u32 {
    use lb_common::counter;
    let now = now();
    let (tcp, opening) = (plan.facts & PKT_TCP != 0, plan.facts & PKT_OPEN != 0);
    let (fin, rst) = (plan.facts & PKT_FIN != 0, plan.facts & PKT_RST != 0);
    match plan.stage {
        STAGE_NEW => {
            if plan.replaced != u32::MAX {
                replace(key, plan.replaced, plan.replaced_generation);
            }
            // A TCP flow waits apart until its handshake completes; UDP (and
            // a flow Maglev recovered mid-stream) is established at once.
            let kept = if tcp && opening {
                open(key, plan.service, plan.backend, backend, now)
            } else {
                establish(key, plan.service, plan.backend, backend, now)
            };
            if !kept {
                return counter::DROP_TABLE_FULL;
            }
            crate::stats::count(counter::NEW_FLOWS);
        }
        STAGE_HALF_OPEN if rst => {
            // full_path checked the flow's generation: `backend` is its own.
            let e = Ending {
                service: plan.service,
                backend: plan.backend,
                generation: plan.generation,
                _pad: 0,
            };
            close_transient(key, &reply_key(key, backend), &e, now);
        }
        STAGE_HALF_OPEN if !opening => {
            if !promote(key, plan.service, plan.backend, backend, now) {
                return counter::DROP_TABLE_FULL;
            }
            crate::stats::count(counter::FLOWS_ESTABLISHED);
            if fin {
                // The handshake's ACK came with the client's FIN.
                if let Some(f) = entry(key) {
                    // SAFETY: a live map value (see touch).
                    unsafe { client_ends(f, true) };
                }
            }
        }
        STAGE_ESTABLISHED => {
            let Some(f) = entry(key) else {
                return 0;
            };
            // SAFETY: a live map value (see touch).
            unsafe { touch(f, now) };
            if fin || rst {
                // SAFETY: as above.
                let (flags, service) = unsafe { (client_ends(f, fin), (*f).service) };
                let e = Ending {
                    service,
                    backend: plan.backend,
                    generation: plan.generation,
                    _pad: 0,
                };
                if (rst || both_fins(flags)) && retire(key, &reply_key(key, backend), &e, now) {
                    crate::stats::count(counter::FLOWS_CLOSED);
                }
            }
        }
        STAGE_BACKEND_RESET => reset_backend_side(key, backend),
        _ => {}
    }
    0
}
