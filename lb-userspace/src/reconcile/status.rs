//! What `lb status --json`, `/status.json`, the status page and the metrics
//! read: typed here, serialized once, deserialized where it crosses the
//! control socket. `docs/status.md` describes every field; the keys and their
//! shape are an interface (scripts and the page read them by name).

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{backends, weight, Admin, BackendObservations, Balancer, Result};
use crate::{
    config::{DownPolicy, HealthKind, Protocol, SchedulerKind, SteeringKind},
    dataplane::TrafficStatus,
    health::CheckResult,
    mysql::{Observation, Roles},
};

/// How often the status page's graphs are sampled, and how far back they go.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const HISTORY_SPAN: Duration = Duration::from_secs(15 * 60);
/// Up to this many backends the graphs have a line per backend, beyond it
/// one per service.
const GRAPHED_BACKENDS: usize = 32;

/// The share of the connection table (percent) from which its fill is a
/// pressure: counted, logged, shown.
pub const PRESSURE_PERCENT: u64 = 90;

/// Everything `lb status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The config file the daemon runs (and reloads).
    pub config_file: PathBuf,
    /// Whether the pinned data path outlives the daemon.
    pub state: PinnedState,
    /// The interfaces the data path runs on.
    pub attachments: Vec<Attachment>,
    pub services: Vec<ServiceStatus>,
    /// The data path's counters by name (`lb_common::counter::TABLE`).
    pub counters: BTreeMap<String, u64>,
    /// The status page's graphs.
    pub history: History,
    /// The connection table.
    pub conntrack: FlowTable,
    /// Reloads since the daemon started (SIGHUP or `lb reload`).
    pub reloads: Reloads,
}

/// How many reloads were applied and how many refused (the running
/// configuration stayed): a script that changed the file waits for one of
/// them to move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloads {
    pub applied: u64,
    pub rejected: u64,
}

/// Whether what is pinned outlives this daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedState {
    /// None when it could not be told.
    pub survives_restart: Option<bool>,
    pub why: String,
}

/// An interface the data path runs on, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    /// `xdp` (native), `xdp-generic` or `tc`.
    pub hook: String,
    /// The older name of the same (`native`, `generic` or `tc`).
    pub mode: String,
    /// Why this hook.
    pub reason: String,
    /// Taken over from an earlier daemon.
    pub adopted: bool,
}

/// A service and its backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: SchedulerKind,
    pub on_backend_down: DownPolicy,
    pub steering: SteeringKind,
    /// MySQL-steered services only.
    pub mysql: Option<ServiceMysql>,
    pub traffic: TrafficStatus,
    /// In ring order.
    pub backends: Vec<BackendStatus>,
}

/// A steered service's MySQL roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMysql {
    /// The backend that takes writes.
    pub primary: Option<String>,
    /// An ambiguous or bad state an operator must see.
    pub alarm: Option<String>,
}

/// A backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    /// Its flows in the connection table that have not closed and are not idle.
    pub active_flows: u64,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Set at run time, else the file's.
    pub weight: u32,
    pub state: BackendState,
    pub admin: Admin,
    /// Backends with health checks only.
    pub health: Option<HealthStatus>,
    /// Backends of MySQL-steered services, once observed.
    pub mysql: Option<BackendMysql>,
    pub traffic: TrafficStatus,
    /// Added through the control socket, not from the file.
    pub added_at_runtime: bool,
}

/// A backend's state as `lb status` shows it: the operator's mark first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
    Disabled,
}

impl BackendState {
    pub const ALL: [BackendState; 4] = [
        BackendState::Up,
        BackendState::Down,
        BackendState::Draining,
        BackendState::Disabled,
    ];

    /// What was seen of a backend, as one state.
    pub fn of(b: &BackendObservations) -> BackendState {
        match (b.admin, b.health.up) {
            (Admin::Disabled, _) => BackendState::Disabled,
            (Admin::Draining, _) => BackendState::Draining,
            (Admin::Enabled, false) => BackendState::Down,
            (Admin::Enabled, true) => BackendState::Up,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }
}

/// A backend's health checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    pub kind: HealthKind,
    pub up: bool,
    /// Checks in a row against the current state.
    pub streak: u32,
    pub rise: u32,
    pub fall: u32,
    pub last: Option<CheckResult>,
    /// The last checks, oldest first.
    pub history: Vec<CheckResult>,
}

/// A MySQL server's role and the latest look at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendMysql {
    pub role: MysqlRole,
    pub observation: Observation,
}

/// A server's role as `lb status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MysqlRole {
    Primary,
    Replica,
    Writable,
    ReadOnly,
    Unreachable,
}

