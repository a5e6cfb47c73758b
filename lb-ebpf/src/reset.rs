//! Answering a TCP segment with a reset, in place: the frame is cut to bare
//! headers, rewritten into the reset (`lb_common::reset`) and sent back out of
//! the interface it came in on.
//!
//! The reset carries a complete TCP checksum. On TC, a segment a local socket
//! sent over a veth may carry only the pseudo-header's part (TX checksum
//! offload); its reset goes back over that same veth, whose receiving end
//! takes such a socket buffer as checksummed, so the complete checksum is
//! never checked against it: valid either way.

use lb_common::reset::tcp_reset;
use network_types::eth::EthHdr;

use crate::{
    hook::{Hook, Verdict},
    parse::ptr_at,
};

const HEADERS: usize = EthHdr::LEN + 20 + 20;

/// Turns the frame (a TCP segment with a 20-byte IPv4 header) into the reset
/// that refuses it, to be sent back out of the interface it came in on; a drop
/// if it cannot (IP options, a reset itself, or the frame cannot be trimmed).
#[inline(always)]
pub fn reset<H: Hook>(ctx: &H) -> Verdict {
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<[u8; 14], _>(ctx, 0),
        ptr_at::<[u8; 20], _>(ctx, EthHdr::LEN),
        ptr_at::<[u8; 20], _>(ctx, EthHdr::LEN + 20),
    ) else {
        return Verdict::Drop;
    };
    // SAFETY: all three are inside the frame.
    let (eth_in, ip_in, tcp_in) = unsafe { (*eth, *ip, *tcp) };
    if ip_in[0] != 0x45 {
        return Verdict::Drop;
    }
    let tot_len = u16::from_be_bytes([ip_in[2], ip_in[3]]) as u32;
    let doff = ((tcp_in[12] >> 4) as u32) * 4;
    let payload = tot_len.saturating_sub(20 + doff);
    let Some((ip_out, tcp_out)) = tcp_reset(&ip_in, &tcp_in, payload) else {
        return Verdict::Drop;
    };
    if !ctx.truncate(HEADERS) {
        return Verdict::Drop;
    }
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<[u8; 14], _>(ctx, 0),
        ptr_at::<[u8; 20], _>(ctx, EthHdr::LEN),
        ptr_at::<[u8; 20], _>(ctx, EthHdr::LEN + 20),
    ) else {
        return Verdict::Drop;
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
    Verdict::Bounce
}
