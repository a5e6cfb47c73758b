//! Picking a backend for a new flow: the next slot of the service's ring.

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    num::NonZeroU64,
};

use lb_common::{
    maglev, FlowKey, Service, MAGLEV_MAP_SIZE, RING_MAP_SIZE, RING_SIZE, SERVICE_F_MAGLEV,
};

use crate::maps::{MAGLEV, RINGS, RR_POSITION};

/// The backend id for a new flow `key` of `svc`, or `None` if it has none.
#[inline(always)]
pub fn pick(svc: &Service, key: &FlowKey) -> Option<u32> {
    if svc.flags & SERVICE_F_MAGLEV != 0 {
        maglev_backend(svc, key)
    } else {
        next_backend(svc)
    }
}

/// The backend Maglev assigns to the flow: its hash indexes the service's table.
#[inline(always)]
pub fn maglev_backend(svc: &Service, key: &FlowKey) -> Option<u32> {
    let len = svc.ring_len;
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
    let slot = svc.ring_base + h % len;
    MAGLEV.get(slot).copied()
}

/// The backend id for the next new flow of `svc`, or `None` if it has none.
/// The position is one counter shared by all CPUs (an atomic add), so new flows
/// walk the ring in order whichever CPU they arrive on.
#[inline(always)]
fn next_backend(svc: &Service) -> Option<u32> {
    // NonZero: the remainder below can then never divide by zero (and the
    // compiler emits no panic path, which the verifier would reject).
    let len = NonZeroU64::new(svc.ring_len as u64)?;
    if svc.ring_len > RING_SIZE || svc.ring_base > RING_MAP_SIZE - RING_SIZE {
        return None;
    }
    let pos = RR_POSITION.get_ptr_mut(svc.id)?;
    // SAFETY: pos points into an array map value that lives as long as the map.
    // The BPF target has no `AtomicU64::fetch_add` (no CAS in its core), but the
    // instruction set has an atomic fetch-and-add, which this intrinsic emits.
    // SeqCst, not Relaxed: LLVM 22's BPF backend lowers a Relaxed fetch_add to
    // the non-fetching `lock +=` and then uses the addend as the "old value"
    // (seen here: every service started on its second backend).
    let n = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(pos, 1) };
    let slot = svc.ring_base + (n % len) as u32;
    RINGS.get(slot).copied()
}
