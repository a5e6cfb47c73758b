//! The connection table: which backend each flow is on, and how to reverse it.

use aya_ebpf::helpers::generated::bpf_jiffies64;
use lb_common::{Backend, BackendKey, Flow, FlowKey, ReverseFlow, FLOW_F_CLOSING};

use crate::maps::{BACKEND_VIPS, CONNTRACK, REVERSE};

/// A known flow's backend id and the backend generation it was scheduled with.
pub struct Known {
    pub backend: u32,
    pub generation: u32,
}

/// Looks the flow up and refreshes it: its last-seen time, and the closing
/// mark when the client sends FIN or RST. A SYN (`opening`) on a flow that was
/// closing is a new connection reusing the ports: it is not a match, so the
/// caller schedules it afresh.
#[inline(always)]
pub fn lookup(key: &FlowKey, opening: bool, closing: bool) -> Option<Known> {
    let f = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: f points at a live map value; racing writers only store whole
    // fields, and a lost update of the timestamp or flag is harmless.
    unsafe {
        if opening && (*f).flags & FLOW_F_CLOSING != 0 {
            return None;
        }
        touch(f, closing);
        Some(Known {
            backend: (*f).backend,
            generation: (*f).generation,
        })
    }
}

/// The flow's entry, for the established fast path (`main::established`).
#[inline(always)]
pub fn entry(key: &FlowKey) -> Option<*mut Flow> {
    CONNTRACK.get_ptr_mut(key)
}

/// Marks a packet seen on the flow: its last-seen tick (stored only when it
/// changed: a stored value shared by CPUs is not written per packet), and
/// the closing mark when the packet is a FIN or RST.
///
/// # Safety
/// `f` points at a live map value; racing writers only store whole fields,
/// and a lost update of the tick or the flag is harmless.
#[inline(always)]
pub unsafe fn touch(f: *mut Flow, closing: bool) {
    // SAFETY: plain helper call (inlined by the JIT: no call is made).
    let now = unsafe { bpf_jiffies64() };
    if (*f).last_seen != now {
        (*f).last_seen = now;
    }
    if closing {
        (*f).flags |= FLOW_F_CLOSING;
    }
}

/// Records a new flow in both directions; false if the table refused it.
#[inline(always)]
pub fn insert(key: &FlowKey, service: u32, backend_id: u32, backend: &Backend) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_jiffies64() };
    let flow = Flow {
        backend: backend_id,
        service,
        last_seen: now,
        generation: backend.generation,
        flags: 0,
    };
    let reply_key = FlowKey::new(backend.addr, key.src, backend.port, key.sport, key.proto);
    // The reverse entry as five words, stored volatile (LLVM merges stores of
    // zeros into a memset call); its hop (generation 0: missing) is filled by
    // the flow's first reply (`main::reply`).
    let vport = u16::from_ne_bytes(key.dport) as u64;
    let mut rev = core::mem::MaybeUninit::<ReverseFlow>::uninit();
    let w = rev.as_mut_ptr() as *mut u64;
    // SAFETY: five stores into the five words of the 40-byte value.
    unsafe {
        core::ptr::write_volatile(w, u32::from_ne_bytes(key.dst) as u64 | vport << 32);
        core::ptr::write_volatile(w.add(1), backend_id as u64 | (service as u64) << 32);
        core::ptr::write_volatile(w.add(2), 0);
        core::ptr::write_volatile(w.add(3), 0);
        core::ptr::write_volatile(w.add(4), 0);
    }
    const _: () = assert!(core::mem::size_of::<ReverseFlow>() == 40);
    // SAFETY: every byte was written above; any bit pattern is a ReverseFlow.
    // By reference: a copy of it would be made with a memset again.
    let rev = unsafe { &*rev.as_ptr() };
    CONNTRACK.insert(key, flow, 0).is_ok() && REVERSE.insert(reply_key, rev, 0).is_ok()
}

/// The client flow (client to `vip`:`vport`) of the reply `key` (backend to client).
#[inline(always)]
fn client_flow(key: &FlowKey, vip: [u8; 4], vport: [u8; 2]) -> FlowKey {
    FlowKey::new(key.dst, vip, key.dport, vport, key.proto)
}

/// Marks the client flow that the reply `key` (backend to client) belongs
/// to as closing: the backend sent FIN or RST.
#[inline(always)]
pub fn mark_closing(key: &FlowKey, vip: [u8; 4], vport: [u8; 2]) {
    if let Some(f) = CONNTRACK.get_ptr_mut(client_flow(key, vip, vport)) {
        // SAFETY: a live map value; setting a flag bit races harmlessly.
        unsafe { (*f).flags |= FLOW_F_CLOSING };
    }
}

/// Where a reply's VIP side came from.
pub enum Reverse {
    /// This balancer's own entry for the flow (in the table: the data path
    /// keeps the client side's next hop in it).
    Tracked(*mut ReverseFlow),
    /// The backend's address (stateless reverse NAT, active-active).
    ByBackend(ReverseFlow),
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

/// The VIP side of a backend's reply: from the flow's own entry if this
/// instance tracked it, else from the backend's address when the backend serves
/// one VIP only (a flow that came through another balancer instance).
#[inline(always)]
pub fn reverse(key: &FlowKey) -> Option<Reverse> {
    if let Some(r) = REVERSE.get_ptr_mut(key) {
        return Some(Reverse::Tracked(r));
    }
    // SAFETY: the value is copied out at once.
    unsafe {
        let b = BackendKey {
            addr: key.src,
            port: key.sport,
            proto: key.proto,
            _pad: 0,
        };
        BACKEND_VIPS.get(b).copied().map(Reverse::ByBackend)
    }
}
