//! The only code that touches the BPF program and its maps.
//!
//! `apply` turns service specs (computed by the reconciler) into map writes.
//! Each service's ring (or Maglev table) is written into the half of its space
//! the data path is not reading, and then switched in by one update of the
//! service entry, so a packet sees the old backend set or the new one, never a
//! mix or an empty set.
//!
//! With a pin directory, maps and XDP links are pinned in bpffs: they outlive
//! the daemon, forwarding continues while it is down, and the next daemon
//! adopts them (the connection table included) instead of starting over. A
//! newer program replaces the old one on the pinned links atomically.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    counter,
    firewall::{
        limit_ns, Firewall, RuleKey, FIREWALL_F_CLOSED_DROP, FIREWALL_F_DENY_LIST,
        FIREWALL_F_ECHO_REPLY, RULE_ALLOW, RULE_DENY,
    },
    maglev, prefilter_bit, ring, Backend, BackendKey, Flow, FlowKey, NextHop, ReverseFlow, Service,
    ServiceKey, Settings, Traffic, BACKEND_F_DROP_FLOWS, BACKEND_F_NO_NEW_FLOWS, BACKEND_F_PRESENT,
    BACKEND_F_RESET_FLOWS, FLOW_F_CLOSING, IFACE_F_PEER, MAX_BACKENDS, MAX_IFINDEX,
    MAX_MAGLEV_SERVICES, MAX_SERVICES, PREFILTER_BACKENDS, PREFILTER_VIPS, PREFILTER_WORDS,
    RING_SIZE, SERVICE_F_ALLOWLIST, SERVICE_F_FIREWALL, SERVICE_F_MAGLEV, SERVICE_F_RESET_IF_EMPTY,
};
use serde::Serialize;

use crate::{
    config::{
        Cidr, ClosedPorts, FirewallConfig, Hook, Protocol, Scheduler, ServiceConfig, SourceRules,
    },
    iface,
};

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

/// Every map of the program (each is pinned under the pin directory by name).
pub const MAPS: &[&str] = &[
    "SERVICES",
    "BACKENDS",
    "RINGS",
    "MAGLEV",
    "BACKEND_VIPS",
    "RR_POSITION",
    "CONNTRACK",
    "REVERSE",
    "COUNTERS",
    "SERVICE_TRAFFIC",
    "BACKEND_TRAFFIC",
    "VIPS",
    "FIREWALL",
    "FW_DENY",
    "FW_RULES",
    "SOURCE_RATE",
    "GLOBAL_RATE",
    "IFACES",
    "SERVICES_BY_ID",
    "PREFILTER",
    "HOPS",
    "HOP_GENERATION",
    "TRANSIENT",
    "ACTIVE",
    "SETTINGS",
    "SCRATCH",
    "ACTIVE_RECLAIMED",
];

/// Written into the pin directory's LAYOUT file-map: a daemon refuses to adopt
/// maps of another layout (bump it whenever a map's type or size changes).
pub const LAYOUT_VERSION: u64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot load the data path's programs (are you root? is the kernel 5.16 or newer?)")]
    Load(#[source] EbpfError),
    #[error("the XDP program has no map {0} (a stale build? run `cargo xtask build-ebpf`)")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0} (a stale build? run `cargo xtask build-ebpf`)")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{iface}: {problem}")]
    Hook { iface: String, problem: String },
    #[error("cannot attach to {iface} at {mode}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("XDP program: {0}")]
    Program(#[source] ProgramError),
    #[error("service {service}: {problem}")]
    Capacity { service: String, problem: String },
    #[error("duplicating a map's descriptor: {0}")]
    Dup(#[source] std::io::Error),
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error("pinned state in {}: {problem}", dir.display())]
    Pins { dir: PathBuf, problem: String },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// What the maps should say about one service: its address and its backends,
/// each with the ring weight it gets (0: no new flows) and whether its
/// established flows are dropped. The reconciler computes these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Maglev table size and hash seed; None: the round-robin ring.
    pub maglev: Option<(u32, u32)>,
    /// Refuse TCP connections with a reset while no backend can take them.
    pub reset_if_empty: bool,
    /// Which sources may reach it.
    pub rules: SourceRules,
    pub backends: Vec<BackendSpec>,
    /// UDP: how long a flow may idle before it is over.
    pub udp_idle: Option<std::time::Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Slots in the scheduling ring, or Maglev weight: 0 takes no new flows.
    pub ring_weight: u32,
    pub drop_flows: bool,
    /// Answer its established TCP flows' packets with resets.
    pub reset_flows: bool,
}

impl ServiceSpec {
    /// Every backend taking new flows as configured (no health or admin state).
    pub fn from_config(s: &ServiceConfig, maglev_seed: u32) -> ServiceSpec {
        ServiceSpec {
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            maglev: (s.scheduler == Scheduler::Maglev)
                .then_some((s.maglev_table_size, maglev_seed)),
            reset_if_empty: false,
            rules: s.firewall.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| BackendSpec {
                    name: b.name.clone(),
                    address: b.address,
                    port: b.port,
                    ring_weight: match s.scheduler {
                        Scheduler::RoundRobin => 1,
                        Scheduler::WeightedRoundRobin | Scheduler::Maglev => b.weight,
                    },
                    drop_flows: false,
                    reset_flows: false,
                })
                .collect(),
            udp_idle: (s.protocol == Protocol::Udp).then_some(s.udp_idle_timeout),
        }
    }
}

/// Where a service lives in the maps.
#[derive(Debug, Clone)]
struct ServiceSlot {
    id: u32,
    key: ServiceKey,
    /// Which half (0 or 1) of its ring or table space the data path reads now.
    half: u32,
    /// Its slot in the Maglev map, for Maglev services.
    maglev_slot: Option<u32>,
    /// What each half of its Maglev space holds (empty: unknown), so a new
    /// table only writes the entries that differ.
    tables: [Vec<u32>; 2],
    /// None after adoption: written in full at the first apply.
    spec: Option<ServiceSpec>,
}

/// An interface the data path runs on, and how.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub interface: String,
    /// The hook: `xdp` (native), `xdp-generic` or `tc`.
    pub hook: &'static str,
    /// The older name of the same (`native`, `generic` or `tc`).
    pub mode: &'static str,
    /// Why this hook.
    pub reason: String,
    /// Taken over from an earlier daemon (the link was pinned).
    pub adopted: bool,
}

/// A hook's status names: (`hook`, `mode`).
fn hook_names(h: Hook) -> (&'static str, &'static str) {
    match h {
        Hook::Xdp => ("xdp", "native"),
        Hook::XdpGeneric => ("xdp-generic", "generic"),
        Hook::Tc => ("tc", "tc"),
        Hook::Auto => ("auto", "auto"),
    }
}

enum Link {
    /// Owned by the XDP program: detached when it is dropped.
    Owned(XdpLinkId),
    /// Owned by the TC program: detached when it is dropped.
    OwnedTc(SchedClassifierLinkId),
    /// Pinned in bpffs: outlives the daemon until unpinned.
    Pinned { fd: FdLink, pin: PathBuf },
}

/// Hands out small integer ids and takes them back.
#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: Vec<u32>,
}

impl Ids {
    fn take(&mut self, max: u32) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }

    fn give_back(&mut self, id: u32) {
        self.free.push(id);
    }

    /// Marks `id` used (adoption); ids below it not yet used become free.
    fn claim(&mut self, id: u32) {
        if let Some(i) = self.free.iter().position(|&f| f == id) {
            self.free.remove(i);
            return;
        }
        while self.next <= id {
            if self.next != id {
                self.free.push(self.next);
            }
            self.next += 1;
        }
    }
}

/// What an earlier daemon left in pinned maps, matched at the first apply.
#[derive(Debug, Default)]
struct Adoption {
    services: HashMap<ServiceKey, Service>,
    /// Present backends: id and value.
    backends: Vec<(u32, Backend)>,
}

/// The loaded program, its maps and what has been written to them.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<(Attachment, Link)>,
    services: BTreeMap<String, ServiceSlot>,
    /// (service name, backend name) -> backend id.
    backends: HashMap<(String, String), u32>,
    service_ids: Ids,
    backend_ids: Ids,
    maglev_ids: Ids,
    /// Per backend slot: how many backends have held it (see `Backend::generation`).
    generations: Vec<u32>,
    backend_vips: HashMap<BackendKey, ReverseFlow>,
    /// Whether BACKEND_VIPS is filled (see `set_stateless_replies`).
    stateless_replies: bool,
    pin_dir: Option<PathBuf>,
    adopting: Option<Adoption>,
    nr_cpus: usize,
    /// Entries of the connection table.
    conntrack_size: u32,
    /// What the firewall maps hold (read back at load: pinned maps may
    /// carry an earlier daemon's entries).
    vips: HashSet<[u8; 4]>,
    deny: HashSet<Cidr>,
    /// The settings last written by `set_firewall`.
    firewall: Option<FirewallConfig>,
    rules: HashMap<(u32, Cidr), u32>,
    /// What PREFILTER holds (read back at load).
    prefilter: Vec<u32>,
    /// The next-hop generation last written to HOP_GENERATION.
    hop_generation: u32,
    /// Freed backend slots whose traffic still counts (replies of their
    /// flows keep coming for a while) -> the service id they served, if it
    /// still exists: folded into the totals when the slot is given again.
    retired: HashMap<u32, Option<u32>>,
}

