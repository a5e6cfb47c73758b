//! Where a packet goes next. A cached next hop first (a backend's, kept by
//! the daemon in `HOPS`; a client's, kept in its flow's reverse entry), valid
//! while its generation is the current `HOP_GENERATION` and the packet fits
//! its MTU; otherwise a route lookup in the kernel's FIB, which also tells a
//! packet for this host, an unresolved neighbour or one too big for the link.
//!
//! The lookup is made before the packet is rewritten, with the addresses it
//! will carry, so that a packet whose destination is this host (say, the reply
//! to the balancer's own health check) is recognised and left alone.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::generated::bpf_fib_lookup};
use lb_common::{counter, FlowKey, NextHop};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    hook::{Hook, Outcome},
    maps::{HOP_GENERATION, SCRATCH, SCRATCH_FIB},
    stats,
};

const AF_INET: u64 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// What the FIB says about a destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Forward out of the route's `ifindex` with its MACs.
    Via,
    /// The destination is this host (or not forwardable: broadcast, multicast).
    Local,
    /// The next hop's MAC is not resolved yet: the kernel must forward it.
    NoNeigh,
    /// The packet is bigger than the egress link's MTU: the kernel must
    /// fragment it or tell its sender.
    TooBig,
    /// No usable route.
    Unreachable,
}

/// A route: its kind, and for `Kind::Via` the hop the frame leaves by.
/// Every field is always written (see `hook::Outcome` for why no enum with
/// a payload crosses function boundaries here).
#[derive(Clone, Copy)]
pub struct Route {
    pub kind: Kind,
    pub hop: NextHop,
}

/// The current next-hop generation (0, never current, before the daemon
/// wrote one).
#[inline(always)]
pub fn generation() -> u32 {
    HOP_GENERATION.get(0).copied().unwrap_or(0)
}

/// The route along `hop` if it is current and the packet (IPv4 total
/// length `tot_len`) fits it.
#[inline(always)]
fn cached<H: Hook>(ctx: &H, hop: &NextHop, tot_len: u16) -> bool {
    hop.generation != 0
        && hop.generation == generation()
        && ctx.mtu_check_len(tot_len) as u32 <= hop.mtu
        && ctx.segments_fit(hop.ifindex, hop.mtu)
}

/// The route for the packet whose IPv4 header is `ip`, addressed as `to`
/// will address it (source, destination, ports and protocol as they are after
/// any rewrite): along `hop` when it is current, else as the kernel's FIB
/// says (counted as a lookup).
#[inline(always)]
pub fn route<H: Hook>(ctx: &H, hop: &NextHop, ip: *mut Ipv4Hdr, to: &FlowKey) -> Route {
    // SAFETY: the caller parsed the IPv4 header as inside the frame.
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len });
    if cached(ctx, hop, tot_len) {
        return Route {
            kind: Kind::Via,
            hop: *hop,
        };
    }
    stats::count(counter::NEXT_HOP_LOOKUPS);
    lookup(ctx, ip, to)
}

/// Looks up the route of `to` in the kernel's FIB (see [`fib`]). A
/// subprogram, not inlined: it is off the fast path (its parameters and
/// result pass through a per-CPU scratch slot, off the 512-byte stack).
#[inline(never)]
pub fn lookup<H: Hook>(ctx: &H, ip: *mut Ipv4Hdr, to: &FlowKey) -> Route {
    let kind = match fib(ctx, ip, to) {
        0 => Kind::Via,
        1 => Kind::Local,
        2 => Kind::NoNeigh,
        3 => Kind::TooBig,
        _ => Kind::Unreachable,
    };
    let hop = match SCRATCH.get(SCRATCH_FIB) {
        // SAFETY: `fib` left the hop in the slot's first 24 bytes (the slot
        // is 64 bytes, 8-aligned).
        Some(slot) => unsafe { *(slot.as_ptr() as *const NextHop) },
        None => NextHop::default(),
    };
    Route { kind, hop }
}

