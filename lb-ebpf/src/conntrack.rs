//! The connection table: which backend each flow is on, and how to reverse it.

use aya_ebpf::helpers::bpf_ktime_get_ns;
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
        (*f).last_seen_ns = bpf_ktime_get_ns();
        if closing {
            (*f).flags |= FLOW_F_CLOSING;
        }
        Some(Known {
            backend: (*f).backend,
            generation: (*f).generation,
        })
    }
}

/// Records a new flow in both directions; false if the table refused it.
#[inline(always)]
pub fn insert(key: &FlowKey, service: u32, backend_id: u32, backend: &Backend) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow {
        backend: backend_id,
        service,
        last_seen_ns: now,
        generation: backend.generation,
        flags: 0,
    };
    let reply_key = FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    let rev = ReverseFlow {
        vip: key.dst,
        vport: key.dport,
        _pad: [0; 2],
        backend: backend_id,
        service,
    };
    CONNTRACK.insert(key, flow, 0).is_ok() && REVERSE.insert(reply_key, rev, 0).is_ok()
}

/// The client flow (client to VIP) of the reply `key` (backend to client).
#[inline(always)]
fn client_flow(key: &FlowKey, rev: &ReverseFlow) -> FlowKey {
    FlowKey {
        src: key.dst,
        dst: rev.vip,
        sport: key.dport,
        dport: rev.vport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// Marks the client flow that the reply `key` (backend to client) belongs
/// to as closing: the backend sent FIN or RST.
#[inline(always)]
pub fn mark_closing(key: &FlowKey, rev: &ReverseFlow) {
    if let Some(f) = CONNTRACK.get_ptr_mut(client_flow(key, rev)) {
        // SAFETY: a live map value; setting a flag bit races harmlessly.
        unsafe { (*f).flags |= FLOW_F_CLOSING };
    }
}

/// Where a reply's VIP side came from.
pub enum Reverse {
    /// This balancer's own entry for the flow.
    Tracked(ReverseFlow),
    /// The backend's address (stateless reverse NAT, active-active).
    ByBackend(ReverseFlow),
}

/// Whether a tracked reply entry belongs to a connection that is over: the
/// backend is answering a new handshake (SYN-ACK) on the same addresses and
/// ports while the client-side entry is gone or closing. That is another
/// connection (the client reusing its port to reach the backend directly, or
/// through another NAT), not a reply of ours: the stale entry is dropped.
#[inline(always)]
pub fn stale_for_handshake(key: &FlowKey, rev: &ReverseFlow) -> bool {
    // SAFETY: the value is read at once.
    let stale = match unsafe { CONNTRACK.get(client_flow(key, rev)) } {
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
    // SAFETY: the values are copied out at once.
    unsafe {
        if let Some(r) = REVERSE.get(key) {
            return Some(Reverse::Tracked(*r));
        }
        let b = BackendKey {
            addr: key.src,
            port: key.sport,
            proto: key.proto,
            _pad: 0,
        };
        BACKEND_VIPS.get(b).copied().map(Reverse::ByBackend)
    }
}