impl Dataplane {
    /// Loads the program into the kernel (verifier included) with private
    /// maps, without attaching it: for tests and one-off use.
    pub fn load() -> Result<Dataplane> {
        let ebpf = Ebpf::load(&program_object()?).map_err(DataplaneError::Load)?;
        Dataplane::finish_load(lb_common::CONNTRACK_SIZE, ebpf, None, None)
    }

    /// Like [`Dataplane::load`], with a connection table (and reverse table)
    /// of `entries` flows instead of `CONNTRACK_SIZE` (benchmarks fill it).
    pub fn load_with_conntrack(entries: u32) -> Result<Dataplane> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("CONNTRACK", entries)
            .map_max_entries("REVERSE", entries);
        let ebpf = loader
            .load(&program_object()?)
            .map_err(DataplaneError::Load)?;
        Dataplane::finish_load(entries, ebpf, None, None)
    }

    /// Writes flows straight into the connection table, all on one backend of
    /// one service (benchmarks fill the table to a given occupancy). Returns
    /// how many were written.
    pub fn insert_flows(
        &mut self,
        service: &str,
        backend: &str,
        keys: impl Iterator<Item = FlowKey>,
    ) -> Result<u64> {
        let svc = self
            .services
            .get(service)
            .map(|s| s.id)
            .ok_or(DataplaneError::MissingMap("service"))?;
        let bid = *self
            .backends
            .get(&(service.to_owned(), backend.to_owned()))
            .ok_or(DataplaneError::MissingMap("backend"))?;
        let flow = Flow {
            backend: bid,
            service: svc,
            last_seen: crate::clock::jiffies_now(),
            generation: self.generations[bid as usize],
            flags: 0,
        };
        let mut table: BpfHashMap<_, FlowKey, Flow> =
            BpfHashMap::try_from(self.map("CONNTRACK")?).map_err(map_err("CONNTRACK"))?;
        let mut n = 0;
        for k in keys {
            table.insert(k, flow, 0).map_err(map_err("CONNTRACK"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Loads the program with its maps pinned under `dir` (bpffs, mounted if
    /// needed). Maps pinned there by an earlier daemon are adopted, with
    /// their contents, unless `fresh`, which removes them first. Returns the
    /// data path and whether it adopted earlier state.
    pub fn load_pinned(
        dir: &Path,
        fresh: bool,
        conntrack_size: u32,
        transient_size: u32,
    ) -> Result<(Dataplane, bool)> {
        let pins = |problem: String| DataplaneError::Pins {
            dir: dir.to_owned(),
            problem,
        };
        ensure_bpffs(dir).map_err(pins)?;
        if fresh {
            remove_pins(dir).map_err(pins)?;
        }
        std::fs::create_dir_all(dir).map_err(|e| pins(format!("creating it: {e}")))?;
        let layout_pin = dir.join("LAYOUT");
        let adopted = layout_pin.exists();
        if adopted {
            let m = MapData::from_pin(&layout_pin).map_err(|e| pins(format!("LAYOUT: {e}")))?;
            let a: Array<_, u64> = Array::try_from(aya::maps::Map::Array(m))
                .map_err(|e| pins(format!("LAYOUT: {e}")))?;
            let v = a.get(&0, 0).map_err(|e| pins(format!("LAYOUT: {e}")))?;
            if v != LAYOUT_VERSION {
                return Err(pins(format!(
                    "its maps have layout {v}, this build uses {LAYOUT_VERSION}: they cannot be \
                     adopted; start with `lb run --fresh` (established flows will be lost)"
                )));
            }
        }
        if adopted {
            // A pinned map is reused as it is: its size must be the one asked.
            for (map, asked, key) in [
                ("CONNTRACK", conntrack_size, "conntrack_size"),
                ("TRANSIENT", transient_size, "transient_size"),
            ] {
                let have = aya::maps::MapInfo::from_pin(dir.join(map))
                    .map_err(|e| pins(format!("{map}: {e}")))?
                    .max_entries();
                if have != asked {
                    return Err(pins(format!(
                        "its {map} table has {have} entries and the config asks for {asked} \
                         ([daemon] {key}): keep the size, or start with `lb run --fresh` \
                         (established flows will be lost)"
                    )));
                }
            }
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("CONNTRACK", conntrack_size)
            .map_max_entries("REVERSE", conntrack_size)
            .map_max_entries("TRANSIENT", transient_size);
        let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        if std::env::var_os("LB_XDP_OBJECT").is_some() {
            tracing::info!(object = ?std::env::var_os("LB_XDP_OBJECT"), "loading the XDP object from LB_XDP_OBJECT");
        }
        let ebpf = loader
            .load(&program_object()?)
            .map_err(DataplaneError::Load)?;
        let adoption = if adopted {
            Some(read_adoption(&ebpf)?)
        } else {
            None
        };
        let mut dp = Dataplane::finish_load(conntrack_size, ebpf, Some(dir.to_owned()), adoption)?;
        if !adopted {
            write_layout(&layout_pin).map_err(pins)?;
        }
        // The running program, pinned for inspection (`bpftool prog show pinned`);
        // the links hold it attached either way.
        let prog_pin = dir.join("prog-lb");
        let _ = std::fs::remove_file(&prog_pin);
        dp.program_mut()
            .pin(&prog_pin)
            .map_err(|e| pins(format!("pinning the program: {e}")))?;
        let tc_pin = dir.join("prog-lb_tc");
        let _ = std::fs::remove_file(&tc_pin);
        dp.tc_program_mut()
            .pin(&tc_pin)
            .map_err(|e| pins(format!("pinning the TC program: {e}")))?;
        Ok((dp, adopted))
    }

    fn finish_load(
        conntrack_size: u32,
        mut ebpf: Ebpf,
        pin_dir: Option<PathBuf>,
        adoption: Option<Adoption>,
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
        let mut dp = Dataplane {
            ebpf,
            attached: Vec::new(),
            services: BTreeMap::new(),
            backends: HashMap::new(),
            service_ids: Ids::default(),
            backend_ids: Ids::default(),
            maglev_ids: Ids::default(),
            generations: vec![0; MAX_BACKENDS as usize],
            backend_vips: HashMap::new(),
            stateless_replies: false,
            pin_dir,
            adopting: None,
            nr_cpus,
            conntrack_size,
            vips: HashSet::new(),
            deny: HashSet::new(),
            firewall: None,
            rules: HashMap::new(),
            prefilter: Vec::new(),
            hop_generation: 0,
            retired: HashMap::new(),
        };
        dp.read_firewall_maps()?;
        if adoption.is_none() {
            dp.set_linger(std::time::Duration::from_secs(
                crate::config::DEFAULT_CLOSED_LINGER_S as u64,
            ))?;
        }
        dp.prefilter = {
            let a: Array<_, u32> =
                Array::try_from(dp.map_ref("PREFILTER")?).map_err(map_err("PREFILTER"))?;
            a.iter().map(|r| r.unwrap_or(0)).collect()
        };
        dp.hop_generation = {
            let a: Array<_, u32> = Array::try_from(dp.map_ref("HOP_GENERATION")?)
                .map_err(map_err("HOP_GENERATION"))?;
            a.get(&0, 0).map_err(map_err("HOP_GENERATION"))?
        };
        if let Some(a) = adoption {
            // Generations survive in every slot, present or not.
            let all: Vec<Backend> = {
                let arr: Array<_, Backend> =
                    Array::try_from(dp.map_ref("BACKENDS")?).map_err(map_err("BACKENDS"))?;
                arr.iter().filter_map(|r| r.ok()).collect()
            };
            for (i, b) in all.iter().enumerate() {
                dp.generations[i] = b.generation;
            }
            // Every id the earlier daemon used stays taken until the first
            // apply has matched it or let it go: a new service or backend must
            // never be handed an id an adopted one still holds.
            for svc in a.services.values() {
                dp.service_ids.claim(svc.id);
                if svc.flags & SERVICE_F_MAGLEV != 0 {
                    dp.maglev_ids
                        .claim(svc.ring_base / (2 * maglev::MAX_TABLE_SIZE));
                }
            }
            for (bid, _) in &a.backends {
                dp.backend_ids.claim(*bid);
            }
            // Slots the earlier daemon freed still hold their traffic.
            for bid in 0..MAX_BACKENDS {
                if !a.backends.iter().any(|(b, _)| *b == bid)
                    && dp.traffic("BACKEND_TRAFFIC", bid)? != Traffic::default()
                {
                    dp.retired.insert(bid, None);
                }
            }
            dp.adopting = Some(a);
        }
        Ok(dp)
    }

    /// The map named `name`, read-only (tests and benchmarks read the data
    /// path's state through it; everything else goes through `apply`).
    pub fn map_named(&self, name: &str) -> Option<&aya::maps::Map> {
        self.ebpf.map(name)
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

    /// Runs the data path on `iface` at the hook `asked` for (`auto`: chosen
    /// by what the interface is, see `iface::choose`); refuses a hook that
    /// cannot forward correctly there. With a pin directory, a link an
    /// earlier daemon pinned for `iface` is taken over when it is of the
    /// chosen kind: this program replaces the old one on it atomically (no
    /// packet goes unprocessed). A pinned link of the other kind is replaced
    /// after the new one is attached. The new link is pinned.
    pub fn attach(&mut self, iface: &str, asked: Hook) -> Result<Attachment> {
        let hook_err = |problem: String| DataplaneError::Hook {
            iface: iface.to_owned(),
            problem,
        };
        let facts = iface::facts(iface, asked)
            .map_err(|e| hook_err(format!("cannot read what the interface is: {e}")))?;
        let mut choice = iface::choose(iface, asked, &facts).map_err(hook_err)?;
        // Before any link: the first packet already knows how to leave.
        self.set_iface_flags(iface, &facts)?;
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link-{iface}")));
        let mut replaced = None;
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            match self.adopt_link(iface, pin, choice.hook) {
                Ok(Some(hook)) => {
                    let (hook, mode) = hook_names(hook);
                    let a = Attachment {
                        interface: iface.to_owned(),
                        hook,
                        mode,
                        reason: choice.reason,
                        adopted: true,
                    };
                    self.attached.last_mut().expect("adopt_link pushed it").0 = a.clone();
                    return Ok(a);
                }
                // Of the other kind: attach the new hook first, then let the
                // old link go, so no packet passes unprocessed.
                Ok(None) => replaced = Some(pin.clone()),
                // The interface it was attached to is gone (removed, or its
                // namespace deleted): the pin is stale; attach afresh.
                Err(e) => {
                    tracing::warn!(iface, pin = %pin.display(), error = %e, "the pinned link cannot be taken over; attaching afresh");
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        if let Some(old) = &replaced {
            // The new link takes the pin's name once it is attached.
            let _ = std::fs::rename(old, old.with_extension("replaced"));
        }
        let attached = self.attach_new(iface, &mut choice);
        if let Some(old) = &replaced {
            let moved = old.with_extension("replaced");
            if attached.is_ok() {
                let _ = std::fs::remove_file(&moved);
            } else {
                let _ = std::fs::rename(&moved, old);
            }
        }
        let link = attached?;
        let link = match &pin {
            None => link,
            Some(pin) => {
                let (name, _) = hook_names(choice.hook);
                let attach_err = |source| DataplaneError::Attach {
                    iface: iface.to_owned(),
                    mode: name,
                    source,
                };
                let fd = self.take_fd_link(link).map_err(attach_err)?;
                let pinned = fd.pin(pin).map_err(|e| DataplaneError::Pins {
                    dir: pin.clone(),
                    problem: format!("pinning the link: {e}"),
                })?;
                // Keep our handle; the pin stays until removed.
                Link::Pinned {
                    fd: pinned.into(),
                    pin: pin.clone(),
                }
            }
        };
        let (hook, mode) = hook_names(choice.hook);
        let a = Attachment {
            interface: iface.to_owned(),
            hook,
            mode,
            reason: choice.reason,
            adopted: false,
        };
        self.attached.push((a.clone(), link));
        Ok(a)
    }

    /// Attaches a new link at `choice.hook`. A NIC whose driver has no
    /// native XDP gets TC when the choice was automatic (the reason says so).
    fn attach_new(&mut self, iface: &str, choice: &mut iface::Choice) -> Result<Link> {
        let attach_err = |mode, source| DataplaneError::Attach {
            iface: iface.to_owned(),
            mode,
            source,
        };
        match choice.hook {
            Hook::Xdp | Hook::XdpGeneric => {
                let (aya_mode, name) = if choice.hook == Hook::Xdp {
                    (AyaXdpMode::Driver, "native XDP")
                } else {
                    (AyaXdpMode::Skb, "generic XDP")
                };
                match self.program_mut().attach(iface, aya_mode) {
                    Ok(id) => Ok(Link::Owned(id)),
                    Err(source) if choice.reason.starts_with("auto") => {
                        tracing::info!(iface, error = %source, "no native XDP here; using TC");
                        choice.hook = Hook::Tc;
                        choice.reason = format!(
                            "auto: a NIC whose driver cannot run native XDP ({source}): TC"
                        );
                        self.attach_new(iface, choice)
                    }
                    Err(source) => Err(attach_err(name, source)),
                }
            }
            Hook::Tc | Hook::Auto => {
                // The clsact qdisc is only needed by the older netlink
                // attachment; TCX links (kernel 6.6+) need none.
                let id = self
                    .tc_program_mut()
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(|source| attach_err("TC ingress", source))?;
                Ok(Link::OwnedTc(id))
            }
        }
    }

    /// Marks in `IFACES` how the TC hook sends out of `iface`.
    fn set_iface_flags(&mut self, iface: &str, facts: &iface::Facts) -> Result<()> {
        let Some(index) = iface::if_index(iface).filter(|&i| i < MAX_IFINDEX) else {
            return Ok(());
        };
        let flags = if facts.veth.as_ref().is_some_and(|p| p.elsewhere) {
            IFACE_F_PEER
        } else {
            0
        };
        let mut a = self.array::<u32>("IFACES")?;
        if a.get(&index, 0).map_err(map_err("IFACES"))? != flags {
            a.set(index, flags, 0).map_err(map_err("IFACES"))?;
        }
        Ok(())
    }

    /// Takes over the link pinned at `pin` if it is of the kind `hook` needs
    /// (XDP or TCX): this program replaces the old one on it atomically.
    /// Returns the hook it runs at, or None when the pinned link is of the
    /// other kind (left as it is).
    fn adopt_link(&mut self, iface: &str, pin: &Path, hook: Hook) -> Result<Option<Hook>> {
        let pins = |problem: String| DataplaneError::Pins {
            dir: pin.to_owned(),
            problem,
        };
        let open = || -> Result<FdLink> {
            Ok(PinnedLink::from_pin(pin)
                .map_err(|e| pins(e.to_string()))?
                .into())
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            mode: "the adopted link",
            source,
        };
        let (used, link) = match XdpLink::try_from(open()?) {
            Ok(xdp_link) => {
                if hook == Hook::Tc {
                    return Ok(None);
                }
                let used = xdp_mode_of(iface);
                let id = self
                    .program_mut()
                    .attach_to_link(xdp_link)
                    .map_err(attach_err)?;
                (used, Link::Owned(id))
            }
            Err(_) => {
                let tc_link = SchedClassifierLink::try_from(open()?)
                    .map_err(|e| pins(format!("neither an XDP nor a TCX link: {e}")))?;
                if hook != Hook::Tc {
                    return Ok(None);
                }
                let id = self
                    .tc_program_mut()
                    .attach_to_link(tc_link)
                    .map_err(attach_err)?;
                (Hook::Tc, Link::OwnedTc(id))
            }
        };
        let fd = self.take_fd_link(link).map_err(attach_err)?;
        let (h, mode) = hook_names(used);
        self.attached.push((
            Attachment {
                interface: String::new(),
                hook: h,
                mode,
                reason: String::new(),
                adopted: true,
            },
            Link::Pinned {
                fd,
                pin: pin.to_owned(),
            },
        ));
        Ok(Some(used))
    }

    fn take_fd_link(&mut self, link: Link) -> std::result::Result<FdLink, ProgramError> {
        let fd = |e: aya::programs::links::LinkError| {
            ProgramError::IOError(std::io::Error::other(e.to_string()))
        };
        match link {
            Link::Owned(id) => FdLink::try_from(self.program_mut().take_link(id)?).map_err(fd),
            Link::OwnedTc(id) => FdLink::try_from(self.tc_program_mut().take_link(id)?).map_err(fd),
            Link::Pinned { .. } => unreachable!("only a new link is pinned"),
        }
    }

    /// Ends this daemon's hold on the data path. `keep`: leave everything
    /// pinned and attached (forwarding continues; the next daemon adopts it).
    /// Otherwise detach from every interface and remove the pins.
    pub fn shutdown(&mut self, keep: bool) {
        for (a, link) in std::mem::take(&mut self.attached) {
            match link {
                Link::Owned(id) => {
                    if let Err(e) = self.program_mut().detach(id) {
                        tracing::warn!(iface = %a.interface, error = %e, "detach failed");
                    }
                }
                Link::OwnedTc(id) => {
                    if let Err(e) = self.tc_program_mut().detach(id) {
                        tracing::warn!(iface = %a.interface, error = %e, "detach failed");
                    }
                }
                // Dropping our fd leaves the pinned link (and the program) in place.
                Link::Pinned { fd, pin } if keep => drop((fd, pin)),
                Link::Pinned { fd, pin } => {
                    if let Err(e) = std::fs::remove_file(&pin) {
                        tracing::warn!(iface = %a.interface, error = %e, "unpinning the link failed");
                    }
                    // The last reference: the link detaches as the fd closes.
                    drop(fd);
                }
            }
        }
        if !keep {
            if let Some(dir) = self.pin_dir.take() {
                if let Err(e) = remove_pins(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing pins failed");
                }
            }
        }
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.attached.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Detaches pinned links of interfaces that are not in `keep` (an
    /// earlier daemon's config attached to more interfaces than this one's).
    pub fn drop_stale_links(&mut self, keep: &[String]) {
        let Some(dir) = &self.pin_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link-") {
                if !keep.iter().any(|k| k == iface) {
                    tracing::info!(
                        iface,
                        "detaching from an interface the config no longer lists"
                    );
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Makes the maps carry exactly `services`: adds, updates and removes
    /// services and backends, each change atomic for the packets in flight.
    /// A service whose spec did not change is not written at all.
    pub fn apply(&mut self, services: &[ServiceSpec]) -> Result<()> {
        // New addresses pass the prefilter before their services exist;
        // gone ones stop passing it only after their services are gone.
        self.sync_prefilter(services, true)?;
        for s in services {
            if self
                .services
                .get(&s.name)
                .is_some_and(|slot| slot.spec.as_ref() == Some(s))
            {
                continue;
            }
            self.apply_service(s)?;
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name)?;
        }
        if let Some(a) = self.adopting.take() {
            self.forget_unadopted(a)?;
        }
        self.sync_vips(services)?;
        self.forget_rules_of_gone_services()?;
        self.sync_backend_vips(services)?;
        self.sync_prefilter(services, false)
    }

    /// Writes the prefilter's words that differ: the bits of every VIP and
    /// every backend address of `services`, plus (`keep`) those set now.
    fn sync_prefilter(&mut self, services: &[ServiceSpec], keep: bool) -> Result<()> {
        let mut want = vec![0u32; 2 * PREFILTER_WORDS as usize];
        if keep {
            want.copy_from_slice(&self.prefilter);
        }
        let vips = services
            .iter()
            .map(|s| s.vip)
            // VIPs the firewall guards (closed ports) pass it too.
            .chain(self.vips.iter().map(|v| Ipv4Addr::from(*v)));
        let backends = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.address));
        for (half, addr) in vips
            .map(|a| (PREFILTER_VIPS, a))
            .chain(backends.map(|a| (PREFILTER_BACKENDS, a)))
        {
            let (word, bit) = prefilter_bit(addr.octets());
            want[(half + word) as usize] |= bit;
        }
        // What the map holds is tracked word by word: a failed write leaves
        // the record true to the map.
        let mut have = std::mem::take(&mut self.prefilter);
        let result = (|| {
            let mut a = self.array::<u32>("PREFILTER")?;
            for (i, &w) in want.iter().enumerate() {
                if w != have[i] {
                    a.set(i as u32, w, 0).map_err(map_err("PREFILTER"))?;
                    have[i] = w;
                }
            }
            Ok(())
        })();
        self.prefilter = have;
        result
    }

    /// How long a closed flow lingers in the transient table (its
    /// retransmitted FINs and last ACK still go through).
    pub fn set_linger(&mut self, linger: std::time::Duration) -> Result<()> {
        let ticks = crate::clock::jiffies(linger).min(u32::MAX as u64) as u32;
        self.array::<Settings>("SETTINGS")?
            .set(
                0,
                Settings {
                    linger_ticks: ticks,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err("SETTINGS"))
    }

    /// Established flows per backend, as the data path counts them when
    /// flows enter and leave the connection table: O(backends), whatever
    /// the number of flows.
    pub fn active_flows(&self) -> Result<HashMap<(String, String), u64>> {
        let a: PerCpuArray<_, i64> =
            PerCpuArray::try_from(self.map_ref("ACTIVE")?).map_err(map_err("ACTIVE"))?;
        let reclaimed: Array<_, u64> = Array::try_from(self.map_ref("ACTIVE_RECLAIMED")?)
            .map_err(map_err("ACTIVE_RECLAIMED"))?;
        let mut out = HashMap::with_capacity(self.backends.len());
        for (key, &bid) in &self.backends {
            let n: i64 = a.get(&bid, 0).map_err(map_err("ACTIVE"))?.iter().sum();
            let gone = reclaimed
                .get(&bid, 0)
                .map_err(map_err("ACTIVE_RECLAIMED"))? as i64;
            out.insert(key.clone(), (n - gone).max(0) as u64);
        }
        Ok(out)
    }

    /// A sweep of the connection table for UDP flows idle past their
    /// service's timeout, to run off the daemon's loop (it walks the table):
    /// None when no service is UDP.
    pub fn udp_sweep(&self) -> Result<Option<UdpSweep>> {
        let idle: HashMap<u32, u64> = self
            .services
            .values()
            .filter_map(|slot| {
                let spec = slot.spec.as_ref()?;
                let d = spec.udp_idle?;
                Some((slot.id, crate::clock::jiffies(d).max(1)))
            })
            .collect();
        if idle.is_empty() {
            return Ok(None);
        }
        let backends = self
            .live_backends()
            .map(|(bid, b)| (bid, (b.address.octets(), b.port.to_be_bytes())))
            .collect();
        Ok(Some(UdpSweep {
            conntrack: self.table_handle("CONNTRACK")?,
            reverse: self.table_handle("REVERSE")?,
            idle,
            backends,
        }))
    }

    /// Takes note of flows a sweep reclaimed, per backend id.
    pub fn reclaimed(&mut self, per_backend: &HashMap<u32, u64>) -> Result<()> {
        let mut a = self.array::<u64>("ACTIVE_RECLAIMED")?;
        for (&bid, &n) in per_backend {
            let had = a.get(&bid, 0).map_err(map_err("ACTIVE_RECLAIMED"))?;
            a.set(bid, had + n, 0)
                .map_err(map_err("ACTIVE_RECLAIMED"))?;
        }
        Ok(())
    }

    /// Makes every cached next hop stale at once (the kernel reported a
    /// change): the data path asks the FIB until `set_hops` writes them again
    /// under the new generation, which this returns.
    pub fn invalidate_hops(&mut self) -> Result<u32> {
        let next = match self.hop_generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        self.array::<u32>("HOP_GENERATION")?
            .set(0, next, 0)
            .map_err(map_err("HOP_GENERATION"))?;
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
        let live: HashSet<u32> = self.backends.values().copied().collect();
        let generation = self.hop_generation;
        let mut a = self.array::<NextHop>("HOPS")?;
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
            a.set(*bid, value, 0).map_err(map_err("HOPS"))?;
        }
        Ok(())
    }

    /// Every backend written, with its id.
    fn live_backends(&self) -> impl Iterator<Item = (u32, &BackendSpec)> {
        self.services
            .values()
            .filter_map(|slot| slot.spec.as_ref())
            .flat_map(move |spec| {
                spec.backends.iter().filter_map(move |b| {
                    let bid = *self.backends.get(&(spec.name.clone(), b.name.clone()))?;
                    Some((bid, b))
                })
            })
    }

    /// A descriptor of its own for the hash table `name`, for a walk off the
    /// daemon's loop.
    fn table_handle(&self, name: &'static str) -> Result<MapData> {
        let fd = match self.map_ref(name)? {
            aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m) => {
                std::os::fd::AsFd::as_fd(m.fd())
                    .try_clone_to_owned()
                    .map_err(DataplaneError::Dup)?
            }
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        MapData::from_fd(fd).map_err(map_err(name))
    }

    /// The (backend id, address) of every backend: what the next-hop
    /// watcher resolves.
    pub fn hop_targets(&self) -> Vec<(u32, Ipv4Addr)> {
        let mut out: Vec<(u32, Ipv4Addr)> = self
            .live_backends()
            .map(|(bid, b)| (bid, b.address))
            .collect();
        out.sort_unstable();
        out
    }

    /// Reads back what the firewall maps hold (an earlier daemon's pins).
    fn read_firewall_maps(&mut self) -> Result<()> {
        let vips: BpfHashMap<_, [u8; 4], u32> =
            BpfHashMap::try_from(self.map_ref("VIPS")?).map_err(map_err("VIPS"))?;
        self.vips = vips.keys().filter_map(|k| k.ok()).collect();
        let deny: LpmTrie<_, [u8; 4], u32> =
            LpmTrie::try_from(self.map_ref("FW_DENY")?).map_err(map_err("FW_DENY"))?;
        self.deny = deny
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| Cidr {
                addr: Ipv4Addr::from(k.data()),
                len: k.prefix_len() as u8,
            })
            .collect();
        let rules: LpmTrie<_, RuleKey, u32> =
            LpmTrie::try_from(self.map_ref("FW_RULES")?).map_err(map_err("FW_RULES"))?;
        self.rules = rules
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| {
                let d = k.data();
                let cidr = Cidr {
                    addr: Ipv4Addr::from(d.addr),
                    len: (k.prefix_len() - 32) as u8,
                };
                ((u32::from_be_bytes(d.service), cidr), v)
            })
            .collect();
        Ok(())
    }

    /// Makes VIPS hold exactly the services' addresses.
    fn sync_vips(&mut self, services: &[ServiceSpec]) -> Result<()> {
        let want: HashSet<[u8; 4]> = services.iter().map(|s| s.vip.octets()).collect();
        let mut m: BpfHashMap<_, [u8; 4], u32> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("VIPS")
                .ok_or(DataplaneError::MissingMap("VIPS"))?,
        )
        .map_err(map_err("VIPS"))?;
        for v in want.difference(&self.vips) {
            m.insert(v, 1, 0).map_err(map_err("VIPS"))?;
        }
        for v in self.vips.difference(&want) {
            let _ = m.remove(v);
        }
        self.vips = want;
        Ok(())
    }

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
        {
            let mut m: LpmTrie<_, [u8; 4], u32> =
                LpmTrie::try_from(self.map("FW_DENY")?).map_err(map_err("FW_DENY"))?;
            for c in &added {
                m.insert(&key(c), 1, 0).map_err(map_err("FW_DENY"))?;
            }
        }
        let (source_cost_ns, source_burst_ns) = limit_ns(
            f.source_new_flows_per_sec as u64,
            f.source_new_flows_burst as u64,
        );
        // The global cap is shared out between the CPUs: each enforces its
        // part with its own bucket (no contention on the packet path).
        let (cost, burst) = limit_ns(f.new_flows_per_sec as u64, f.new_flows_burst as u64);
        let cpus = self.nr_cpus.max(1) as u64;
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
        self.array::<Firewall>("FIREWALL")?
            .set(0, value, 0)
            .map_err(map_err("FIREWALL"))?;
        {
            let mut m: LpmTrie<_, [u8; 4], u32> =
                LpmTrie::try_from(self.map("FW_DENY")?).map_err(map_err("FW_DENY"))?;
            for c in &removed {
                let _ = m.remove(&key(c));
            }
        }
        self.deny = want;
        self.firewall = Some(f.clone());
        Ok(())
    }

    /// Writes service `id`'s source rules (adding before removing, so a
    /// changed list never lets through what both versions deny); returns the
    /// service's firewall flags.
    fn write_rules(&mut self, id: u32, rules: &SourceRules) -> Result<u32> {
        let want: HashMap<Cidr, u32> = rules
            .allow
            .iter()
            .map(|c| (*c, RULE_ALLOW))
            .chain(rules.deny.iter().map(|c| (*c, RULE_DENY)))
            .collect();
        let key = |c: &Cidr| {
            LpmKey::new(
                32 + c.len as u32,
                RuleKey {
                    service: id.to_be_bytes(),
                    addr: c.addr.octets(),
                },
            )
        };
        let have: Vec<(Cidr, u32)> = self
            .rules
            .iter()
            .filter(|((sid, _), _)| *sid == id)
            .map(|((_, c), v)| (*c, *v))
            .collect();
        let mut m: LpmTrie<_, RuleKey, u32> = LpmTrie::try_from(
            self.ebpf
                .map_mut("FW_RULES")
                .ok_or(DataplaneError::MissingMap("FW_RULES"))?,
        )
        .map_err(map_err("FW_RULES"))?;
        for (c, v) in &want {
            if !have.contains(&(*c, *v)) {
                m.insert(&key(c), v, 0).map_err(map_err("FW_RULES"))?;
                self.rules.insert((id, *c), *v);
            }
        }
        for (c, _) in have {
            if !want.contains_key(&c) {
                let _ = m.remove(&key(&c));
                self.rules.remove(&(id, c));
            }
        }
        Ok(match (want.is_empty(), rules.allow.is_empty()) {
            (true, _) => 0,
            (false, true) => SERVICE_F_FIREWALL,
            (false, false) => SERVICE_F_FIREWALL | SERVICE_F_ALLOWLIST,
        })
    }

    /// Removes the rules of service ids no service holds any more.
    fn forget_rules_of_gone_services(&mut self) -> Result<()> {
        let live: HashSet<u32> = self.services.values().map(|s| s.id).collect();
        let gone: Vec<u32> = self
            .rules
            .keys()
            .map(|(id, _)| *id)
            .filter(|id| !live.contains(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for id in gone {
            self.write_rules(id, &SourceRules::default())?;
        }
        Ok(())
    }

    /// After the first apply that follows an adoption: whatever the earlier
    /// daemon left that this config does not have is removed.
    fn forget_unadopted(&mut self, a: Adoption) -> Result<()> {
        for (key, svc) in a.services {
            tracing::info!(
                ?key,
                "removing a service the earlier daemon had and this config does not"
            );
            let _ = self.services_map()?.remove(&key);
            self.service_ids.give_back(svc.id);
            if svc.flags & SERVICE_F_MAGLEV != 0 {
                self.maglev_ids
                    .give_back(svc.ring_base / (2 * maglev::MAX_TABLE_SIZE));
            }
        }
        for (bid, b) in a.backends {
            self.retired.insert(bid, None);
            self.backend_ids.give_back(bid);
            self.array::<Backend>("BACKENDS")?
                .set(
                    bid,
                    Backend {
                        generation: b.generation,
                        ..Backend::default()
                    },
                    0,
                )
                .map_err(map_err("BACKENDS"))?;
        }
        // Existing reply entries are rewritten or removed by sync_backend_vips.
        let keys: Vec<BackendKey> = {
            let m: BpfHashMap<_, BackendKey, ReverseFlow> =
                BpfHashMap::try_from(self.map_ref("BACKEND_VIPS")?)
                    .map_err(map_err("BACKEND_VIPS"))?;
            m.keys().filter_map(|k| k.ok()).collect()
        };
        for k in keys {
            self.backend_vips.entry(k).or_insert(ReverseFlow {
                vip: [0; 4],
                vport: [0; 2],
                _pad: [0; 2],
                backend: u32::MAX,
                service: u32::MAX,
                hop: NextHop::default(),
            });
        }
        Ok(())
    }

    /// Un-NAT replies from single-VIP backends by their address alone, so a
    /// balancer can carry flows it did not see start (active-active). Off by
    /// default: traffic that reaches a backend without the VIP (an operator's
    /// connection routed through the balancer, another NAT) would be rewritten
    /// too. Takes effect at the next `apply`.
    pub fn set_stateless_replies(&mut self, on: bool) {
        self.stateless_replies = on;
    }

    /// Keeps BACKEND_VIPS equal to the backends that serve exactly one VIP
    /// (empty unless stateless replies are on).
    fn sync_backend_vips(&mut self, services: &[ServiceSpec]) -> Result<()> {
        if !self.stateless_replies {
            let have = std::mem::take(&mut self.backend_vips);
            let mut m: BpfHashMap<_, BackendKey, ReverseFlow> =
                BpfHashMap::try_from(self.map("BACKEND_VIPS")?).map_err(map_err("BACKEND_VIPS"))?;
            for k in have.keys() {
                let _ = m.remove(k);
            }
            return Ok(());
        }
        let mut seen: HashMap<BackendKey, Vec<ReverseFlow>> = HashMap::new();
        for s in services {
            let Some(slot) = self.services.get(&s.name) else {
                continue;
            };
            for b in &s.backends {
                let Some(&bid) = self.backends.get(&(s.name.clone(), b.name.clone())) else {
                    continue;
                };
                let key = BackendKey {
                    addr: b.address.octets(),
                    port: b.port.to_be_bytes(),
                    proto: s.protocol.number(),
                    _pad: 0,
                };
                seen.entry(key).or_default().push(ReverseFlow {
                    vip: s.vip.octets(),
                    vport: s.port.to_be_bytes(),
                    _pad: [0; 2],
                    backend: bid,
                    service: slot.id,
                    hop: NextHop::default(),
                });
            }
        }
        let want: HashMap<BackendKey, ReverseFlow> = seen
            .into_iter()
            .filter(|(_, v)| {
                v.iter().all(|r| (r.vip, r.vport) == (v[0].vip, v[0].vport)) && v.len() == 1
            })
            .map(|(k, v)| (k, v[0]))
            .collect();
        let have = std::mem::take(&mut self.backend_vips);
        let mut m: BpfHashMap<_, BackendKey, ReverseFlow> =
            BpfHashMap::try_from(self.map("BACKEND_VIPS")?).map_err(map_err("BACKEND_VIPS"))?;
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                m.insert(k, v, 0).map_err(map_err("BACKEND_VIPS"))?;
            }
        }
        for k in have.keys() {
            if !want.contains_key(k) {
                let _ = m.remove(k);
            }
        }
        self.backend_vips = want;
        Ok(())
    }

    fn apply_service(&mut self, s: &ServiceSpec) -> Result<()> {
        let key = ServiceKey {
            vip: s.vip.octets(),
            port: s.port.to_be_bytes(),
            proto: s.protocol.number(),
            _pad: 0,
        };
        let capacity = |problem: String| DataplaneError::Capacity {
            service: s.name.clone(),
            problem,
        };
        let adopted = self.adopting.as_mut().and_then(|a| a.services.remove(&key));
        let (id, half, old_key, mut maglev_slot, tables) =
            match (self.services.get(&s.name), adopted) {
                (Some(slot), _) => (
                    slot.id,
                    1 - slot.half,
                    Some(slot.key),
                    slot.maglev_slot,
                    slot.tables.clone(),
                ),
                (None, Some(svc)) => {
                    // The earlier daemon's service: same id and counters, and the
                    // half it was not reading gets the new ring.
                    self.service_ids.claim(svc.id);
                    let maglev = svc.flags & SERVICE_F_MAGLEV != 0;
                    let (unit, slot) = if maglev {
                        let slot = svc.ring_base / (2 * maglev::MAX_TABLE_SIZE);
                        self.maglev_ids.claim(slot);
                        (maglev::MAX_TABLE_SIZE, Some(slot))
                    } else {
                        (RING_SIZE, None)
                    };
                    let half = (svc.ring_base / unit) % 2;
                    (svc.id, 1 - half, Some(key), slot, Default::default())
                }
                (None, None) => {
                    let id = self
                        .service_ids
                        .take(MAX_SERVICES)
                        .ok_or_else(|| capacity(format!("more than {MAX_SERVICES} services")))?;
                    self.reset_counters("SERVICE_TRAFFIC", id)?;
                    // Retired backends of the id's earlier service are not this one's.
                    for svc in self.retired.values_mut() {
                        if *svc == Some(id) {
                            *svc = None;
                        }
                    }
                    self.array::<u64>("RR_POSITION")?
                        .set(id, 0, 0)
                        .map_err(map_err("RR_POSITION"))?;
                    (id, 0, None, None, Default::default())
                }
            };
        let old_backends: HashMap<String, BackendSpec> = self
            .services
            .get(&s.name)
            .and_then(|slot| slot.spec.as_ref())
            .map(|spec| {
                spec.backends
                    .iter()
                    .map(|b| (b.name.clone(), b.clone()))
                    .collect()
            })
            .unwrap_or_default();

        // Backends first: a ring must only name backends that are already written.
        let mut ids = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let bkey = (s.name.clone(), b.name.clone());
            let moved = old_backends
                .get(&b.name)
                .is_some_and(|o| (o.address, o.port) != (b.address, b.port));
            if moved {
                // Same name, new address: a different server. Its old flows
                // must not follow the name to the new address.
                self.remove_backend(&bkey, id)?;
            }
            let adopted = self.adopting.as_mut().and_then(|a| {
                let i = a.backends.iter().position(|(_, v)| {
                    v.service == id
                        && v.addr == b.address.octets()
                        && v.port == b.port.to_be_bytes()
                })?;
                Some(a.backends.remove(i).0)
            });
            let (bid, fresh) = match (self.backends.get(&bkey), adopted) {
                (Some(&bid), _) => (bid, false),
                (None, Some(bid)) => {
                    // Same slot and generation: its flows keep going.
                    self.backend_ids.claim(bid);
                    self.backends.insert(bkey, bid);
                    (bid, true)
                }
                (None, None) => {
                    let bid = self
                        .backend_ids
                        .take(MAX_BACKENDS)
                        .ok_or_else(|| capacity(format!("more than {MAX_BACKENDS} backends")))?;
                    if let Some(service) = self.retired.remove(&bid) {
                        self.retire_traffic(bid, service)?;
                    }
                    self.reset_counters("BACKEND_TRAFFIC", bid)?;
                    // The slot's count of flows was the earlier backend's.
                    let zeros = PerCpuValues::try_from(vec![0i64; self.nr_cpus])
                        .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
                    PerCpuArray::<_, i64>::try_from(self.map("ACTIVE")?)
                        .map_err(map_err("ACTIVE"))?
                        .set(bid, zeros, 0)
                        .map_err(map_err("ACTIVE"))?;
                    self.array::<u64>("ACTIVE_RECLAIMED")?
                        .set(bid, 0, 0)
                        .map_err(map_err("ACTIVE_RECLAIMED"))?;
                    // The slot's cached hop was the earlier backend's.
                    self.array::<NextHop>("HOPS")?
                        .set(bid, NextHop::default(), 0)
                        .map_err(map_err("HOPS"))?;
                    self.generations[bid as usize] = self.generations[bid as usize].wrapping_add(1);
                    self.backends.insert(bkey, bid);
                    (bid, true)
                }
            };
            let unchanged = !fresh
                && old_backends.get(&b.name).is_some_and(|o| {
                    (o.drop_flows, o.reset_flows, o.ring_weight == 0)
                        == (b.drop_flows, b.reset_flows, b.ring_weight == 0)
                });
            if !unchanged {
                let value = Backend {
                    addr: b.address.octets(),
                    port: b.port.to_be_bytes(),
                    _pad: [0; 2],
                    flags: BACKEND_F_PRESENT
                        | if b.drop_flows {
                            BACKEND_F_DROP_FLOWS
                        } else {
                            0
                        }
                        | if b.reset_flows {
                            BACKEND_F_RESET_FLOWS
                        } else {
                            0
                        }
                        | if b.ring_weight == 0 {
                            BACKEND_F_NO_NEW_FLOWS
                        } else {
                            0
                        },
                    service: id,
                    generation: self.generations[bid as usize],
                };
                self.array::<Backend>("BACKENDS")?
                    .set(bid, value, 0)
                    .map_err(map_err("BACKENDS"))?;
            }
            ids.push(bid);
        }

        let weights: Vec<u32> = s.backends.iter().map(|b| b.ring_weight).collect();
        let mut tables = tables;
        let (base, len, flags, seed) = match s.maglev {
            None => {
                if let Some(slot) = maglev_slot.take() {
                    self.maglev_ids.give_back(slot);
                }
                let mut slots = vec![0u32; RING_SIZE as usize];
                let len = ring::fill_ring(&weights, &mut slots).ok_or_else(|| {
                    capacity(format!("the weights need more than {RING_SIZE} ring slots"))
                })?;
                let base = (id * 2 + half) * RING_SIZE;
                let mut rings = self.array::<u32>("RINGS")?;
                for (i, &slot) in slots[..len].iter().enumerate() {
                    rings
                        .set(base + i as u32, ids[slot as usize], 0)
                        .map_err(map_err("RINGS"))?;
                }
                (base, len as u32, 0, 0)
            }
            Some((m, seed)) => {
                let slot = match maglev_slot {
                    Some(slot) => slot,
                    None => {
                        let slot = self.maglev_ids.take(MAX_MAGLEV_SERVICES).ok_or_else(|| {
                            capacity(format!("more than {MAX_MAGLEV_SERVICES} Maglev services"))
                        })?;
                        maglev_slot = Some(slot);
                        slot
                    }
                };
                let base = (slot * 2 + half) * maglev::MAX_TABLE_SIZE;
                let names: Vec<(&[u8], u32)> = s
                    .backends
                    .iter()
                    .map(|b| (b.name.as_bytes(), b.ring_weight))
                    .collect();
                let mut table = vec![0u32; m as usize];
                let len = if maglev::fill_table(&names, seed, &mut table) {
                    for e in table.iter_mut() {
                        *e = ids[*e as usize];
                    }
                    // Write only what differs from what this half holds.
                    let known = &tables[half as usize];
                    let mut maglev_map = self.array::<u32>("MAGLEV")?;
                    for (i, &b) in table.iter().enumerate() {
                        if known.len() != table.len() || known[i] != b {
                            maglev_map
                                .set(base + i as u32, b, 0)
                                .map_err(map_err("MAGLEV"))?;
                        }
                    }
                    m
                } else {
                    // No backend can take new flows.
                    table.clear();
                    0
                };
                tables[half as usize] = table;
                (base, len, SERVICE_F_MAGLEV, seed)
            }
        };
        let firewall_flags = self.write_rules(id, &s.rules)?;
        let value = Service {
            id,
            ring_base: base,
            ring_len: len,
            flags: flags
                | firewall_flags
                | if s.reset_if_empty {
                    SERVICE_F_RESET_IF_EMPTY
                } else {
                    0
                },
            hash_seed: seed,
            idle_ticks: s.udp_idle.map_or(0, |d| {
                crate::clock::jiffies(d).clamp(1, u32::MAX as u64) as u32
            }),
        };
        // By id first: a flow scheduled by the new entry finds it there.
        self.array::<Service>("SERVICES_BY_ID")?
            .set(id, value, 0)
            .map_err(map_err("SERVICES_BY_ID"))?;
        {
            let mut svcs = self.services_map()?;
            svcs.insert(key, value, 0).map_err(map_err("SERVICES"))?;
            if let Some(old) = old_key.filter(|k| *k != key) {
                svcs.remove(&old).map_err(map_err("SERVICES"))?;
            }
        }

        // Backends that left this service: after the switch, nothing new picks them.
        let gone: Vec<(String, String)> = self
            .backends
            .keys()
            .filter(|(svc, b)| svc == &s.name && !s.backends.iter().any(|c| &c.name == b))
            .cloned()
            .collect();
        for bkey in gone {
            self.remove_backend(&bkey, id)?;
        }
        self.services.insert(
            s.name.clone(),
            ServiceSlot {
                id,
                key,
                half,
                maglev_slot,
                tables,
                spec: Some(s.clone()),
            },
        );
        tracing::debug!(service = %s.name, slots = len, backends = s.backends.len(), "service written");
        Ok(())
    }

    fn remove_service(&mut self, name: &str) -> Result<()> {
        let Some(slot) = self.services.remove(name) else {
            return Ok(());
        };
        self.services_map()?
            .remove(&slot.key)
            .map_err(map_err("SERVICES"))?;
        let gone: Vec<(String, String)> = self
            .backends
            .keys()
            .filter(|(svc, _)| svc == name)
            .cloned()
            .collect();
        for bkey in gone {
            self.remove_backend(&bkey, slot.id)?;
        }
        self.service_ids.give_back(slot.id);
        if let Some(m) = slot.maglev_slot {
            self.maglev_ids.give_back(m);
        }
        tracing::debug!(service = %name, "service removed");
        Ok(())
    }

    /// Frees a backend's slot; its traffic is folded into its service's
    /// (`service`) and the totals, which stay monotonic.
    fn remove_backend(&mut self, bkey: &(String, String), service: u32) -> Result<()> {
        if let Some(bid) = self.backends.remove(bkey) {
            self.retired.insert(bid, Some(service));
            // The generation stays in the slot: flows that remember it must
            // never match whichever backend takes the slot next.
            let cleared = Backend {
                generation: self.generations[bid as usize],
                ..Backend::default()
            };
            self.array::<Backend>("BACKENDS")?
                .set(bid, cleared, 0)
                .map_err(map_err("BACKENDS"))?;
            self.backend_ids.give_back(bid);
        }
        Ok(())
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn array<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        Array::try_from(self.map(name)?).map_err(map_err(name))
    }

    fn services_map(&mut self) -> Result<BpfHashMap<&mut MapData, ServiceKey, Service>> {
        BpfHashMap::try_from(self.map("SERVICES")?).map_err(map_err("SERVICES"))
    }

    fn reset_counters(&mut self, name: &'static str, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![Traffic::default(); self.nr_cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        let mut a: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        a.set(id, zeros, 0).map_err(map_err(name))
    }

    /// Moves a retired backend slot's traffic, as the slot is given again,
    /// into its service's (SERVICE_TRAFFIC) and the FORWARDED and REPLIES
    /// totals, which the data path does not count itself. The daemon is the
    /// only writer of those slots.
    fn retire_traffic(&mut self, bid: u32, service: Option<u32>) -> Result<()> {
        let t = self.traffic("BACKEND_TRAFFIC", bid)?;
        if t == Traffic::default() {
            return Ok(());
        }
        if let Some(id) = service {
            let mut kept = self.traffic("SERVICE_TRAFFIC", id)?;
            kept.add(&t);
            self.set_traffic("SERVICE_TRAFFIC", id, kept)?;
        }
        let cpus = self.nr_cpus;
        let mut c: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map("COUNTERS")?).map_err(map_err("COUNTERS"))?;
        for (slot, add) in [
            (counter::FORWARDED, t.packets),
            (counter::REPLIES, t.reply_packets),
        ] {
            let now: u64 = c.get(&slot, 0).map_err(map_err("COUNTERS"))?.iter().sum();
            let mut v = vec![0u64; cpus];
            v[0] = now + add;
            let v = PerCpuValues::try_from(v).map_err(|e| DataplaneError::Cpus(e.to_string()))?;
            c.set(slot, v, 0).map_err(map_err("COUNTERS"))?;
        }
        Ok(())
    }

    /// Writes `t` as a per-CPU slot's value (on the first CPU; the others zero).
    fn set_traffic(&mut self, name: &'static str, id: u32, t: Traffic) -> Result<()> {
        let mut v = vec![Traffic::default(); self.nr_cpus];
        v[0] = t;
        let v = PerCpuValues::try_from(v).map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        let mut a: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        a.set(id, v, 0).map_err(map_err(name))
    }

    fn traffic(&self, name: &'static str, id: u32) -> Result<Traffic> {
        let a: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        let mut total = Traffic::default();
        for t in a.get(&id, 0).map_err(map_err(name))?.iter() {
            total.add(t);
        }
        Ok(total)
    }

    /// The outcome counters, summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_ref("COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let v = a.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
            out.insert(*name, v.iter().sum());
        }
        // Forwarded packets are counted per backend (one update per packet):
        // the totals are the live backends' plus what retired ones left.
        let mut live = Traffic::default();
        for &bid in self.backends.values().chain(self.retired.keys()) {
            live.add(&self.traffic("BACKEND_TRAFFIC", bid)?);
        }
        *out.entry(counter::NAMES[counter::FORWARDED as usize])
            .or_default() += live.packets;
        *out.entry(counter::NAMES[counter::REPLIES as usize])
            .or_default() += live.reply_packets;
        Ok(out)
    }

    /// Traffic of a service, summed over CPUs: its live backends' and what
    /// its removed backends left.
    pub fn service_traffic(&self, service: &str) -> Result<Traffic> {
        let Some(slot) = self.services.get(service) else {
            return Ok(Traffic::default());
        };
        let mut total = self.traffic("SERVICE_TRAFFIC", slot.id)?;
        for ((svc, _), &bid) in &self.backends {
            if svc == service {
                total.add(&self.traffic("BACKEND_TRAFFIC", bid)?);
            }
        }
        for (&bid, &svc) in &self.retired {
            if svc == Some(slot.id) {
                total.add(&self.traffic("BACKEND_TRAFFIC", bid)?);
            }
        }
        Ok(total)
    }

    /// Traffic of one backend of a service, summed over CPUs.
    pub fn backend_traffic(&self, service: &str, backend: &str) -> Result<Traffic> {
        match self.backends.get(&(service.to_owned(), backend.to_owned())) {
            Some(&bid) => self.traffic("BACKEND_TRAFFIC", bid),
            None => Ok(Traffic::default()),
        }
    }

    /// A handle for counting flows away from the daemon's loop: its own
    /// descriptor of the connection table, and which backend each id is now.
    pub fn census(&self) -> Result<FlowCensus> {
        Ok(FlowCensus {
            table: self.table_handle("CONNTRACK")?,
            backends: self
                .backends
                .iter()
                .map(|(k, &bid)| ((bid, self.generations[bid as usize]), k.clone()))
                .collect(),
            capacity: self.conntrack_size as u64,
        })
    }
}

/// Deletes UDP flows idle past their service's timeout (see
/// [`Dataplane::udp_sweep`]): one walk of the connection table, off the
/// daemon's loop.
pub struct UdpSweep {
    conntrack: MapData,
    reverse: MapData,
    /// Service id -> idle timeout in ticks (UDP services).
    idle: HashMap<u32, u64>,
    /// Backend id -> its address and port (network order).
    backends: HashMap<u32, ([u8; 4], [u8; 2])>,
}

impl UdpSweep {
    /// Deletes the idle UDP flows and their reply entries; returns how many
    /// per backend id. A flow the data path replaced meanwhile is not
    /// counted twice: only a successful delete counts.
    pub fn run(self) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        let (Ok(mut table), Ok(mut reverse)) = (
            BpfHashMap::<_, FlowKey, Flow>::try_from(aya::maps::Map::LruHashMap(self.conntrack)),
            BpfHashMap::<_, FlowKey, ReverseFlow>::try_from(aya::maps::Map::LruHashMap(
                self.reverse,
            )),
        ) else {
            return out;
        };
        let now = crate::clock::jiffies_now();
        let idle: Vec<(FlowKey, Flow)> = table
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, f)| {
                k.proto == lb_common::IPPROTO_UDP
                    && self
                        .idle
                        .get(&f.service)
                        .is_some_and(|&t| now.saturating_sub(f.last_seen) > t)
            })
            .collect();
        for (k, f) in idle {
            if table.remove(&k).is_err() {
                continue;
            }
            if let Some(&(addr, port)) = self.backends.get(&f.backend) {
                let _ = reverse.remove(&FlowKey::new(addr, k.src, port, k.sport, k.proto));
            }
            *out.entry(f.backend).or_default() += 1;
        }
        out
    }
}

