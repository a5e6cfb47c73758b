//! The control-plane part of `cargo xtask bench`: how soon the daemon acts on
//! what its health checks and MySQL monitors see, and what it costs in
//! memory. One testbed with the seed's kinds of services over real servers:
//!
//! ```text
//!  client ── lb (the `lb` daemon) ── switch ──┬── web1, web2 (nginx :80, :443)
//!                                             └── db1, db2 (MariaDB, GTID replication)
//! ```
//! - A backend's failure to the last new flow sent to it: the client opens
//!   about 1,000 TCP connections a second to the VIP; at T0 web1 fails (its
//!   nginx stops, or every packet to it is dropped). The last new flow is the
//!   last increase of web1's new-flow counter in the data path (its
//!   BACKEND_TRAFFIC entry, read from the daemon's pinned map every
//!   millisecond), checked against what the client saw.
//! - A MySQL promotion to the write VIP switching: the client writes through
//!   the write VIP on a new connection every 10 ms; at T0 the replica becomes
//!   the writable primary; the figure is the first write the new primary takes.
//! - Memory: the daemon runs with its connection table sized for 1,000,000
//!   flows; the kernel memory of its maps (`memlock` in each map's fdinfo) and
//!   its resident memory, idle and with 1,000,000 flows in the table.
//!
//! Nothing asks the daemon for its status while a time is being measured
//! (status walks the connection table), except in the runs whose point is a
//! failure during a metrics scrape of the full table.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray};
use lb_common::{Backend, Flow, FlowKey, Traffic, BACKEND_F_PRESENT};
use lb_userspace::{
    control::{self, Request},
    error::Chain,
};

use lb_tests::{
    daemon::LbDaemon,
    mariadb::{MariaDb, APP_PASSWORD, APP_USER, MONITOR_PASSWORD, MONITOR_USER},
    netns::Netns,
    nginx::Nginx,
    topology::{backend_addr, lb_config, pin_dir_for, Topology, VIP},
    TempDir,
};

/// The web service's health checks, which the failover times are judged
/// against: every 100 ms, a 100 ms timeout, up after 2 passes, down after 2 failures.
pub const CHECK_INTERVAL_MS: u64 = 100;
/// See [`CHECK_INTERVAL_MS`].
pub const CHECK_TIMEOUT_MS: u64 = 100;
/// See [`CHECK_INTERVAL_MS`].
pub const RISE: u32 = 2;
/// See [`CHECK_INTERVAL_MS`].
pub const FALL: u32 = 2;
/// The daemon's `conntrack_size`: room for `FLOWS`.
pub const TABLE_SIZE: u32 = 1 << 20;
/// Flows put in the daemon's table for the memory figures.
pub const FLOWS: u32 = 1_000_000;
/// The MySQL monitors' interval (the seed's).
pub const MYSQL_INTERVAL_MS: u64 = 250;
/// The MySQL monitors' timeout (the seed's).
pub const MYSQL_TIMEOUT_MS: u64 = 200;

const WEB: u16 = 80;
const WEB_TLS: u16 = 443;
const WRITE: u16 = 3306;
const READ: u16 = 3307;

/// How long the client keeps connecting after a failure: five times the
/// bound the checks set (interval x fall + timeout).
const WINDOW: Duration =
    Duration::from_millis(5 * (CHECK_INTERVAL_MS * FALL as u64 + CHECK_TIMEOUT_MS));
/// The client's pace: one new connection per tick.
const CONNECT_EVERY: Duration = Duration::from_millis(1);
/// How long a connection may take to be accepted before it counts as unanswered.
const CONNECT_PATIENCE: Duration = Duration::from_millis(200);
/// The writer's pace through the write VIP.
const WRITE_EVERY: Duration = Duration::from_millis(10);

/// How a backend fails in [`Bed::backend_failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Failure {
    /// Its nginx stops: its port refuses connections and checks.
    Stopped,
    /// Every packet to it is dropped (a hung or unplugged host): checks time out.
    Silent,
}

impl Failure {
    /// What happens to web1, for the printed runs.
    pub fn describe(self) -> &'static str {
        match self {
            Failure::Stopped => "web1's nginx stopped",
            Failure::Silent => "web1 stops answering (all its input dropped)",
        }
    }
}

