//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) and the flow hash
//! the data path uses to index the table.
//!
//! Every balancer with the same config (backend names, weights, table size,
//! seed) builds the same table and hashes a flow the same way, so any instance
//! sends any flow to the same backend: a flow that moves between instances, or
//! outlives a daemon's connection table, still reaches the backend it started on.

/// The default table size: a prime, as Maglev needs (Katran uses the same).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// The largest table size a service may ask for.
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// 64-bit finaliser of MurmurHash3: a cheap, well-mixed bijection.
#[inline(always)]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The hash of a flow's 5-tuple (client side, as the client sent it), with a
/// seed from the config. Fixed work, no loops: it runs in the data path.
#[inline(always)]
pub fn flow_hash(
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    seed: u32,
) -> u32 {
    let a = ((u32::from_be_bytes(src) as u64) << 32) | u32::from_be_bytes(dst) as u64;
    let b = ((u16::from_be_bytes(sport) as u64) << 32)
        | ((u16::from_be_bytes(dport) as u64) << 16)
        | proto as u64;
    let h = fmix64(a ^ fmix64(b ^ ((seed as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15));
    (h ^ (h >> 32)) as u32
}

/// FNV-1a over a name, then mixed with the seed: where a backend's
/// permutation starts and how it steps.
#[cfg(not(target_arch = "bpf"))]
fn name_hash(name: &[u8], seed: u32, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in name {
        h ^= c as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    fmix64(h ^ salt ^ ((seed as u64) << 17))
}

/// Salts of [`name_hash`]: where a backend's permutation starts, how it steps.
#[cfg(not(target_arch = "bpf"))]
const OFFSET_SALT: u64 = 0x5bd1_e995;
#[cfg(not(target_arch = "bpf"))]
const SKIP_SALT: u64 = 0x1b87_3593;

/// Whether `m` is prime (trial division; `m` is at most a few hundred thousand).
pub fn is_prime(m: u32) -> bool {
    if m < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= m as u64 {
        if (m as u64).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Fills `table` (its length `M` must be prime) with indices into `backends`,
/// each given by its name and weight, following Maglev's population with
/// weights as credits: in each round a backend places its next preferred slot
/// once its accumulated weight reaches the largest weight. Backends of weight
/// 0 take no slot. Returns false (and leaves `table` unspecified) if no
/// backend has a weight or `M` is not prime.
/// (Userspace only: it allocates.)
#[cfg(not(target_arch = "bpf"))]
pub fn fill_table(backends: &[(&[u8], u32)], seed: u32, table: &mut [u32]) -> bool {
    extern crate alloc;
    use alloc::vec;

    let m = table.len() as u64;
    let max_w = backends.iter().map(|b| b.1).max().unwrap_or(0);
    if max_w == 0 || !is_prime(m as u32) {
        return false;
    }
    let n = backends.len();
    let offset: alloc::vec::Vec<u64> = backends
        .iter()
        .map(|b| name_hash(b.0, seed, OFFSET_SALT) % m)
        .collect();
    let skip: alloc::vec::Vec<u64> = backends
        .iter()
        .map(|b| name_hash(b.0, seed, SKIP_SALT) % (m - 1) + 1)
        .collect();
    let mut next = vec![0u64; n];
    let mut credit = vec![0u64; n];
    const EMPTY: u32 = u32::MAX;
    table.iter_mut().for_each(|e| *e = EMPTY);
    let mut filled = 0u64;
    while filled < m {
        for i in 0..n {
            credit[i] += backends[i].1 as u64;
            if credit[i] < max_w as u64 {
                continue;
            }
            credit[i] -= max_w as u64;
            // The backend's next preferred slot that is still free.
            loop {
                let slot = (offset[i] + next[i] * skip[i]) % m;
                next[i] += 1;
                if table[slot as usize] == EMPTY {
                    table[slot as usize] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{format, string::String, vec, vec::Vec};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn table(backends: &[(String, u32)], m: u32, seed: u32) -> Vec<u32> {
        let b: Vec<(&[u8], u32)> = backends.iter().map(|(n, w)| (n.as_bytes(), *w)).collect();
        let mut t = vec![0; m as usize];
        assert!(fill_table(&b, seed, &mut t));
        t
    }

    fn shares(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in t {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn default_size_is_prime() {
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65_536) && !is_prime(1) && is_prime(2) && is_prime(13));
    }

    /// Every backend's share is within 1% of its weighted share (relative),
    /// for N up to 500 with M = 65537, equal and unequal weights.
    #[test]
    fn shares_are_within_one_percent_of_the_weighted_share() {
        let m = DEFAULT_TABLE_SIZE;
        for &n in &[2usize, 3, 10, 100, 257, 500] {
            for weighted in [false, true] {
                let bs: Vec<(String, u32)> = names(n)
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| (s, if weighted { 1 + (i % 4) as u32 } else { 1 }))
                    .collect();
                let total: u64 = bs.iter().map(|b| b.1 as u64).sum();
                let t = table(&bs, m, 7);
                for (i, &c) in shares(&t, n).iter().enumerate() {
                    let want = m as f64 * bs[i].1 as f64 / total as f64;
                    let err = (c as f64 - want).abs() / want;
                    assert!(
                        err <= 0.01,
                        "N={n} weighted={weighted}: backend {i} has {c} slots, wants {want:.1} ({:.2}%)",
                        err * 100.0
                    );
                }
            }
        }
    }

    /// Removing one of N backends changes few entries besides the removed
    /// backend's own: bound 1/N of the table plus 1% of M (Maglev is not
    /// perfectly minimal; the NSDI paper measures a small excess).
    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        let m = DEFAULT_TABLE_SIZE;
        for &n in &[3usize, 10, 100, 500] {
            let all: Vec<(String, u32)> = names(n).into_iter().map(|s| (s, 1)).collect();
            let before = table(&all, m, 1);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<(String, u32)> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != removed)
                    .map(|(_, b)| b.clone())
                    .collect();
                let after = table(&rest, m, 1);
                // Compare by name: indices shift when one is removed.
                let changed = before
                    .iter()
                    .zip(&after)
                    .filter(|(&b, &a)| all[b as usize].0 != rest[a as usize].0)
                    .count();
                let bound = m as f64 / n as f64 + 0.01 * m as f64;
                assert!(
                    (changed as f64) <= bound,
                    "N={n}, removing {removed}: {changed} entries changed, bound {bound:.0}"
                );
            }
        }
    }

    #[test]
    fn builds_are_deterministic_and_depend_on_the_seed() {
        let bs: Vec<(String, u32)> = names(50).into_iter().map(|s| (s, 2)).collect();
        assert_eq!(
            table(&bs, DEFAULT_TABLE_SIZE, 42),
            table(&bs, DEFAULT_TABLE_SIZE, 42)
        );
        assert_ne!(
            table(&bs, DEFAULT_TABLE_SIZE, 42),
            table(&bs, DEFAULT_TABLE_SIZE, 43)
        );
    }

    #[test]
    fn zero_weight_takes_no_slot_and_a_non_prime_size_is_refused() {
        let bs = [(String::from("a"), 1), (String::from("b"), 0)];
        let t = table(&bs, 13, 0);
        assert!(t.iter().all(|&i| i == 0));
        let mut t = vec![0; 12];
        assert!(!fill_table(&[(b"a", 1)], 0, &mut t));
        assert!(!fill_table(&[(b"a", 0)], 0, &mut [0; 13]));
    }

    // Pinned values: every balancer, of any version, must hash a flow and
    // build a table the same way, or flows move when instances or versions
    // mix. They come from an independent implementation (Python, from
    // MurmurHash3's fmix64, FNV-1a and the population loop as documented).

    #[test]
    fn fmix64_is_murmurhash3s_finaliser() {
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert_eq!(fmix64(0x0123_4567_89ab_cdef), 0x87cb_fbfe_8902_2cea);
        assert_eq!(fmix64(u64::MAX), 0x64b5_720b_4b82_5f21);
    }

    #[test]
    fn flow_hash_values_are_pinned_and_every_field_counts() {
        let h = |src, sport: u16, dport: u16, proto, seed| {
            flow_hash(
                src,
                [10, 0, 0, 100],
                sport.to_be_bytes(),
                dport.to_be_bytes(),
                proto,
                seed,
            )
        };
        let base = h([10, 0, 1, 2], 40000, 80, 6, 0);
        assert_eq!(base, 0xd8b3_1460);
        assert_eq!(h([10, 0, 1, 2], 40000, 80, 6, 9), 0x539c_286f);
        assert_eq!(h([192, 168, 7, 1], 1234, 53, 17, 0xdead_beef), 0xa477_9414);
        for (field, other) in [
            ("src", h([10, 0, 1, 3], 40000, 80, 6, 0)),
            ("sport", h([10, 0, 1, 2], 40001, 80, 6, 0)),
            ("dport", h([10, 0, 1, 2], 40000, 81, 6, 0)),
            ("proto", h([10, 0, 1, 2], 40000, 80, 17, 0)),
            ("seed", h([10, 0, 1, 2], 40000, 80, 6, 1)),
            (
                "dst",
                flow_hash([10, 0, 1, 2], [10, 0, 0, 101], [0x9c, 0x40], [0, 80], 6, 0),
            ),
        ] {
            assert_ne!(other, base, "{field} does not change the hash");
        }
    }

    #[test]
    fn tables_are_pinned() {
        let bs = |ws: &[(&str, u32)]| -> Vec<(String, u32)> {
            ws.iter().map(|(n, w)| (String::from(*n), *w)).collect()
        };
        assert_eq!(
            table(&bs(&[("a", 1), ("b", 1)]), 13, 7),
            [1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            table(&bs(&[("web1", 3), ("web2", 2), ("web3", 1)]), 13, 42),
            [0, 1, 2, 2, 0, 1, 1, 0, 0, 0, 1, 0, 0]
        );
    }

    /// A backend's offset is reduced modulo M before it is stepped from, so
    /// a name whose hash lies within M of `u64::MAX` works like any other
    /// (this name and seed were found by inverting fmix64).
    #[test]
    fn a_name_hashing_next_to_u64_max_does_not_overflow() {
        let (name, seed): (&[u8], u32) = (b"backend-102656", 3_539_839_824);
        let m = DEFAULT_TABLE_SIZE as u64;
        let h = name_hash(name, seed, OFFSET_SALT);
        assert_eq!(u64::MAX - h, 50_896);
        let mut t = vec![u32::MAX; m as usize];
        assert!(fill_table(&[(name, 1), (b"backend-1", 1)], seed, &mut t));
        // Its first choice, the first slot filled, is its offset.
        assert_eq!(h % m, 14_641);
        assert_eq!(t[14_641], 0);
    }

    #[test]
    fn flow_hash_spreads_and_is_deterministic() {
        let m = DEFAULT_TABLE_SIZE;
        let mut hits = vec![0u32; 16];
        for port in 0..16_000u16 {
            let h = flow_hash(
                [10, 0, 1, 2],
                [10, 0, 0, 100],
                port.to_be_bytes(),
                [0, 80],
                6,
                9,
            );
            assert_eq!(
                h,
                flow_hash(
                    [10, 0, 1, 2],
                    [10, 0, 0, 100],
                    port.to_be_bytes(),
                    [0, 80],
                    6,
                    9
                )
            );
            hits[((h % m) * 16 / m) as usize] += 1;
        }
        for &c in &hits {
            assert!((900..1100).contains(&c), "uneven: {hits:?}");
        }
    }
}
