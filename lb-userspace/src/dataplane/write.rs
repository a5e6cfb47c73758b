//! The writer: applies the planner's writes to the maps, in order. It
//! decides nothing; each write is one map update (or, for the counters of a
//! slot given again, the few that reset it).

use aya::maps::lpm_trie::Key as LpmKey;
use lb_common::{counter, firewall::RuleKey, maps as names, NextHop, Traffic};

use super::{
    maps::{map_err, Maps},
    plan::Write,
    Result,
};

impl Maps {
    /// Applies `writes` in order; stops at the first that fails.
    pub fn write(&mut self, writes: &[Write]) -> Result<()> {
        for w in writes {
            self.write_one(w)?;
        }
        Ok(())
    }

    fn write_one(&mut self, w: &Write) -> Result<()> {
        match *w {
            Write::Prefilter { word, bits } => self
                .prefilter
                .set(word, bits, 0)
                .map_err(map_err(names::PREFILTER)),
            Write::NewService { id } => {
                let zeros = self.on_first_cpu(Traffic::default())?;
                self.service_traffic
                    .set(id, zeros, 0)
                    .map_err(map_err(names::SERVICE_TRAFFIC))?;
                self.rr_position
                    .set(id, 0, 0)
                    .map_err(map_err(names::RR_POSITION))
            }
            Write::FoldTraffic { backend, into } => self.fold_traffic(backend, into),
            Write::NewBackend { id } => {
                let zeros = self.on_first_cpu(Traffic::default())?;
                self.backend_traffic
                    .set(id, zeros, 0)
                    .map_err(map_err(names::BACKEND_TRAFFIC))?;
                // The slot's count of flows was the earlier backend's.
                let zeros = self.on_first_cpu(0i64)?;
                self.active
                    .set(id, zeros, 0)
                    .map_err(map_err(names::ACTIVE))?;
                self.active_reclaimed
                    .set(id, 0, 0)
                    .map_err(map_err(names::ACTIVE_RECLAIMED))?;
                // So was its cached hop.
                self.hops
                    .set(id, NextHop::default(), 0)
                    .map_err(map_err(names::HOPS))
            }
            Write::Backend { id, value } => self
                .backends
                .set(id, value, 0)
                .map_err(map_err(names::BACKENDS)),
            Write::Ring { index, backend } => self
                .rings
                .set(index, backend, 0)
                .map_err(map_err(names::RINGS)),
            Write::Maglev { index, backend } => self
                .maglev
                .set(index, backend, 0)
                .map_err(map_err(names::MAGLEV)),
            Write::Rule {
                service,
                cidr,
                verdict,
            } => {
                let key = LpmKey::new(
                    32 + cidr.len as u32,
                    RuleKey {
                        service: service.to_be_bytes(),
                        addr: cidr.addr.octets(),
                    },
                );
                match verdict {
                    Some(v) => self
                        .fw_rules
                        .insert(&key, v, 0)
                        .map_err(map_err(names::FW_RULES)),
                    None => {
                        // Already gone is what was asked.
                        let _ = self.fw_rules.remove(&key);
                        Ok(())
                    }
                }
            }
            Write::ServiceById { id, value } => self
                .services_by_id
                .set(id, value, 0)
                .map_err(map_err(names::SERVICES_BY_ID)),
            Write::Service { key, value } => self
                .services
                .insert(key, value, 0)
                .map_err(map_err(names::SERVICES)),
            Write::RemoveService { key } => {
                let _ = self.services.remove(&key);
                Ok(())
            }
            Write::Vip { vip, present } => {
                if present {
                    self.vips.insert(vip, 1, 0).map_err(map_err(names::VIPS))
                } else {
                    let _ = self.vips.remove(&vip);
                    Ok(())
                }
            }
            Write::BackendVip { key, value } => match value {
                Some(v) => self
                    .backend_vips
                    .insert(key, v, 0)
                    .map_err(map_err(names::BACKEND_VIPS)),
                None => {
                    let _ = self.backend_vips.remove(&key);
                    Ok(())
                }
            },
        }
    }

    /// Moves a retired backend slot's traffic into its service's
    /// (SERVICE_TRAFFIC) and the FORWARDED and REPLIES totals, which the data
    /// path does not count itself. The daemon is the only writer of those.
    fn fold_traffic(&mut self, backend: u32, into: Option<u32>) -> Result<()> {
        let t = Maps::traffic(&self.backend_traffic, backend, names::BACKEND_TRAFFIC)?;
        if t == Traffic::default() {
            return Ok(());
        }
        if let Some(id) = into {
            let mut kept = Maps::traffic(&self.service_traffic, id, names::SERVICE_TRAFFIC)?;
            kept.add(&t);
            let v = self.on_first_cpu(kept)?;
            self.service_traffic
                .set(id, v, 0)
                .map_err(map_err(names::SERVICE_TRAFFIC))?;
        }
        for (slot, add) in [
            (counter::FORWARDED, t.packets),
            (counter::REPLIES, t.reply_packets),
        ] {
            let now: u64 = self
                .counters
                .get(&slot, 0)
                .map_err(map_err(names::COUNTERS))?
                .iter()
                .sum();
            let v = self.on_first_cpu(now + add)?;
            self.counters
                .set(slot, v, 0)
                .map_err(map_err(names::COUNTERS))?;
        }
        Ok(())
    }
}
