//! The TOML configuration: parsing and whole-file validation, no side effects.
//!
//! Nothing is applied until the whole file validates; every problem names the
//! file, the key (`service[1].backend[0].address`) and what was wrong.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// How long a UDP flow may idle before it is over, unless a service says
/// (`udp_idle_timeout_s`).
pub const DEFAULT_UDP_IDLE_S: u32 = 60;
/// How long a closed TCP flow lingers (`[daemon] closed_linger_s`).
pub const DEFAULT_CLOSED_LINGER_S: u32 = 10;

/// Bounds of `[daemon] conntrack_size`.
pub const MIN_CONNTRACK_SIZE: u32 = 1024;
pub const MAX_CONNTRACK_SIZE: u32 = 16 << 20;

/// The largest config file read (a bigger one is a mistake: /dev/zero, say).
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// The largest password file read.
const MAX_PASSWORD_BYTES: u64 = 4096;
/// The longest service or backend name.
const MAX_NAME_LEN: usize = 64;
/// The most checks in a row `rise` and `fall` may ask for.
const MAX_RISE_FALL: u32 = 1000;

/// Why a small file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("{size} bytes, at most {max} are read")]
    TooBig { size: u64, max: u64 },
    /// It grew past `max` while it was read.
    #[error("more than {max} bytes")]
    Grew { max: u64 },
    #[error("not UTF-8 text ({0})")]
    NotUtf8(std::string::FromUtf8Error),
}

/// Reads a regular file of at most `max` bytes as UTF-8. Anything else (a
/// directory, a FIFO that would block, a device that never ends) is refused
/// before a byte is read.
pub fn read_small_file(path: &Path, max: u64) -> Result<String, ReadError> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile);
    }
    if meta.len() > max {
        return Err(ReadError::TooBig {
            size: meta.len(),
            max,
        });
    }
    let f = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::Grew { max });
    }
    String::from_utf8(bytes).map_err(ReadError::NotUtf8)
}

/// Why a backend's weight cannot be used (the file's, or one set at run time).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("weights need scheduler = \"weighted-round-robin\"")]
    NeedsWeightedScheduler,
    #[error("weight {weight} is above {}", lb_common::RING_SIZE)]
    AboveRing { weight: u32 },
    #[error(
        "the weights need {slots} ring slots (sum of weights over their common divisor), \
         at most {} fit",
        lb_common::RING_SIZE
    )]
    RingOverflow { slots: u64 },
}

/// The weight of a backend of a `scheduler` service that asks for `asked`
/// (none: 1), or why it cannot have it. The one check of a backend's weight.
pub fn check_weight(scheduler: SchedulerKind, asked: Option<u32>) -> Result<u32, WeightError> {
    match (scheduler, asked) {
        (SchedulerKind::RoundRobin, Some(_)) => Err(WeightError::NeedsWeightedScheduler),
        (_, Some(weight)) if weight > lb_common::RING_SIZE => {
            Err(WeightError::AboveRing { weight })
        }
        (_, w) => Ok(w.unwrap_or(1)),
    }
}

/// Whether a service's weights fit its ring (a Maglev table takes any weights).
pub fn check_ring(scheduler: SchedulerKind, weights: &[u32]) -> Result<(), WeightError> {
    let slots = lb_common::ring::ring_len(weights);
    if scheduler != SchedulerKind::Maglev && slots > lb_common::RING_SIZE as u64 {
        return Err(WeightError::RingOverflow { slots });
    }
    Ok(())
}

/// What is wrong with a backend address of a service at `vip`, if anything.
pub fn backend_address_problem(a: Ipv4Addr, vip: Option<Ipv4Addr>) -> Option<String> {
    if a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback() {
        return Some(format!("{a} cannot be a backend address"));
    }
    if Some(a) == vip {
        return Some(format!("{a} is the service's own VIP: packets would loop"));
    }
    None
}

/// What is wrong with a service or backend name, if anything: it appears in
/// logs, metrics labels and `lb status`, so it must be short and printable.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Some(format!("longer than {MAX_NAME_LEN} characters"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Some(format!("{name:?} contains control characters"));
    }
    None
}

/// Where `lb` listens for `lb status` and friends when the config does not say.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lb.sock";
/// Where metrics and the status page listen when the config does not say:
/// loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9100";
/// Where maps and links are pinned when the config does not say.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// One problem in a config file: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {error}", file.display())]
    Read { file: PathBuf, error: ReadError },
    /// TOML syntax, an unknown key, or a value of the wrong type; toml's message
    /// names the key and shows the line.
    #[error("{}: {message}", file.display())]
    Parse { file: PathBuf, message: String },
    #[error("{}: invalid configuration:{}", file.display(), ProblemList(problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  {}: {}", p.key, p.problem)?;
        }
        Ok(())
    }
}

/// `xdp_mode`, the setting `hook` replaces (kept so older configs load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum XdpMode {
    Auto,
    Native,
    Generic,
}

impl XdpMode {
    fn hook(self) -> Hook {
        match self {
            XdpMode::Auto => Hook::Auto,
            XdpMode::Native => Hook::Xdp,
            XdpMode::Generic => Hook::XdpGeneric,
        }
    }
}

/// Where on an interface the data path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// Native XDP on a physical NIC whose driver has it; TC on veth and
    /// other virtual devices, and on NICs without native XDP.
    #[default]
    Auto,
    /// Native (driver) XDP: fail if the driver cannot run it.
    Xdp,
    /// Generic XDP (on the socket buffer): only when asked.
    XdpGeneric,
    /// TC ingress (clsact, `sched_cls`).
    Tc,
}

impl Hook {
    /// The name the config uses.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Auto => "auto",
            Hook::Xdp => "xdp",
            Hook::XdpGeneric => "xdp-generic",
            Hook::Tc => "tc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A scheduler's name, as the config file and the status write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    Maglev,
}

/// How a service picks the backend of a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Each backend in turn, one new flow each.
    RoundRobin,
    /// Each backend in turn, `weight` new flows each, interleaved.
    WeightedRoundRobin,
    /// Maglev consistent hashing of the flow's 5-tuple into a lookup table
    /// of `table_size` entries (a prime), weights honoured: every balancer
    /// with the same config sends a flow to the same backend.
    Maglev { table_size: u32 },
}

impl Scheduler {
    pub fn kind(self) -> SchedulerKind {
        match self {
            Scheduler::RoundRobin => SchedulerKind::RoundRobin,
            Scheduler::WeightedRoundRobin => SchedulerKind::WeightedRoundRobin,
            Scheduler::Maglev { .. } => SchedulerKind::Maglev,
        }
    }
}

/// The file as written (before validation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: RawDaemon,
    #[serde(default)]
    firewall: RawFirewall,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    interfaces: Vec<String>,
    xdp_mode: Option<XdpMode>,
    hook: Option<Hook>,
    #[serde(default)]
    hooks: BTreeMap<String, Hook>,
    netns: Option<String>,
    control_socket: Option<PathBuf>,
    #[serde(default = "yes")]
    manage_neighbours: bool,
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    maglev_seed: u32,
    metrics_listen: Option<String>,
    #[serde(default)]
    stateless_reverse_nat: bool,
    conntrack_size: Option<u32>,
    transient_size: Option<u32>,
    closed_linger_s: Option<u32>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: u16,
    protocol: Protocol,
    #[serde(default)]
    scheduler: SchedulerKind,
    #[serde(default)]
    on_backend_down: DownPolicy,
    maglev_table_size: Option<u32>,
    #[serde(default)]
    steering: SteeringKind,
    mysql: Option<RawMysql>,
    health: Option<RawHealth>,
    #[serde(default)]
    firewall: RawSourceRules,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
    udp_idle_timeout_s: Option<u32>,
}

