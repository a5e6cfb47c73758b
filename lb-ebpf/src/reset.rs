//! Answering a TCP segment with a reset, in place: the frame is cut to bare
//! headers, rewritten into the reset (`lb_common::reset`) and sent back out of
//! the interface it came in on.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::reset::tcp_reset;
use network_types::eth::EthHdr;

use crate::parse::ptr_at;

const HEADERS: usize = EthHdr::LEN + 20 + 20;

/// Turns the frame (a TCP segment with a 20-byte IPv4 header) into the reset
/// that refuses it and sends it back out of the interface it came in on;
/// XDP_DROP if it cannot (IP options, a reset itself, or the frame cannot be
/// trimmed).
///
/// It leaves by XDP_REDIRECT to the ingress interface rather than XDP_TX: the
/// same wire, but a redirect flushes at once on every driver, while veth holds
/// XDP_TX frames until its peer's next poll unless the peer runs XDP itself
/// (seen here: resets arriving seconds late). Resets are rare; this path is
/// not the one to optimise.
#[inline(always)]
pub fn reset(ctx: &XdpContext) -> u32 {
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<[u8; 14]>(ctx, 0),
        ptr_at::<[u8; 20]>(ctx, EthHdr::LEN),
        ptr_at::<[u8; 20]>(ctx, EthHdr::LEN + 20),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: all three are inside the frame.
    let (eth_in, ip_in, tcp_in) = unsafe { (*eth, *ip, *tcp) };
    if ip_in[0] != 0x45 {
        return xdp_action::XDP_DROP;
    }
    let tot_len = u16::from_be_bytes([ip_in[2], ip_in[3]]) as u32;
    let doff = ((tcp_in[12] >> 4) as u32) * 4;
    let payload = tot_len.saturating_sub(20 + doff);
    let Some((ip_out, tcp_out)) = tcp_reset(&ip_in, &tcp_in, payload) else {
        return xdp_action::XDP_DROP;
    };
    let len = ctx.data_end() - ctx.data();
    if len > HEADERS {
        // SAFETY: shrinking the frame by what lies past the headers.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - HEADERS) as i32)) } != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<[u8; 14]>(ctx, 0),
        ptr_at::<[u8; 20]>(ctx, EthHdr::LEN),
        ptr_at::<[u8; 20]>(ctx, EthHdr::LEN + 20),
    ) else {
        return xdp_action::XDP_DROP;
    };
    let mut eth_out = eth_in;
    eth_out[..6].copy_from_slice(&eth_in[6..12]);
    eth_out[6..12].copy_from_slice(&eth_in[..6]);
    // SAFETY: re-checked to be inside the (trimmed) frame.
    unsafe {
        *eth = eth_out;
        *ip = ip_out;
        *tcp = tcp_out;
    }
    // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
    unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) as u32 }
}
