//! The only code that touches the BPF program and its maps, in three parts
//! with one direction between them:
//!
//! - `plan`: the planner. Pure: turns the services asked for, and what it
//!   knows the maps hold, into an ordered list of writes. It owns ids,
//!   generations and ring halves. Unit-tested without a kernel.
//! - `write`: the writer. Applies a plan to the maps, in order.
//! - `maps`: typed handles on every map, taken once at load by the names in
//!   `lb_common::maps`.
//!
//! Around them: loading, pinning and adoption (`pins`), the interfaces the
//! program runs on (`links`), the firewall's global settings (`firewall`)
//! and what the data path counts (`stats`).
//!
//! With a pin directory, maps and links are pinned in bpffs: they outlive
//! the daemon, forwarding continues while it is down, and the next daemon
//! adopts them (the connection table included) instead of starting over. A
//! newer program replaces the old one on the pinned links atomically.

use std::{net::Ipv4Addr, path::PathBuf};

use aya::{
    maps::MapError,
    programs::{ProgramError, SchedClassifier, Xdp},
    Ebpf, EbpfError,
};
use lb_common::{maps as names, NextHop, Settings};

mod firewall;
mod links;
mod maps;
mod pins;
pub mod plan;
mod spec;
mod stats;
mod write;

pub use links::Attachment;
pub use maps::{Maps, Table};
pub use pins::{persistence, remove_pins, Persistence};
use plan::Planner;
pub use spec::{BackendSpec, ServiceSpec};
pub use stats::{Census, FlowCensus, TrafficStatus, UdpSweep};

use crate::config::FirewallConfig;
use maps::map_err;

/// The XDP object built by `cargo xtask build-ebpf`, embedded at build time.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The object to load: the embedded one, or the file `$LB_XDP_OBJECT` names
/// (an operator's or a test's way to load another build of the program, e.g.
/// one built with lb-ebpf's `verbose-logs` feature, without rebuilding `lb`).
fn program_object() -> Result<std::borrow::Cow<'static, [u8]>> {
    match std::env::var_os("LB_XDP_OBJECT") {
        None => Ok(std::borrow::Cow::Borrowed(PROGRAM)),
        Some(p) => {
            std::fs::read(&p)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| DataplaneError::Pins {
                    dir: PathBuf::from(&p),
                    problem: format!("LB_XDP_OBJECT: {e}"),
                })
        }
    }
}

/// Name of the XDP function in the object.
pub const PROGRAM_NAME: &str = "lb";
/// Name of the TC (`sched_cls`) function in the object: the same data path.
pub const TC_PROGRAM_NAME: &str = "lb_tc";

