//! The TCP reset the data path answers with when it refuses a connection
//! (no backend can take it) or ends one (its backend was demoted): RFC 793's
//! reset generation, from the refused segment's headers alone.

use crate::checksum;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The IPv4 and TCP headers (20 bytes each, no options) of the reset that
/// answers a segment with headers `ip` and `tcp` (their first 20 bytes) and
/// `payload_len` bytes of data: addresses and ports swapped, from the address
/// the client sent to. None for a segment that is itself a reset (RFC 793:
/// never answer a reset).
pub fn tcp_reset(ip: &[u8; 20], tcp: &[u8; 20], payload_len: u32) -> Option<([u8; 20], [u8; 20])> {
    let flags = tcp[13];
    if flags & RST != 0 {
        return None;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    // If the segment acknowledged something, the reset takes its sequence
    // number from that acknowledgement; otherwise it acknowledges the segment.
    let (out_seq, out_ack, out_flags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        let len = payload_len
            .wrapping_add((flags & SYN != 0) as u32)
            .wrapping_add((flags & FIN != 0) as u32);
        (0, seq.wrapping_add(len), RST | ACK)
    };

    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&40u16.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = 6;
    h[12..16].copy_from_slice(&ip[16..20]);
    h[16..20].copy_from_slice(&ip[12..16]);
    let c = checksum::full(&h);
    h[10] = c[0];
    h[11] = c[1];

    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&tcp[2..4]);
    t[2..4].copy_from_slice(&tcp[0..2]);
    t[4..8].copy_from_slice(&out_seq.to_be_bytes());
    t[8..12].copy_from_slice(&out_ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = out_flags;
    let src = [h[12], h[13], h[14], h[15]];
    let dst = [h[16], h[17], h[18], h[19]];
    let c = checksum::l4_full(src, dst, 6, &t);
    t[16] = c[0];
    t[17] = c[1];
    Some((h, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(flags: u8, seq: u32, ack: u32) -> ([u8; 20], [u8; 20]) {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[12..16].copy_from_slice(&[10, 0, 1, 2]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 101]);
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&3306u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        (ip, t)
    }

    #[test]
    fn a_syn_is_answered_with_rst_ack_acknowledging_it() {
        let (ip, t) = seg(SYN, 1000, 0);
        let (h, r) = tcp_reset(&ip, &t, 0).unwrap();
        assert_eq!(&h[12..16], &[10, 0, 0, 101], "from the VIP");
        assert_eq!(&h[16..20], &[10, 0, 1, 2], "to the client");
        assert_eq!(u16::from_be_bytes([r[0], r[1]]), 3306);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), 40000);
        assert_eq!(r[13], RST | ACK);
        assert_eq!(u32::from_be_bytes([r[4], r[5], r[6], r[7]]), 0);
        assert_eq!(u32::from_be_bytes([r[8], r[9], r[10], r[11]]), 1001);
        assert!(checksum::verifies(&h, 0));
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&h[12..16]);
        pseudo[4..8].copy_from_slice(&h[16..20]);
        pseudo[9] = 6;
        pseudo[11] = 20;
        assert!(checksum::verifies(&r, checksum::sum(&pseudo, 0)));
    }

    /// Every byte of the answer to a SYN, checksums from an independent full
    /// recomputation: IPv4 with DF and TTL 64, a 20-byte TCP header (data
    /// offset 5), RST|ACK, window 0.
    #[test]
    fn the_answer_to_a_syn_byte_for_byte() {
        let (ip, t) = seg(SYN, 1000, 0);
        let (h, r) = tcp_reset(&ip, &t, 0).unwrap();
        assert_eq!(
            h,
            [
                0x45, 0x00, 0x00, 0x28, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x25, 0x6a, 0x0a, 0x00,
                0x00, 0x65, 0x0a, 0x00, 0x01, 0x02,
            ]
        );
        assert_eq!(
            r,
            [
                0x0c, 0xea, 0x9c, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xe9, 0x50, 0x14,
                0x00, 0x00, 0xed, 0x56, 0x00, 0x00,
            ]
        );
    }

    #[test]
    fn a_segment_with_ack_gets_a_bare_rst_at_its_ack_number() {
        let (ip, t) = seg(ACK | 0x08, 5000, 777_777);
        let (_, r) = tcp_reset(&ip, &t, 100).unwrap();
        assert_eq!(r[13], RST);
        assert_eq!(u32::from_be_bytes([r[4], r[5], r[6], r[7]]), 777_777);
    }

    #[test]
    fn data_and_fin_without_ack_are_acknowledged_in_full() {
        let (ip, t) = seg(FIN, u32::MAX - 5, 0);
        let (_, r) = tcp_reset(&ip, &t, 10).unwrap();
        assert_eq!(
            u32::from_be_bytes([r[8], r[9], r[10], r[11]]),
            5,
            "wraps around"
        );
    }

    #[test]
    fn a_reset_is_never_answered() {
        let (ip, t) = seg(RST | ACK, 1, 1);
        assert!(tcp_reset(&ip, &t, 0).is_none());
    }
}
