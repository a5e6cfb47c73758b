//! The planner: what the maps should hold, worked out from the config and
//! what was observed since (health, operators' marks, MySQL roles). Pure: no
//! kernel, no clock, no I/O, so every rule is unit-tested here; the
//! [`Balancer`](super::Balancer) keeps the observations and writes the result.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    config::{
        BackendConfig, Config, DownPolicy, OnDemotion, Protocol, Scheduler, ServiceConfig, Steering,
    },
    dataplane::{BackendSpec, ServiceSpec},
    health::{CheckResult, Health},
    mysql::{self, Observation, Roles},
};

/// What an operator said about a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Takes new flows when healthy.
    #[default]
    Enabled,
    /// Takes no new flows; its established flows continue until they end.
    Draining,
    /// Out of service: no new flows (established ones are not cut).
    Disabled,
}

/// Everything seen or said since the config was loaded, per service by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    pub services: BTreeMap<String, ServiceObservations>,
}

/// What was seen or said about one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceObservations {
    /// MySQL roles (steered services), as [`roles`] last decided them.
    pub roles: Roles,
    /// Backends added through the control socket, in the order they came:
    /// after the file's in the ring. Gone at the next reload.
    pub added: Vec<BackendConfig>,
    /// The file's backends removed through the control socket, until the
    /// next reload.
    pub removed: BTreeSet<String>,
    /// Per backend name.
    pub backends: BTreeMap<String, BackendObservations>,
}

/// What was seen or said about one backend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendObservations {
    pub health: Health,
    pub admin: Admin,
    /// A weight set through the control socket (instead of the file's),
    /// until the next reload.
    pub weight: Option<u32>,
    /// The latest MySQL observation (steered services).
    pub mysql: Option<Observation>,
    /// It was this service's primary and lost the role: its connections are
    /// reset (under `on_demotion = "reset"`) until it is primary again.
    pub demoted: bool,
    /// The last health checks, oldest first: for the status page only.
    pub history: VecDeque<CheckResult>,
}

/// A service nothing was observed about yet.
static NOTHING_SEEN: ServiceObservations = ServiceObservations {
    roles: Roles {
        primary: None,
        alarm: None,
    },
    added: Vec::new(),
    removed: BTreeSet::new(),
    backends: BTreeMap::new(),
};

/// A backend nothing was observed about yet: enabled, taken to be up.
static UNSEEN: BackendObservations = BackendObservations {
    health: Health::UNCHECKED,
    admin: Admin::Enabled,
    weight: None,
    mysql: None,
    demoted: false,
    history: VecDeque::new(),
};

impl Observations {
    /// What was seen of `service` (nothing yet: an empty record).
    pub fn service(&self, service: &str) -> &ServiceObservations {
        self.services.get(service).unwrap_or(&NOTHING_SEEN)
    }

    /// The record of `backend` of `service`, to update with what was just
    /// seen of it; None if neither is known.
    pub fn backend_mut(
        &mut self,
        service: &str,
        backend: &str,
    ) -> Option<&mut BackendObservations> {
        self.services.get_mut(service)?.backends.get_mut(backend)
    }
}

impl ServiceObservations {
    /// What was seen of `backend` (nothing yet: enabled and up).
    pub fn backend(&self, backend: &str) -> &BackendObservations {
        self.backends.get(backend).unwrap_or(&UNSEEN)
    }
}

/// The backends of `s` as they run, in ring order: the file's, less those
/// removed at run time, then those added at run time.
pub fn backends<'a>(
    s: &'a ServiceConfig,
    o: &'a ServiceObservations,
) -> impl Iterator<Item = &'a BackendConfig> + Clone {
    s.backends
        .iter()
        .filter(|b| !o.removed.contains(&b.name))
        .chain(&o.added)
}

/// A backend's weight: the one set at run time, else the file's.
pub fn weight(b: &BackendConfig, o: &BackendObservations) -> u32 {
    o.weight.unwrap_or(b.weight)
}

/// Ring slots (or Maglev weight) of a backend that takes new flows: round
/// robin gives every backend one, the weighted schedulers its weight.
pub fn ring_weight(scheduler: Scheduler, weight: u32) -> u32 {
    match scheduler {
        Scheduler::RoundRobin => 1,
        Scheduler::WeightedRoundRobin | Scheduler::Maglev { .. } => weight,
    }
}

/// Why a backend takes no new flows of its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    Disabled,
    Draining,
    /// Its health checks say down.
    Down,
    ZeroWeight,
    /// A write service's backend other than the primary.
    NotPrimary,
    /// A read service's backend that is not a fit replica, while one is (or,
    /// with none fit, that is not the primary reads fall back to).
    NotReadable,
}

