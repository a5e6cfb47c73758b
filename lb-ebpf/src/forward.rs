//! Where a packet goes next: a route lookup in the kernel's FIB gives the
//! egress interface and both MACs; the frame then leaves with XDP_TX (same
//! interface) or XDP_REDIRECT (another one).
//!
//! The lookup is made before the packet is rewritten, with the addresses it
//! will carry, so that a packet whose destination is this host (say, the reply
//! to the balancer's own health check) is recognised and left alone.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::counter;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// What the FIB says about a destination.
pub enum Route {
    /// Forward out of `ifindex` with these MACs.
    Via {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
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

/// Looks up the route from `src` to `dst` (network order) for the packet whose
/// IPv4 header is `ip`, with protocol `proto` and `ports` (as they will be after
/// any rewrite), as the kernel would forward it arriving on this interface.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
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
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        fib.ifindex = ctx.ingress_ifindex() as u32;
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
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Via {
            ifindex: fib.ifindex,
            smac: fib.smac,
            dmac: fib.dmac,
        },
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::Local,
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig,
        _ => Route::Unreachable,
    }
}

/// Sends the (rewritten) packet along `route`; returns the action and the
/// outcome counter (`sent` when it went out).
#[inline(always)]
pub fn send(ctx: &XdpContext, eth: *mut EthHdr, route: Route, sent: u32) -> (u32, u32) {
    match route {
        Route::Via {
            ifindex,
            smac,
            dmac,
        } => {
            // SAFETY: parse() checked the Ethernet header is inside the frame.
            unsafe {
                (*eth).dst_addr = dmac;
                (*eth).src_addr = smac;
            }
            if ifindex == ctx.ingress_ifindex() as u32 {
                (xdp_action::XDP_TX, sent)
            } else {
                // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
                (unsafe { bpf_redirect(ifindex, 0) } as u32, sent)
            }
        }
        // The kernel resolves the neighbour and forwards the rewritten packet
        // (the daemon keeps backends' neighbours resolved, so this is rare).
        Route::NoNeigh => (xdp_action::XDP_PASS, counter::PASS_NO_NEIGH),
        // The kernel fragments it (DF clear) or answers "fragmentation
        // needed" to its source: the client's own packet, as rewritten, or a
        // reply without DF (replies with DF are passed before rewriting).
        Route::TooBig => (xdp_action::XDP_PASS, counter::PASS_TOO_BIG),
        Route::Local => (xdp_action::XDP_PASS, counter::PASS_NO_SERVICE),
        Route::Unreachable => (xdp_action::XDP_DROP, counter::DROP_NO_ROUTE),
    }
}