/// `[firewall]`: what the data path drops before any service sees it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFirewall {
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    closed_ports: ClosedPorts,
    #[serde(default = "yes")]
    icmp_echo_reply: bool,
    #[serde(default = "default_source_rate")]
    source_new_flows_per_sec: u32,
    source_new_flows_burst: Option<u32>,
    #[serde(default = "default_global_rate")]
    new_flows_per_sec: u32,
    new_flows_burst: Option<u32>,
}

impl Default for RawFirewall {
    fn default() -> Self {
        RawFirewall {
            deny: Vec::new(),
            closed_ports: ClosedPorts::default(),
            icmp_echo_reply: true,
            source_new_flows_per_sec: default_source_rate(),
            source_new_flows_burst: None,
            new_flows_per_sec: default_global_rate(),
            new_flows_burst: None,
        }
    }
}

/// Default per-source new-flow rate: far above what one client (or one NAT
/// gateway full of them) opens, far below what one flooding host sends.
pub const DEFAULT_SOURCE_NEW_FLOWS_PER_SEC: u32 = 10_000;
/// Default global new-flow rate: the connection table (262,144 entries) then
/// turns over no faster than every ~2.6 s, even under a flood from many sources.
pub const DEFAULT_NEW_FLOWS_PER_SEC: u32 = 100_000;

fn default_source_rate() -> u32 {
    DEFAULT_SOURCE_NEW_FLOWS_PER_SEC
}

fn default_global_rate() -> u32 {
    DEFAULT_NEW_FLOWS_PER_SEC
}

/// `[service.firewall]`: which sources may reach the service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSourceRules {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// What happens to traffic for a VIP on a port no service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClosedPorts {
    /// Dropped in XDP and counted (`drop_closed_port`).
    #[default]
    Drop,
    /// Left to the kernel, as if the balancer were not there.
    Pass,
}

/// Why a text is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{text:?} is not an IPv4 address or CIDR (a.b.c.d/len)")]
    NotAnAddress { text: String },
    #[error("{text:?}: the prefix length must be 0 to 32")]
    BadPrefix { text: String },
    #[error("{text:?} has host bits set (the network is {network})")]
    HostBits { text: String, network: Cidr },
}

/// An IPv4 network: an address with its host bits zero and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/len` or a bare address (a /32).
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| CidrError::NotAnAddress {
            text: text.to_owned(),
        })?;
        let len = match len {
            None => 32,
            // Digits only, no leading zero: "/+24" and "/024" are typos.
            Some(l) => match l.parse::<u8>() {
                Ok(n)
                    if n <= 32
                        && l.bytes().all(|b| b.is_ascii_digit())
                        && (l == "0" || !l.starts_with('0')) =>
                {
                    n
                }
                _ => {
                    return Err(CidrError::BadPrefix {
                        text: text.to_owned(),
                    })
                }
            },
        };
        let net = Cidr { addr, len };
        let masked = Ipv4Addr::from(u32::from(addr) & net.mask());
        if masked != addr {
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                network: Cidr { addr: masked, len },
            });
        }
        Ok(net)
    }

    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0)
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The validated `[firewall]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Every packet from these sources is dropped.
    pub deny: Vec<Cidr>,
    pub closed_ports: ClosedPorts,
    /// Answer ICMP echo requests to VIPs.
    pub icmp_echo_reply: bool,
    /// New flows a second one source may open (0: no limit), and its burst.
    pub source_new_flows_per_sec: u32,
    pub source_new_flows_burst: u32,
    /// New flows a second across all sources (0: no cap), and its burst.
    pub new_flows_per_sec: u32,
    pub new_flows_burst: u32,
}

impl Default for FirewallConfig {
    /// What an absent `[firewall]` means.
    fn default() -> Self {
        FirewallConfig {
            deny: Vec::new(),
            closed_ports: ClosedPorts::Drop,
            icmp_echo_reply: true,
            source_new_flows_per_sec: DEFAULT_SOURCE_NEW_FLOWS_PER_SEC,
            source_new_flows_burst: DEFAULT_SOURCE_NEW_FLOWS_PER_SEC,
            new_flows_per_sec: DEFAULT_NEW_FLOWS_PER_SEC,
            new_flows_burst: DEFAULT_NEW_FLOWS_PER_SEC,
        }
    }
}

/// A service's source rules: the most specific matching CIDR decides; a source
/// no rule matches is allowed, unless the service has allow rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceRules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    address: String,
    port: Option<u16>,
    weight: Option<u32>,
    health: Option<RawHealth>,
}

/// `[service.mysql]`: how to monitor the servers of a steered service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMysql {
    user: String,
    password_file: PathBuf,
    #[serde(default = "default_mysql_interval")]
    interval_ms: u64,
    #[serde(default = "default_mysql_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_max_lag")]
    max_replica_lag_s: u64,
    #[serde(default)]
    on_demotion: OnDemotion,
}

fn default_mysql_interval() -> u64 {
    250
}
fn default_mysql_timeout() -> u64 {
    200
}
fn default_max_lag() -> u64 {
    5
}

/// A steering mode's name, as the config file and the status write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SteeringKind {
    #[default]
    None,
    MysqlPrimary,
    MysqlReplica,
}

/// Where a service's new connections go, beyond health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Steering {
    /// Any healthy backend, by the scheduler.
    None,
    /// A write VIP: every new connection to the one current MySQL primary,
    /// as the monitor finds it.
    MysqlPrimary(MysqlMonitor),
    /// A read VIP: healthy replicas within the lag limit; the primary if none.
    MysqlReplica(MysqlMonitor),
}

impl Steering {
    pub fn kind(&self) -> SteeringKind {
        match self {
            Steering::None => SteeringKind::None,
            Steering::MysqlPrimary(_) => SteeringKind::MysqlPrimary,
            Steering::MysqlReplica(_) => SteeringKind::MysqlReplica,
        }
    }

    /// The MySQL monitor of a steered service.
    pub fn mysql(&self) -> Option<&MysqlMonitor> {
        match self {
            Steering::None => None,
            Steering::MysqlPrimary(m) | Steering::MysqlReplica(m) => Some(m),
        }
    }
}

/// What happens to the connections of a primary that stops being one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnDemotion {
    /// Reset them (TCP reset from the balancer), so clients reconnect to the
    /// new primary instead of writing to a server that refuses writes.
    #[default]
    Reset,
    /// Leave them be.
    Keep,
}

/// A password read from a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A validated `[service.mysql]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MysqlMonitor {
    pub user: String,
    pub password_file: PathBuf,
    pub password: Secret,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub max_replica_lag_s: u64,
    pub on_demotion: OnDemotion,
}

/// `[service.health]`, and `[service.backend.health]` overriding it key by key.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<HealthKind>,
    path: Option<String>,
    expect_status: Option<u16>,
    host: Option<String>,
    port: Option<u16>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