/// Written into the pin directory's LAYOUT file-map: a daemon refuses to adopt
/// maps of another layout (bump it whenever a map's type or size changes).
pub const LAYOUT_VERSION: u64 = 7;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot load the data path's programs (are you root? is the kernel 5.16 or newer?)")]
    Load(#[source] EbpfError),
    #[error("the XDP program has no map {0} (a stale build? run `cargo xtask build-ebpf`)")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0} (a stale build? run `cargo xtask build-ebpf`)")]
    MissingProgram(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{iface}: {problem}")]
    Hook { iface: String, problem: String },
    #[error(transparent)]
    Refused(#[from] crate::iface::Refusal),
    #[error("cannot attach to {iface} at {mode}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the data path's programs")]
    Program(#[source] ProgramError),
    #[error(transparent)]
    Capacity(#[from] plan::CapacityError),
    #[error("no {0} of that name has been applied")]
    Unknown(&'static str),
    #[error("duplicating a map's descriptor")]
    Dup(#[source] std::io::Error),
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error("pinned state in {}: {problem}", dir.display())]
    Pins { dir: PathBuf, problem: String },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// The loaded program, its maps and what has been written to them.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    planner: Planner,
    attached: Vec<(Attachment, links::Link)>,
    pin_dir: Option<PathBuf>,
    /// Entries of the connection table.
    conntrack_size: u32,
    /// What the global deny list holds (read back at load: pinned maps may
    /// carry an earlier daemon's entries), and the settings last written.
    deny: std::collections::HashSet<crate::config::Cidr>,
    firewall: Option<FirewallConfig>,
    /// The next-hop generation last written to HOP_GENERATION.
    hop_generation: u32,
}

impl Dataplane {
    /// Loads the program into the kernel (verifier included) with private
    /// maps, without attaching it: for tests and one-off use.
    pub fn load() -> Result<Dataplane> {
        let ebpf = Ebpf::load(&program_object()?).map_err(DataplaneError::Load)?;
        Dataplane::finish_load(lb_common::CONNTRACK_SIZE, ebpf, None, false)
    }

    /// Like [`Dataplane::load`], with a connection table (and reverse table)
    /// of `entries` flows instead of `CONNTRACK_SIZE` (benchmarks fill it).
    #[cfg(feature = "testing")]
    pub fn load_with_conntrack(entries: u32) -> Result<Dataplane> {
        let mut loader = aya::EbpfLoader::new();
        loader
            .map_max_entries(names::CONNTRACK, entries)
            .map_max_entries(names::REVERSE, entries);
        let ebpf = loader
            .load(&program_object()?)
            .map_err(DataplaneError::Load)?;
        Dataplane::finish_load(entries, ebpf, None, false)
    }

    /// Writes flows straight into the connection table, all on one backend of
    /// one service (benchmarks fill the table to a given occupancy). Returns
    /// how many were written.
    #[cfg(feature = "testing")]
    pub fn insert_flows(
        &mut self,
        service: &str,
        backend: &str,
        keys: impl Iterator<Item = lb_common::FlowKey>,
    ) -> Result<u64> {
        let svc = self
            .planner
            .service_id(service)
            .ok_or(DataplaneError::Unknown("service"))?;
        let bid = self
            .planner
            .backend_id(service, backend)
            .ok_or(DataplaneError::Unknown("backend"))?;
        let flow = lb_common::Flow {
            backend: bid,
            service: svc,
            last_seen: crate::clock::jiffies_now(),
            generation: self.planner.generation(bid),
            flags: 0,
        };
        let mut n = 0;
        for k in keys {
            self.maps
                .conntrack
                .insert(k, flow, 0)
                .map_err(map_err(names::CONNTRACK))?;
            n += 1;
        }
        Ok(n)
    }

    /// The id the planner gave a service's backend (tests write next hops
    /// by id for backends they name).
    #[cfg(feature = "testing")]
    pub fn backend_id(&self, service: &str, backend: &str) -> Option<u32> {
        self.planner.backend_id(service, backend)
    }

    /// The maps, to read (tests and benchmarks check the data path's state
    /// through them; every write goes through `apply`).
    #[cfg(feature = "testing")]
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Loads both programs, takes the maps, and starts the planner from what
    /// they hold (`adopting`: an earlier daemon's pins).
    fn finish_load(
        conntrack_size: u32,
        mut ebpf: Ebpf,
        pin_dir: Option<PathBuf>,
        adopting: bool,
    ) -> Result<Dataplane> {
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::MissingProgram(PROGRAM_NAME))?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.load().map_err(DataplaneError::Program)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM_NAME)
            .ok_or(DataplaneError::MissingProgram(TC_PROGRAM_NAME))?
            .try_into()
            .map_err(DataplaneError::Program)?;
        tc.load().map_err(DataplaneError::Program)?;
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?;
        let maps = Maps::take(&mut ebpf, nr_cpus)?;
        let found = maps.found()?;
        let deny = maps
            .fw_deny
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| crate::config::Cidr {
                addr: Ipv4Addr::from(k.data()),
                len: k.prefix_len() as u8,
            })
            .collect();
        let hop_generation = maps
            .hop_generation
            .get(&0, 0)
            .map_err(map_err(names::HOP_GENERATION))?;
        let mut dp = Dataplane {
            ebpf,
            maps,
            planner: Planner::new(found, crate::clock::hz()),
            attached: Vec::new(),
            pin_dir,
            conntrack_size,
            deny,
            firewall: None,
            hop_generation,
        };
        if !adopting {
            dp.set_linger(std::time::Duration::from_secs(
                crate::config::DEFAULT_CLOSED_LINGER_S as u64,
            ))?;
        }
        Ok(dp)
    }

    /// The program's aya-log reader (only if it was built with log statements).
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// The TC program (the same data path), e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program_mut(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(TC_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is sched_cls")
    }

    /// Makes the maps carry exactly `services`: adds, updates and removes
    /// services and backends, each change atomic for the packets in flight
    /// (see `plan`). A service whose spec did not change is not written.
    pub fn apply(&mut self, services: &[ServiceSpec]) -> Result<()> {
        let writes = self.planner.plan(services)?;
        if let Err(e) = self.maps.write(&writes) {
            // The planner believes the whole plan landed; it did not. Start
            // it again from what the maps hold, as a restarted daemon would.
            tracing::warn!(error = %e, "a map write failed; re-reading the maps");
            let stateless = self.planner.stateless_replies();
            match self.maps.found() {
                Ok(found) => {
                    self.planner = Planner::new(found, crate::clock::hz());
                    self.planner.set_stateless_replies(stateless);
                }
                Err(e) => tracing::warn!(error = %e, "re-reading the maps failed"),
            }
            return Err(e);
        }
        tracing::debug!(writes = writes.len(), "services written");
        Ok(())
    }

    /// Un-NAT replies from single-VIP backends by their address alone, so a
    /// balancer can carry flows it did not see start (active-active). Off by
    /// default: traffic that reaches a backend without the VIP (an operator's
    /// connection routed through the balancer, another NAT) would be rewritten
    /// too. Takes effect at the next `apply`.
    pub fn set_stateless_replies(&mut self, on: bool) {
        self.planner.set_stateless_replies(on);
    }

    /// How long a closed flow lingers in the transient table (its
    /// retransmitted FINs and last ACK still go through).
    pub fn set_linger(&mut self, linger: std::time::Duration) -> Result<()> {
        let ticks = crate::clock::jiffies(linger).min(u32::MAX as u64) as u32;
        let value = Settings {
            linger_ticks: ticks,
            _pad: 0,
        };
        self.maps
            .settings
            .set(0, value, 0)
            .map_err(map_err(names::SETTINGS))
    }

    /// Makes every cached next hop stale at once (the kernel reported a
    /// change): the data path asks the FIB until `set_hops` writes them again
    /// under the new generation, which this returns.
    pub fn invalidate_hops(&mut self) -> Result<u32> {
        let next = match self.hop_generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        self.maps
            .hop_generation
            .set(0, next, 0)
            .map_err(map_err(names::HOP_GENERATION))?;
        self.hop_generation = next;
        Ok(next)
    }

    /// Writes backends' next hops, resolved from the kernel's tables since
    /// the last `invalidate_hops` (None: not resolvable, the data path asks
    /// the FIB). Hops of ids that are no backend's now are skipped.
    pub fn set_hops(&mut self, hops: &[(u32, Option<crate::nexthop::Hop>)]) -> Result<()> {
        if self.hop_generation == 0 {
            self.invalidate_hops()?;
        }
        let live: std::collections::HashSet<u32> =
            self.planner.backend_ids().map(|(_, id)| id).collect();
        let generation = self.hop_generation;
        for (bid, hop) in hops {
            if !live.contains(bid) {
                continue;
            }
            let value = match hop {
                Some(h) => NextHop {
                    generation,
                    ifindex: h.ifindex,
                    mtu: h.mtu,
                    smac: h.smac,
                    dmac: h.dmac,
                },
                None => NextHop::default(),
            };
            self.maps
                .hops
                .set(*bid, value, 0)
                .map_err(map_err(names::HOPS))?;
        }
        Ok(())
    }

    /// The (backend id, address) of every backend: what the next-hop
    /// watcher resolves.
    pub fn hop_targets(&self) -> Vec<(u32, Ipv4Addr)> {
        let mut out: Vec<(u32, Ipv4Addr)> = self
            .planner
            .live_backends()
            .map(|(bid, b)| (bid, b.address))
            .collect();
        out.sort_unstable();
        out
    }
}