impl MysqlRole {
    pub const ALL: [MysqlRole; 5] = [
        MysqlRole::Primary,
        MysqlRole::Replica,
        MysqlRole::Writable,
        MysqlRole::ReadOnly,
        MysqlRole::Unreachable,
    ];

    /// The role of server `name` given the service's roles and its latest look.
    pub fn of(roles: &Roles, name: &str, o: &Observation) -> MysqlRole {
        if roles.primary.as_deref() == Some(name) {
            MysqlRole::Primary
        } else if !o.reachable {
            MysqlRole::Unreachable
        } else if o.replicating {
            MysqlRole::Replica
        } else if !o.read_only {
            MysqlRole::Writable
        } else {
            MysqlRole::ReadOnly
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MysqlRole::Primary => "primary",
            MysqlRole::Replica => "replica",
            MysqlRole::Writable => "writable",
            MysqlRole::ReadOnly => "read-only",
            MysqlRole::Unreachable => "unreachable",
        }
    }
}

/// The status page's graphs: samples of cumulative counters (the page draws
/// rates between them) and the changes of state among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Seconds between samples.
    pub every_s: u64,
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
}

/// One sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Wall-clock milliseconds since the Unix epoch.
    pub t: u64,
    /// (`service/backend`, or `service` when backends are many; new flows;
    /// packets both ways).
    pub backends: Vec<(String, u64, u64)>,
    /// Packets by what the data path did: forward, pass, drop, answer.
    pub actions: BTreeMap<String, u64>,
}

/// A change of state (a backend going up or down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub t: u64,
    /// `service/backend up` or `service/backend down`.
    pub what: String,
}

/// The connection table's fill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTable {
    /// Established flows in it.
    pub entries: u64,
    pub capacity: u64,
    pub pressure: Pressure,
    /// Times it filled past `PRESSURE_PERCENT`.
    pub pressure_events: u64,
}

/// The connection table's fill, in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pressure {
    Ok,
    /// Past `PRESSURE_PERCENT`.
    High,
    /// Established flows are being evicted.
    Full,
}

impl Pressure {
    pub fn name(self) -> &'static str {
        match self {
            Pressure::Ok => "ok",
            Pressure::High => "high",
            Pressure::Full => "full",
        }
    }
}

impl Status {
    /// The JSON the control socket carries.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the status has string keys only")
    }
}

