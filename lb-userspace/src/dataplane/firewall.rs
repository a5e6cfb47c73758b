//! The firewall's global part: its settings (rate limits, what closed ports
//! get) and the global deny list. Per-service source rules are the planner's.

use std::collections::HashSet;

use aya::maps::lpm_trie::Key as LpmKey;
use lb_common::{
    firewall::{
        limit_ns, Firewall, FIREWALL_F_CLOSED_DROP, FIREWALL_F_DENY_LIST, FIREWALL_F_ECHO_REPLY,
    },
    maps as names,
};

use super::{maps::map_err, Dataplane, Result};
use crate::config::{Cidr, ClosedPorts, FirewallConfig};

impl Dataplane {
    /// Writes the firewall's settings and global deny list; in force for the
    /// next packet. New deny entries are written before the flag that makes
    /// the data path read them, old ones removed after.
    pub fn set_firewall(&mut self, f: &FirewallConfig) -> Result<()> {
        if self.firewall.as_ref() == Some(f) {
            // The reconciler syncs on every report: nothing to write.
            return Ok(());
        }
        let want: HashSet<Cidr> = f.deny.iter().copied().collect();
        let key = |c: &Cidr| LpmKey::new(c.len as u32, c.addr.octets());
        let added: Vec<Cidr> = want.difference(&self.deny).copied().collect();
        let removed: Vec<Cidr> = self.deny.difference(&want).copied().collect();
        for c in &added {
            self.maps
                .fw_deny
                .insert(&key(c), 1, 0)
                .map_err(map_err(names::FW_DENY))?;
        }
        let (source_cost_ns, source_burst_ns) = limit_ns(
            f.source_new_flows_per_sec as u64,
            f.source_new_flows_burst as u64,
        );
        // The global cap is shared out between the CPUs: each enforces its
        // part with its own bucket (no contention on the packet path).
        let (cost, burst) = limit_ns(f.new_flows_per_sec as u64, f.new_flows_burst as u64);
        let cpus = self.maps.nr_cpus().max(1) as u64;
        let global_cost_ns = cost.saturating_mul(cpus);
        let value = Firewall {
            flags: if want.is_empty() {
                0
            } else {
                FIREWALL_F_DENY_LIST
            } | if f.closed_ports == ClosedPorts::Drop {
                FIREWALL_F_CLOSED_DROP
            } else {
                0
            } | if f.icmp_echo_reply {
                FIREWALL_F_ECHO_REPLY
            } else {
                0
            },
            _pad: 0,
            source_cost_ns,
            source_burst_ns,
            global_cost_ns,
            global_burst_ns: burst.max(global_cost_ns),
        };
        self.maps
            .firewall
            .set(0, value, 0)
            .map_err(map_err(names::FIREWALL))?;
        for c in &removed {
            let _ = self.maps.fw_deny.remove(&key(c));
        }
        self.deny = want;
        self.firewall = Some(f.clone());
        Ok(())
    }
}
