//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Checksums and the 16-bit words they cover are handled as `[u8; 2]` in
//! network byte order, exactly as they sit in the packet.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after the 16-bit word `old` covered by it became `new`
/// (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
pub fn replace2(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let hc = u16::from_be_bytes(check);
    let m = u16::from_be_bytes(old);
    let m2 = u16::from_be_bytes(new);
    let sum = (!hc) as u32 + (!m) as u32 + m2 as u32;
    (!fold(sum)).to_be_bytes()
}

/// The checksum after the 32-bit field `old` (an IPv4 address) became `new`.
#[inline(always)]
pub fn replace4(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let c = replace2(check, [old[0], old[1]], [new[0], new[1]]);
    replace2(c, [old[2], old[3]], [new[2], new[3]])
}

/// Two 16-bit word changes as one: with `d = merge2(a, a2, b, b2)`,
/// `replace2(c, [0, 0], d)` is `replace2(replace2(c, a, a2), b, b2)` (the same
/// one's-complement value; adding the word 0 changes nothing). A rewrite
/// that changes a port and the TCP flags owes the hook one update, not two.
#[inline(always)]
pub fn merge2(old_a: [u8; 2], new_a: [u8; 2], old_b: [u8; 2], new_b: [u8; 2]) -> [u8; 2] {
    let sum = (!u16::from_be_bytes(old_a)) as u32
        + u16::from_be_bytes(new_a) as u32
        + (!u16::from_be_bytes(old_b)) as u32
        + u16::from_be_bytes(new_b) as u32;
    fold(sum).to_be_bytes()
}

/// UDP's variant: a zero checksum means "none" and stays zero; a computed zero
/// is sent as `0xffff` (RFC 768).
#[inline(always)]
pub fn udp_replace4(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    if check == [0, 0] {
        return check;
    }
    nonzero(replace4(check, old, new))
}

/// UDP's variant of [`replace2`].
#[inline(always)]
pub fn udp_replace2(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    if check == [0, 0] {
        return check;
    }
    nonzero(replace2(check, old, new))
}

#[inline(always)]
fn nonzero(c: [u8; 2]) -> [u8; 2] {
    if c == [0, 0] {
        [0xff, 0xff]
    } else {
        c
    }
}

/// One's-complement sum of `data` (an odd trailing byte is padded with zero),
/// added to `initial`. Not for the data path: it loops over the whole buffer.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// The full checksum of `data` (e.g. an IPv4 header with its checksum field zeroed).
pub fn full(data: &[u8]) -> [u8; 2] {
    (!fold(sum(data, 0))).to_be_bytes()
}