impl RawHealth {
    /// This section's keys where set, `base`'s otherwise. A section that
    /// switches the kind to tcp does not inherit the HTTP-only keys.
    fn over(&self, base: &RawHealth) -> RawHealth {
        let http = self.kind != Some(HealthKind::Tcp);
        RawHealth {
            kind: self.kind.or(base.kind),
            path: self
                .path
                .clone()
                .or_else(|| base.path.clone().filter(|_| http)),
            expect_status: self.expect_status.or(base.expect_status.filter(|_| http)),
            host: self
                .host
                .clone()
                .or_else(|| base.host.clone().filter(|_| http)),
            port: self.port.or(base.port),
            interval_ms: self.interval_ms.or(base.interval_ms),
            timeout_ms: self.timeout_ms.or(base.timeout_ms),
            rise: self.rise.or(base.rise),
            fall: self.fall.or(base.fall),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect succeeds within the timeout.
    Tcp,
    /// An HTTP GET of `path` answers `expect_status` within the timeout.
    Http,
}

/// What happens to established flows of a backend its health checks mark down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DownPolicy {
    /// They keep flowing to it (a flapping check breaks nothing; a dead server
    /// times its clients out as it would without a balancer).
    #[default]
    KeepFlows,
    /// Their packets are dropped at the balancer (and counted), so clients give
    /// up on them and reconnect, to a healthy backend.
    DropFlows,
}

/// A backend's health check, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// HTTP only.
    pub path: String,
    pub expect_status: u16,
    pub host: Option<String>,
    /// The TCP port probed; None: the backend's own port.
    pub port: Option<u16>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub file: PathBuf,
    pub daemon: DaemonConfig,
    pub firewall: FirewallConfig,
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The data path runs on each of these.
    pub interfaces: Vec<String>,
    /// The hook asked for on every interface (`hook`, or the older `xdp_mode`).
    pub hook: Hook,
    /// Per-interface overrides (`[daemon.hooks]`).
    pub hooks: BTreeMap<String, Hook>,
    /// The network namespace `lb run` enters (/run/netns/NAME), if any.
    pub netns: Option<String>,
    pub control_socket: PathBuf,
    /// Keep a kernel-managed neighbour entry for each backend's next hop, so
    /// the data path always finds its MAC (`ip neigh ... managed`).
    pub manage_neighbours: bool,
    /// Where maps and links are pinned (bpffs), so they outlive the daemon.
    pub pin_dir: PathBuf,
    /// Seed of the Maglev flow hash and tables: the same on every balancer of
    /// an active-active group.
    pub maglev_seed: u32,
    /// Where `/metrics` and the status page listen; None: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Rewrite any reply from a single-VIP backend back to its VIP, whether or
    /// not this balancer saw the flow (active-active). Off by default: it
    /// would also rewrite traffic that reaches the backends without the VIP.
    pub stateless_reverse_nat: bool,
    /// Entries of the connection table (and of the reply table beside it):
    /// established flows.
    pub conntrack_size: u32,
    /// Entries of the transient table: half-open and closed flows, two each.
    pub transient_size: u32,
    /// How long a closed flow lingers (its retransmitted FINs and last ACK
    /// still go through).
    pub closed_linger: Duration,
}

/// Whether `name` names a namespace under /run/netns.
fn netns_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_graphic() && c != '/')
}

/// `[daemon] netns` of the config file at `file`, read before the file is
/// validated (the interfaces it names are checked inside that namespace);
/// None when the file cannot be read or says none.
pub fn netns_of(file: &Path) -> Option<String> {
    let text = read_small_file(file, MAX_CONFIG_BYTES).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let name = v.get("daemon")?.get("netns")?.as_str()?;
    netns_name_ok(name).then(|| name.to_owned())
}

impl DaemonConfig {
    /// The hook asked for on `iface`.
    pub fn hook_for(&self, iface: &str) -> Hook {
        self.hooks.get(iface).copied().unwrap_or(self.hook)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub on_backend_down: DownPolicy,
    pub steering: Steering,
    /// The service's `[service.health]`: what backends added at run time get.
    pub health: Option<HealthCheck>,
    /// `[service.firewall]`.
    pub firewall: SourceRules,
    pub backends: Vec<BackendConfig>,
    /// UDP: a flow idle for this long is over (its next packet is scheduled
    /// afresh, and its entry is reclaimed).
    pub udp_idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    /// None: not checked, always considered up.
    pub health: Option<HealthCheck>,
}

impl Config {
    /// Reads and validates `file`; checks that the interfaces exist here.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = read_small_file(file, MAX_CONFIG_BYTES).map_err(|error| ConfigError::Read {
            file: file.to_owned(),
            error,
        })?;
        Config::parse(file, &text, &interface_exists)
    }

    /// Validates `text` as the contents of `file`; `iface_ok` says whether an
    /// interface name exists.
    pub fn parse(
        file: &Path,
        text: &str,
        iface_ok: &dyn Fn(&str) -> bool,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut problems = Vec::new();
        let mut bad = |key: String, problem: String| problems.push(Problem { key, problem });

        check_interfaces(&raw.daemon, iface_ok, &mut bad);
        if raw.services.len() > lb_common::MAX_SERVICES as usize {
            bad(
                "service".into(),
                format!(
                    "{} services, at most {} are supported",
                    raw.services.len(),
                    lb_common::MAX_SERVICES
                ),
            );
        }
        // The global deny list as a set, for the services' allow rules to be
        // checked against (its own problems are reported by validate_firewall).
        let global_deny: HashSet<Cidr> = raw
            .firewall
            .deny
            .iter()
            .filter_map(|t| Cidr::parse(t).ok())
            .collect();
        let mut seen = Seen::default();
        let services: Vec<ServiceConfig> = raw
            .services
            .iter()
            .enumerate()
            .filter_map(|(si, s)| validate_service(si, s, file, &global_deny, &mut seen, &mut bad))
            .collect();
        if seen.maglev_services > lb_common::MAX_MAGLEV_SERVICES {
            bad(
                "service".into(),
                format!(
                    "{} Maglev services, at most {} are supported",
                    seen.maglev_services,
                    lb_common::MAX_MAGLEV_SERVICES
                ),
            );
        }
        let daemon = validate_daemon(raw.daemon, &mut bad);
        if seen.rules > lb_common::firewall::MAX_SERVICE_RULES as usize {
            bad(
                "service".into(),
                format!(
                    "{} firewall rules in all services, at most {} are supported",
                    seen.rules,
                    lb_common::firewall::MAX_SERVICE_RULES
                ),
            );
        }
        let firewall = validate_firewall(&raw.firewall, &services, &mut bad);
        if seen.backends > lb_common::MAX_BACKENDS as usize {
            bad(
                "service".into(),
                format!(
                    "{} backends in all, at most {} are supported",
                    seen.backends,
                    lb_common::MAX_BACKENDS
                ),
            );
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems,
            });
        }
        Ok(Config {
            file: file.to_owned(),
            daemon,
            firewall,
            services,
        })
    }
}

/// What the services validated so far have taken, for the checks across
/// services (names, addresses, capacities).
#[derive(Default)]
struct Seen<'a> {
    names: HashMap<&'a str, usize>,
    endpoints: HashMap<(Ipv4Addr, u16, Protocol), usize>,
    backends: usize,
    rules: usize,
    maglev_services: u32,
}

/// `[daemon] interfaces` and the per-interface hooks.
fn check_interfaces(
    d: &RawDaemon,
    iface_ok: &dyn Fn(&str) -> bool,
    bad: &mut dyn FnMut(String, String),
) {
    if d.interfaces.is_empty() {
        bad(
            "daemon.interfaces".into(),
            "needs at least one interface to attach to".into(),
        );
    }
    let mut seen_if = HashSet::new();
    for (i, name) in d.interfaces.iter().enumerate() {
        if !seen_if.insert(name) {
            bad(
                format!("daemon.interfaces[{i}]"),
                format!("interface {name:?} is listed twice"),
            );
        } else if !iface_ok(name) {
            bad(
                format!("daemon.interfaces[{i}]"),
                format!("unknown interface {name:?} (no such network interface here)"),
            );
        }
    }
    if d.hook.is_some() && d.xdp_mode.is_some() {
        bad(
            "daemon.xdp_mode".into(),
            "is the older name of daemon.hook: set one of them".into(),
        );
    }
    if let Some(ns) = &d.netns {
        if !netns_name_ok(ns) {
            bad(
                "daemon.netns".into(),
                format!(
                    "{ns:?} is not a namespace name (as `ip netns add` makes them under \
                     /run/netns: 1 to 64 characters, no '/', not . or ..)"
                ),
            );
        }
    }
    for name in d.hooks.keys() {
        if !d.interfaces.contains(name) {
            bad(
                format!("daemon.hooks.{name}"),
                format!("{name:?} is not one of daemon.interfaces"),
            );
        }
    }
}