impl Balancer {
    /// Everything `lb status` shows. O(backends): the flow counts are the
    /// data path's (flows entering and leaving the connection table).
    pub fn status(&mut self) -> Result<Status> {
        let active = self.dp.active_flows()?;
        let established: u64 = active.values().sum();
        let capacity = self.file.daemon.conntrack_size as u64;
        let pressure = self.pressure(established, capacity);
        let mut services = Vec::new();
        for s in &self.file.services {
            let o = self.obs.service(&s.name);
            let mut list = Vec::new();
            for b in backends(s, o) {
                let bo = o.backend(&b.name);
                let key = (s.name.clone(), b.name.clone());
                list.push(BackendStatus {
                    name: b.name.clone(),
                    active_flows: active.get(&key).copied().unwrap_or(0),
                    address: b.address,
                    port: b.port,
                    weight: weight(b, bo),
                    state: BackendState::of(bo),
                    admin: bo.admin,
                    health: b.health.as_ref().map(|h| HealthStatus {
                        kind: h.kind,
                        up: bo.health.up,
                        streak: bo.health.streak,
                        rise: h.rise,
                        fall: h.fall,
                        last: bo.health.last.clone(),
                        history: bo.history.iter().cloned().collect(),
                    }),
                    mysql: bo.mysql.as_ref().map(|m| BackendMysql {
                        role: MysqlRole::of(&o.roles, &b.name, m),
                        observation: m.clone(),
                    }),
                    traffic: self.dp.backend_traffic(&s.name, &b.name)?.into(),
                    added_at_runtime: o.added.iter().any(|a| a.name == b.name),
                });
            }
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                scheduler: s.scheduler.kind(),
                on_backend_down: s.on_backend_down,
                steering: s.steering.kind(),
                mysql: s.steering.mysql().map(|_| ServiceMysql {
                    primary: o.roles.primary.clone(),
                    alarm: o.roles.alarm.clone(),
                }),
                traffic: self.dp.service_traffic(&s.name)?.into(),
                backends: list,
            });
        }
        let counters = self
            .dp
            .counters()?
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let kept = crate::dataplane::persistence(&self.file.daemon.pin_dir);
        Ok(Status {
            config_file: self.file.file.clone(),
            state: PinnedState {
                survives_restart: kept.survives_restart,
                why: kept.why,
            },
            attachments: self
                .dp
                .attachments()
                .into_iter()
                .map(|a| Attachment {
                    interface: a.interface,
                    hook: a.hook.to_owned(),
                    mode: a.mode.to_owned(),
                    reason: a.reason,
                    adopted: a.adopted,
                })
                .collect(),
            services,
            counters,
            history: History {
                every_s: SAMPLE_EVERY.as_secs(),
                samples: self.samples.iter().cloned().collect(),
                events: self.events.iter().cloned().collect(),
            },
            conntrack: FlowTable {
                entries: established,
                capacity,
                pressure,
                pressure_events: self.pressure_events,
            },
            reloads: self.reloads,
        })
    }

    /// Takes note of the flow table's fill: crossing [`PRESSURE_PERCENT`] of
    /// its capacity is counted and logged (at most once a minute), before
    /// established flows are evicted at 100%.
    fn pressure(&mut self, established: u64, capacity: u64) -> Pressure {
        let high = established * 100 >= capacity * PRESSURE_PERCENT;
        if high && !self.pressured {
            self.pressure_events += 1;
            let quiet = self
                .pressure_logged
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if quiet {
                self.pressure_logged = Some(Instant::now());
                tracing::warn!(
                    established,
                    capacity,
                    "the connection table is {}% full: at 100% established flows are evicted \
                     (raise [daemon] conntrack_size)",
                    established * 100 / capacity.max(1)
                );
            }
        }
        self.pressured = high;
        if established >= capacity {
            Pressure::Full
        } else if high {
            Pressure::High
        } else {
            Pressure::Ok
        }
    }

    /// Takes one sample of the counters the status page graphs: per backend
    /// its new flows and packets, and packets by action (cumulative; the page
    /// draws the rates between samples). O(backends).
    pub fn sample(&mut self) {
        // Per backend while they are few, else per service: 15 minutes of
        // samples stay a small answer whatever the size of the config.
        let total: usize = self
            .file
            .services
            .iter()
            .map(|s| backends(s, self.obs.service(&s.name)).count())
            .sum();
        let mut lines = Vec::new();
        for s in &self.file.services {
            if total > GRAPHED_BACKENDS {
                if let Ok(t) = self.dp.service_traffic(&s.name) {
                    lines.push((s.name.clone(), t.new_flows, t.packets + t.reply_packets));
                }
                continue;
            }
            for b in backends(s, self.obs.service(&s.name)) {
                if let Ok(t) = self.dp.backend_traffic(&s.name, &b.name) {
                    lines.push((
                        format!("{}/{}", s.name, b.name),
                        t.new_flows,
                        t.packets + t.reply_packets,
                    ));
                }
            }
        }
        let mut actions: BTreeMap<String, u64> = BTreeMap::new();
        if let Ok(c) = self.dp.counters() {
            for (name, v) in c {
                use lb_common::counter::{by_name, Action, Kind};
                let Some(Kind::Outcome { action, .. }) = by_name(name).map(|d| d.kind) else {
                    continue;
                };
                // The page groups what the data path answered itself.
                let action = match action {
                    Action::Reset | Action::Reply => "answer",
                    a => a.name(),
                };
                *actions.entry(action.to_owned()).or_default() += v;
            }
        }
        push_bounded(
            &mut self.samples,
            Sample {
                t: unix_ms(),
                backends: lines,
                actions,
            },
        );
        let horizon = unix_ms().saturating_sub(HISTORY_SPAN.as_millis() as u64);
        while self.events.front().is_some_and(|e| e.t < horizon) {
            self.events.pop_front();
        }
    }
}

/// Appends to a history, keeping 15 minutes' worth of samples.
pub(super) fn push_bounded<T>(q: &mut VecDeque<T>, v: T) {
    let keep = (HISTORY_SPAN.as_secs() / SAMPLE_EVERY.as_secs() + 1) as usize;
    while q.len() >= keep {
        q.pop_front();
    }
    q.push_back(v);
}