/// The full TCP/UDP checksum over the IPv4 pseudo-header and `segment`
/// (whose checksum field must be zeroed).
pub fn l4_full(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> [u8; 2] {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    let s = sum(segment, sum(&pseudo, 0));
    (!fold(s)).to_be_bytes()
}

/// Whether `data` (a header or pseudo-header-prefixed segment including its
/// checksum field) verifies: its one's-complement sum is all ones.
pub fn verifies(data: &[u8], initial: u32) -> bool {
    fold(sum(data, initial)) == 0xffff
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// A deterministic pseudo-random byte stream (xorshift), so failures reproduce.
    fn bytes(seed: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    }

    /// Equal as one's-complement values (0x0000 and 0xffff are both zero).
    fn same_value(a: [u8; 2], b: [u8; 2]) -> bool {
        a == b || (a == [0, 0] || a == [0xff, 0xff]) && (b == [0, 0] || b == [0xff, 0xff])
    }

    #[test]
    fn a_merged_change_is_the_two_changes_in_turn() {
        let mut seed = 0x6d65_7267_6532;
        for _ in 0..20_000 {
            let r = bytes(&mut seed, 10);
            let w = |i: usize| [r[i], r[i + 1]];
            let (c, a, a2, b, b2) = (w(0), w(2), w(4), w(6), w(8));
            let merged = replace2(c, [0, 0], merge2(a, a2, b, b2));
            let in_turn = replace2(replace2(c, a, a2), b, b2);
            assert!(
                same_value(merged, in_turn),
                "{r:02x?}: {merged:02x?} {in_turn:02x?}"
            );
        }
        // No change at all: the checksum stays as it was.
        assert_eq!(
            replace2([0x12, 0x34], [0, 0], merge2([1, 2], [1, 2], [3, 4], [3, 4])),
            [0x12, 0x34]
        );
    }

    #[test]
    fn a_segment_with_a_new_port_and_flags_verifies_after_one_merged_update() {
        let (src, dst) = ([10, 0, 1, 2], [10, 0, 0, 100]);
        let mut seed = 0x7273_7421;
        let mut seg = bytes(&mut seed, 40);
        seg[12] = 5 << 4;
        seg[16] = 0;
        seg[17] = 0;
        let c = l4_full(src, dst, 6, &seg);
        seg[16..18].copy_from_slice(&c);
        let (old_port, old_flags) = ([seg[2], seg[3]], [seg[12], seg[13]]);
        let (new_port, new_flags) = ([0x1f, 0x90], [seg[12], 0x14]);
        seg[2..4].copy_from_slice(&new_port);
        seg[12..14].copy_from_slice(&new_flags);
        let c = replace2(c, [0, 0], merge2(old_port, new_port, old_flags, new_flags));
        // The full recomputation over the changed segment agrees.
        seg[16] = 0;
        seg[17] = 0;
        assert!(same_value(c, l4_full(src, dst, 6, &seg)));
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(full(&data), (!0xddf2u16).to_be_bytes());
    }

    #[test]
    fn known_ipv4_header() {
        // A header from a real capture; its checksum is b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(verifies(&h, 0));
        h[10] = 0;
        h[11] = 0;
        assert_eq!(full(&h), [0xb8, 0x61]);
    }

    /// Incremental updates agree with a full recomputation, for random data and
    /// random replaced fields at random even offsets.
    #[test]
    fn incremental_matches_full_recomputation() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000 {
            let len = 8 + 2 * (bytes(&mut seed, 1)[0] as usize % 40);
            let mut data = bytes(&mut seed, len);
            // The checksum field lives at offset 0..2 here.
            data[0] = 0;
            data[1] = 0;
            let c = full(&data);
            data[..2].copy_from_slice(&c);
            assert!(verifies(&data, 0), "round {round}");

            let off = 2 + 2 * (bytes(&mut seed, 1)[0] as usize % ((len - 6) / 2));
            let new = bytes(&mut seed, 4);
            let old: [u8; 4] = data[off..off + 4].try_into().unwrap();
            let new4: [u8; 4] = new[..4].try_into().unwrap();
            data[off..off + 4].copy_from_slice(&new4);
            let inc = replace4([data[0], data[1]], old, new4);

            let mut zeroed = data.clone();
            zeroed[0] = 0;
            zeroed[1] = 0;
            let recomputed = full(&zeroed);
            // One's complement has two zeros; both verify.
            data[..2].copy_from_slice(&inc);
            assert!(
                verifies(&data, 0),
                "round {round}: {inc:?} vs {recomputed:?}"
            );
            if recomputed != [0xff, 0xff] && recomputed != [0, 0] {
                assert_eq!(inc, recomputed, "round {round}");
            }
        }
    }

    #[test]
    fn l4_checksum_with_pseudo_header_updates_incrementally() {
        let mut seed = 7;
        for _ in 0..5_000 {
            let src: [u8; 4] = bytes(&mut seed, 4).try_into().unwrap();
            let dst: [u8; 4] = bytes(&mut seed, 4).try_into().unwrap();
            let new_dst: [u8; 4] = bytes(&mut seed, 4).try_into().unwrap();
            let new_port: [u8; 2] = bytes(&mut seed, 2).try_into().unwrap();
            let extra = seed as usize % 50;
            let mut seg = bytes(&mut seed, 20 + extra);
            seg[16] = 0;
            seg[17] = 0;
            let c = l4_full(src, dst, IPPROTO, &seg);
            seg[16..18].copy_from_slice(&c);

            let old_port = [seg[2], seg[3]];
            seg[2..4].copy_from_slice(&new_port);
            let c = replace4([seg[16], seg[17]], dst, new_dst);
            let c = replace2(c, old_port, new_port);
            seg[16..18].copy_from_slice(&c);

            let mut zeroed = seg.clone();
            zeroed[16] = 0;
            zeroed[17] = 0;
            let want = l4_full(src, new_dst, IPPROTO, &zeroed);
            if want != [0xff, 0xff] && want != [0, 0] {
                assert_eq!(c, want);
            }
        }
    }
    const IPPROTO: u8 = 6;

    /// A trailing odd byte counts as the high byte of a word whose low byte
    /// is zero (RFC 1071 section 4.1).
    #[test]
    fn an_odd_trailing_byte_is_padded_with_zero() {
        // RFC 1071's words (sum 0x2ddf0) and 0xab: 0x2ddf0 + 0xab00 = 0x388f0,
        // folded 0x88f3.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7, 0xab];
        assert_eq!(sum(&data, 0), 0x0003_88f0);
        assert_eq!(sum(&data, 0), sum(&[&data[..], &[0]].concat(), 0));
        assert_eq!(full(&data), [0x77, 0x0c]);
    }

    /// The initial sum (a pseudo-header's) is any `u32`: past 32 bits the
    /// carry comes back in (end-around carry), as often as it takes.
    #[test]
    fn a_sum_past_32_bits_folds_its_carry_back_in() {
        // 0xffff_ffff + 0xffff = 0x1_0000_fffe -> 0xfffe + 1.
        assert_eq!(sum(&[0xff, 0xff], 0xffff_ffff), 0xffff);
        // 0xffff_ffff + 2 = 0x1_0000_0001 -> 1 + 1.
        assert_eq!(sum(&[0x00, 0x02], 0xffff_ffff), 2);
        // Exactly 32 bits of ones: nothing to fold.
        assert_eq!(sum(&[], 0xffff_ffff), 0xffff_ffff);
        assert_eq!(sum(&[0x00, 0x01], 0xffff_fffe), 0xffff_ffff);
    }

    #[test]
    fn a_corrupted_header_does_not_verify() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(verifies(&h, 0));
        // One bit of the TTL flipped.
        h[8] ^= 1;
        assert!(!verifies(&h, 0));
        h[8] ^= 1;
        // The checksum field zeroed.
        h[10] = 0;
        h[11] = 0;
        assert!(!verifies(&h, 0));
    }

    /// A UDP checksum that is present is updated like TCP's: a datagram
    /// 10.0.1.2:40000 -> 10.0.0.100:53 (payload "abcd", checksum 0x8934 by
    /// full recomputation) sent on to 10.0.1.7 has checksum 0x8891.
    #[test]
    fn a_present_udp_checksum_is_updated() {
        let mut seg = [0u8; 12];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&53u16.to_be_bytes());
        seg[4..6].copy_from_slice(&12u16.to_be_bytes());
        seg[8..12].copy_from_slice(b"abcd");
        let (src, vip, backend) = ([10, 0, 1, 2], [10, 0, 0, 100], [10, 0, 1, 7]);
        assert_eq!(l4_full(src, vip, 17, &seg), [0x89, 0x34]);
        assert_eq!(l4_full(src, backend, 17, &seg), [0x88, 0x91]);
        assert_eq!(udp_replace4([0x89, 0x34], vip, backend), [0x88, 0x91]);
        assert_eq!(udp_replace4([0x88, 0x91], backend, vip), [0x89, 0x34]);
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(udp_replace4([0, 0], [1, 2, 3, 4], [5, 6, 7, 8]), [0, 0]);
        assert_eq!(udp_replace2([0, 0], [0, 80], [0, 81]), [0, 0]);
        // Find an update whose one's-complement result is zero: check 0xfffe with
        // a word going from 0 to 1 gives ~(~0xfffe + ~0 + 1) = ~(1 + 0xffff + 1) = 0xfffe...
        // so search instead of hand-deriving.
        let mut hit = false;
        for c in 1..=0xffffu32 {
            let check = (c as u16).to_be_bytes();
            if replace2(check, [0, 0], [0, 1]) == [0, 0] {
                assert_eq!(udp_replace2(check, [0, 0], [0, 1]), [0xff, 0xff]);
                hit = true;
            }
        }
        assert!(hit, "some checksum must update to zero");
    }
}