/// One `[[service]]`: None when it cannot be built (its problems reported).
fn validate_service<'a>(
    si: usize,
    s: &'a RawService,
    file: &Path,
    global_deny: &HashSet<Cidr>,
    seen: &mut Seen<'a>,
    bad: &mut dyn FnMut(String, String),
) -> Option<ServiceConfig> {
    let key = format!("service[{si}]");
    if let Some(n) = s.udp_idle_timeout_s {
        if s.protocol != Protocol::Udp {
            bad(
                format!("{key}.udp_idle_timeout_s"),
                "only a UDP service has an idle timeout (a TCP flow ends with FIN or RST)".into(),
            );
        } else if !(1..=86_400).contains(&n) {
            bad(
                format!("{key}.udp_idle_timeout_s"),
                format!("{n} is outside 1..=86400 (seconds)"),
            );
        }
    }
    if let Some(p) = name_problem(&s.name) {
        bad(format!("{key}.name"), p);
    } else if let Some(prev) = seen.names.insert(&s.name, si) {
        bad(
            format!("{key}.name"),
            format!("duplicate service name {:?} (also service[{prev}])", s.name),
        );
    }
    let vip = match s.vip.parse::<Ipv4Addr>() {
        Ok(v) if v.is_unspecified() || v.is_multicast() || v.is_broadcast() || v.is_loopback() => {
            bad(
                format!("{key}.vip"),
                format!("{v} cannot be a service address"),
            );
            None
        }
        Ok(v) => Some(v),
        Err(_) => {
            bad(
                format!("{key}.vip"),
                format!("invalid IPv4 address {:?}", s.vip),
            );
            None
        }
    };
    if s.port == 0 {
        bad(format!("{key}.port"), "port 0 is not a valid port".into());
    }
    if let Some(vip) = vip {
        if let Some(prev) = seen.endpoints.insert((vip, s.port, s.protocol), si) {
            bad(
                format!("{key}.vip"),
                format!(
                    "duplicate VIP:port {vip}:{}/{} (also service[{prev}])",
                    s.port, s.protocol
                ),
            );
        }
    }
    if s.backends.is_empty() {
        bad(
            format!("{key}.backend"),
            format!("service {:?} has no backends", s.name),
        );
    }
    let svc_health = s
        .health
        .as_ref()
        .and_then(|h| validate_health(h, s.protocol, &format!("{key}.health"), bad));
    let mut names = HashSet::new();
    let backends: Vec<BackendConfig> = s
        .backends
        .iter()
        .enumerate()
        .filter_map(|(bi, b)| {
            validate_backend(
                &format!("{key}.backend[{bi}]"),
                b,
                s,
                vip,
                &svc_health,
                &mut names,
                bad,
            )
        })
        .collect();
    let scheduler = validate_scheduler(&key, s, bad);
    if scheduler.kind() == SchedulerKind::Maglev {
        seen.maglev_services += 1;
    }
    let steering = validate_steering(&key, s, file, bad);
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    if !backends.is_empty() && lb_common::ring::ring_len(&weights) == 0 {
        bad(
            format!("{key}.backend"),
            "every backend has weight 0: the service could take no flow".into(),
        );
    }
    if let Err(e) = check_ring(s.scheduler, &weights) {
        bad(format!("{key}.backend"), e.to_string());
    }
    seen.backends += s.backends.len();
    let firewall = validate_source_rules(&key, &s.firewall, global_deny, bad);
    seen.rules += firewall.allow.len() + firewall.deny.len();
    Some(ServiceConfig {
        name: s.name.clone(),
        vip: vip?,
        port: s.port,
        protocol: s.protocol,
        scheduler,
        on_backend_down: s.on_backend_down,
        steering,
        health: svc_health,
        firewall,
        backends,
        udp_idle_timeout: Duration::from_secs(
            s.udp_idle_timeout_s.unwrap_or(DEFAULT_UDP_IDLE_S) as u64
        ),
    })
}

/// One `[[service.backend]]` of `s`: None without a usable address.
fn validate_backend<'a>(
    bkey: &str,
    b: &'a RawBackend,
    s: &RawService,
    vip: Option<Ipv4Addr>,
    svc_health: &Option<HealthCheck>,
    names: &mut HashSet<&'a str>,
    bad: &mut dyn FnMut(String, String),
) -> Option<BackendConfig> {
    if let Some(p) = name_problem(&b.name) {
        bad(format!("{bkey}.name"), p);
    } else if !names.insert(&b.name) {
        bad(
            format!("{bkey}.name"),
            format!("duplicate backend name {:?} in this service", b.name),
        );
    }
    let address = match b.address.parse::<Ipv4Addr>() {
        Ok(a) => match backend_address_problem(a, vip) {
            Some(p) => {
                bad(format!("{bkey}.address"), p);
                None
            }
            None => Some(a),
        },
        Err(_) => {
            bad(
                format!("{bkey}.address"),
                format!("invalid IPv4 address {:?}", b.address),
            );
            None
        }
    };
    let port = b.port.unwrap_or(s.port);
    if port == 0 {
        bad(format!("{bkey}.port"), "port 0 is not a valid port".into());
    }
    let weight = check_weight(s.scheduler, b.weight).unwrap_or_else(|e| {
        bad(format!("{bkey}.weight"), e.to_string());
        match e {
            WeightError::AboveRing { weight } => weight,
            _ => 1,
        }
    });
    let health = match &b.health {
        None => svc_health.clone(),
        Some(own) => validate_health(
            &own.over(&s.health.clone().unwrap_or_default()),
            s.protocol,
            &format!("{bkey}.health"),
            bad,
        ),
    };
    Some(BackendConfig {
        name: b.name.clone(),
        address: address?,
        port,
        weight,
        health,
    })
}

/// `scheduler` and, for Maglev, `maglev_table_size`.
fn validate_scheduler(key: &str, s: &RawService, bad: &mut dyn FnMut(String, String)) -> Scheduler {
    let table_size = s
        .maglev_table_size
        .unwrap_or(lb_common::maglev::DEFAULT_TABLE_SIZE);
    if s.maglev_table_size.is_some() && s.scheduler != SchedulerKind::Maglev {
        bad(
            format!("{key}.maglev_table_size"),
            "needs scheduler = \"maglev\"".into(),
        );
    }
    if !lb_common::maglev::is_prime(table_size) || table_size > lb_common::maglev::MAX_TABLE_SIZE {
        bad(
            format!("{key}.maglev_table_size"),
            format!(
                "{table_size} must be a prime no larger than {}",
                lb_common::maglev::MAX_TABLE_SIZE
            ),
        );
    } else if s.scheduler == SchedulerKind::Maglev && (table_size as usize) < 100 * s.backends.len()
    {
        bad(
            format!("{key}.maglev_table_size"),
            format!(
                "{table_size} is too small for {} backends: Maglev needs at least 100 slots per \
                 backend to spread evenly",
                s.backends.len()
            ),
        );
    }
    match s.scheduler {
        SchedulerKind::RoundRobin => Scheduler::RoundRobin,
        SchedulerKind::WeightedRoundRobin => Scheduler::WeightedRoundRobin,
        SchedulerKind::Maglev => Scheduler::Maglev { table_size },
    }
}

