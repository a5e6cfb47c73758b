//! Where a packet goes next: a route lookup in the kernel's FIB gives the
//! egress interface and both MACs; the hook then sends the frame out of it.
//!
//! The lookup is made before the packet is rewritten, with the addresses it
//! will carry, so that a packet whose destination is this host (say, the reply
//! to the balancer's own health check) is recognised and left alone.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::generated::bpf_fib_lookup};
use lb_common::counter;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::hook::{Hook, Outcome};

const AF_INET: u8 = 2;
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

/// A route: its kind, and for `Kind::Via` where and how the frame leaves.
/// Every field is always written (see `hook::Outcome` for why no enum with
/// a payload crosses function boundaries here).
#[derive(Clone, Copy)]
pub struct Route {
    pub kind: Kind,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Looks up the route from `src` to `dst` (network order) for the packet whose
/// IPv4 header is `ip`, with protocol `proto` and `ports` (as they will be after
/// any rewrite), as the kernel would forward it arriving on this interface.
#[inline(always)]
pub fn route<H: Hook>(
    ctx: &H,
    ip: *mut Ipv4Hdr,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    ports: ([u8; 2], [u8; 2]),
) -> Route {
    // SAFETY: an all-zero bpf_fib_lookup is valid input; the fields set below
    // are the ones the helper reads for an IPv4 forward lookup.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: the caller parsed the IPv4 header as inside the frame.
    unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = proto;
        fib.sport = u16::from_ne_bytes(ports.0);
        fib.dport = u16::from_ne_bytes(ports.1);
        fib.__bindgen_anon_1.tot_len = ctx.mtu_check_len(u16::from_be_bytes((*ip).tot_len));
        fib.ifindex = ctx.ingress_ifindex();
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    }
    // SAFETY: fib is a valid, fully sized bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let kind = match rc {
        BPF_FIB_LKUP_RET_SUCCESS if !ctx.segments_fit(fib.ifindex) => Kind::TooBig,
        BPF_FIB_LKUP_RET_SUCCESS => Kind::Via,
        BPF_FIB_LKUP_RET_NOT_FWDED => Kind::Local,
        BPF_FIB_LKUP_RET_NO_NEIGH => Kind::NoNeigh,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Kind::TooBig,
        _ => Kind::Unreachable,
    };
    Route {
        kind,
        ifindex: fib.ifindex,
        smac: fib.smac,
        dmac: fib.dmac,
    }
}

/// Sends the (rewritten) packet along `route`; the outcome is counted as
/// `sent` when it goes out.
#[inline(always)]
pub fn send(eth: *mut EthHdr, route: Route, sent: u32) -> Outcome {
    match route.kind {
        Kind::Via => {
            // SAFETY: parse() checked the Ethernet header is inside the frame.
            unsafe {
                (*eth).dst_addr = route.dmac;
                (*eth).src_addr = route.smac;
            }
            Outcome::out(route.ifindex, sent)
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
