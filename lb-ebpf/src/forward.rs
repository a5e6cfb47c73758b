//! Sending a rewritten packet on: route lookup in the kernel's FIB, next-hop
//! MACs, then XDP_TX (same interface) or XDP_REDIRECT (another one).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::counter;

use crate::parse::Packet;

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// How the packet leaves, and the outcome counter if it did not go out.
pub enum Sent {
    Out(u32),
    Pass(u32),
    Drop(u32),
}

/// Looks up the route to the packet's (already rewritten) destination as the
/// kernel would forward it, fills in the MACs and picks the action.
#[inline(always)]
pub fn forward(ctx: &XdpContext, p: &Packet) -> Sent {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: an all-zero bpf_fib_lookup is valid input; the fields set below
    // are the ones the helper reads for an IPv4 forward lookup.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let (sport, dport) = p.ports();
    // SAFETY: parse() checked the IPv4 header is inside the frame.
    unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = p.proto;
        fib.sport = u16::from_ne_bytes(sport);
        fib.dport = u16::from_ne_bytes(dport);
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*p.ip).tot_len);
        fib.ifindex = ingress;
        fib.__bindgen_anon_2.tos = (*p.ip).tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*p.ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*p.ip).dst_addr);
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
        BPF_FIB_LKUP_RET_SUCCESS => {
            // SAFETY: parse() checked the Ethernet header is inside the frame.
            unsafe {
                (*p.eth).dst_addr = fib.dmac;
                (*p.eth).src_addr = fib.smac;
            }
            if fib.ifindex == ingress {
                Sent::Out(xdp_action::XDP_TX)
            } else {
                // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
                Sent::Out(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
            }
        }
        // The kernel resolves the neighbour and forwards the rewritten packet
        // (the daemon keeps backends' neighbours resolved, so this is rare).
        BPF_FIB_LKUP_RET_NO_NEIGH => Sent::Pass(counter::PASS_NO_NEIGH),
        _ => Sent::Drop(counter::DROP_NO_ROUTE),
    }
}
