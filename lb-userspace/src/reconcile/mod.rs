//! The reconciler: the one owner of the data path. Config (file and reloads),
//! operators (the control socket) and health checkers report what they want
//! or see; the reconciler keeps that desired state and turns it into map
//! writes through [`Dataplane::apply`], which writes only what changed.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{
        BackendConfig, Config, DownPolicy, HealthCheck, MysqlMonitor, OnDemotion, Scheduler,
        ServiceConfig, Steering,
    },
    control::{Request, Response},
    dataplane::{BackendSpec, Census, Dataplane, FlowCensus, ServiceSpec, TrafficStatus},
    health::{self, Health, Report},
    mysql::{self, Observation, Roles},
    nexthop,
};

/// A flow counts as active while it has not closed and saw a packet within this.
pub const TCP_ACTIVE_IDLE: Duration = Duration::from_secs(300);
pub const UDP_ACTIVE_IDLE: Duration = Duration::from_secs(60);

/// What an operator said about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Takes new flows when healthy.
    Enabled,
    /// Takes no new flows; its established flows continue until they end.
    Draining,
    /// Out of service: no new flows (established ones are not cut).
    Disabled,
}

#[derive(Debug)]
struct BackendState {
    config: BackendConfig,
    admin: Admin,
    health: Health,
    /// Added through the control socket, not from the file.
    runtime: bool,
    /// The latest MySQL observation (steered services).
    mysql: Option<Observation>,
    /// It was this service's primary and lost the role: its connections are
    /// reset (under `on_demotion = "reset"`) until it is primary again.
    demoted: bool,
    /// The last health checks, oldest first (for the status page).
    history: std::collections::VecDeque<health::CheckResult>,
}

/// Health checks kept per backend for `lb status` and the status page.
const HISTORY: usize = 30;

impl BackendState {
    fn new(config: BackendConfig, runtime: bool) -> Self {
        BackendState {
            config,
            admin: Admin::Enabled,
            health: Health::default(),
            runtime,
            mysql: None,
            demoted: false,
            history: std::collections::VecDeque::with_capacity(HISTORY),
        }
    }

    fn takes_new_flows(&self) -> bool {
        self.admin == Admin::Enabled && self.health.up && self.config.weight > 0
    }

    /// up, down, draining or disabled: what `lb status` shows.
    fn state(&self) -> &'static str {
        match (self.admin, self.health.up) {
            (Admin::Disabled, _) => "disabled",
            (Admin::Draining, _) => "draining",
            (Admin::Enabled, false) => "down",
            (Admin::Enabled, true) => "up",
        }
    }
}

#[derive(Debug)]
struct ServiceState {
    config: ServiceConfig,
    /// In config order (the ring order).
    backends: Vec<BackendState>,
    /// MySQL roles (steered services).
    roles: Roles,
}

impl ServiceState {
    fn backend_mut(&mut self, name: &str) -> Option<&mut BackendState> {
        self.backends.iter_mut().find(|b| b.config.name == name)
    }

    /// Re-decides MySQL roles from the latest observations; returns true if
    /// the primary changed. Logs every change of primary and of alarm.
    fn steer(&mut self) -> bool {
        if self.config.steering == Steering::None {
            return false;
        }
        let observed: Vec<(&str, Option<&Observation>)> = self
            .backends
            .iter()
            .map(|b| (b.config.name.as_str(), b.mysql.as_ref()))
            .collect();
        let next = mysql::decide(&self.roles, &observed);
        let svc = self.config.name.clone();
        if next.alarm != self.roles.alarm {
            match &next.alarm {
                Some(a) => tracing::error!(service = %svc, alarm = %a, "MySQL alarm"),
                None => tracing::info!(service = %svc, "MySQL alarm cleared"),
            }
        }
        let changed = next.primary != self.roles.primary;
        if changed {
            tracing::warn!(service = %svc, from = ?self.roles.primary, to = ?next.primary, "primary changed");
            if let Some(old) = self.roles.primary.clone() {
                if let Some(b) = self.backend_mut(&old) {
                    b.demoted = true;
                }
            }
            if let Some(new) = next.primary.clone() {
                if let Some(b) = self.backend_mut(&new) {
                    b.demoted = false;
                }
            }
        }
        self.roles = next;
        changed
    }