/// One backend failure, timed from the failure (T0).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverRun {
    pub failure: Failure,
    /// The last increase of the backend's new-flow counter (0 if none after T0).
    pub last_new_flow_ms: f64,
    /// The start of the last connection the client saw go to it (refused, or
    /// unanswered within 200 ms), if any started after T0.
    pub client_last_ms: Option<f64>,
    /// Connections the client saw go to it that started more than 5 ms after
    /// its last new flow: their SYNs matched flows already tracked to it.
    pub client_after_last_flow: usize,
    /// The metrics request the failure happened during, if any: how long it took.
    pub scrape_ms: Option<f64>,
    /// When the daemon logged it down.
    pub marked_down_ms: Option<f64>,
    /// New flows the data path sent to it after T0.
    pub flows_after: u64,
    /// New connections per second the client made.
    pub connections_per_s: f64,
    /// False if new flows still reached it in the last 100 ms of the window.
    pub settled: bool,
}

/// One promotion, timed from the moment the new primary became writable (T0).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PromotionRun {
    pub kind: &'static str,
    /// The start of the first write through the write VIP that the new primary took.
    pub switch_ms: f64,
    /// From the old primary going read-only (or being killed) to that write.
    pub outage_ms: f64,
    /// Write attempts that failed in between.
    pub failed_writes: usize,
    /// Writes the old primary took after it went read-only (must be none).
    pub stray_writes: usize,
}

/// One BPF map's kernel memory, as its fdinfo reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapMemory {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub memlock_bytes: u64,
}

/// The running daemon's memory, and how long it takes to answer, idle.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Idle {
    /// VmRSS and VmHWM (peak), KiB.
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// The maps it holds.
    pub maps: Vec<MapMemory>,
}

/// The running daemon's memory and how long it takes to answer, idle and
/// with `flows` flows in its connection table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DaemonMemory {
    pub idle: Idle,
    /// VmRSS after the failover and promotion runs.
    pub rss_after_runs_kib: u64,
    /// VmRSS with the flows in the table, after status and metrics requests.
    pub rss_full_kib: u64,
    /// VmHWM at the end.
    pub hwm_kib: u64,
    pub flows: u32,
    /// Entries of the connection table (its `conntrack_size`).
    pub table_capacity: u64,
    /// Entries the daemon counted after the fill (LRU eviction could take some).
    pub present: u64,
    pub fill_s: f64,
    /// The maps with the flows in the table.
    pub maps: Vec<MapMemory>,
    /// (entries in the table as the daemon counted them, ms of each `lb status` round trip).
    pub status_ms: Vec<(u64, Vec<f64>)>,
    /// Ms of each metrics request (a Prometheus scrape) with the flows in the table.
    pub metrics_full_ms: Vec<f64>,
    /// Failovers (nginx stopped) with the flows in the table, each 20 ms into a metrics request.
    pub failover_while_scraped: Vec<FailoverRun>,
}

/// The testbed; everything in it is removed on drop (fields drop in order:
/// the daemon and servers before the namespaces).
pub struct Bed {
    lb: LbDaemon,
    webs: Vec<Nginx>,
    dbs: Vec<MariaDb>,
    /// Index in `dbs` of the current primary.
    primary: usize,
    pid: u32,
    _secret: TempDir,
    t: Topology,
}

impl Bed {
    /// Builds it and waits until every check passed once and db1 is the primary.
    pub fn new(prefix: &str) -> Result<Bed, String> {
        let t = Topology::with_backends(prefix, &["web1", "web2", "db1", "db2"]);
        let webs = vec![web(&t.backends[0], 1), web(&t.backends[1], 2)];
        let dbs = vec![
            MariaDb::start(&t.backends[2], "db1", backend_addr(3), 1),
            MariaDb::start(&t.backends[3], "db2", backend_addr(4), 2),
        ];
        dbs[0].create_users_and_schema(MONITOR_PASSWORD);
        dbs[0].make_writable();
        dbs[1].replicate_from(&dbs[0]);
        dbs[1].catch_up(&dbs[0]);
        let secret = TempDir::new("bench-secret");
        let pass = secret.path().join("monitor.pass");
        std::fs::write(&pass, format!("{MONITOR_PASSWORD}\n"))
            .map_err(|e| format!("{}: {e}", pass.display()))?;
        let lb = LbDaemon::start(&t.lb, |sock| {
            lb_config(sock, &services(&pass)).replacen(
                "\n\n",
                &format!("\nconntrack_size = {TABLE_SIZE}\n\n"),
                1,
            )
        });
        let pid = daemon_pid(&lb.config)?;
        let bed = Bed {
            lb,
            webs,
            dbs,
            primary: 0,
            pid,
            _secret: secret,
            t,
        };
        for (svc, b) in [
            ("web", "web1"),
            ("web", "web2"),
            ("web-tls", "web1"),
            ("web-tls", "web2"),
        ] {
            until(
                &format!("{svc}/{b} checked and up"),
                Duration::from_secs(10),
                || bed.checked_up(svc, b).then_some(()),
            )?;
        }
        bed.wait_primary(Some("db1"), Duration::from_secs(10))?;
        Ok(bed)
    }

