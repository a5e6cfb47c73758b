//! The reconciler: the one owner of the data path. Config (file and reloads),
//! operators (the control socket) and health checkers report what they want
//! or see; the reconciler keeps those observations, works out what the maps
//! should hold with the pure planner ([`desired`]), and has it written
//! through [`Dataplane::apply`] only when that changed.

mod desired;
mod status;

use std::{
    collections::{HashMap, VecDeque},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle};

pub use self::{
    desired::{
        backends, desired, desired_service, eligibility, ring_weight, service_spec, weight, Admin,
        BackendObservations, Ineligible, Observations, ServiceObservations,
    },
    status::{
        Attachment, BackendMysql, BackendState, BackendStatus, Event, FlowTable, HealthStatus,
        History, MysqlRole, PinnedState, Pressure, Sample, ServiceMysql, ServiceStatus, Status,
        HISTORY_SPAN, PRESSURE_PERCENT, SAMPLE_EVERY,
    },
};
use crate::{
    config::{
        check_ring, check_weight, BackendConfig, Cidr, Config, ConfigError, HealthCheck,
        MysqlMonitor, WeightError,
    },
    control::{Request, Response},
    dataplane::{Census, Dataplane, DataplaneError, FlowCensus, ServiceSpec},
    health::{self, Report},
    mysql::{self, Observation},
    nexthop,
};

/// A flow counts as active while it has not closed and saw a packet within this.
pub const TCP_ACTIVE_IDLE: Duration = Duration::from_secs(300);
pub const UDP_ACTIVE_IDLE: Duration = Duration::from_secs(60);

/// Health checks kept per backend for `lb status` and the status page.
const HISTORY: usize = 30;

/// Why the reconciler refused a request or could not apply a change.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no service {service:?}")]
    UnknownService { service: String },
    #[error("service {service:?} has no backend {backend:?}")]
    UnknownBackend { service: String, backend: String },
    #[error("service {service:?} already has a backend named {backend:?}")]
    DuplicateBackend { service: String, backend: String },
    #[error("backend name {name:?}: {problem}")]
    BadName { name: String, problem: String },
    #[error("{problem}")]
    BadAddress { problem: String },
    #[error("{address} is on the firewall's deny list ({cidr}): its replies would be dropped")]
    DeniedAddress { address: Ipv4Addr, cidr: Cidr },
    #[error("port 0 is not a valid port")]
    PortZero,
    #[error("{service}/{backend}")]
    InvalidWeight {
        service: String,
        backend: String,
        #[source]
        source: WeightError,
    },
    #[error("at most {max} backends are supported")]
    Capacity { max: u32 },
    #[error(
        "{}: [daemon] changed (interfaces, hooks, control_socket, manage_neighbours): \
         restart lb to apply that; nothing was changed",
        file.display()
    )]
    DaemonChanged { file: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("stop is handled by the daemon")]
    StopElsewhere,
    #[error("data path")]
    Dataplane(#[from] DataplaneError),
}

type Result<T, E = ReconcileError> = std::result::Result<T, E>;

/// An error and its causes as one line, for the control socket's answer.
pub fn message(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::Chain(e).to_string()
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
    /// The file as loaded: never changed in place (run-time changes are
    /// observations).
    file: Config,
    obs: Observations,
    /// What the maps were last given, None when unknown (not yet written, a
    /// write failed, or the config changed): the next write is then whole.
    applied: Option<Vec<ServiceSpec>>,
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
    samples: VecDeque<Sample>,
    events: VecDeque<Event>,
    reloads: status::Reloads,
    /// Every backend's (id, address), for the next-hop watcher.
    hop_targets: tokio::sync::watch::Sender<Vec<(u32, Ipv4Addr)>>,
}

impl Balancer {
    /// Takes over a loaded data path and writes `cfg` into it. Health reports
    /// are to be sent to `reports` and fed back through [`Balancer::on_report`].
    pub fn new(
        cfg: Config,
        dp: Dataplane,
        reports: mpsc::Sender<Report>,
        mysql_reports: mpsc::Sender<mysql::Report>,
        first_look: FirstLook,
    ) -> Result<Balancer> {
        let mut obs = Observations::default();
        for s in &cfg.services {
            let so = obs.services.entry(s.name.clone()).or_default();
            for b in &s.backends {
                so.backends.entry(b.name.clone()).or_default().mysql =
                    first_look.get(&(s.name.clone(), b.name.clone())).cloned();
            }
        }
        let mut dp = dp;
        dp.set_stateless_replies(cfg.daemon.stateless_reverse_nat);
        let mut b = Balancer {
            file: cfg,
            obs,
            applied: None,
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
            samples: VecDeque::new(),
            events: VecDeque::new(),
            reloads: status::Reloads::default(),
        };
        b.steer_all();
        b.sync()?;
        Ok(b)
    }