/// `steering` and its `[service.mysql]` (the password read from its file).
fn validate_steering(
    key: &str,
    s: &RawService,
    file: &Path,
    bad: &mut dyn FnMut(String, String),
) -> Steering {
    let m = match (&s.mysql, s.steering) {
        (None, SteeringKind::None) => return Steering::None,
        (Some(_), SteeringKind::None) => {
            bad(
                format!("{key}.mysql"),
                "needs steering = \"mysql-primary\" or \"mysql-replica\"".into(),
            );
            return Steering::None;
        }
        (None, _) => {
            bad(
                format!("{key}.mysql"),
                "MySQL steering needs a [service.mysql] section (user, password_file)".into(),
            );
            return Steering::None;
        }
        (Some(m), _) => m,
    };
    if m.user.is_empty() || m.user.chars().any(|c| c.is_control()) {
        bad(
            format!("{key}.mysql.user"),
            "must be a non-empty name without control characters".into(),
        );
    }
    if s.protocol != Protocol::Tcp {
        bad(
            format!("{key}.steering"),
            "MySQL steering needs protocol = \"tcp\"".into(),
        );
    }
    if !(10..=60_000).contains(&m.interval_ms) {
        bad(
            format!("{key}.mysql.interval_ms"),
            format!("{} is outside 10..=60000", m.interval_ms),
        );
    }
    if m.timeout_ms == 0 || m.timeout_ms > m.interval_ms {
        bad(
            format!("{key}.mysql.timeout_ms"),
            format!(
                "{} must be at least 1 and at most interval_ms ({})",
                m.timeout_ms, m.interval_ms
            ),
        );
    }
    // A relative path is the config file's neighbour.
    let password_file = file
        .parent()
        .map(|d| d.join(&m.password_file))
        .unwrap_or_else(|| m.password_file.clone());
    let password = match read_small_file(&password_file, MAX_PASSWORD_BYTES) {
        // A trailing newline is the file's, not the password's.
        Ok(p) => Secret(p.trim_end_matches(['\n', '\r']).to_owned()),
        Err(e) => {
            bad(
                format!("{key}.mysql.password_file"),
                format!("cannot read {}: {e}", password_file.display()),
            );
            return Steering::None;
        }
    };
    let monitor = MysqlMonitor {
        user: m.user.clone(),
        password_file,
        password,
        interval_ms: m.interval_ms,
        timeout_ms: m.timeout_ms,
        max_replica_lag_s: m.max_replica_lag_s,
        on_demotion: m.on_demotion,
    };
    match s.steering {
        SteeringKind::MysqlReplica => Steering::MysqlReplica(monitor),
        _ => Steering::MysqlPrimary(monitor),
    }
}

/// `[service.firewall]`: its CIDRs, none both allowed and denied, no allow
/// rule inside the global deny list.
fn validate_source_rules(
    key: &str,
    f: &RawSourceRules,
    global_deny: &HashSet<Cidr>,
    bad: &mut dyn FnMut(String, String),
) -> SourceRules {
    let allow = cidrs(&f.allow, &format!("{key}.firewall.allow"), bad);
    let deny = cidrs(&f.deny, &format!("{key}.firewall.deny"), bad);
    let allowed: HashSet<&Cidr> = allow.iter().map(|(_, c)| c).collect();
    for (i, c) in &deny {
        if allowed.contains(c) {
            bad(
                format!("{key}.firewall.deny[{i}]"),
                format!("{c} is also allowed: a CIDR is either allowed or denied"),
            );
        }
    }
    for (i, c) in &allow {
        if let Some(d) = covered_by(c, global_deny) {
            bad(
                format!("{key}.firewall.allow[{i}]"),
                format!("{c} is inside {d} of [firewall] deny: none of it could reach the service"),
            );
        }
    }
    SourceRules {
        allow: allow.into_iter().map(|(_, c)| c).collect(),
        deny: deny.into_iter().map(|(_, c)| c).collect(),
    }
}

/// `[daemon]` beyond its interfaces: paths, table sizes, the metrics
/// listener, with their defaults.
fn validate_daemon(d: RawDaemon, bad: &mut dyn FnMut(String, String)) -> DaemonConfig {
    // A path the daemon creates or replaces things in: absolute, no . or ..
    let plain = |p: &Path| {
        p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        })
    };
    if let Some(p) = &d.pin_dir {
        if !plain(p) || !p.starts_with("/sys/fs/bpf/") || p == Path::new("/sys/fs/bpf") {
            bad(
                "daemon.pin_dir".into(),
                format!(
                    "{} is not a directory of its own under /sys/fs/bpf/ (bpffs), written \
                     without . or ..",
                    p.display()
                ),
            );
        }
    }
    if let Some(n) = d.transient_size {
        if !(MIN_CONNTRACK_SIZE..=MAX_CONNTRACK_SIZE).contains(&n) {
            bad(
                "daemon.transient_size".into(),
                format!("{n} is outside {MIN_CONNTRACK_SIZE}..={MAX_CONNTRACK_SIZE}"),
            );
        }
    }
    if let Some(n) = d.closed_linger_s {
        if !(1..=300).contains(&n) {
            bad(
                "daemon.closed_linger_s".into(),
                format!("{n} is outside 1..=300 (seconds)"),
            );
        }
    }
    if let Some(n) = d.conntrack_size {
        if !(MIN_CONNTRACK_SIZE..=MAX_CONNTRACK_SIZE).contains(&n) {
            bad(
                "daemon.conntrack_size".into(),
                format!(
                    "{n} is outside {MIN_CONNTRACK_SIZE}..={MAX_CONNTRACK_SIZE} \
                     (each flow takes about 200 bytes of kernel memory, in two tables)"
                ),
            );
        }
    }
    if let Some(p) = &d.control_socket {
        // The daemon replaces a stale socket there: the path must be an
        // absolute file name of its own.
        if !p.is_absolute()
            || !plain(p)
            || p.file_name().is_none()
            || p.parent() == Some(Path::new("/"))
        {
            bad(
                "daemon.control_socket".into(),
                format!(
                    "{:?} must be an absolute path to a file in a directory (like {DEFAULT_CONTROL_SOCKET}), \
                     without . or ..",
                    p.display().to_string()
                ),
            );
        }
    }
    let metrics_listen = match d.metrics_listen.as_deref() {
        None => Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        Some("off") => None,
        Some(a) => match a.parse::<std::net::SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                bad(
                    "daemon.metrics_listen".into(),
                    format!("{a:?} is not an address:port (or \"off\")"),
                );
                None
            }
        },
    };
    DaemonConfig {
        interfaces: d.interfaces,
        hook: d.hook.or(d.xdp_mode.map(XdpMode::hook)).unwrap_or_default(),
        hooks: d.hooks,
        netns: d.netns,
        control_socket: d
            .control_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        manage_neighbours: d.manage_neighbours,
        pin_dir: d.pin_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
        maglev_seed: d.maglev_seed,
        metrics_listen,
        stateless_reverse_nat: d.stateless_reverse_nat,
        conntrack_size: d.conntrack_size.unwrap_or(lb_common::CONNTRACK_SIZE),
        transient_size: d.transient_size.unwrap_or(lb_common::TRANSIENT_SIZE),
        closed_linger: Duration::from_secs(
            d.closed_linger_s.unwrap_or(DEFAULT_CLOSED_LINGER_S) as u64
        ),
    }
}