    /// The daemon's memory now (call it before the runs).
    pub fn idle(&self) -> Result<Idle, String> {
        let (rss_kib, hwm_kib) = rss(self.pid)?;
        let maps = maps_of(self.pid);
        match maps.iter().find(|m| m.name == lb_common::maps::CONNTRACK) {
            Some(m) if m.max_entries == TABLE_SIZE as u64 => {}
            other => {
                return Err(format!(
                    "the daemon's connection table is not {TABLE_SIZE} entries ({other:?}): \
                     is `[daemon] conntrack_size` honoured?"
                ))
            }
        }
        Ok(Idle {
            rss_kib,
            hwm_kib,
            maps,
        })
    }

    fn checked_up(&self, svc: &str, backend: &str) -> bool {
        let b = self.lb.backend(svc, backend);
        b["state"] == "up" && b["health"]["last"]["ok"] == true
    }

    fn primary_now(&self) -> Option<String> {
        let st = self.lb.status();
        st["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "mysql-write")
            .and_then(|s| s["mysql"]["primary"].as_str().map(str::to_owned))
    }

    fn wait_primary(&self, want: Option<&str>, within: Duration) -> Result<(), String> {
        until(&format!("write VIP primary {want:?}"), within, || {
            (self.primary_now().as_deref() == want).then_some(())
        })
    }

    /// Fails web1 `runs` times the `failure` way while the client connects,
    /// and times what follows; web1 is restored and seen up between runs.
    /// With `during_scrape`, each failure happens 20 ms into a metrics request.
    pub fn backend_failure(
        &mut self,
        failure: Failure,
        runs: usize,
        during_scrape: bool,
    ) -> Result<Vec<FailoverRun>, String> {
        let pins = pin_dir_for(&self.lb.socket);
        // A scrape of a full table holds the daemon's loop for about a second.
        let window = if during_scrape {
            WINDOW + Duration::from_secs(3)
        } else {
            WINDOW
        };
        let mut out = Vec::new();
        for run in 0..runs {
            let counter = NewFlows::open(&pins, backend_addr(1), WEB)?;
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = watch(counter, stop.clone());
            let load = Connector::start(&self.t.client, SocketAddrV4::new(VIP, WEB).into());
            std::thread::sleep(Duration::from_millis(300));
            let scrape = during_scrape.then(|| {
                let socket = self.lb.socket.clone();
                let s = std::thread::spawn(move || {
                    let start = Instant::now();
                    control::request(&socket, &Request::Metrics)
                        .map_err(|e| Chain(&e).to_string())?;
                    Ok::<f64, String>(start.elapsed().as_secs_f64() * 1000.0)
                });
                std::thread::sleep(Duration::from_millis(20));
                s
            });
            let t0 = Instant::now();
            let t0_ms = unix_ms();
            match failure {
                Failure::Stopped => self.webs[0].stop(),
                Failure::Silent => {
                    self.t.backends[0].exec(
                        "nft",
                        &["add table inet lbbench; \
                           add chain inet lbbench input { type filter hook input priority -300; policy drop; }"],
                    );
                }
            }
            std::thread::sleep(window);
            let attempts = load.stop();
            stop.store(true, Ordering::Relaxed);
            let changes = watcher.join().map_err(|_| "the counter watcher panicked")?;
            let scrape_ms = match scrape {
                Some(s) => Some(s.join().map_err(|_| "the scrape panicked")??),
                None => None,
            };
            let down = logged_changes(&self.lb.log_text(), "web", "web1", "down")
                .into_iter()
                .find(|at| *at >= t0_ms);
            let restoring = unix_ms();
            match failure {
                Failure::Stopped => self.webs[0].restart(&self.t.backends[0]),
                Failure::Silent => {
                    self.t.backends[0].exec("nft", &["delete table inet lbbench"]);
                }
            }
            // Back up before the next run. The daemon's log says so: `lb
            // status` would walk the whole table each time it is asked.
            if down.is_some() {
                until("web/web1 up again", Duration::from_secs(10), || {
                    logged_changes(&self.lb.log_text(), "web", "web1", "up")
                        .into_iter()
                        .find(|at| *at >= restoring)
                })?;
            }
            let mut r = failover_run(failure, t0, window, &attempts, &changes)?;
            r.marked_down_ms = down.map(|at| (at - t0_ms) as f64);
            r.scrape_ms = scrape_ms;
            println!(
                "  run {} {:<46} last new flow {:>6.1} ms, marked down {:>6} ms; the client's last to web1 {:>6} ms, \
                 {} after its last new flow; {} flows after T0, {:.0} conn/s{}{}",
                run + 1,
                failure.describe(),
                r.last_new_flow_ms,
                fmt_opt(r.marked_down_ms),
                fmt_opt(r.client_last_ms),
                r.client_after_last_flow,
                r.flows_after,
                r.connections_per_s,
                scrape_ms
                    .map(|m| format!("; during a {m:.0} ms scrape"))
                    .unwrap_or_default(),
                if r.settled { "" } else { " (NOT SETTLED)" }
            );
            out.push(r);
        }
        Ok(out)
    }

    /// Planned switchovers, back and forth, `runs` times, while the client writes.
    pub fn switchovers(&mut self, runs: usize) -> Result<Vec<PromotionRun>, String> {
        let mut out = Vec::new();
        for run in 0..runs {
            let (old, new) = (self.primary, 1 - self.primary);
            self.wait_primary(Some(&self.dbs[old].name), Duration::from_secs(10))?;
            let writer = Writer::start(&self.t.client);
            std::thread::sleep(Duration::from_millis(500));
            let (demoted, promoted) = self.dbs[new].take_over_from(&self.dbs[old]);
            std::thread::sleep(Duration::from_millis(1500));
            let log = writer.stop();
            self.primary = new;
            self.wait_primary(Some(&self.dbs[new].name), Duration::from_secs(5))?;
            let r = promotion_run(
                "planned switchover",
                demoted,
                promoted,
                &log,
                self.dbs[old].server_id,
                self.dbs[new].server_id,
            )?;
            print_promotion(run + 1, &r);
            out.push(r);
        }
        Ok(out)
    }

    /// Kills the primary, waits until the daemon sees no primary, promotes the
    /// replica and times the write VIP's switch to it. The killed server stays down.
    pub fn crash_promotion(&mut self) -> Result<PromotionRun, String> {
        let (old, new) = (self.primary, 1 - self.primary);
        let writer = Writer::start(&self.t.client);
        std::thread::sleep(Duration::from_millis(500));
        let killed = Instant::now();
        self.dbs[old].kill();
        let noticed = self.wait_primary(None, Duration::from_secs(5));
        let promoted = self.dbs[new].promote();
        std::thread::sleep(Duration::from_millis(1500));
        let log = writer.stop();
        noticed?;
        self.primary = new;
        self.wait_primary(Some(&self.dbs[new].name), Duration::from_secs(5))?;
        let r = promotion_run(
            "primary killed, replica promoted",
            killed,
            promoted,
            &log,
            self.dbs[old].server_id,
            self.dbs[new].server_id,
        )?;
        print_promotion(1, &r);
        Ok(r)
    }

    /// Puts `FLOWS` copies of a real flow in the daemon's connection table,
    /// then reads its memory and times `requests` status and metrics round
    /// trips; then `scraped_runs` failovers happen during metrics scrapes.
    pub fn daemon_memory(
        &mut self,
        idle: Idle,
        requests: usize,
        scraped_runs: usize,
    ) -> Result<DaemonMemory, String> {
        let (rss_after_runs_kib, _) = rss(self.pid)?;
        let pins = pin_dir_for(&self.lb.socket);
        let mut status_ms = vec![self.time_request(Request::Status, requests)];
        // One connection held open through the web VIP: closed flows leave
        // the connection table, so this one is there to be copied.
        let _held = self
            .t
            .client
            .run(|| {
                let vip = std::net::SocketAddrV4::new(VIP, WEB).into();
                let mut c = lb_tests::http::Conn::open(vip)?;
                c.get("/").map(|_| c)
            })
            .map_err(|e| format!("a connection through the web VIP: {e}"))?;
        let mut table: BpfHashMap<MapData, FlowKey, Flow> =
            BpfHashMap::try_from(pinned(&pins, lb_common::maps::CONNTRACK)?)
                .map_err(|e| e.to_string())?;
        // A flow the data path made (one of the client's to the web VIP), as
        // the model of the copies: open, seen now.
        let model = table
            .iter()
            .filter_map(Result::ok)
            .find(|(k, _)| k.dst == VIP.octets() && k.dport == WEB.to_be_bytes())
            .map(|(_, f)| f)
            .ok_or("no flow to the web VIP in the daemon's table")?;
        let flow = Flow {
            last_seen: lb_userspace::clock::jiffies_now(),
            flags: 0,
            ..model
        };
        let start = Instant::now();
        for k in flow_keys(FLOWS) {
            table
                .insert(k, flow, 0)
                .map_err(|e| format!("filling the daemon's table: {e}"))?;
        }
        let fill_s = start.elapsed().as_secs_f64();
        let full = self.time_request(Request::Status, requests);
        // The copies were written from here, not by the data path: only a
        // walk of the table (the census) sees them.
        let census = control::request(&self.lb.socket, &Request::Census)
            .map_err(|e| format!("census: {}", Chain(&e)))?;
        let present = census["entries"].as_u64().unwrap_or(0);
        println!("  wrote {FLOWS} flows into the daemon's connection table in {fill_s:.1} s; its census counts {present}");
        status_ms.push((present, full.1));
        let (_, metrics_full_ms) = self.time_request(Request::Metrics, requests);
        let (rss_full_kib, _) = rss(self.pid)?;
        let maps = maps_of(self.pid);
        let failover_while_scraped = self.backend_failure(Failure::Stopped, scraped_runs, true)?;
        let (_, hwm_kib) = rss(self.pid)?;
        Ok(DaemonMemory {
            idle,
            rss_after_runs_kib,
            rss_full_kib,
            hwm_kib,
            flows: FLOWS,
            table_capacity: TABLE_SIZE as u64,
            present,
            fill_s,
            maps,
            status_ms,
            metrics_full_ms,
            failover_while_scraped,
        })
    }

    /// `n` round trips of `req` through the control socket: the entries of the
    /// connection table the last answer counted, and the milliseconds of each.
    fn time_request(&self, req: Request, n: usize) -> (u64, Vec<f64>) {
        let mut entries = 0;
        let ms = (0..n.max(1))
            .map(|_| {
                let start = Instant::now();
                let answer = control::request(&self.lb.socket, &req)
                    .unwrap_or_else(|e| panic!("{req:?}: {}\n{}", Chain(&e), self.lb.log_text()));
                let took = start.elapsed().as_secs_f64() * 1000.0;
                entries = answer["conntrack"]["entries"].as_u64().unwrap_or(entries);
                took
            })
            .collect();
        (entries, ms)
    }
}

/// nginx on :80 and :443 of backend `i`, answering with its name.
fn web(ns: &Netns, i: usize) -> Nginx {
    let name = format!("web{i}");
    let a = backend_addr(i);
    let servers = [WEB, WEB_TLS]
        .map(|p| {
            format!(
                "server {{ listen {a}:{p} reuseport; \
                 location / {{ default_type text/plain; return 200 \"{name}\\n\"; }} }}"
            )
        })
        .join("\n  ");
    Nginx::start_with_servers(ns, &name, SocketAddrV4::new(a, WEB), &servers)
}

/// The seed's kinds of services (as config/demo.toml has them), with faster
/// checks on `web`; the MySQL monitor logs in with the password in `password_file`.
fn services(password_file: &Path) -> String {
    let backends = |list: [(&str, usize); 2], port: u16| -> String {
        list.iter()
            .map(|(n, i)| {
                format!(
                    "\n[[service.backend]]\nname = \"{n}\"\naddress = \"{}\"\nport = {port}\n",
                    backend_addr(*i)
                )
            })
            .collect()
    };
    let webs = [("web1", 1), ("web2", 2)];
    let dbs = [("db1", 3), ("db2", 4)];
    let service = |name: &str, port: u16, extra: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"tcp\"\n{extra}\n"
        )
    };
    let mysql = format!(
        "[service.mysql]\nuser = \"{MONITOR_USER}\"\npassword_file = \"{}\"\n\
         interval_ms = {MYSQL_INTERVAL_MS}\ntimeout_ms = {MYSQL_TIMEOUT_MS}\nmax_replica_lag_s = 5\n",
        password_file.display()
    );
    [
        service(
            "web",
            WEB,
            &format!(
                "[service.health]\nkind = \"http\"\npath = \"/\"\ninterval_ms = {CHECK_INTERVAL_MS}\n\
                 timeout_ms = {CHECK_TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n"
            ),
        ),
        backends(webs, WEB),
        service(
            "web-tls",
            WEB_TLS,
            "[service.health]\nkind = \"tcp\"\ninterval_ms = 250\ntimeout_ms = 200\nrise = 2\nfall = 2\n",
        ),
        backends(webs, WEB_TLS),
        service(
            "mysql-write",
            WRITE,
            &format!("steering = \"mysql-primary\"\n\n{mysql}"),
        ),
        backends(dbs, 3306),
        service(
            "mysql-read",
            READ,
            &format!("steering = \"mysql-replica\"\n\n{mysql}"),
        ),
        backends(dbs, 3306),
    ]
    .join("\n")
}