    /// Runs the data path on `iface` (see `Dataplane::attach`). The data
    /// path's links are the one thing the daemon asks for directly; its maps
    /// are written only by `sync`.
    pub fn attach(
        &mut self,
        iface: &str,
        hook: crate::config::Hook,
    ) -> Result<crate::dataplane::Attachment> {
        Ok(self.dp.attach(iface, hook)?)
    }

    /// Detaches pinned links of interfaces that are not in `keep`.
    pub fn drop_stale_links(&mut self, keep: &[String]) {
        self.dp.drop_stale_links(keep);
    }

    /// The program's log reader (a build with verbose logs only).
    pub fn program_logger(
        &mut self,
    ) -> std::result::Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        self.dp.logger()
    }

    /// Ends the daemon's hold on the data path (see `Dataplane::shutdown`).
    pub fn shutdown(&mut self, keep: bool) {
        self.dp.shutdown(keep);
    }

    pub fn config_file(&self) -> &Config {
        &self.file
    }

    /// After a change of config: the daemon-wide settings, every service,
    /// and the checkers.
    fn sync(&mut self) -> Result<()> {
        self.dp.set_firewall(&self.file.firewall)?;
        self.dp.set_linger(self.file.daemon.closed_linger)?;
        self.applied = None;
        self.write()?;
        self.sync_checkers();
        Ok(())
    }

    /// Writes what the planner wants, if it is not what the maps hold.
    fn write(&mut self) -> Result<()> {
        let specs = desired(&self.file, &self.obs);
        self.write_specs(specs)
    }

    /// After an observation about one service: only its spec is worked out
    /// again, and nothing is written when it did not change.
    fn write_service(&mut self, service: &str) -> Result<()> {
        let Some(i) = self.file.services.iter().position(|s| s.name == service) else {
            return Ok(());
        };
        let spec = service_spec(
            &self.file.services[i],
            self.obs.service(service),
            self.file.daemon.maglev_seed,
        );
        let specs = match &self.applied {
            Some(a) if a.len() == self.file.services.len() && a[i].name == service => {
                if a[i] == spec {
                    return Ok(());
                }
                let mut specs = a.clone();
                specs[i] = spec;
                specs
            }
            _ => desired(&self.file, &self.obs),
        };
        self.write_specs(specs)
    }

    fn write_specs(&mut self, specs: Vec<ServiceSpec>) -> Result<()> {
        if self.applied.as_ref() == Some(&specs) {
            return Ok(());
        }
        // Until it succeeds, what the maps hold is unknown.
        self.applied = None;
        self.dp.apply(&specs)?;
        self.applied = Some(specs);
        let targets = self.dp.hop_targets();
        self.hop_targets.send_if_modified(|t| {
            let changed = *t != targets;
            *t = targets;
            changed
        });
        Ok(())
    }

    /// Re-decides every steered service's MySQL roles.
    fn steer_all(&mut self) {
        let names: Vec<String> = self.file.services.iter().map(|s| s.name.clone()).collect();
        for name in names {
            self.steer(&name);
        }
    }

    /// Re-decides a steered service's MySQL roles from its latest
    /// observations. Logs every change of primary and of alarm, and marks a
    /// primary that lost the role as demoted.
    fn steer(&mut self, service: &str) {
        let Some(s) = self.file.services.iter().find(|s| s.name == service) else {
            return;
        };
        if s.steering == crate::config::Steering::None {
            return;
        }
        let o = self.obs.services.entry(service.to_owned()).or_default();
        let next = desired::roles(s, o);
        if next.alarm != o.roles.alarm {
            match &next.alarm {
                Some(a) => tracing::error!(service, alarm = %a, "MySQL alarm"),
                None => tracing::info!(service, "MySQL alarm cleared"),
            }
        }
        if next.primary != o.roles.primary {
            tracing::warn!(service, from = ?o.roles.primary, to = ?next.primary, "primary changed");
            if let Some(b) = o.roles.primary.as_ref().and_then(|p| o.backends.get_mut(p)) {
                b.demoted = true;
            }
            if let Some(b) = next.primary.as_ref().and_then(|p| o.backends.get_mut(p)) {
                b.demoted = false;
            }
        }
        o.roles = next;
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
    /// those whose target changed or went, starts the missing ones. Only the
    /// backend list and the config decide targets, so only their changes call it.
    fn sync_checkers(&mut self) {
        let mut checks = HashMap::new();
        let mut watch = HashMap::new();
        for s in &self.file.services {
            for b in backends(s, self.obs.service(&s.name)) {
                let key = (s.name.clone(), b.name.clone());
                if let Some(h) = &b.health {
                    let port = h.port.unwrap_or(b.port);
                    checks.insert(key.clone(), (b.address, port, h.clone()));
                }
                if let Some(m) = s.steering.mysql() {
                    watch.insert(key, (b.address, b.port, m.clone()));
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

    /// Counts a health-check result and applies a change of state (and
    /// writes nothing when the backend's state did not change).
    pub fn on_report(&mut self, r: Report) {
        if !is_current(&self.checkers, &r.service, &r.backend, r.checker) {
            return;
        }
        let Some(check) = self
            .file
            .services
            .iter()
            .find(|s| s.name == r.service)
            .and_then(|s| backends(s, self.obs.service(&s.name)).find(|b| b.name == r.backend))
            .and_then(|b| b.health.clone())
        else {
            return;
        };
        let Some(b) = self.obs.backend_mut(&r.service, &r.backend) else {
            return;
        };
        let detail = r.result.detail.clone();
        self.metrics
            .observe_check(&r.service, &r.backend, r.result.ok, r.result.latency_us);
        if b.history.len() == HISTORY {
            b.history.pop_front();
        }
        b.history.push_back(r.result.clone());
        if !b.health.record(r.result, check.rise, check.fall) {
            return;
        }
        let up = b.health.up;
        let state = if up { "up" } else { "down" };
        let what = format!("{}/{} {state}", r.service, r.backend);
        status::push_bounded(
            &mut self.events,
            Event {
                t: status::unix_ms(),
                what,
            },
        );
        if up {
            tracing::info!(service = %r.service, backend = %r.backend, state, check = %detail, "backend state changed");
        } else {
            tracing::warn!(service = %r.service, backend = %r.backend, state, check = %detail, "backend state changed");
        }
        if let Err(e) = self.write_service(&r.service) {
            tracing::error!(error = %message(&e), "applying a health change failed");
        }
    }

    /// Takes a MySQL observation: re-decides the service's roles and applies
    /// what changed (a new primary, a replica in or out of the read set);
    /// nothing is written when the service's spec stays the same.
    pub fn on_mysql_report(&mut self, r: mysql::Report) {
        if !is_current(&self.monitors, &r.service, &r.backend, r.monitor) {
            return;
        }
        let Some(b) = self.obs.backend_mut(&r.service, &r.backend) else {
            return;
        };
        let was_reachable = b.mysql.as_ref().map(|o| o.reachable);
        if was_reachable.is_some_and(|w| w != r.observation.reachable) {
            tracing::warn!(service = %r.service, backend = %r.backend, reachable = r.observation.reachable,
                error = ?r.observation.error, "MySQL server reachability changed");
        }
        b.mysql = Some(r.observation);
        self.steer(&r.service);
        if let Err(e) = self.write_service(&r.service) {
            tracing::error!(error = %message(&e), "applying a MySQL change failed");
        }
    }

    /// Makes `new` (a validated file) the configuration, applying only the
    /// difference. Operators' drain and disable marks on backends that remain
    /// are kept, and so is their health; backends added at run time that the
    /// file does not list are removed, and weights set at run time go back
    /// to the file's. `[daemon]` changes need a restart.
    pub fn reload(&mut self, new: Config) -> Result<String> {
        if new.daemon != self.file.daemon {
            return Err(ReconcileError::DaemonChanged {
                file: new.file.clone(),
            });
        }
        let mut obs = Observations::default();
        for s in &new.services {
            let so = obs.services.entry(s.name.clone()).or_default();
            let old_service = self.file.services.iter().find(|o| o.name == s.name);
            let old = self.obs.services.get(&s.name);
            if let Some(old) = old {
                so.roles = old.roles.clone();
            }
            for b in &s.backends {
                let bo = so.backends.entry(b.name.clone()).or_default();
                // What ran under this name (from the file or added at run time).
                let prev = old_service.zip(old).and_then(|(os, o)| {
                    backends(os, o)
                        .find(|x| x.name == b.name)
                        .map(|x| (x, o.backend(&b.name)))
                });
                if let Some((was, seen)) = prev {
                    bo.admin = seen.admin;
                    bo.mysql = seen.mysql.clone();
                    bo.demoted = seen.demoted;
                    if (was.address, was.port, &was.health) == (b.address, b.port, &b.health) {
                        bo.health = seen.health.clone();
                    }
                }
            }
        }
        self.obs = obs;
        self.file = new;
        self.steer_all();
        self.sync()?;
        let backends: usize = self.file.services.iter().map(|s| s.backends.len()).sum();
        let msg = format!(
            "{}: applied ({} services, {backends} backends)",
            self.file.file.display(),
            self.file.services.len()
        );
        tracing::info!(file = %self.file.file.display(), services = self.file.services.len(), backends, "config applied");
        Ok(msg)
    }

    /// Answers a control request.
    pub fn control(&mut self, req: Request) -> Response {
        let r = match req {
            // O(backends): the data path counts flows per backend.
            Request::Status => {
                return match self.status() {
                    Ok(status) => Response::Ok(status.to_json()),
                    Err(e) => Response::Error(message(&e)),
                };
            }
            Request::Metrics => {
                return match self.status() {
                    Ok(status) => Response::Ok(json!({ "text": self.metrics.render(&status) })),
                    Err(e) => Response::Error(message(&e)),
                };
            }
            // The daemon's loop takes this off the loop (`flow_query`); here
            // the census is taken in place.
            Request::Census => {
                return match self.flow_query() {
                    Ok(q) => q.answer(),
                    Err(e) => Response::Error(message(&e)),
                };
            }
            // The daemon's loop handles it: it owns the process's lifetime.
            Request::Stop { .. } => Err(ReconcileError::StopElsewhere),
            Request::Reload => {
                let r = Config::load(&self.file.file.clone())
                    .map_err(|e| {
                        tracing::error!(error = %e, "config rejected");
                        ReconcileError::from(e)
                    })
                    .and_then(|c| self.reload(c));
                match r {
                    Ok(_) => self.reloads.applied += 1,
                    Err(_) => self.reloads.rejected += 1,
                }
                r
            }
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
            Err(e) => Response::Error(message(&e)),
        }
    }

    /// The config of a service and what was seen of it.
    fn service(
        &self,
        service: &str,
    ) -> Result<(&crate::config::ServiceConfig, &ServiceObservations)> {
        let s = self
            .file
            .services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| ReconcileError::UnknownService {
                service: service.to_owned(),
            })?;
        Ok((s, self.obs.service(service)))
    }

    /// The backend `name` of `service` as it runs.
    fn backend(&self, service: &str, name: &str) -> Result<&BackendConfig> {
        let (s, o) = self.service(service)?;
        backends(s, o)
            .find(|b| b.name == name)
            .ok_or_else(|| ReconcileError::UnknownBackend {
                service: service.to_owned(),
                backend: name.to_owned(),
            })
    }

    /// What was seen of a backend that runs, to be changed.
    fn observed_mut(&mut self, service: &str, name: &str) -> Result<&mut BackendObservations> {
        self.backend(service, name)?;
        Ok(self
            .obs
            .services
            .entry(service.to_owned())
            .or_default()
            .backends
            .entry(name.to_owned())
            .or_default())
    }

    fn add_backend(
        &mut self,
        service: &str,
        name: &str,
        address: Ipv4Addr,
        port: Option<u16>,
        weight: Option<u32>,
    ) -> Result<String> {
        let total: usize = self
            .file
            .services
            .iter()
            .map(|s| backends(s, self.obs.service(&s.name)).count())
            .sum();
        if total >= lb_common::MAX_BACKENDS as usize {
            return Err(ReconcileError::Capacity {
                max: lb_common::MAX_BACKENDS,
            });
        }
        if let Some(problem) = crate::config::name_problem(name) {
            return Err(ReconcileError::BadName {
                name: name.to_owned(),
                problem,
            });
        }
        // Its replies must not be dropped by the firewall.
        if let Some(c) = self.file.firewall.deny.iter().find(|c| c.contains(address)) {
            return Err(ReconcileError::DeniedAddress { address, cidr: *c });
        }
        let (s, o) = self.service(service)?;
        if backends(s, o).any(|b| b.name == name) {
            return Err(ReconcileError::DuplicateBackend {
                service: service.to_owned(),
                backend: name.to_owned(),
            });
        }
        if let Some(problem) = crate::config::backend_address_problem(address, Some(s.vip)) {
            return Err(ReconcileError::BadAddress { problem });
        }
        let port = port.unwrap_or(s.port);
        if port == 0 {
            return Err(ReconcileError::PortZero);
        }
        let invalid = |source| ReconcileError::InvalidWeight {
            service: service.to_owned(),
            backend: name.to_owned(),
            source,
        };
        let weight = check_weight(s.scheduler.kind(), weight).map_err(invalid)?;
        let mut weights: Vec<u32> = backends(s, o)
            .map(|b| self::weight(b, o.backend(&b.name)))
            .collect();
        weights.push(weight);
        check_ring(s.scheduler.kind(), &weights).map_err(invalid)?;
        let config = BackendConfig {
            name: name.to_owned(),
            address,
            port,
            weight,
            health: s.health.clone(),
        };
        let so = self.obs.services.entry(service.to_owned()).or_default();
        so.added.push(config);
        so.backends
            .insert(name.to_owned(), BackendObservations::default());
        self.write()?;
        self.sync_checkers();
        tracing::info!(service, backend = name, %address, port, "backend added");
        Ok(format!("{service}/{name} added: {address}:{port}"))
    }

    fn remove_backend(&mut self, service: &str, name: &str) -> Result<String> {
        self.backend(service, name)?;
        let so = self.obs.services.entry(service.to_owned()).or_default();
        let before = so.added.len();
        so.added.retain(|b| b.name != name);
        if so.added.len() == before {
            so.removed.insert(name.to_owned());
        }
        so.backends.remove(name);
        self.write()?;
        self.sync_checkers();
        tracing::info!(service, backend = name, "backend removed");
        Ok(format!("{service}/{name} removed"))
    }

    fn set_admin(&mut self, service: &str, name: &str, admin: Admin) -> Result<String> {
        let b = self.observed_mut(service, name)?;
        b.admin = admin;
        let state = BackendState::of(b);
        self.write_service(service)?;
        tracing::info!(
            service,
            backend = name,
            state = state.name(),
            "backend state changed"
        );
        Ok(format!("{service}/{name} is {}", state.name()))
    }

    fn set_weight(&mut self, service: &str, name: &str, weight: u32) -> Result<String> {
        let (s, o) = self.service(service)?;
        let invalid = |source| ReconcileError::InvalidWeight {
            service: service.to_owned(),
            backend: name.to_owned(),
            source,
        };
        check_weight(s.scheduler.kind(), Some(weight)).map_err(invalid)?;
        self.backend(service, name)?;
        let weights: Vec<u32> = backends(s, o)
            .map(|b| match b.name == name {
                true => weight,
                false => self::weight(b, o.backend(&b.name)),
            })
            .collect();
        check_ring(s.scheduler.kind(), &weights).map_err(invalid)?;
        self.observed_mut(service, name)?.weight = Some(weight);
        self.write_service(service)?;
        tracing::info!(service, backend = name, weight, "backend weight changed");
        Ok(format!("{service}/{name} weight {weight}"))
    }

    /// A census of the connection table, answered off the daemon's loop
    /// ([`FlowQuery::answer`]): it walks the whole table, one system call per
    /// entry (seconds for a full one). A diagnostic only: status and metrics
    /// use the data path's own counts.
    pub fn flow_query(&self) -> Result<FlowQuery> {
        Ok(FlowQuery {
            census: self.dp.census()?,
            censuses: self.censuses.clone(),
        })
    }
}

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
        let mut backends: Vec<status::RecentFlows> = census
            .active
            .into_iter()
            .map(|((service, backend), recent_flows)| status::RecentFlows {
                service,
                backend,
                recent_flows,
            })
            .collect();
        backends.sort_by(|a, b| (&a.service, &a.backend).cmp(&(&b.service, &b.backend)));
        let answer = status::CensusStatus {
            entries: census.entries,
            capacity: census.capacity,
            backends,
        };
        match serde_json::to_value(answer) {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Error(format!("census: {e}")),
        }
    }
}

/// Whether a report comes from the task running for its backend now (a
/// report of a task that was since replaced is stale and ignored).
fn is_current<W>(
    tasks: &HashMap<(String, String), Checker<W>>,
    service: &str,
    backend: &str,
    id: u64,
) -> bool {
    tasks
        .get(&(service.to_owned(), backend.to_owned()))
        .is_some_and(|c| c.id == id)
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