/// Parses a list of CIDRs, reporting each bad or repeated one under `key[i]`.
/// Returns each good one with its position in the file (for later messages).
fn cidrs(list: &[String], key: &str, bad: &mut dyn FnMut(String, String)) -> Vec<(usize, Cidr)> {
    let mut out = Vec::with_capacity(list.len());
    let mut seen = HashSet::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        match Cidr::parse(text) {
            Ok(c) if !seen.insert(c) => bad(format!("{key}[{i}]"), format!("{c} is listed twice")),
            Ok(c) => out.push((i, c)),
            Err(e) => bad(format!("{key}[{i}]"), e.to_string()),
        }
    }
    out
}

/// The CIDR of `deny` (a set) that holds all of `c`, if any.
fn covered_by(c: &Cidr, deny: &HashSet<Cidr>) -> Option<Cidr> {
    (0..=c.len).find_map(|len| {
        let net = Cidr {
            addr: Ipv4Addr::from(u32::from(c.addr) & Cidr { addr: c.addr, len }.mask()),
            len,
        };
        deny.get(&net).copied()
    })
}

/// Checks `[firewall]` and fills in its defaults.
fn validate_firewall(
    f: &RawFirewall,
    services: &[ServiceConfig],
    bad: &mut dyn FnMut(String, String),
) -> FirewallConfig {
    let deny = cidrs(&f.deny, "firewall.deny", bad);
    if deny.len() > lb_common::firewall::MAX_DENY_RULES as usize {
        bad(
            "firewall.deny".into(),
            format!(
                "{} CIDRs, at most {} are supported",
                deny.len(),
                lb_common::firewall::MAX_DENY_RULES
            ),
        );
    }
    // (Too long a list is refused above; checking its coverage would only be slow.)
    let checked = if deny.len() > lb_common::firewall::MAX_DENY_RULES as usize {
        &deny[..0]
    } else {
        &deny[..]
    };
    for (i, c) in checked {
        // Replies and health-check answers come from the backends.
        let cut_off = services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
            .find(|(_, b)| c.contains(b.address));
        if let Some((s, b)) = cut_off {
            bad(
                format!("firewall.deny[{i}]"),
                format!(
                    "{c} covers backend {:?} of service {:?} ({}): its replies would be dropped",
                    b.name, s.name, b.address
                ),
            );
        }
    }
    let mut rate = |key: &str, per_sec: u32, burst: Option<u32>| -> u32 {
        // A rate above 1e9 would cost less than a nanosecond of credit.
        if per_sec > 1_000_000_000 {
            bad(
                format!("firewall.{key}_per_sec"),
                format!("{per_sec} is above 1000000000 (use 0 for no limit)"),
            );
        }
        match burst {
            Some(0) if per_sec > 0 => {
                bad(
                    format!("firewall.{key}_burst"),
                    "must be at least 1 (no flow could ever start)".into(),
                );
                0
            }
            Some(b) => b,
            // One second's worth.
            None => per_sec,
        }
    };
    let source_new_flows_burst = rate(
        "source_new_flows",
        f.source_new_flows_per_sec,
        f.source_new_flows_burst,
    );
    let new_flows_burst = rate("new_flows", f.new_flows_per_sec, f.new_flows_burst);
    FirewallConfig {
        deny: deny.into_iter().map(|(_, c)| c).collect(),
        closed_ports: f.closed_ports,
        icmp_echo_reply: f.icmp_echo_reply,
        source_new_flows_per_sec: f.source_new_flows_per_sec,
        source_new_flows_burst,
        new_flows_per_sec: f.new_flows_per_sec,
        new_flows_burst,
    }
}

/// Fills in a health check's defaults and checks its values; reports problems
/// under `key` and returns None if there were any.
fn validate_health(
    h: &RawHealth,
    protocol: Protocol,
    key: &str,
    bad: &mut dyn FnMut(String, String),
) -> Option<HealthCheck> {
    let mut ok = true;
    let mut fail = |k: &str, p: String| {
        bad(format!("{key}.{k}"), p);
        ok = false;
    };
    let kind = h.kind.unwrap_or(HealthKind::Tcp);
    let path = h.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        fail("path", format!("{path:?} must start with '/'"));
    } else if path.chars().any(|c| c.is_control() || c == ' ') {
        fail(
            "path",
            format!("{path:?} contains spaces or control characters (percent-encode them)"),
        );
    }
    if let Some(host) = &h.host {
        if host.is_empty() || host.chars().any(|c| c.is_control() || c.is_whitespace()) {
            fail(
                "host",
                format!("{host:?} is not a host name (empty, or spaces or control characters)"),
            );
        }
    }
    let expect_status = h.expect_status.unwrap_or(200);
    if !(100..=599).contains(&expect_status) {
        fail(
            "expect_status",
            format!("{expect_status} is not an HTTP status"),
        );
    }
    if kind == HealthKind::Tcp
        && (h.path.is_some() || h.expect_status.is_some() || h.host.is_some())
    {
        fail(
            "kind",
            "path, expect_status and host need kind = \"http\"".into(),
        );
    }
    if protocol == Protocol::Udp && h.port.is_none() {
        fail(
            "port",
            "a UDP service is checked over TCP: say which TCP port to probe".into(),
        );
    }
    if h.port == Some(0) {
        fail("port", "port 0 is not a valid port".into());
    }
    let interval_ms = h.interval_ms.unwrap_or(1000);
    let timeout_ms = h.timeout_ms.unwrap_or(500);
    if !(10..=3_600_000).contains(&interval_ms) {
        fail(
            "interval_ms",
            format!("{interval_ms} is outside 10..=3600000"),
        );
    }
    if timeout_ms == 0 || timeout_ms > interval_ms {
        fail(
            "timeout_ms",
            format!("{timeout_ms} must be at least 1 and at most interval_ms ({interval_ms})"),
        );
    }
    let rise = h.rise.unwrap_or(2);
    let fall = h.fall.unwrap_or(3);
    if rise > MAX_RISE_FALL {
        fail("rise", format!("{rise} is above {MAX_RISE_FALL}"));
    }
    if fall > MAX_RISE_FALL {
        fail("fall", format!("{fall} is above {MAX_RISE_FALL}"));
    }
    if rise == 0 {
        fail("rise", "must be at least 1".into());
    }
    if fall == 0 {
        fail("fall", "must be at least 1".into());
    }
    ok.then(|| HealthCheck {
        kind,
        path,
        expect_status,
        host: h.host.clone(),
        port: h.port,
        interval_ms,
        timeout_ms,
        rise,
        fall,
    })
}

/// Whether a network interface of that name exists in this network namespace.
pub fn interface_exists(name: &str) -> bool {
    if_index(name).is_some()
}

/// The interface's index, if it exists here.
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
interfaces = ["eth0", "eth1"]
xdp_mode = "auto"

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
scheduler = "round-robin"

[[service.backend]]
name = "web1"
address = "10.0.2.11"
port = 8080