/// The figures of one failure run, from the client's attempts and the
/// counter's changes.
fn failover_run(
    failure: Failure,
    t0: Instant,
    window: Duration,
    attempts: &[Attempt],
    changes: &[(Instant, u64)],
) -> Result<FailoverRun, String> {
    let ms = |at: Instant| at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
    let before = changes
        .iter()
        .take_while(|(at, _)| *at < t0)
        .last()
        .map(|c| c.1)
        .ok_or("the counter watcher saw nothing before the failure")?;
    let first = changes.first().map(|c| c.1).unwrap_or(0);
    if before <= first {
        return Err(
            "web1 received no new flows before the failure: the load is not reaching it".into(),
        );
    }
    let after: Vec<&(Instant, u64)> = changes.iter().filter(|(at, _)| *at >= t0).collect();
    let last_new_flow_ms = after.last().map(|(at, _)| ms(*at)).unwrap_or(0.0);
    let flows_after = after.last().map(|(_, v)| v - before).unwrap_or(0);
    let to_web1 = |o: Outcome| match failure {
        Failure::Stopped => o == Outcome::Refused,
        Failure::Silent => o == Outcome::Unanswered,
    };
    let client_last_ms = attempts
        .iter()
        .filter(|a| a.at >= t0 && to_web1(a.outcome))
        .map(|a| ms(a.at))
        .reduce(f64::max);
    let client_after_last_flow = attempts
        .iter()
        .filter(|a| a.at >= t0 && to_web1(a.outcome) && ms(a.at) > last_new_flow_ms + 5.0)
        .count();
    let span = match (attempts.first(), attempts.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at).as_secs_f64(),
        _ => 0.0,
    };
    Ok(FailoverRun {
        failure,
        last_new_flow_ms,
        client_last_ms,
        client_after_last_flow,
        scrape_ms: None,
        marked_down_ms: None,
        flows_after,
        connections_per_s: if span > 0.0 {
            attempts.len() as f64 / span
        } else {
            0.0
        },
        settled: last_new_flow_ms < (window.as_secs_f64() * 1000.0 - 100.0),
    })
}