    /// Whether backend `b` may take new flows of this service right now.
    fn eligible(&self, b: &BackendState) -> bool {
        if !b.takes_new_flows() {
            return false;
        }
        match self.config.steering {
            Steering::None => true,
            Steering::MysqlPrimary => self.roles.primary.as_deref() == Some(&b.config.name),
            Steering::MysqlReplica => {
                let max = self
                    .config
                    .mysql
                    .as_ref()
                    .map_or(0, |m| m.max_replica_lag_s);
                let fit = |x: &BackendState| {
                    x.takes_new_flows()
                        && x.mysql.as_ref().is_some_and(|o| mysql::fit_replica(o, max))
                };
                if self.backends.iter().any(fit) {
                    fit(b)
                } else {
                    // No replica fit for reads: they fall back to the primary.
                    self.roles.primary.as_deref() == Some(&b.config.name)
                }
            }
        }
    }

    fn spec(&self, maglev_seed: u32) -> ServiceSpec {
        let c = &self.config;
        let reset_demoted = c
            .mysql
            .as_ref()
            .is_some_and(|m| m.on_demotion == OnDemotion::Reset)
            && c.steering == Steering::MysqlPrimary;
        ServiceSpec {
            name: c.name.clone(),
            vip: c.vip,
            port: c.port,
            protocol: c.protocol,
            maglev: (c.scheduler == Scheduler::Maglev)
                .then_some((c.maglev_table_size, maglev_seed)),
            // Steered services refuse what they cannot place: a write with no
            // primary fails fast instead of hanging.
            reset_if_empty: c.steering != Steering::None,
            udp_idle: (c.protocol == crate::config::Protocol::Udp).then_some(c.udp_idle_timeout),
            rules: c.firewall.clone(),
            backends: self
                .backends
                .iter()
                .map(|b| BackendSpec {
                    name: b.config.name.clone(),
                    address: b.config.address,
                    port: b.config.port,
                    ring_weight: match (self.eligible(b), c.scheduler) {
                        (false, _) => 0,
                        (true, Scheduler::RoundRobin) => 1,
                        (true, Scheduler::WeightedRoundRobin | Scheduler::Maglev) => {
                            b.config.weight
                        }
                    },
                    drop_flows: !b.health.up && c.on_backend_down == DownPolicy::DropFlows,
                    reset_flows: reset_demoted && b.demoted,
                })
                .collect(),
        }
    }
}

struct Checker<W> {
    id: u64,
    what: W,
    task: JoinHandle<()>,
}

impl<W> Drop for Checker<W> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a health checker probes, and how.
type CheckTarget = (Ipv4Addr, u16, HealthCheck);

/// What a MySQL monitor watches, and as whom.
type MonitorTarget = (Ipv4Addr, u16, MysqlMonitor);

/// Observations made before the first map write, by (service, backend).
pub type FirstLook = HashMap<(String, String), Observation>;

/// The desired state and the data path it is written to.
pub struct Balancer {
    file: Config,
    services: Vec<ServiceState>,
    dp: Dataplane,
    reports: mpsc::Sender<Report>,
    mysql_reports: mpsc::Sender<mysql::Report>,
    checkers: HashMap<(String, String), Checker<CheckTarget>>,
    metrics: crate::metrics::Metrics,
    censuses: Arc<CensusCache>,
    monitors: HashMap<(String, String), Checker<MonitorTarget>>,
    next_checker: u64,
    /// Whether the connection table was past `PRESSURE_PERCENT` at the last
    /// look, how often it crossed it, and when that was last logged.
    pressured: bool,
    pressure_events: u64,
    pressure_logged: Option<Instant>,
    /// The last 15 minutes, sampled every `SAMPLE_EVERY` (the status page's
    /// graphs), and the changes of state within them.
    samples: std::collections::VecDeque<serde_json::Value>,
    events: std::collections::VecDeque<serde_json::Value>,
    /// Every backend's (id, address), for the next-hop watcher.
    hop_targets: tokio::sync::watch::Sender<Vec<(u32, Ipv4Addr)>>,
}

type Result<T> = std::result::Result<T, String>;

