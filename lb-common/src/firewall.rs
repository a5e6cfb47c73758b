//! The firewall's shared parts: the settings the daemon writes, the key of the
//! per-service source rules, and the token bucket of the SYN-flood guard.

/// Most CIDRs on the global deny list.
pub const MAX_DENY_RULES: u32 = 16_384;
/// Most source rules across all services.
pub const MAX_SERVICE_RULES: u32 = 16_384;
/// Sources whose new-flow rate is tracked at once (LRU: the least recently
/// seen source is forgotten, and starts again with a full bucket).
pub const SOURCE_RATE_SIZE: u32 = 65_536;

/// Value of the one-entry `FIREWALL` array: what the guard does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Firewall {
    /// `FIREWALL_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// Credit one new flow from one source costs (1e9 / rate); 0: no limit.
    pub source_cost_ns: u64,
    /// Most credit a source can save up (burst x cost).
    pub source_burst_ns: u64,
    /// Credit one new flow costs on one CPU's share of the global cap; 0: no cap.
    pub global_cost_ns: u64,
    pub global_burst_ns: u64,
}

/// The global deny list has entries: look every source up.
pub const FIREWALL_F_DENY_LIST: u32 = 1;
/// Traffic to a VIP on a port (or protocol) no service uses is dropped.
pub const FIREWALL_F_CLOSED_DROP: u32 = 2;
/// ICMP echo requests to a VIP are answered (else dropped).
pub const FIREWALL_F_ECHO_REPLY: u32 = 4;

/// Key data of the per-service rule trie: the service id and the source, both
/// in network order, so a rule's prefix is 32 + the CIDR's length and only
/// matches sources of its own service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub service: [u8; 4],
    pub addr: [u8; 4],
}

/// What a matching rule says (value of the rule trie).
pub const RULE_ALLOW: u32 = 1;
pub const RULE_DENY: u32 = 2;

/// A token bucket counted in nanoseconds of credit: time adds credit up to
/// the burst, each admitted event spends its cost. No division on the packet
/// path (the daemon turns rates into costs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TokenBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl TokenBucket {
    /// A bucket first seen at `now`, full, and having admitted one event.
    pub fn first(now: u64, cost: u64, burst: u64) -> (TokenBucket, bool) {
        let mut b = TokenBucket {
            credit_ns: burst,
            last_ns: now,
        };
        let ok = b.take(now, cost, burst);
        (b, ok)
    }

    /// Adds the credit earned since the last event (capped at `burst`) and
    /// spends `cost` if there is that much; returns whether the event is admitted.
    pub fn take(&mut self, now: u64, cost: u64, burst: u64) -> bool {
        let earned = now.saturating_sub(self.last_ns);
        self.last_ns = now;
        let credit = self.credit_ns.saturating_add(earned);
        let credit = if credit > burst { burst } else { credit };
        if credit >= cost {
            self.credit_ns = credit - cost;
            true
        } else {
            self.credit_ns = credit;
            false
        }
    }
}

/// Cost and burst (ns of credit) of a limit of `per_sec` events a second with
/// bursts of `burst` events; (0, 0) when `per_sec` is 0 (no limit).
pub fn limit_ns(per_sec: u64, burst: u64) -> (u64, u64) {
    if per_sec == 0 {
        return (0, 0);
    }
    let cost = (1_000_000_000 / per_sec).max(1);
    (cost, cost.saturating_mul(burst.max(1)))
}

const _: () = assert!(core::mem::size_of::<Firewall>() == 40);
const _: () = assert!(core::mem::size_of::<RuleKey>() == 8);
const _: () = assert!(core::mem::size_of::<TokenBucket>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_the_rate() {
        let (cost, burst) = limit_ns(10, 5);
        assert_eq!((cost, burst), (SEC / 10, SEC / 2));
        let (mut b, ok) = TokenBucket::first(SEC, cost, burst);
        assert!(ok);
        let admitted = (0..20).filter(|_| b.take(SEC, cost, burst)).count();
        assert_eq!(admitted, 4, "the burst is 5 events, one spent by the first");
        assert!(
            !b.take(SEC + cost - 1, cost, burst),
            "not yet a whole event's credit"
        );
        assert!(b.take(SEC + cost, cost, burst));
        // A long silence refills to the burst, not beyond.
        let later = 100 * SEC;
        let admitted = (0..20).filter(|_| b.take(later, cost, burst)).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let (cost, burst) = limit_ns(1, 1);
        let (mut b, _) = TokenBucket::first(10 * SEC, cost, burst);
        assert!(!b.take(5 * SEC, cost, burst));
        assert!(!b.take(5 * SEC + cost - 1, cost, burst));
    }

    #[test]
    fn zero_rate_means_no_limit() {
        assert_eq!(limit_ns(0, 100), (0, 0));
        assert_eq!(limit_ns(2_000_000_000, 1), (1, 1));
    }
}