/// When (Unix ms) the daemon logged that `service`/`backend` changed to
/// `state`, from the timestamps of its log lines.
fn logged_changes(log: &str, service: &str, backend: &str, state: &str) -> Vec<u64> {
    let want = format!("service={service} backend={backend} state=\"{state}\"");
    log.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("backend state changed") && l.contains(&want))
        .filter_map(|l| l.split_whitespace().next().and_then(unix_ms_of))
        .collect()
}

/// A log line without its terminal colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Unix milliseconds of an RFC 3339 UTC timestamp ("2026-11-26T02:50:43.584843Z").
fn unix_ms_of(ts: &str) -> Option<u64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms).ok()
}

fn promotion_run(
    kind: &'static str,
    demoted: Instant,
    promoted: Instant,
    log: &[(Instant, Result<u32, String>)],
    old_id: u32,
    new_id: u32,
) -> Result<PromotionRun, String> {
    let first = log
        .iter()
        .find(|(at, r)| *at >= promoted && r.as_ref().is_ok_and(|id| *id == new_id))
        .map(|(at, _)| *at)
        .ok_or_else(|| format!("{kind}: no write reached the new primary within 1.5 s"))?;
    Ok(PromotionRun {
        kind,
        switch_ms: first.duration_since(promoted).as_secs_f64() * 1000.0,
        outage_ms: first.duration_since(demoted).as_secs_f64() * 1000.0,
        failed_writes: log
            .iter()
            .filter(|(at, r)| *at >= demoted && *at < first && r.is_err())
            .count(),
        stray_writes: log
            .iter()
            .filter(|(at, r)| *at >= demoted && r.as_ref().is_ok_and(|id| *id == old_id))
            .count(),
    })
}