impl Balancer {
    /// Takes over a loaded data path and writes `cfg` into it. Health reports
    /// are to be sent to `reports` and fed back through [`Balancer::on_report`].
    pub fn new(
        cfg: Config,
        dp: Dataplane,
        reports: mpsc::Sender<Report>,
        mysql_reports: mpsc::Sender<mysql::Report>,
        first_look: FirstLook,
    ) -> anyhow::Result<Balancer> {
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let mut st = ServiceState {
                    config: s.clone(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            let mut st = BackendState::new(b.clone(), false);
                            st.mysql = first_look.get(&(s.name.clone(), b.name.clone())).cloned();
                            st
                        })
                        .collect(),
                    roles: Roles::default(),
                };
                st.steer();
                st
            })
            .collect();
        let mut dp = dp;
        dp.set_stateless_replies(cfg.daemon.stateless_reverse_nat);
        let mut b = Balancer {
            file: cfg,
            services,
            dp,
            reports,
            mysql_reports,
            checkers: HashMap::new(),
            metrics: crate::metrics::Metrics::new(),
            censuses: Arc::default(),
            monitors: HashMap::new(),
            next_checker: 0,
            hop_targets: tokio::sync::watch::Sender::new(Vec::new()),
            pressured: false,
            pressure_events: 0,
            pressure_logged: None,
            samples: Default::default(),
            events: Default::default(),
        };
        b.sync().map_err(anyhow::Error::msg)?;
        Ok(b)
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    pub fn config_file(&self) -> &Config {
        &self.file
    }

    /// Writes the desired state to the maps and makes the checkers match it.
    fn sync(&mut self) -> Result<()> {
        let seed = self.file.daemon.maglev_seed;
        let specs: Vec<ServiceSpec> = self.services.iter().map(|s| s.spec(seed)).collect();
        self.dp
            .set_firewall(&self.file.firewall)
            .map_err(|e| format!("{e:#}"))?;
        self.dp
            .set_linger(self.file.daemon.closed_linger)
            .map_err(|e| format!("{e:#}"))?;
        self.dp.apply(&specs).map_err(|e| format!("{e:#}"))?;
        let targets = self.dp.hop_targets();
        self.hop_targets.send_if_modified(|t| {
            let changed = *t != targets;
            *t = targets;
            changed
        });
        self.sync_checkers();
        Ok(())
    }

    /// Takes one sample of the counters the status page graphs: per backend
    /// its new flows and packets, and packets by action (cumulative; the page
    /// draws the rates between samples). O(backends).
    pub fn sample(&mut self) {
        // Per backend while they are few, else per service: 15 minutes of
        // samples stay a small answer whatever the size of the config.
        let total: usize = self.services.iter().map(|s| s.backends.len()).sum();
        let mut backends = Vec::new();
        for s in &self.services {
            if total > GRAPHED_BACKENDS {
                if let Ok(t) = self.dp.service_traffic(&s.config.name) {
                    backends.push(json!([
                        s.config.name,
                        t.new_flows,
                        t.packets + t.reply_packets
                    ]));
                }
                continue;
            }
            for b in &s.backends {
                if let Ok(t) = self.dp.backend_traffic(&s.config.name, &b.config.name) {
                    backends.push(json!([
                        format!("{}/{}", s.config.name, b.config.name),
                        t.new_flows,
                        t.packets + t.reply_packets
                    ]));
                }
            }
        }
        let mut actions: BTreeMap<&str, u64> = BTreeMap::new();
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
                *actions.entry(action).or_default() += v;
            }
        }
        push_bounded(
            &mut self.samples,
            json!({ "t": unix_ms(), "backends": backends, "actions": actions }),
        );
        let horizon = unix_ms().saturating_sub(HISTORY_SPAN.as_millis() as u64);
        while self
            .events
            .front()
            .is_some_and(|e| e["t"].as_u64().unwrap_or(0) < horizon)
        {
            self.events.pop_front();
        }
    }

    /// A sweep of idle UDP flows to run off the loop, if any service is UDP.
    pub fn udp_sweep(&self) -> Option<crate::dataplane::UdpSweep> {
        match self.dp.udp_sweep() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sweep idle UDP flows");
                None
            }
        }
    }

    /// Takes note of the flows a sweep reclaimed.
    pub fn on_udp_sweep(&mut self, per_backend: HashMap<u32, u64>) {
        let n: u64 = per_backend.values().sum();
        if n > 0 {
            tracing::debug!(flows = n, "idle UDP flows reclaimed");
        }
        if let Err(e) = self.dp.reclaimed(&per_backend) {
            tracing::warn!(error = %e, "cannot count reclaimed UDP flows");
        }
    }

    /// The backends whose next hops the watcher keeps current (`nexthop`).
    pub fn hop_targets(&self) -> tokio::sync::watch::Receiver<Vec<(u32, Ipv4Addr)>> {
        self.hop_targets.subscribe()
    }

    /// Applies what the next-hop watcher reports: every cached hop stale at
    /// once, or freshly resolved hops.
    pub fn on_next_hops(&mut self, e: nexthop::Event) {
        let done = match e {
            nexthop::Event::Invalidate => self.dp.invalidate_hops().map(|_| ()),
            nexthop::Event::Hops(hops) => self.dp.set_hops(&hops),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "cannot write next hops: the data path looks them up itself");
        }
    }

    /// Makes the health checkers and MySQL monitors match the backends: stops
    /// those whose target changed or went, starts the missing ones.
    fn sync_checkers(&mut self) {
        let mut checks = HashMap::new();
        let mut watch = HashMap::new();
        for s in &self.services {
            for b in &s.backends {
                let key = (s.config.name.clone(), b.config.name.clone());
                if let Some(h) = &b.config.health {
                    let port = h.port.unwrap_or(b.config.port);
                    checks.insert(key.clone(), (b.config.address, port, h.clone()));
                }
                if let Some(m) = &s.config.mysql {
                    watch.insert(key, (b.config.address, b.config.port, m.clone()));
                }
            }
        }
        let reports = self.reports.clone();
        sync_tasks(
            &mut self.checkers,
            checks,
            &mut self.next_checker,
            |key, what, id| {
                health::spawn(
                    key.0.clone(),
                    key.1.clone(),
                    what.0,
                    what.1,
                    what.2.clone(),
                    id,
                    reports.clone(),
                )
            },
        );
        let reports = self.mysql_reports.clone();
        sync_tasks(
            &mut self.monitors,
            watch,
            &mut self.next_checker,
            |key, what, id| {
                mysql::spawn(
                    key.0.clone(),
                    key.1.clone(),
                    what.0,
                    what.1,
                    what.2.clone(),
                    id,
                    reports.clone(),
                )
            },
        );
    }

    /// Counts a health-check result and applies a change of state.
    pub fn on_report(&mut self, r: Report) {
        let Some((s, i)) = report_target(
            &self.checkers,
            &mut self.services,
            &r.service,
            &r.backend,
            r.checker,
        ) else {
            return;
        };
        let b = &mut s.backends[i];
        let Some(check) = b.config.health.clone() else {
            return;
        };
        let detail = r.result.detail.clone();
        self.metrics
            .observe_check(&r.service, &r.backend, r.result.ok, r.result.latency_us);
        if b.history.len() == HISTORY {
            b.history.pop_front();
        }
        b.history.push_back(r.result.clone());
        if b.health.record(r.result, check.rise, check.fall) {
            let state = if b.health.up { "up" } else { "down" };
            let what = format!("{}/{} {state}", r.service, r.backend);
            push_bounded(&mut self.events, json!({ "t": unix_ms(), "what": what }));
            if b.health.up {
                tracing::info!(service = %r.service, backend = %r.backend, state, check = %detail, "backend state changed");
            } else {
                tracing::warn!(service = %r.service, backend = %r.backend, state, check = %detail, "backend state changed");
            }
            if let Err(e) = self.sync() {
                tracing::error!(error = %e, "applying a health change failed");
            }
        }
    }

    /// Takes a MySQL observation: re-decides the service's roles and applies
    /// what changed (a new primary, a replica in or out of the read set).
    pub fn on_mysql_report(&mut self, r: mysql::Report) {
        let Some((s, i)) = report_target(
            &self.monitors,
            &mut self.services,
            &r.service,
            &r.backend,
            r.monitor,
        ) else {
            return;
        };
        let b = &mut s.backends[i];
        let was_reachable = b.mysql.as_ref().map(|o| o.reachable);
        if was_reachable.is_some_and(|w| w != r.observation.reachable) {
            tracing::warn!(service = %r.service, backend = %r.backend, reachable = r.observation.reachable,
                error = ?r.observation.error, "MySQL server reachability changed");
        }
        b.mysql = Some(r.observation);
        s.steer();
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "applying a MySQL change failed");
        }
    }

    /// Makes `new` (a validated file) the configuration, applying only the
    /// difference. Operators' drain and disable marks on backends that remain
    /// are kept, and so is their health; backends added at run time that the
    /// file does not list are removed. `[daemon]` changes need a restart.
    pub fn reload(&mut self, new: Config) -> Result<String> {
        if new.daemon != self.file.daemon {
            return Err(format!(
                "{}: [daemon] changed (interfaces, hooks, control_socket, manage_neighbours): \
                 restart lb to apply that; nothing was changed",
                new.file.display()
            ));
        }
        let mut old: HashMap<(String, String), BackendState> = HashMap::new();
        let mut old_roles: HashMap<String, Roles> = HashMap::new();
        for s in self.services.drain(..) {
            old_roles.insert(s.config.name.clone(), s.roles);
            for b in s.backends {
                old.insert((s.config.name.clone(), b.config.name.clone()), b);
            }
        }
        self.services = new
            .services
            .iter()
            .map(|s| ServiceState {
                config: s.clone(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let mut st = BackendState::new(b.clone(), false);
                        if let Some(prev) = old.remove(&(s.name.clone(), b.name.clone())) {
                            st.admin = prev.admin;
                            st.mysql = prev.mysql;
                            st.demoted = prev.demoted;
                            let same_target =
                                (prev.config.address, prev.config.port, &prev.config.health)
                                    == (b.address, b.port, &b.health);
                            if same_target {
                                st.health = prev.health;
                            }
                        }
                        st
                    })
                    .collect(),
                roles: old_roles.remove(&s.name).unwrap_or_default(),
            })
            .collect();
        for s in &mut self.services {
            s.steer();
        }
        self.file = new;
        self.sync()?;
        let backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        let msg = format!(
            "{}: applied ({} services, {backends} backends)",
            self.file.file.display(),
            self.services.len()
        );
        tracing::info!(file = %self.file.file.display(), services = self.services.len(), backends, "config applied");
        Ok(msg)
    }

    /// Answers a control request.
    pub fn control(&mut self, req: Request) -> Response {
        let r = match req {
            // O(backends): the data path counts flows per backend.
            Request::Status => {
                return self.status().map_or_else(Response::Error, Response::Ok);
            }
            Request::Metrics => {
                return match self.status() {
                    Ok(status) => Response::Ok(json!({ "text": self.metrics.render(&status) })),
                    Err(e) => Response::Error(e),
                };
            }
            // The daemon's loop takes this off the loop (`flow_query`); here
            // the census is taken in place.
            Request::Census => {
                return match self.flow_query() {
                    Ok(q) => q.answer(),
                    Err(e) => Response::Error(e),
                };
            }
            // The daemon's loop handles it: it owns the process's lifetime.
            Request::Stop { .. } => Err("stop is handled by the daemon".into()),
            Request::Reload => Config::load(&self.file.file.clone())
                .map_err(|e| {
                    tracing::error!(error = %e, "config rejected");
                    e.to_string()
                })
                .and_then(|c| self.reload(c)),
            Request::BackendAdd {
                service,
                name,
                address,
                port,
                weight,
            } => self.add_backend(&service, &name, address, port, weight),
            Request::BackendRemove { service, name } => self.remove_backend(&service, &name),
            Request::BackendDrain { service, name } => {
                self.set_admin(&service, &name, Admin::Draining)
            }
            Request::BackendEnable { service, name } => {
                self.set_admin(&service, &name, Admin::Enabled)
            }
            Request::BackendDisable { service, name } => {
                self.set_admin(&service, &name, Admin::Disabled)
            }
            Request::BackendWeight {
                service,
                name,
                weight,
            } => self.set_weight(&service, &name, weight),
        };
        match r {
            Ok(msg) => Response::Ok(json!({ "message": msg })),
            Err(e) => Response::Error(e),
        }
    }

    fn service_mut(&mut self, service: &str) -> Result<&mut ServiceState> {
        self.services
            .iter_mut()
            .find(|s| s.config.name == service)
            .ok_or_else(|| format!("no service {service:?}"))
    }

    fn add_backend(
        &mut self,
        service: &str,
        name: &str,
        address: Ipv4Addr,
        port: Option<u16>,
        weight: Option<u32>,
    ) -> Result<String> {
        let total: usize = self.services.iter().map(|s| s.backends.len()).sum();
        if total >= lb_common::MAX_BACKENDS as usize {
            return Err(format!(
                "at most {} backends are supported",
                lb_common::MAX_BACKENDS
            ));
        }
        if let Some(p) = crate::config::name_problem(name) {
            return Err(format!("backend name {name:?}: {p}"));
        }
        // Its replies must not be dropped by the firewall.
        if let Some(c) = self.file.firewall.deny.iter().find(|c| c.contains(address)) {
            return Err(format!(
                "{address} is on the firewall's deny list ({c}): its replies would be dropped"
            ));
        }
        let s = self.service_mut(service)?;
        if s.backends.iter().any(|b| b.config.name == name) {
            return Err(format!(
                "service {service:?} already has a backend named {name:?}"
            ));
        }
        if let Some(p) = crate::config::backend_address_problem(address, Some(s.config.vip)) {
            return Err(p);
        }
        let port = port.unwrap_or(s.config.port);
        if port == 0 {
            return Err("port 0 is not a valid port".into());
        }
        if weight.is_some() && s.config.scheduler == Scheduler::RoundRobin {
            return Err("weights need scheduler = \"weighted-round-robin\"".into());
        }
        let weight = weight.unwrap_or(1);
        check_ring(s, |w| w.push(weight))?;
        let config = BackendConfig {
            name: name.to_owned(),
            address,
            port,
            weight,
            health: s.config.health.clone(),
        };
        s.backends.push(BackendState::new(config, true));
        self.sync()?;
        tracing::info!(service, backend = name, %address, port, "backend added");
        Ok(format!("{service}/{name} added: {address}:{port}"))
    }

    fn remove_backend(&mut self, service: &str, name: &str) -> Result<String> {
        let s = self.service_mut(service)?;
        let before = s.backends.len();
        s.backends.retain(|b| b.config.name != name);
        if s.backends.len() == before {
            return Err(format!("service {service:?} has no backend {name:?}"));
        }
        self.sync()?;
        tracing::info!(service, backend = name, "backend removed");
        Ok(format!("{service}/{name} removed"))
    }

    fn set_admin(&mut self, service: &str, name: &str, admin: Admin) -> Result<String> {
        let s = self.service_mut(service)?;
        let b = s
            .backend_mut(name)
            .ok_or_else(|| format!("service {service:?} has no backend {name:?}"))?;
        b.admin = admin;
        let state = b.state();
        self.sync()?;
        tracing::info!(service, backend = name, state, "backend state changed");
        Ok(format!("{service}/{name} is {state}"))
    }

    fn set_weight(&mut self, service: &str, name: &str, weight: u32) -> Result<String> {
        let s = self.service_mut(service)?;
        if s.config.scheduler == Scheduler::RoundRobin {
            return Err(format!(
                "service {service:?} uses round-robin: weights need scheduler = \"weighted-round-robin\""
            ));
        }
        let i = s
            .backends
            .iter()
            .position(|b| b.config.name == name)
            .ok_or_else(|| format!("service {service:?} has no backend {name:?}"))?;
        check_ring(s, |w| w[i] = weight)?;
        s.backends[i].config.weight = weight;
        self.sync()?;
        tracing::info!(service, backend = name, weight, "backend weight changed");
        Ok(format!("{service}/{name} weight {weight}"))
    }

    /// A census of the connection table, answered off the daemon's loop
    /// ([`FlowQuery::answer`]): it walks the whole table, one system call per
    /// entry (seconds for a full one). A diagnostic only: status and metrics
    /// use the data path's own counts.
    pub fn flow_query(&self) -> Result<FlowQuery> {
        Ok(FlowQuery {
            census: self.dp.census().map_err(|e| format!("{e:#}"))?,
            censuses: self.censuses.clone(),
        })
    }

    /// Takes note of the flow table's fill: crossing [`PRESSURE`] of its
    /// capacity is counted and logged (at most once a minute), before
    /// established flows are evicted at 100%.
    fn pressure(&mut self, established: u64, capacity: u64) -> &'static str {
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
            "full"
        } else if high {
            "high"
        } else {
            "ok"
        }
    }

    /// Everything `lb status` shows, as JSON. O(backends): the flow counts
    /// are the data path's (flows entering and leaving the connection table).
    pub fn status(&mut self) -> Result<serde_json::Value> {
        let e = |e: crate::dataplane::DataplaneError| format!("{e:#}");
        let active = self.dp.active_flows().map_err(e)?;
        let established: u64 = active.values().sum();
        let capacity = self.file.daemon.conntrack_size as u64;
        let pressure = self.pressure(established, capacity);
        let mut services = Vec::new();
        for s in &self.services {
            let c = &s.config;
            let mut backends = Vec::new();
            for b in &s.backends {
                let traffic: TrafficStatus = self
                    .dp
                    .backend_traffic(&c.name, &b.config.name)
                    .map_err(e)?
                    .into();
                let key = (c.name.clone(), b.config.name.clone());
                backends.push(json!({
                    "name": b.config.name,
                    "active_flows": active.get(&key).copied().unwrap_or(0),
                    "address": b.config.address,
                    "port": b.config.port,
                    "weight": b.config.weight,
                    "state": b.state(),
                    "admin": b.admin,
                    "health": b.config.health.as_ref().map(|h| json!({
                        "kind": h.kind,
                        "up": b.health.up,
                        "streak": b.health.streak,
                        "rise": h.rise,
                        "fall": h.fall,
                        "last": b.health.last,
                        "history": b.history,
                    })),
                    "mysql": b.mysql.as_ref().map(|o| json!({
                        "role": mysql_role(&s.roles, &b.config.name, o),
                        "observation": o,
                    })),
                    "traffic": traffic,
                    "added_at_runtime": b.runtime,
                }));
            }
            let traffic: TrafficStatus = self.dp.service_traffic(&c.name).map_err(e)?.into();
            services.push(json!({
                "name": c.name,
                "vip": c.vip,
                "port": c.port,
                "protocol": c.protocol,
                "scheduler": c.scheduler,
                "on_backend_down": c.on_backend_down,
                "steering": c.steering,
                "mysql": (c.steering != Steering::None).then(|| json!({
                    "primary": s.roles.primary,
                    "alarm": s.roles.alarm,
                })),
                "traffic": traffic,
                "backends": backends,
            }));
        }
        let counters: BTreeMap<String, u64> = self
            .dp
            .counters()
            .map_err(e)?
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Ok(json!({
            "config_file": self.file.file,
            "state": crate::dataplane::persistence(&self.file.daemon.pin_dir),
            "attachments": self.dp.attachments(),
            "services": services,
            "counters": counters,
            "history": {
                "every_s": SAMPLE_EVERY.as_secs(),
                "samples": self.samples,
                "events": self.events,
            },
            "conntrack": {
                "entries": established,
                "capacity": capacity,
                "pressure": pressure,
                "pressure_events": self.pressure_events,
            },
        }))
    }
}