/// Counts the connection table's flows (see [`Dataplane::census`]). Taking a
/// census walks the whole table, one system call per entry: seconds for a
/// full table, so it runs on a thread of its own, never in the daemon's loop.
pub struct FlowCensus {
    table: MapData,
    /// (backend id, generation) -> (service, backend).
    backends: HashMap<(u32, u32), (String, String)>,
    capacity: u64,
}

/// What a census found.
#[derive(Debug, Default, Clone)]
pub struct Census {
    /// Entries in the table (open, closing and idle flows until evicted).
    pub entries: u64,
    pub capacity: u64,
    /// Per (service, backend): flows that have not closed and saw a packet
    /// within their idle time.
    pub active: HashMap<(String, String), u64>,
}

impl FlowCensus {
    /// Walks the table once: every entry counts in `entries`; one that has
    /// not closed and saw a packet within its idle time (TCP: `tcp_idle`,
    /// UDP: `udp_idle`) counts as active for its backend.
    pub fn take(self, tcp_idle: std::time::Duration, udp_idle: std::time::Duration) -> Census {
        let mut census = Census {
            capacity: self.capacity,
            ..Census::default()
        };
        let Ok(table) =
            BpfHashMap::<_, FlowKey, Flow>::try_from(aya::maps::Map::LruHashMap(self.table))
        else {
            return census;
        };
        let now = crate::clock::jiffies_now();
        let mut by_id: HashMap<(u32, u32), u64> = HashMap::new();
        for entry in table.iter() {
            let Ok((k, f)) = entry else { continue };
            census.entries += 1;
            let idle = if k.proto == lb_common::IPPROTO_TCP {
                tcp_idle
            } else {
                udp_idle
            };
            if f.flags & FLOW_F_CLOSING != 0
                || now.saturating_sub(f.last_seen) > crate::clock::jiffies(idle)
            {
                continue;
            }
            *by_id.entry((f.backend, f.generation)).or_default() += 1;
        }
        for (id, n) in by_id {
            if let Some(key) = self.backends.get(&id) {
                census.active.insert(key.clone(), n);
            }
        }
        census
    }
}