[[service.backend]]
name = "web2"
address = "10.0.2.12"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("lb.toml"), text, &|n| n.starts_with("eth"))
    }

    fn problems(text: &str) -> String {
        parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.daemon.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.daemon.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        let s = &c.services[0];
        assert_eq!(
            (s.vip, s.port, s.protocol),
            ("10.0.0.100".parse().unwrap(), 80, Protocol::Tcp)
        );
        assert_eq!(s.backends[0].port, 8080);
        assert_eq!(
            s.backends[1].port, 80,
            "backend port defaults to the service's"
        );
        assert_eq!(s.backends[1].weight, 1);
    }

    #[test]
    fn hooks_are_chosen_per_interface_and_xdp_mode_still_reads() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.daemon.hook, Hook::Auto, "xdp_mode = \"auto\"");
        for (old, hook) in [("native", Hook::Xdp), ("generic", Hook::XdpGeneric)] {
            let c = parse(&GOOD.replace("xdp_mode = \"auto\"", &format!("xdp_mode = \"{old}\"")))
                .unwrap();
            assert_eq!(c.daemon.hook_for("eth0"), hook, "xdp_mode = {old:?}");
        }
        let c = parse(&GOOD.replace(
            "xdp_mode = \"auto\"",
            "hook = \"tc\"\nhooks = { eth1 = \"xdp\" }",
        ))
        .unwrap();
        assert_eq!(c.daemon.hook_for("eth0"), Hook::Tc);
        assert_eq!(c.daemon.hook_for("eth1"), Hook::Xdp);
        let e =
            problems(&GOOD.replace("xdp_mode = \"auto\"", "xdp_mode = \"auto\"\nhook = \"tc\""));
        assert!(
            e.contains("daemon.xdp_mode: is the older name of daemon.hook"),
            "{e}"
        );
        let e = problems(&GOOD.replace("xdp_mode = \"auto\"", "hooks = { eth7 = \"tc\" }"));
        assert!(
            e.contains("daemon.hooks.eth7: \"eth7\" is not one of daemon.interfaces"),
            "{e}"
        );
        let e = problems(&GOOD.replace("xdp_mode = \"auto\"", "hook = \"offload\""));
        assert!(e.contains("unknown variant `offload`"), "{e}");
    }

    #[test]
    fn malformed_toml_names_the_file_and_line() {
        let e = problems("[daemon\ninterfaces = []");
        assert!(e.starts_with("lb.toml: "), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = problems(&GOOD.replace("xdp_mode = \"auto\"", "xdp_mod = \"auto\""));
        assert!(e.contains("unknown field `xdp_mod`"), "{e}");
    }

    #[test]
    fn duplicate_vip_port_is_rejected() {
        let text = format!(
            "{GOOD}\n[[service]]\nname = \"web-b\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[service.backend]]\nname = \"x\"\naddress = \"10.0.2.13\"\n"
        );
        let e = problems(&text);
        assert!(
            e.contains("service[1].vip: duplicate VIP:port 10.0.0.100:80/tcp"),
            "{e}"
        );
    }

    #[test]
    fn invalid_address_is_named_with_its_key() {
        let e = problems(&GOOD.replace("10.0.2.12", "10.0.2.300"));
        assert!(
            e.contains("service[0].backend[1].address: invalid IPv4 address \"10.0.2.300\""),
            "{e}"
        );
        let e = problems(&GOOD.replace("10.0.0.100", "not-an-ip"));
        assert!(e.contains("service[0].vip: invalid IPv4 address"), "{e}");
    }

    #[test]
    fn service_without_backends_is_rejected() {
        let text = GOOD.split("[[service.backend]]").next().unwrap();
        let e = problems(text);
        assert!(
            e.contains("service[0].backend: service \"web\" has no backends"),
            "{e}"
        );
    }

    #[test]
    fn unknown_interface_is_rejected() {
        let e = problems(&GOOD.replace("\"eth1\"", "\"nosuch0\""));
        assert!(
            e.contains("daemon.interfaces[1]: unknown interface \"nosuch0\""),
            "{e}"
        );
    }

    #[test]
    fn weights_need_the_weighted_scheduler() {
        let e = problems(&GOOD.replace("port = 8080", "port = 8080\nweight = 3"));
        assert!(e.contains("service[0].backend[0].weight"), "{e}");
        let ok = GOOD
            .replace("port = 8080", "port = 8080\nweight = 3")
            .replace("\"round-robin\"", "\"weighted-round-robin\"");
        assert_eq!(parse(&ok).unwrap().services[0].backends[0].weight, 3);
    }

    #[test]
    fn health_defaults_and_per_backend_overrides() {
        let text = GOOD.replace(
            "scheduler = \"round-robin\"\n",
            "scheduler = \"round-robin\"\n\n[service.health]\nkind = \"http\"\npath = \"/ok\"\ninterval_ms = 200\ntimeout_ms = 100\n",
        ).replace(
            "port = 8080\n",
            "port = 8080\n\n[service.backend.health]\nkind = \"tcp\"\npath = \"/x\"\n",
        );
        // A tcp override that still carries an HTTP path is a mistake worth naming.
        let e = problems(&text);
        assert!(e.contains("service[0].backend[0].health.kind"), "{e}");

        let text = text.replace("path = \"/x\"\n", "fall = 5\n");
        let c = parse(&text).unwrap();
        let b0 = c.services[0].backends[0].health.clone().unwrap();
        let b1 = c.services[0].backends[1].health.clone().unwrap();
        assert_eq!(b0.kind, HealthKind::Tcp, "the backend's own kind wins");
        assert_eq!((b0.fall, b0.interval_ms, b0.port), (5, 200, None));
        assert_eq!(b1.kind, HealthKind::Http);
        assert_eq!(
            (b1.path.as_str(), b1.expect_status, b1.rise, b1.fall),
            ("/ok", 200, 2, 3)
        );
    }

    #[test]
    fn health_values_are_checked() {
        let text = GOOD.replace(
            "scheduler = \"round-robin\"\n",
            "scheduler = \"round-robin\"\n\n[service.health]\nkind = \"http\"\npath = \"ok\"\ninterval_ms = 100\ntimeout_ms = 500\nrise = 0\n",
        );
        let e = problems(&text);
        for k in ["health.path", "health.timeout_ms", "health.rise"] {
            assert!(e.contains(&format!("service[0].{k}")), "{k}: {e}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = problems(
            &GOOD
                .replace("10.0.2.12", "bad")
                .replace("\"eth1\"", "\"nosuch0\""),
        );
        assert!(
            e.contains("backend[1].address") && e.contains("interfaces[1]"),
            "{e}"
        );
    }

    #[test]
    fn firewall_defaults_when_absent() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.firewall, FirewallConfig::default());
        assert_eq!(c.firewall.closed_ports, ClosedPorts::Drop);
        assert!(c.firewall.icmp_echo_reply);
        assert_eq!(c.services[0].firewall, SourceRules::default());
    }

    #[test]
    fn firewall_rules_parse() {
        let text = GOOD.replace(
            "[[service]]",
            "[firewall]\ndeny = [\"192.0.2.0/24\", \"198.51.100.7\"]\nclosed_ports = \"pass\"\n\
             icmp_echo_reply = false\nsource_new_flows_per_sec = 50\nnew_flows_per_sec = 0\n\n[[service]]",
        ) + "\n[service.firewall]\nallow = [\"10.0.1.0/24\"]\ndeny = [\"10.0.1.66/32\"]\n";
        let c = parse(&text).unwrap();
        let f = &c.firewall;
        assert_eq!(
            f.deny,
            [
                Cidr::parse("192.0.2.0/24").unwrap(),
                Cidr {
                    addr: "198.51.100.7".parse().unwrap(),
                    len: 32
                }
            ]
        );
        assert_eq!(f.closed_ports, ClosedPorts::Pass);
        assert!(!f.icmp_echo_reply);
        assert_eq!(
            (f.source_new_flows_per_sec, f.source_new_flows_burst),
            (50, 50)
        );
        assert_eq!(f.new_flows_per_sec, 0);
        let r = &c.services[0].firewall;
        assert_eq!(r.allow, [Cidr::parse("10.0.1.0/24").unwrap()]);
        assert_eq!(r.deny, [Cidr::parse("10.0.1.66/32").unwrap()]);
    }

    #[test]
    fn firewall_mistakes_are_named() {
        let with_fw =
            |fw: &str| GOOD.replace("[[service]]", &format!("[firewall]\n{fw}\n\n[[service]]"));
        for (fw, key, what) in [
            (
                "deny = [\"10.0.0.0/33\"]",
                "firewall.deny[0]",
                "prefix length",
            ),
            (
                "deny = [\"10.0.1.5/24\"]",
                "firewall.deny[0]",
                "host bits set (the network is 10.0.1.0/24)",
            ),
            (
                "deny = [\"ten\"]",
                "firewall.deny[0]",
                "not an IPv4 address or CIDR",
            ),
            (
                "deny = [\"1.2.3.4\", \"1.2.3.4/32\"]",
                "firewall.deny[1]",
                "listed twice",
            ),
            (
                "deny = [\"10.0.2.0/24\"]",
                "firewall.deny[0]",
                "covers backend \"web1\"",
            ),
            (
                "source_new_flows_burst = 0",
                "firewall.source_new_flows_burst",
                "at least 1",
            ),
            (
                "new_flows_per_sec = 2000000000",
                "firewall.new_flows_per_sec",
                "above 1000000000",
            ),
        ] {
            let e = problems(&with_fw(fw));
            assert!(e.contains(key) && e.contains(what), "{fw}: {e}");
        }
        let e = problems(&with_fw("closed_ports = \"reject\""));
        assert!(e.contains("unknown variant `reject`"), "{e}");
        let e = problems(&with_fw("colour = 1"));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = problems(
            &(GOOD.to_owned()
                + "\n[service.firewall]\nallow = [\"10.0.1.0/24\"]\ndeny = [\"10.0.1.0/24\"]\n"),
        );
        assert!(
            e.contains("service[0].firewall.deny[0]") && e.contains("also allowed"),
            "{e}"
        );
    }

    #[test]
    fn cidrs_contain_what_they_should() {
        let c = Cidr::parse("10.0.1.64/26").unwrap();
        assert!(c.contains("10.0.1.64".parse().unwrap()));
        assert!(c.contains("10.0.1.127".parse().unwrap()));
        assert!(!c.contains("10.0.1.128".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("255.255.255.255".parse().unwrap()));
        assert_eq!(all.to_string(), "0.0.0.0/0");
    }

    #[test]
    fn hostile_values_are_refused() {
        let svc_line = |from: &str, to: &str| GOOD.replacen(from, to, 1);
        for (text, key, what) in [
            (
                svc_line("xdp_mode = \"auto\"", "control_socket = \"lb.sock\""),
                "daemon.control_socket",
                "absolute path",
            ),
            (
                svc_line("xdp_mode = \"auto\"", "control_socket = \"/\""),
                "daemon.control_socket",
                "absolute path",
            ),
            (
                svc_line(
                    "xdp_mode = \"auto\"",
                    "pin_dir = \"/sys/fs/bpf/../../../tmp/x\"",
                ),
                "daemon.pin_dir",
                "without . or ..",
            ),
            (
                svc_line("xdp_mode = \"auto\"", "pin_dir = \"/sys/fs/bpf\""),
                "daemon.pin_dir",
                "a directory of its own",
            ),
            (
                svc_line("10.0.0.100", "127.0.0.1"),
                "service[0].vip",
                "cannot be a service address",
            ),
            (
                svc_line("10.0.2.11", "127.0.0.2"),
                "backend[0].address",
                "cannot be a backend address",
            ),
            (
                svc_line("10.0.2.11", "10.0.0.100"),
                "backend[0].address",
                "the service's own VIP",
            ),
            (
                svc_line("name = \"web\"", "name = \"we\\nb\""),
                "service[0].name",
                "control characters",
            ),
            (
                svc_line("name = \"web1\"", &format!("name = \"{}\"", "x".repeat(65))),
                "backend[0].name",
                "longer than 64",
            ),
        ] {
            let e = problems(&text);
            assert!(e.contains(key) && e.contains(what), "{key}: {e}");
        }
        let health =
            |kv: &str| GOOD.to_owned() + &format!("\n[service.health]\nkind = \"http\"\n{kv}\n");
        for (kv, key) in [
            ("host = \"a\\r\\nX-Evil: 1\"", "health.host"),
            ("host = \"\"", "health.host"),
            ("path = \"/a b\"", "health.path"),
            ("rise = 4294967295", "health.rise"),
            ("fall = 1001", "health.fall"),
        ] {
            let e = problems(&health(kv));
            assert!(e.contains(key), "{kv}: {e}");
        }
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("lb-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (path, what) in [
            (Path::new("/dev/zero"), "not a regular file"),
            (dir.as_path(), "not a regular file"),
        ] {
            let e = read_small_file(path, 100).unwrap_err().to_string();
            assert!(e.contains(what), "{}: {e}", path.display());
        }
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 101]).unwrap();
        assert!(matches!(
            read_small_file(&big, 100),
            Err(ReadError::TooBig {
                size: 101,
                max: 100
            })
        ));
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_small_file(&fifo, 100),
            Err(ReadError::NotAFile)
        ));
        let e = Config::load(&dir.join("nonexistent.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e.matches("No such file").count(),
            1,
            "the OS error is said once: {e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn firewall_messages_name_the_position_in_the_file() {
        let text = GOOD.replace(
            "[[service]]",
            "[firewall]\ndeny = [\"192.0.2.0/24\", \"192.0.2.0/24\", \"10.0.2.0/24\"]\n\n[[service]]",
        ) + "\n[service.firewall]\nallow = [\"10.0.1.0/24\"]\n\
              deny = [\"10.0.1.64/26\", \"10.0.1.64/26\", \"10.0.1.0/24\"]\n";
        let e = problems(&text);
        assert!(
            e.contains("firewall.deny[2]: 10.0.2.0/24 covers backend"),
            "{e}"
        );
        assert!(
            e.contains("service[0].firewall.deny[2]: 10.0.1.0/24 is also allowed"),
            "{e}"
        );
        assert!(
            e.contains("service[0].firewall.deny[1]: 10.0.1.64/26 is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn an_allow_rule_the_global_deny_list_swallows_is_refused() {
        let text = GOOD.replace(
            "[[service]]",
            "[firewall]\ndeny = [\"10.0.0.0/16\"]\n\n[[service]]",
        ) + "\n[service.firewall]\nallow = [\"10.9.0.0/16\", \"10.0.1.0/24\"]\n";
        let e = problems(&text);
        assert!(
            e.contains("service[0].firewall.allow[1]: 10.0.1.0/24 is inside 10.0.0.0/16"),
            "{e}"
        );
        for typo in ["192.0.2.0/+24", "192.0.2.0/024", "192.0.2.0/ 24"] {
            assert!(Cidr::parse(typo).is_err(), "{typo}");
        }
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().len, 0);
    }

    #[test]
    fn the_connection_table_size_is_bounded() {
        let with =
            |n: u64| GOOD.replacen("xdp_mode = \"auto\"", &format!("conntrack_size = {n}"), 1);
        assert_eq!(
            parse(GOOD).unwrap().daemon.conntrack_size,
            lb_common::CONNTRACK_SIZE
        );
        assert_eq!(
            parse(&with(1_000_000)).unwrap().daemon.conntrack_size,
            1_000_000
        );
        for n in [0, 1023, (16 << 20) + 1] {
            let e = problems(&with(n));
            assert!(
                e.contains("daemon.conntrack_size") && e.contains("outside"),
                "{e}"
            );
        }
    }
}
