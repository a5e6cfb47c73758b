//! The TOML configuration: parsing and whole-file validation, no side effects.
//!
//! Nothing is applied until the whole file validates; every problem names the
//! file, the key (`service[1].backend[0].address`) and what was wrong.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Where `lb` listens for `lb status` and friends when the config does not say.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lb.sock";

/// One problem in a config file: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// XDP attachment mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic if the driver lacks XDP.
    #[default]
    Auto,
    /// Native mode only: fail if the driver cannot run XDP.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Each backend in turn, one new flow each.
    #[default]
    RoundRobin,
    /// Each backend in turn, `weight` new flows each, interleaved.
    WeightedRoundRobin,
}

/// The file as written (before validation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: RawDaemon,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    interfaces: Vec<String>,
    #[serde(default)]
    xdp_mode: XdpMode,
    control_socket: Option<PathBuf>,
    #[serde(default = "yes")]
    manage_neighbours: bool,
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
    scheduler: Scheduler,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    address: String,
    port: Option<u16>,
    weight: Option<u32>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub file: PathBuf,
    pub daemon: DaemonConfig,
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// XDP attaches to each of these.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub control_socket: PathBuf,
    /// Keep a kernel-managed neighbour entry for each backend's next hop, so
    /// the data path always finds its MAC (`ip neigh ... managed`).
    pub manage_neighbours: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
}

impl Config {
    /// Reads and validates `file`; checks that the interfaces exist here.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
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

        if raw.daemon.interfaces.is_empty() {
            bad(
                "daemon.interfaces".into(),
                "needs at least one interface to attach to".into(),
            );
        }
        let mut seen_if = HashSet::new();
        for (i, name) in raw.daemon.interfaces.iter().enumerate() {
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
        let mut names = HashMap::new();
        let mut endpoints = HashMap::new();
        let mut services = Vec::new();
        let mut total_backends = 0;
        for (si, s) in raw.services.iter().enumerate() {
            let key = format!("service[{si}]");
            if s.name.is_empty() {
                bad(format!("{key}.name"), "must not be empty".into());
            } else if let Some(prev) = names.insert(&s.name, si) {
                bad(
                    format!("{key}.name"),
                    format!("duplicate service name {:?} (also service[{prev}])", s.name),
                );
            }
            let vip = match s.vip.parse::<Ipv4Addr>() {
                Ok(v) if v.is_unspecified() || v.is_multicast() || v.is_broadcast() => {
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
                if let Some(prev) = endpoints.insert((vip, s.port, s.protocol), si) {
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
            let mut bnames = HashSet::new();
            let mut backends = Vec::new();
            for (bi, b) in s.backends.iter().enumerate() {
                let bkey = format!("{key}.backend[{bi}]");
                if b.name.is_empty() {
                    bad(format!("{bkey}.name"), "must not be empty".into());
                } else if !bnames.insert(&b.name) {
                    bad(
                        format!("{bkey}.name"),
                        format!("duplicate backend name {:?} in this service", b.name),
                    );
                }
                let address = match b.address.parse::<Ipv4Addr>() {
                    Ok(a) if a.is_unspecified() || a.is_multicast() || a.is_broadcast() => {
                        bad(
                            format!("{bkey}.address"),
                            format!("{a} cannot be a backend address"),
                        );
                        None
                    }
                    Ok(a) => Some(a),
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
                let weight = match (s.scheduler, b.weight) {
                    (Scheduler::RoundRobin, Some(_)) => {
                        bad(
                            format!("{bkey}.weight"),
                            "weights need scheduler = \"weighted-round-robin\"".into(),
                        );
                        1
                    }
                    (_, w) => w.unwrap_or(1),
                };
                if weight > lb_common::RING_SIZE {
                    bad(
                        format!("{bkey}.weight"),
                        format!("weight {weight} is above {}", lb_common::RING_SIZE),
                    );
                }
                if let Some(address) = address {
                    backends.push(BackendConfig {
                        name: b.name.clone(),
                        address,
                        port,
                        weight,
                    });
                }
            }
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            if !backends.is_empty() && lb_common::ring::ring_len(&weights) == 0 {
                bad(
                    format!("{key}.backend"),
                    "every backend has weight 0: the service could take no flow".into(),
                );
            }
            if lb_common::ring::ring_len(&weights) > lb_common::RING_SIZE as u64 {
                bad(
                    format!("{key}.backend"),
                    format!(
                        "the weights need {} ring slots (sum of weights over their common \
                         divisor), at most {} fit",
                        lb_common::ring::ring_len(&weights),
                        lb_common::RING_SIZE
                    ),
                );
            }
            total_backends += s.backends.len();
            if let Some(vip) = vip {
                services.push(ServiceConfig {
                    name: s.name.clone(),
                    vip,
                    port: s.port,
                    protocol: s.protocol,
                    scheduler: s.scheduler,
                    backends,
                });
            }
        }
        if total_backends > lb_common::MAX_BACKENDS as usize {
            bad(
                "service".into(),
                format!(
                    "{total_backends} backends in all, at most {} are supported",
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
            daemon: DaemonConfig {
                interfaces: raw.daemon.interfaces,
                xdp_mode: raw.daemon.xdp_mode,
                control_socket: raw
                    .daemon
                    .control_socket
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
                manage_neighbours: raw.daemon.manage_neighbours,
            },
            services,
        })
    }
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
}