/// Wall-clock milliseconds (the page shows times of day).
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `lb census`: one walk of the connection table (see
/// `Dataplane::census`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CensusStatus {
    /// Entries in the table (open, closing and idle flows until evicted).
    pub entries: u64,
    pub capacity: u64,
    /// Per backend with flows seen lately, ordered by service and backend.
    pub backends: Vec<RecentFlows>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentFlows {
    pub service: String,
    pub backend: String,
    /// Flows not closed that saw a packet within their idle time.
    pub recent_flows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON keys scripts, e2e tests and the status page read, by name.
    #[test]
    fn the_status_serializes_with_the_documented_keys() {
        let obs = Observation {
            reachable: true,
            read_only: true,
            replicating: true,
            io_running: Some("Yes".into()),
            sql_running: Some("Yes".into()),
            lag_s: Some(0),
            source: None,
            error: None,
            latency_us: 1,
            at_unix_ms: 2,
        };
        let check = CheckResult {
            ok: true,
            latency_us: 3,
            detail: "HTTP 200".into(),
            at_unix_ms: 4,
        };
        let status = Status {
            config_file: "/etc/lb.toml".into(),
            state: PinnedState {
                survives_restart: None,
                why: "why".into(),
            },
            attachments: vec![Attachment {
                interface: "eth0".into(),
                hook: "xdp".into(),
                mode: "native".into(),
                reason: "asked".into(),
                adopted: false,
            }],
            services: vec![ServiceStatus {
                name: "db".into(),
                vip: Ipv4Addr::new(10, 0, 0, 1),
                port: 3306,
                protocol: Protocol::Tcp,
                scheduler: SchedulerKind::WeightedRoundRobin,
                on_backend_down: DownPolicy::DropFlows,
                steering: SteeringKind::MysqlReplica,
                mysql: Some(ServiceMysql {
                    primary: Some("db1".into()),
                    alarm: None,
                }),
                traffic: TrafficStatus::default(),
                backends: vec![BackendStatus {
                    name: "db2".into(),
                    active_flows: 5,
                    address: Ipv4Addr::new(10, 0, 1, 2),
                    port: 3306,
                    weight: 2,
                    state: BackendState::Draining,
                    admin: Admin::Draining,
                    health: Some(HealthStatus {
                        kind: HealthKind::Tcp,
                        up: true,
                        streak: 0,
                        rise: 2,
                        fall: 3,
                        last: Some(check.clone()),
                        history: vec![check],
                    }),
                    mysql: Some(BackendMysql {
                        role: MysqlRole::ReadOnly,
                        observation: obs,
                    }),
                    traffic: TrafficStatus::default(),
                    added_at_runtime: true,
                }],
            }],
            counters: [("forwarded".to_owned(), 7)].into(),
            history: History {
                every_s: 5,
                samples: vec![Sample {
                    t: 1,
                    backends: vec![("db/db2".into(), 1, 2)],
                    actions: [("answer".to_owned(), 3)].into(),
                }],
                events: vec![Event {
                    t: 1,
                    what: "db/db2 down".into(),
                }],
            },
            conntrack: FlowTable {
                entries: 1,
                capacity: 2,
                pressure: Pressure::High,
                pressure_events: 1,
            },
            reloads: Reloads {
                applied: 2,
                rejected: 1,
            },
        };
        let v = status.to_json();
        let b = &v["services"][0]["backends"][0];
        assert_eq!(v["state"]["survives_restart"], serde_json::Value::Null);
        assert_eq!(v["conntrack"]["pressure"], "high");
        assert_eq!(v["history"]["samples"][0]["backends"][0][0], "db/db2");
        assert_eq!(v["history"]["samples"][0]["actions"]["answer"], 3);
        assert_eq!(v["services"][0]["scheduler"], "weighted-round-robin");
        assert_eq!(v["services"][0]["steering"], "mysql-replica");
        assert_eq!(v["services"][0]["on_backend_down"], "drop-flows");
        assert_eq!(v["services"][0]["vip"], "10.0.0.1");
        assert_eq!(b["state"], "draining");
        assert_eq!(b["admin"], "draining");
        assert_eq!(b["health"]["kind"], "tcp");
        assert_eq!(b["health"]["last"]["detail"], "HTTP 200");
        assert_eq!(b["mysql"]["role"], "read-only");
        assert_eq!(b["mysql"]["observation"]["lag_s"], 0);
        assert_eq!(b["traffic"]["new_flows"], 0);
        assert_eq!(b["added_at_runtime"], true);
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&v),
            [
                "attachments",
                "config_file",
                "conntrack",
                "counters",
                "history",
                "reloads",
                "services",
                "state"
            ]
        );
        assert_eq!(
            keys(b),
            [
                "active_flows",
                "added_at_runtime",
                "address",
                "admin",
                "health",
                "mysql",
                "name",
                "port",
                "state",
                "traffic",
                "weight"
            ]
        );
        let back: Status = serde_json::from_value(v).expect("the status reads back");
        assert_eq!(back, status);
    }
}