/// Traffic counters as `lb status --json` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TrafficStatus {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl From<Traffic> for TrafficStatus {
    fn from(t: Traffic) -> Self {
        TrafficStatus {
            packets: t.packets,
            bytes: t.bytes,
            new_flows: t.new_flows,
            reply_packets: t.reply_packets,
            reply_bytes: t.reply_bytes,
        }
    }
}

/// The mode an attached XDP program runs in, as rtnetlink reports it.
fn xdp_mode_of(iface: &str) -> Hook {
    match iface::xdp_generic(iface) {
        Some(true) => Hook::XdpGeneric,
        _ => Hook::Xdp,
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf if `dir` is not on a bpffs yet.
fn ensure_bpffs(dir: &Path) -> std::result::Result<(), String> {
    let on_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: c is a valid path and st a valid out-parameter.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Err("the pin directory must be under /sys/fs/bpf".into());
    }
    if on_bpffs(root) {
        return Ok(());
    }
    let _ = std::fs::create_dir_all(root);
    // SAFETY: all arguments are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether what is pinned under `dir` outlives this process.
#[derive(Debug, Clone, Serialize)]
pub struct Persistence {
    /// None when it could not be told (no process of the host's mounts to
    /// compare with was readable).
    pub survives_restart: Option<bool>,
    pub why: String,
}

/// Pins outlive the daemon when the bpffs they are on is the one the host
/// sees at the same path: the one our parent (a shell, a service manager,
/// or PID 1) sees. Started under `ip netns exec`, which gives the process a
/// private mount namespace with a fresh /sys, the daemon mounts a bpffs of its
/// own there, which dies with it.
pub fn persistence(dir: &Path) -> Persistence {
    use std::os::unix::fs::MetadataExt;
    let private = |why: String| Persistence {
        survives_restart: Some(false),
        why,
    };
    let ours = match std::fs::metadata(dir) {
        Ok(m) => m.dev(),
        Err(e) => return private(format!("{}: {e}", dir.display())),
    };
    let rel = dir.strip_prefix("/").unwrap_or(dir);
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    for pid in [parent, 1] {
        let theirs = Path::new("/proc")
            .join(pid.to_string())
            .join("root")
            .join(rel);
        match std::fs::metadata(&theirs) {
            Ok(m) if m.dev() == ours => {
                return Persistence {
                    survives_restart: Some(true),
                    why: format!(
                        "pins in {} are on the bpffs the host sees (as process {pid} does)",
                        dir.display()
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => continue,
            _ => {
                return private(format!(
                    "{} is on a bpffs private to this daemon's mount namespace (started with \
                     `ip netns exec`?): its pins, and with them the data path, end with the \
                     daemon. Run `lb run --netns NAME` (or [daemon] netns), which enters only \
                     the network namespace",
                    dir.display()
                ))
            }
        }
    }
    Persistence {
        survives_restart: None,
        why: "no process with the host's mounts could be read to compare with".into(),
    }
}

/// Removes every pin in `dir` (maps, links) and the directory: whatever was
/// attached through a removed link pin detaches once no process holds it.
pub fn remove_pins(dir: &Path) -> std::result::Result<(), String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("reading it: {e}")),
    };
    // Only what this program pins: anything else there is someone else's.
    let ours = |name: &str| {
        MAPS.contains(&name)
            || name == "LAYOUT"
            || name == "prog-lb"
            || name == "prog-lb_tc"
            || name.starts_with("link-")
    };
    for e in entries.flatten() {
        if !e.file_name().to_str().is_some_and(ours) {
            continue;
        }
        std::fs::remove_file(e.path())
            .map_err(|err| format!("removing {}: {err}", e.path().display()))?;
    }
    // Left in place if anything else lives there.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Creates the LAYOUT pin: a one-entry array holding [`LAYOUT_VERSION`].
fn write_layout(pin: &Path) -> std::result::Result<(), String> {
    let fd = create_array_map(8, 1).map_err(|e| format!("creating LAYOUT: {e}"))?;
    let m = MapData::from_fd(fd).map_err(|e| format!("LAYOUT: {e}"))?;
    m.pin(pin).map_err(|e| format!("pinning LAYOUT: {e}"))?;
    let mut a: Array<_, u64> =
        Array::try_from(aya::maps::Map::Array(m)).map_err(|e| format!("LAYOUT: {e}"))?;
    a.set(0, LAYOUT_VERSION, 0)
        .map_err(|e| format!("LAYOUT: {e}"))
}

/// A plain BPF array map (for LAYOUT, which the program does not use).
fn create_array_map(value_size: u32, max_entries: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = MapCreate {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size,
        max_entries,
        map_flags: 0,
    };
    let mut buf = [0u8; 128];
    // SAFETY: MapCreate is plain data no larger than buf.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &attr as *const MapCreate as *const u8,
            buf.as_mut_ptr(),
            std::mem::size_of::<MapCreate>(),
        )
    };
    // SAFETY: BPF_MAP_CREATE (0) with a zero-padded bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, buf.as_ptr(), buf.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// What pinned maps hold that a new daemon needs to carry on: the services
/// and the backends present.
fn read_adoption(ebpf: &Ebpf) -> Result<Adoption> {
    let svcs: BpfHashMap<_, ServiceKey, Service> = BpfHashMap::try_from(
        ebpf.map("SERVICES")
            .ok_or(DataplaneError::MissingMap("SERVICES"))?,
    )
    .map_err(map_err("SERVICES"))?;
    let services = svcs.iter().filter_map(|r| r.ok()).collect();
    let arr: Array<_, Backend> = Array::try_from(
        ebpf.map("BACKENDS")
            .ok_or(DataplaneError::MissingMap("BACKENDS"))?,
    )
    .map_err(map_err("BACKENDS"))?;
    let backends = arr
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.ok().map(|b| (i as u32, b)))
        .filter(|(_, b)| b.flags & BACKEND_F_PRESENT != 0)
        .collect();
    Ok(Adoption { services, backends })
}