/// How often the status page's graphs are sampled, and how far back they go.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const HISTORY_SPAN: Duration = Duration::from_secs(15 * 60);
/// Up to this many backends the graphs have a line per backend, beyond it
/// one per service.
const GRAPHED_BACKENDS: usize = 32;

/// Appends to a history, keeping 15 minutes' worth of samples.
fn push_bounded(q: &mut std::collections::VecDeque<serde_json::Value>, v: serde_json::Value) {
    let keep = (HISTORY_SPAN.as_secs() / SAMPLE_EVERY.as_secs() + 1) as usize;
    while q.len() >= keep {
        q.pop_front();
    }
    q.push_back(v);
}

/// Wall-clock milliseconds (the page shows times of day).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The share of the connection table (percent) from which its fill is a
/// pressure: counted, logged, shown.
pub const PRESSURE_PERCENT: u64 = 90;

/// A census waiting to be taken (see [`Balancer::flow_query`]).
pub struct FlowQuery {
    census: FlowCensus,
    censuses: Arc<CensusCache>,
}

/// The last census and how long it took. One census is taken at a time, and
/// one younger than twice its own duration is reused: a big table (seconds a
/// walk) polled by a status page, Prometheus and `lb status` at once costs one
/// walk now and then, not a core; a small one is counted afresh every time.
#[derive(Default)]
pub struct CensusCache(Mutex<Option<(Instant, Duration, Census)>>);