/// Whether a backend of this kind would take new flows of any service:
/// enabled, up and weighted.
fn serves(b: &BackendConfig, o: &BackendObservations) -> Result<(), Ineligible> {
    match o.admin {
        Admin::Disabled => Err(Ineligible::Disabled),
        Admin::Draining => Err(Ineligible::Draining),
        Admin::Enabled if !o.health.up => Err(Ineligible::Down),
        Admin::Enabled if weight(b, o) == 0 => Err(Ineligible::ZeroWeight),
        Admin::Enabled => Ok(()),
    }
}

/// Whether backend `b` of service `s` may take new flows now, and if not why.
pub fn eligibility(
    s: &ServiceConfig,
    o: &ServiceObservations,
    b: &BackendConfig,
) -> Result<(), Ineligible> {
    serves(b, o.backend(&b.name))?;
    let primary = o.roles.primary.as_deref() == Some(b.name.as_str());
    match &s.steering {
        Steering::None => Ok(()),
        Steering::MysqlPrimary(_) if primary => Ok(()),
        Steering::MysqlPrimary(_) => Err(Ineligible::NotPrimary),
        Steering::MysqlReplica(m) => {
            let max = m.max_replica_lag_s;
            let fit = |x: &BackendConfig| {
                let xo = o.backend(&x.name);
                serves(x, xo).is_ok()
                    && xo
                        .mysql
                        .as_ref()
                        .is_some_and(|m| mysql::fit_replica(m, max))
            };
            let readable = if backends(s, o).any(fit) {
                fit(b)
            } else {
                // No replica fit for reads: they fall back to the primary.
                primary
            };
            if readable {
                Ok(())
            } else {
                Err(Ineligible::NotReadable)
            }
        }
    }
}

/// The MySQL roles of a steered service given its latest observations and
/// its current roles (the primary stays while it qualifies); an unsteered
/// service's stay as they are.
pub fn roles(s: &ServiceConfig, o: &ServiceObservations) -> Roles {
    if s.steering == Steering::None {
        return o.roles.clone();
    }
    let observed: Vec<(&str, Option<&Observation>)> = backends(s, o)
        .map(|b| (b.name.as_str(), o.backend(&b.name).mysql.as_ref()))
        .collect();
    mysql::decide(&o.roles, &observed)
}

/// What the maps should say about every service of `config`, given what
/// was observed: the data path's writer ([`Dataplane::apply`]) makes it so.
///
/// [`Dataplane::apply`]: crate::dataplane::Dataplane::apply
pub fn desired(config: &Config, observations: &Observations) -> Vec<ServiceSpec> {
    config
        .services
        .iter()
        .map(|s| service_spec(s, observations.service(&s.name), config.daemon.maglev_seed))
        .collect()
}

/// One service as configured, nothing observed: every backend enabled, up
/// and at its file's weight (tests and benchmarks write services this way).
pub fn desired_service(s: &ServiceConfig, maglev_seed: u32) -> ServiceSpec {
    service_spec(s, &NOTHING_SEEN, maglev_seed)
}