fn print_promotion(run: usize, r: &PromotionRun) {
    println!(
        "  run {run} {:<46} write VIP on the new primary {:>6.1} ms after it went writable \
         ({:.1} ms without a primary, {} writes failed, {} stray)",
        r.kind, r.switch_ms, r.outage_ms, r.failed_writes, r.stray_writes
    );
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// Polls `f` every 100 ms until it gives a value, for at most `within`.
fn until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `n` distinct TCP flows from 10.100.0.0 onwards to the VIP's port 80.
pub fn flow_keys(n: u32) -> impl Iterator<Item = FlowKey> {
    (0..n).map(|i| FlowKey {
        src: Ipv4Addr::from(0x0a64_0000 + i).octets(),
        dst: VIP.octets(),
        sport: ((i % 50_000) as u16 + 1024).to_be_bytes(),
        dport: WEB.to_be_bytes(),
        proto: 6,
        _pad: [0; 3],
    })
}

/// A map the daemon pinned under `dir`.
fn pinned(dir: &Path, name: &str) -> Result<Map, String> {
    let path = dir.join(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A backend's new-flow counter, read straight from the daemon's pinned map.
struct NewFlows {
    map: PerCpuArray<MapData, Traffic>,
    id: u32,
}

impl NewFlows {
    /// The counter of the backend at `addr:port` (found in the pinned BACKENDS).
    fn open(pins: &Path, addr: Ipv4Addr, port: u16) -> Result<NewFlows, String> {
        let backends: Array<MapData, Backend> =
            Array::try_from(pinned(pins, lb_common::maps::BACKENDS)?).map_err(|e| e.to_string())?;
        let id = (0..backends.len())
            .find(|i| {
                backends.get(i, 0).is_ok_and(|b| {
                    b.flags & BACKEND_F_PRESENT != 0
                        && b.addr == addr.octets()
                        && b.port == port.to_be_bytes()
                })
            })
            .ok_or_else(|| format!("no backend {addr}:{port} in the daemon's BACKENDS"))?;
        let map = PerCpuArray::try_from(pinned(pins, lb_common::maps::BACKEND_TRAFFIC)?)
            .map_err(|e| e.to_string())?;
        Ok(NewFlows { map, id })
    }

    fn read(&self) -> u64 {
        self.map
            .get(&self.id, 0)
            .map(|v| v.iter().map(|t| t.new_flows).sum())
            .unwrap_or(0)
    }
}

/// Reads `counter` every millisecond on a thread until `stop`; returns the
/// first reading and every change, with when it was seen.
fn watch(counter: NewFlows, stop: Arc<AtomicBool>) -> JoinHandle<Vec<(Instant, u64)>> {
    std::thread::spawn(move || {
        let mut seen = vec![(Instant::now(), counter.read())];
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
            let v = counter.read();
            if v != seen[seen.len() - 1].1 {
                seen.push((Instant::now(), v));
            }
        }
        seen
    })
}

/// How one client connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Connected,
    Refused,
    /// Not accepted within `CONNECT_PATIENCE`.
    Unanswered,
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    at: Instant,
    outcome: Outcome,
}

/// New TCP connections to a target at a steady pace from a thread in the
/// client's namespace, each closed with a reset once accepted (no TIME_WAIT
/// piles up); the pace holds while some go unanswered.
struct Connector {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Attempt>>,
}

impl Connector {
    fn start(ns: &Netns, target: SocketAddr) -> Connector {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let mut tick = tokio::time::interval(CONNECT_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut tasks = tokio::task::JoinSet::new();
                let mut out = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let at = Instant::now();
                    tasks.spawn(async move {
                        let outcome = match tokio::time::timeout(
                            CONNECT_PATIENCE,
                            tokio::net::TcpStream::connect(target),
                        )
                        .await
                        {
                            Ok(Ok(c)) => {
                                let _ = c.set_zero_linger();
                                Outcome::Connected
                            }
                            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                Outcome::Refused
                            }
                            Ok(Err(_)) => Outcome::Failed,
                            Err(_) => Outcome::Unanswered,
                        };
                        Attempt { at, outcome }
                    });
                    while let Some(done) = tasks.try_join_next() {
                        out.extend(done.ok());
                    }
                }
                while let Some(done) = tasks.join_next().await {
                    out.extend(done.ok());
                }
                out.sort_by_key(|a| a.at);
                out
            })
        });
        Connector { stop, thread }
    }

    fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the connecting thread panicked")
    }
}