impl CensusCache {
    fn get_or_take(&self, census: FlowCensus) -> Census {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, took, c)) = last.as_ref() {
            if at.elapsed() < *took * 2 {
                return c.clone();
            }
        }
        let started = Instant::now();
        let c = census.take(TCP_ACTIVE_IDLE, UDP_ACTIVE_IDLE);
        *last = Some((Instant::now(), started.elapsed(), c.clone()));
        c
    }
}

impl FlowQuery {
    /// Walks the connection table (seconds for a full one: call it off the
    /// loop): its entries, and per backend the flows seen lately.
    pub fn answer(self) -> Response {
        let census = self.censuses.get_or_take(self.census);
        let mut recent: Vec<serde_json::Value> = census
            .active
            .iter()
            .map(|((service, backend), n)| {
                json!({ "service": service, "backend": backend, "recent_flows": n })
            })
            .collect();
        recent.sort_by_key(|v| v.to_string());
        Response::Ok(json!({
            "entries": census.entries,
            "capacity": census.capacity,
            "backends": recent,
        }))
    }
}

/// The service, and the index of the backend, that a report is about, if it
/// comes from the task running for that backend now (a report of a task that
/// was since replaced is stale and ignored).
fn report_target<'a, W>(
    tasks: &HashMap<(String, String), Checker<W>>,
    services: &'a mut [ServiceState],
    service: &str,
    backend: &str,
    id: u64,
) -> Option<(&'a mut ServiceState, usize)> {
    let key = (service.to_owned(), backend.to_owned());
    if tasks.get(&key).is_none_or(|c| c.id != id) {
        return None;
    }
    let s = services.iter_mut().find(|s| s.config.name == service)?;
    let i = s.backends.iter().position(|b| b.config.name == backend)?;
    Some((s, i))
}

