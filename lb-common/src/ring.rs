//! Scheduling rings: the sequence of backend slots a service's new flows walk
//! through, one step per new flow, with a shared atomic position in the data path.
//!
//! Round robin is the ring `[0, 1, .., n-1]`; weighted round robin repeats each
//! backend as often as its weight, interleaved the way nginx's smooth weighted
//! round robin orders them, so a heavy backend never gets a long run of flows.

/// Greatest common divisor (`gcd(0, x) == x`).
pub fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Length of the ring for `weights`: their sum divided by their common divisor.
/// Zero weights take no slot; all-zero weights give an empty ring.
pub fn ring_len(weights: &[u32]) -> u64 {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g == 0 {
        return 0;
    }
    weights.iter().map(|&w| (w / g) as u64).sum()
}

/// Fills `out` with the smooth weighted round-robin order of the indices of
/// `weights` and returns how many slots it used, or `None` when the ring does
/// not fit in `out`.
pub fn fill_ring(weights: &[u32], out: &mut [u32]) -> Option<usize> {
    let len = ring_len(weights);
    if len > out.len() as u64 {
        return None;
    }
    let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let total = (len as i64).max(1);
    // Running "current weight" per backend, as in nginx's ngx_http_upstream_get_peer;
    // bounded by the ring length, so a fixed array is enough for MAX_BACKENDS.
    let mut current = [0i64; crate::MAX_BACKENDS as usize];
    if weights.len() > current.len() {
        return None;
    }
    for slot in out.iter_mut().take(len as usize) {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += (w / g) as i64;
            if current[i] > current[best] || weights[best] == 0 {
                best = i;
            }
        }
        current[best] -= total;
        *slot = best as u32;
    }
    Some(len as usize)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    fn ring(weights: &[u32]) -> std::vec::Vec<u32> {
        let mut out = vec![0; 1024];
        let n = fill_ring(weights, &mut out).expect("fits");
        out.truncate(n);
        out
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        assert_eq!(ring(&[1, 1]), [0, 1]);
        assert_eq!(ring(&[3, 3, 3]), [0, 1, 2]);
        assert_eq!(ring(&[1]), [0]);
    }

    #[test]
    fn weights_are_honoured_and_interleaved() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(ring(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let r = ring(&[2, 4, 6]);
        assert_eq!(r.len(), 6);
        for (i, want) in [1, 2, 3].iter().enumerate() {
            assert_eq!(r.iter().filter(|&&b| b == i as u32).count(), *want);
        }
    }

    #[test]
    fn zero_weight_takes_no_slot() {
        assert_eq!(ring(&[0, 1, 0, 1]), [1, 3]);
        assert_eq!(ring(&[0, 0]), std::vec::Vec::<u32>::new());
        assert_eq!(ring(&[]), std::vec::Vec::<u32>::new());
    }

    #[test]
    fn too_long_a_ring_is_refused() {
        let mut out = [0; 4];
        assert_eq!(fill_ring(&[3, 2], &mut out), None);
        assert_eq!(fill_ring(&[2, 2], &mut out), Some(2));
    }

    #[test]
    fn a_ring_that_fills_its_space_exactly_fits() {
        let mut out = [9; 4];
        assert_eq!(fill_ring(&[1, 1, 1, 1], &mut out), Some(4));
        assert_eq!(out, [0, 1, 2, 3]);
        assert_eq!(fill_ring(&[1, 1, 1, 1, 1], &mut [0; 4]), None);
    }

    /// `MAX_BACKENDS` backends fit the scheduler's scratch space; one more is
    /// refused even when the output has room for it.
    #[test]
    fn max_backends_fit_and_one_more_is_refused() {
        let n = crate::MAX_BACKENDS as usize;
        let mut out = vec![u32::MAX; n + 1];
        assert_eq!(fill_ring(&vec![1; n], &mut out), Some(n));
        assert!(
            out[..n].iter().enumerate().all(|(i, &b)| b == i as u32),
            "equal weights: plain round robin"
        );
        assert_eq!(fill_ring(&vec![1; n + 1], &mut out), None);
    }
}