/// Writes through the write VIP, each on a new connection as the
/// application's user, every `WRITE_EVERY`; records when each started and the
/// server id of the server that took it.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, Result<u32, String>)>>,
}

impl Writer {
    fn start(ns: &Netns) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let mut tick = tokio::time::interval(WRITE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut log = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let at = Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(1), write_once())
                        .await
                        .unwrap_or_else(|_| Err("timed out".into()));
                    log.push((at, r));
                }
                log
            })
        });
        Writer { stop, thread }
    }

    fn stop(self) -> Vec<(Instant, Result<u32, String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the writing thread panicked")
    }
}

/// One write through the write VIP on a new connection; the server id that took it.
async fn write_once() -> Result<u32, String> {
    use mysql_async::prelude::Queryable;
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(VIP.to_string())
        .tcp_port(WRITE)
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .prefer_socket(false);
    let mut c = mysql_async::Conn::new(opts)
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        c.query_drop("INSERT INTO appdb.t (v, server) VALUES ('bench', @@server_id)")
            .await?;
        c.query_first::<u32, _>("SELECT @@server_id").await
    }
    .await;
    let _ = c.disconnect().await;
    r.map_err(|e| e.to_string())?
        .ok_or_else(|| "no server id".to_owned())
}

/// The pid of the `lb` process run with the config file `config`.
fn daemon_pid(config: &Path) -> Result<u32, String> {
    let want = config.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == want))
        })
        .ok_or_else(|| format!("no process runs with {}", config.display()))
}