/// Makes `running` match `wanted`: a task whose target changed or went is
/// stopped (dropping its `Checker` aborts it), a missing one is started with a
/// fresh id (so reports of a replaced task are recognised and ignored).
fn sync_tasks<W: PartialEq>(
    running: &mut HashMap<(String, String), Checker<W>>,
    wanted: HashMap<(String, String), W>,
    next_id: &mut u64,
    spawn: impl Fn(&(String, String), &W, u64) -> JoinHandle<()>,
) {
    running.retain(|k, c| wanted.get(k).is_some_and(|w| *w == c.what));
    for (key, what) in wanted {
        if running.contains_key(&key) {
            continue;
        }
        *next_id += 1;
        let task = spawn(&key, &what, *next_id);
        running.insert(
            key,
            Checker {
                id: *next_id,
                what,
                task,
            },
        );
    }
}

/// A server's role as `lb status` names it.
fn mysql_role(roles: &Roles, name: &str, o: &Observation) -> &'static str {
    if roles.primary.as_deref() == Some(name) {
        "primary"
    } else if !o.reachable {
        "unreachable"
    } else if o.replicating {
        "replica"
    } else if !o.read_only {
        "writable"
    } else {
        "read-only"
    }
}

/// Refuses a weight change that would not fit the service's ring.
fn check_ring(s: &ServiceState, change: impl FnOnce(&mut Vec<u32>)) -> Result<()> {
    let mut w: Vec<u32> = s.backends.iter().map(|b| b.config.weight).collect();
    change(&mut w);
    if w.iter().any(|&x| x > lb_common::RING_SIZE) {
        return Err(format!("a weight is above {}", lb_common::RING_SIZE));
    }
    let len = lb_common::ring::ring_len(&w);
    if len > lb_common::RING_SIZE as u64 {
        return Err(format!(
            "the weights would need {len} ring slots, at most {} fit",
            lb_common::RING_SIZE
        ));
    }
    Ok(())
}