/// What the maps should say about service `s`.
pub fn service_spec(s: &ServiceConfig, o: &ServiceObservations, maglev_seed: u32) -> ServiceSpec {
    let reset_demoted = matches!(
        &s.steering,
        Steering::MysqlPrimary(m) if m.on_demotion == OnDemotion::Reset
    );
    ServiceSpec {
        name: s.name.clone(),
        vip: s.vip,
        port: s.port,
        protocol: s.protocol,
        maglev: match s.scheduler {
            Scheduler::Maglev { table_size } => Some((table_size, maglev_seed)),
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => None,
        },
        // Steered services refuse what they cannot place: a write with no
        // primary fails fast instead of hanging.
        reset_if_empty: s.steering != Steering::None,
        udp_idle: (s.protocol == Protocol::Udp).then_some(s.udp_idle_timeout),
        rules: s.firewall.clone(),
        backends: backends(s, o)
            .map(|b| {
                let bo = o.backend(&b.name);
                BackendSpec {
                    name: b.name.clone(),
                    address: b.address,
                    port: b.port,
                    ring_weight: match eligibility(s, o, b) {
                        Ok(()) => ring_weight(s.scheduler, weight(b, bo)),
                        Err(_) => 0,
                    },
                    drop_flows: !bo.health.up && s.on_backend_down == DownPolicy::DropFlows,
                    reset_flows: reset_demoted && bo.demoted,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

    use super::*;
    use crate::config::{MysqlMonitor, Secret, SourceRules};

    fn backend(name: &str, last_octet: u8, weight: u32) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            address: Ipv4Addr::new(10, 0, 1, last_octet),
            port: 80,
            weight,
            health: None,
        }
    }

    fn service(scheduler: Scheduler, backends: Vec<BackendConfig>) -> ServiceConfig {
        ServiceConfig {
            name: "web".into(),
            vip: Ipv4Addr::new(10, 0, 0, 10),
            port: 80,
            protocol: Protocol::Tcp,
            scheduler,
            on_backend_down: DownPolicy::default(),
            health: None,
            steering: Steering::None,
            udp_idle_timeout: Duration::from_secs(30),
            firewall: SourceRules::default(),
            backends,
        }
    }

    fn steered(steering: fn(MysqlMonitor) -> Steering, on_demotion: OnDemotion) -> ServiceConfig {
        let mut s = service(
            Scheduler::RoundRobin,
            vec![
                backend("db1", 1, 1),
                backend("db2", 2, 1),
                backend("db3", 3, 1),
            ],
        );
        s.steering = steering(MysqlMonitor {
            user: "lb".into(),
            password_file: PathBuf::from("/dev/null"),
            password: Secret(String::new()),
            interval_ms: 100,
            timeout_ms: 50,
            max_replica_lag_s: 5,
            on_demotion,
        });
        s
    }

    fn spec(name: &str, last_octet: u8, ring_weight: u32) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            address: Ipv4Addr::new(10, 0, 1, last_octet),
            port: 80,
            ring_weight,
            drop_flows: false,
            reset_flows: false,
        }
    }

    fn ring(s: &ServiceConfig, o: &ServiceObservations) -> Vec<(String, u32)> {
        service_spec(s, o, 0)
            .backends
            .into_iter()
            .map(|b| (b.name, b.ring_weight))
            .collect()
    }

    fn named(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    }

    fn with(name: &str, f: impl FnOnce(&mut BackendObservations)) -> ServiceObservations {
        let mut o = ServiceObservations::default();
        f(o.backends.entry(name.into()).or_default());
        o
    }

    fn mysql_obs(writable: bool, replicating: bool, lag_s: Option<u64>) -> Observation {
        Observation {
            reachable: true,
            read_only: !writable,
            replicating,
            io_running: None,
            sql_running: None,
            lag_s,
            source: None,
            error: None,
            latency_us: 0,
            at_unix_ms: 0,
        }
    }

    /// Observations of db1..db3 (None: unreachable) with roles decided.
    fn observed(s: &ServiceConfig, o: &mut ServiceObservations, seen: [Option<Observation>; 3]) {
        for (name, m) in ["db1", "db2", "db3"].into_iter().zip(seen) {
            o.backends.entry(name.into()).or_default().mysql = Some(m.unwrap_or(Observation {
                reachable: false,
                ..mysql_obs(false, false, None)
            }));
        }
        o.roles = roles(s, o);
    }

    #[test]
    fn round_robin_gives_every_backend_one_slot_whatever_its_weight() {
        let s = service(
            Scheduler::RoundRobin,
            vec![backend("web1", 1, 1), backend("web2", 2, 7)],
        );
        assert_eq!(
            desired_service(&s, 9),
            ServiceSpec {
                name: "web".into(),
                vip: Ipv4Addr::new(10, 0, 0, 10),
                port: 80,
                protocol: Protocol::Tcp,
                maglev: None,
                reset_if_empty: false,
                rules: SourceRules::default(),
                backends: vec![spec("web1", 1, 1), spec("web2", 2, 1)],
                udp_idle: None,
            }
        );
    }

    #[test]
    fn weighted_round_robin_and_maglev_give_the_weight() {
        let backends = vec![backend("web1", 1, 1), backend("web2", 2, 3)];
        let wrr = service(Scheduler::WeightedRoundRobin, backends.clone());
        assert_eq!(
            desired_service(&wrr, 0).backends,
            [spec("web1", 1, 1), spec("web2", 2, 3)]
        );
        let maglev = service(Scheduler::Maglev { table_size: 65537 }, backends);
        let m = desired_service(&maglev, 42);
        assert_eq!(m.maglev, Some((65537, 42)));
        assert_eq!(m.backends, [spec("web1", 1, 1), spec("web2", 2, 3)]);
    }

    #[test]
    fn a_backends_record_is_found_for_update_by_service_and_name() {
        let mut o = Observations::default();
        o.services
            .insert("web".into(), with("web2", |b| b.weight = Some(5)));
        o.backend_mut("web", "web2").expect("web2 of web").weight = Some(7);
        assert_eq!(o.service("web").backend("web2").weight, Some(7));
        assert!(o.backend_mut("web", "web9").is_none(), "no such backend");
        assert!(o.backend_mut("db", "web2").is_none(), "no such service");
    }

    #[test]
    fn a_weight_set_at_run_time_wins_over_the_file() {
        let s = service(
            Scheduler::WeightedRoundRobin,
            vec![backend("web1", 1, 1), backend("web2", 2, 3)],
        );
        let o = with("web2", |b| b.weight = Some(5));
        assert_eq!(ring(&s, &o), named(&[("web1", 1), ("web2", 5)]));
        let o = with("web2", |b| b.weight = Some(0));
        assert_eq!(ring(&s, &o), named(&[("web1", 1), ("web2", 0)]));
        assert_eq!(
            eligibility(&s, &o, &s.backends[1]),
            Err(Ineligible::ZeroWeight)
        );
    }

    #[test]
    fn a_backend_down_takes_no_new_flows_and_its_flows_follow_the_policy() {
        let mut s = service(
            Scheduler::RoundRobin,
            vec![backend("web1", 1, 1), backend("web2", 2, 1)],
        );
        let o = with("web2", |b| b.health.up = false);
        assert_eq!(
            service_spec(&s, &o, 0).backends,
            [spec("web1", 1, 1), spec("web2", 2, 0)]
        );
        assert_eq!(eligibility(&s, &o, &s.backends[1]), Err(Ineligible::Down));
        s.on_backend_down = DownPolicy::DropFlows;
        assert_eq!(
            service_spec(&s, &o, 0).backends,
            [
                spec("web1", 1, 1),
                BackendSpec {
                    drop_flows: true,
                    ..spec("web2", 2, 0)
                }
            ]
        );
    }

    #[test]
    fn drained_and_disabled_backends_take_no_new_flows_but_keep_theirs() {
        let s = service(
            Scheduler::WeightedRoundRobin,
            vec![backend("web1", 1, 2), backend("web2", 2, 3)],
        );
        for (admin, why) in [
            (Admin::Draining, Ineligible::Draining),
            (Admin::Disabled, Ineligible::Disabled),
        ] {
            let o = with("web1", |b| b.admin = admin);
            assert_eq!(
                service_spec(&s, &o, 0).backends,
                [spec("web1", 1, 0), spec("web2", 2, 3)],
                "{admin:?}"
            );
            assert_eq!(eligibility(&s, &o, &s.backends[0]), Err(why));
        }
    }

    #[test]
    fn backends_added_at_run_time_follow_the_file_and_removed_ones_go() {
        let s = service(
            Scheduler::WeightedRoundRobin,
            vec![backend("web1", 1, 1), backend("web2", 2, 1)],
        );
        let mut o = ServiceObservations::default();
        o.added.push(backend("web3", 3, 2));
        o.removed.insert("web1".into());
        assert_eq!(
            service_spec(&s, &o, 0).backends,
            [spec("web2", 2, 1), spec("web3", 3, 2)]
        );
    }

    #[test]
    fn writes_go_to_the_primary_only_and_follow_a_failover() {
        let s = steered(Steering::MysqlPrimary, OnDemotion::Keep);
        let mut o = ServiceObservations::default();
        // Nothing is decided before every server was seen: no backend takes
        // writes, and the service refuses them with resets.
        let empty = service_spec(&s, &o, 0);
        assert!(empty.reset_if_empty);
        assert!(empty.backends.iter().all(|b| b.ring_weight == 0));

        let replica = || Some(mysql_obs(false, true, Some(0)));
        observed(
            &s,
            &mut o,
            [Some(mysql_obs(true, false, None)), replica(), replica()],
        );
        assert_eq!(o.roles.primary.as_deref(), Some("db1"));
        assert_eq!(ring(&s, &o), named(&[("db1", 1), ("db2", 0), ("db3", 0)]));
        assert_eq!(
            eligibility(&s, &o, &s.backends[1]),
            Err(Ineligible::NotPrimary)
        );

        // db1 dies, db2 is promoted (writable, no longer replicating).
        observed(
            &s,
            &mut o,
            [None, Some(mysql_obs(true, false, None)), replica()],
        );
        assert_eq!(o.roles.primary.as_deref(), Some("db2"));
        assert_eq!(ring(&s, &o), named(&[("db1", 0), ("db2", 1), ("db3", 0)]));

        // db1 comes back writable: db2 stays primary (no flip-flop).
        observed(
            &s,
            &mut o,
            [
                Some(mysql_obs(true, false, None)),
                Some(mysql_obs(true, false, None)),
                replica(),
            ],
        );
        assert_eq!(o.roles.primary.as_deref(), Some("db2"));
        assert!(o.roles.alarm.is_some());
        assert_eq!(ring(&s, &o), named(&[("db1", 0), ("db2", 1), ("db3", 0)]));
    }

    #[test]
    fn a_demoted_primary_has_its_flows_reset_under_on_demotion_reset() {
        for (on_demotion, reset) in [(OnDemotion::Reset, true), (OnDemotion::Keep, false)] {
            let s = steered(Steering::MysqlPrimary, on_demotion);
            let o = with("db1", |b| b.demoted = true);
            let b = &service_spec(&s, &o, 0).backends[0];
            assert_eq!(b.reset_flows, reset, "{on_demotion:?}");
        }
    }

    #[test]
    fn reads_go_to_fit_replicas_and_fall_back_to_the_primary() {
        let s = steered(Steering::MysqlReplica, OnDemotion::Keep);
        let mut o = ServiceObservations::default();
        let primary = || Some(mysql_obs(true, false, None));
        observed(
            &s,
            &mut o,
            [
                primary(),
                Some(mysql_obs(false, true, Some(1))),
                Some(mysql_obs(false, true, Some(2))),
            ],
        );
        assert_eq!(ring(&s, &o), named(&[("db1", 0), ("db2", 1), ("db3", 1)]));

        // db3 lags past max_replica_lag_s (5), db2's lag is unknown: neither
        // is fit, so reads fall back to the primary.
        observed(
            &s,
            &mut o,
            [
                primary(),
                Some(mysql_obs(false, true, None)),
                Some(mysql_obs(false, true, Some(6))),
            ],
        );
        assert_eq!(ring(&s, &o), named(&[("db1", 1), ("db2", 0), ("db3", 0)]));
        assert_eq!(
            eligibility(&s, &o, &s.backends[1]),
            Err(Ineligible::NotReadable)
        );

        // A fit replica that is drained does not count: the other one takes
        // the reads, and with none left, the primary.
        observed(
            &s,
            &mut o,
            [
                primary(),
                Some(mysql_obs(false, true, Some(0))),
                Some(mysql_obs(false, true, Some(0))),
            ],
        );
        o.backends.get_mut("db2").unwrap().admin = Admin::Draining;
        assert_eq!(ring(&s, &o), named(&[("db1", 0), ("db2", 0), ("db3", 1)]));
        o.backends.get_mut("db3").unwrap().health.up = false;
        assert_eq!(ring(&s, &o), named(&[("db1", 1), ("db2", 0), ("db3", 0)]));
    }

    #[test]
    fn desired_covers_every_service_with_the_daemons_seed() {
        let text = r#"
[daemon]
interfaces = ["lo"]
maglev_seed = 77

[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
scheduler = "maglev"
[[service.backend]]
name = "web1"
address = "10.0.1.1"
"#;
        let cfg = Config::parse(std::path::Path::new("test.toml"), text, &|_| true)
            .unwrap_or_else(|e| panic!("the test config is valid: {e}"));
        let specs = desired(&cfg, &Observations::default());
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].maglev.map(|m| m.1), Some(77));
        assert_eq!(specs, [desired_service(&cfg.services[0], 77)]);
    }

    /// Each service's spec follows what was seen of that service, by name:
    /// two services with a backend of the same name are told apart.
    #[test]
    fn desired_applies_each_services_own_observations() {
        let text = r#"
[daemon]
interfaces = ["lo"]

[[service]]
name = "web"
vip = "10.0.0.10"
port = 80
protocol = "tcp"
[[service.backend]]
name = "app1"
address = "10.0.1.1"

[[service]]
name = "api"
vip = "10.0.0.11"
port = 80
protocol = "tcp"
[[service.backend]]
name = "app1"
address = "10.0.1.1"
"#;
        let cfg = Config::parse(std::path::Path::new("test.toml"), text, &|_| true)
            .unwrap_or_else(|e| panic!("the test config is valid: {e}"));
        let mut observations = Observations::default();
        observations
            .services
            .insert("api".into(), with("app1", |b| b.health.up = false));
        let weights: Vec<(String, u32)> = desired(&cfg, &observations)
            .into_iter()
            .map(|s| (s.name, s.backends[0].ring_weight))
            .collect();
        assert_eq!(weights, named(&[("web", 1), ("api", 0)]));
    }
}