/// Looks up the route of `to` in the kernel's FIB, as the kernel would
/// forward the packet arriving on this interface; returns the kind (0 via,
/// 1 local, 2 no neighbour, 3 too big, 4 unreachable) and leaves the hop in
/// the scratch slot, stamped with the generation read before the lookup, so
/// that it can be cached: a change reported while the lookup ran leaves it
/// stale, not wrong.
#[inline(always)]
fn fib<H: Hook>(ctx: &H, ip: *mut Ipv4Hdr, to: &FlowKey) -> u32 {
    let generation = generation();
    // SAFETY: the caller parsed the IPv4 header as inside the frame.
    let (tot_len, tos) = unsafe { (u16::from_be_bytes((*ip).tot_len), (*ip).tos) };
    let tot_len = ctx.mtu_check_len(tot_len);
    // The struct bpf_fib_lookup, written as its eight words: family,
    // protocol, ports and length; ingress and TOS; source; destination;
    // VLAN and MACs (outputs). Volatile stores: LLVM merges plain stores of
    // zeros into a memset call, a real call per lookup.
    let w0 = AF_INET
        | (to.proto as u64) << 8
        | (u16::from_ne_bytes(to.sport) as u64) << 16
        | (u16::from_ne_bytes(to.dport) as u64) << 32
        | (tot_len as u64) << 48;
    let w1 = ctx.ingress_ifindex() as u64 | (tos as u64) << 32;
    // In this CPU's scratch slot, not on the stack (see maps::SCRATCH).
    let Some(fib) = SCRATCH.get_ptr_mut(SCRATCH_FIB) else {
        return 4;
    };
    let w = fib as *mut u64;
    // SAFETY: eight stores into the eight words of the slot.
    unsafe {
        core::ptr::write_volatile(w, w0);
        core::ptr::write_volatile(w.add(1), w1);
        core::ptr::write_volatile(w.add(2), u32::from_ne_bytes(to.src) as u64);
        core::ptr::write_volatile(w.add(3), 0);
        core::ptr::write_volatile(w.add(4), u32::from_ne_bytes(to.dst) as u64);
        core::ptr::write_volatile(w.add(5), 0);
        core::ptr::write_volatile(w.add(6), 0);
        core::ptr::write_volatile(w.add(7), 0);
    }
    const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
    let params = w as *mut FibParams;
    // SAFETY: `fib` is a fully written, 64-byte bpf_fib_lookup.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), params, 64, 0) };
    // SAFETY: the helper wrote its outputs into the same struct.
    let (ifindex, mtu, w6, w7) = unsafe {
        (
            (*params).ifindex,
            (*params).__bindgen_anon_1.mtu_result,
            core::ptr::read_volatile(w.add(6)),
            core::ptr::read_volatile(w.add(7)),
        )
    };
    let kind = match rc {
        BPF_FIB_LKUP_RET_SUCCESS if !ctx.segments_fit(ifindex, 0) => 3,
        BPF_FIB_LKUP_RET_SUCCESS => 0,
        BPF_FIB_LKUP_RET_NOT_FWDED => 1,
        BPF_FIB_LKUP_RET_NO_NEIGH => 2,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => 3,
        _ => 4,
    };
    // The hop, over the slot's first three words: generation and ifindex;
    // the MTU (the kernel reports the route's on success when asked to
    // check a length; a GSO packet at TC is not checked by length) and the
    // source MAC's first 4 bytes; its last 2 and the destination MAC.
    let mtu = if tot_len != 0 { mtu as u64 } else { 0 };
    let smac = w6 >> 32 | w7 << 32;
    // SAFETY: three stores into the slot (its outputs were read above).
    unsafe {
        core::ptr::write_volatile(w, generation as u64 | (ifindex as u64) << 32);
        core::ptr::write_volatile(w.add(1), mtu | (smac & 0xffff_ffff) << 32);
        core::ptr::write_volatile(w.add(2), (smac >> 32) & 0xffff | (w7 >> 16) << 16);
    }
    kind
}

/// Writes a MAC address with two stores (a 6-byte copy compiles to a
/// memmove call).
#[inline(always)]
unsafe fn write_mac(to: *mut [u8; 6], mac: &[u8; 6]) {
    let p = to as *mut u8;
    core::ptr::write_unaligned(
        p as *mut u32,
        u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]),
    );
    core::ptr::write_unaligned(p.add(4) as *mut u16, u16::from_ne_bytes([mac[4], mac[5]]));
}

/// Sends the (rewritten) packet along `route`; the outcome is counted as
/// `sent` when it goes out.
#[inline(always)]
pub fn send(eth: *mut EthHdr, route: &Route, sent: u32) -> Outcome {
    match route.kind {
        Kind::Via => {
            // SAFETY: parse() checked the Ethernet header is inside the frame.
            unsafe {
                write_mac(&mut (*eth).dst_addr, &route.hop.dmac);
                write_mac(&mut (*eth).src_addr, &route.hop.smac);
            }
            Outcome::out(route.hop.ifindex, sent)
        }
        // The kernel resolves the neighbour and forwards the rewritten packet
        // (the daemon keeps backends' neighbours resolved, so this is rare).
        Kind::NoNeigh => Outcome::pass(counter::PASS_NO_NEIGH),
        // The kernel fragments it (DF clear) or answers "fragmentation
        // needed" to its source: the client's own packet, as rewritten, or a
        // reply without DF (replies with DF are passed before rewriting).
        Kind::TooBig => Outcome::pass(counter::PASS_TOO_BIG),
        Kind::Local => Outcome::pass(counter::PASS_NO_SERVICE),
        Kind::Unreachable => Outcome::drop(counter::DROP_NO_ROUTE),
    }
}