/// VmRSS and VmHWM of `pid`, KiB.
fn rss(pid: u32) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let kib = |key: &str| -> Result<u64, String> {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// The BPF maps process `pid` holds open, one entry per map, largest first,
/// with the kernel memory each fdinfo reports (`memlock`).
pub fn maps_of(pid: u32) -> Vec<MapMemory> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.filter_map(Result::ok) {
        let is_map = std::fs::read_link(fd.path())
            .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        )) else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let meta = MapInfo::from_id(id as u32).ok();
        out.push(MapMemory {
            id: id as u32,
            name: meta
                .as_ref()
                .and_then(|m| m.name_as_str().map(str::to_owned))
                .unwrap_or_default(),
            kind: meta
                .as_ref()
                .and_then(|m| m.map_type().ok())
                .map(|t| format!("{t:?}"))
                .unwrap_or_default(),
            max_entries: field("max_entries:").unwrap_or(0),
            memlock_bytes: memlock,
        });
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.memlock_bytes));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_read_as_unix_milliseconds() {
        assert_eq!(
            unix_ms_of("2026-11-26T02:50:43.584843Z"),
            Some(1_795_661_443_584)
        );
        assert_eq!(unix_ms_of("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_ms_of("2000-02-29T12:00:00.5Z"), Some(951_825_600_500));
    }

    #[test]
    fn state_changes_are_found_in_a_coloured_log() {
        let log = "\x1b[2m2026-11-26T02:50:43.584843Z\x1b[0m \x1b[33m WARN\x1b[0m backend state changed \
                   \x1b[3mservice\x1b[0m\x1b[2m=\x1b[0mweb \x1b[3mbackend\x1b[0m\x1b[2m=\x1b[0mweb1 \
                   \x1b[3mstate\x1b[0m\x1b[2m=\x1b[0m\"down\"\n";
        assert_eq!(
            logged_changes(log, "web", "web1", "down"),
            [1_795_661_443_584]
        );
        assert!(logged_changes(log, "web-tls", "web1", "down").is_empty());
    }
}
