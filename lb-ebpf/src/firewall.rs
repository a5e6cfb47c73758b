//! The firewall: the global deny list, per-service source rules, and the
//! SYN-flood guard's new-flow rate limits. All of it runs before any state is
//! created for a packet.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use lb_common::{
    counter,
    firewall::{
        Firewall, RuleKey, TokenBucket, FIREWALL_F_CLOSED_DROP, FIREWALL_F_DENY_LIST,
        FIREWALL_F_ECHO_REPLY, RULE_ALLOW,
    },
    Service, SERVICE_F_ALLOWLIST, SERVICE_F_FIREWALL,
};

use crate::maps::{FIREWALL, FW_DENY, FW_RULES, GLOBAL_RATE, SOURCE_RATE, VIPS};

/// The settings, in place (all zero, nothing limited, until the daemon
/// writes them). The one-entry array always has its entry; read by reference,
/// not copied onto the 512-byte stack.
#[inline(always)]
pub fn settings() -> Option<&'static Firewall> {
    FIREWALL.get(0)
}

/// Whether `src` is on the global deny list.
#[inline(always)]
pub fn denied(fw: &Firewall, src: [u8; 4]) -> bool {
    fw.flags & FIREWALL_F_DENY_LIST != 0 && FW_DENY.get(Key::new(32, src)).is_some()
}

/// Whether `svc`'s rules let `src` in: the most specific matching rule
/// decides; with no match, allowed unless the service has an allow list.
#[inline(always)]
pub fn service_allows(svc: &Service, src: [u8; 4]) -> bool {
    if svc.flags & SERVICE_F_FIREWALL == 0 {
        return true;
    }
    let key = Key::new(
        64,
        RuleKey {
            service: svc.id.to_be_bytes(),
            addr: src,
        },
    );
    match FW_RULES.get(key) {
        Some(&rule) => rule == RULE_ALLOW,
        None => svc.flags & SERVICE_F_ALLOWLIST == 0,
    }
}

/// Whether a VIP's closed ports and unanswered ICMP are dropped (`dst` is a
/// VIP and the firewall says so).
#[inline(always)]
pub fn closed(fw: &Firewall, dst: [u8; 4]) -> bool {
    fw.flags & FIREWALL_F_CLOSED_DROP != 0 && is_vip(dst)
}

#[inline(always)]
pub fn is_vip(addr: [u8; 4]) -> bool {
    VIPS.get_ptr(addr).is_some()
}

#[inline(always)]
pub fn echo_reply(fw: &Firewall) -> bool {
    fw.flags & FIREWALL_F_ECHO_REPLY != 0
}

/// The SYN-flood guard: whether a new flow from `src` may be created, or the
/// counter of the limit it is over. The source's own rate first (one flooding
/// client is stopped without touching anyone else's share), then this CPU's
/// share of the global cap, which protects the connection table from floods
/// of many sources.
#[inline(always)]
pub fn admit_new_flow(fw: &Firewall, src: [u8; 4]) -> Result<(), u32> {
    if fw.source_cost_ns == 0 && fw.global_cost_ns == 0 {
        return Ok(());
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if fw.source_cost_ns != 0 {
        let ok = match SOURCE_RATE.get_ptr_mut(src) {
            // SAFETY: a live map value; racing CPUs may lose an update, which
            // only makes the limit a little lenient.
            Some(b) => unsafe { (*b).take(now, fw.source_cost_ns, fw.source_burst_ns) },
            None => {
                let (b, ok) = TokenBucket::first(now, fw.source_cost_ns, fw.source_burst_ns);
                let _ = SOURCE_RATE.insert(src, b, 0);
                ok
            }
        };
        if !ok {
            return Err(counter::DROP_SOURCE_RATE);
        }
    }
    if fw.global_cost_ns != 0 {
        if let Some(b) = GLOBAL_RATE.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            if !unsafe { (*b).take(now, fw.global_cost_ns, fw.global_burst_ns) } {
                return Err(counter::DROP_GLOBAL_RATE);
            }
        }
    }
    Ok(())
}
