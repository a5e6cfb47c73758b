//! The connection table: which backend each flow is on, and how to reverse it.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Backend, Flow, FlowKey, ReverseFlow};

use crate::maps::{CONNTRACK, REVERSE};

/// The backend a known flow is on, refreshing its last-seen time.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<u32> {
    let f = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: f points at a live map value; a racing writer can only store a
    // whole new timestamp.
    unsafe {
        (*f).last_seen_ns = bpf_ktime_get_ns();
        Some((*f).backend)
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

/// The VIP side of a backend's reply, if the reply belongs to a tracked flow.
#[inline(always)]
pub fn reverse(key: &FlowKey) -> Option<ReverseFlow> {
    // SAFETY: the value is copied out at once.
    unsafe { REVERSE.get(key).copied() }
}
