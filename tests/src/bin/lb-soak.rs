//! `cargo xtask soak [--minutes N]`: the demo's topology (`lb_tests::seed::up`)
//! under steady mixed load while a chaos loop stops and restarts web
//! backends, reloads changed configs, SIGKILLs and restarts the daemon, swaps
//! the program and runs MySQL switchovers. Every failed request, broken
//! connection and lost or misdirected write is classified against the events
//! it overlapped; what the design does not allow fails the run (exit status 1).
//!
//! `lb-soak [--minutes N] [--seed S] [--upgrade-object PATH] [--prefix P]`
//!
//! Load: HTTP GETs of `/` on new connections from the client (paced), long-
//! lived keep-alive HTTP connections (re-opened only after an allowed end),
//! and from the app servers' namespaces (the database VIPs answer the web LAN
//! only) MySQL writes through the write VIP on new connections and on a
//! pooled connection, each a row `(seq, @@server_id)` recorded with the
//! server that took it, and reads through the read VIP.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LbDaemon,
    http,
    mariadb::{MariaDb, APP_PASSWORD, APP_USER},
    netns::Netns,
    rng::Rng,
    seed::{self, Narrator, Options, Seed, READ_VIP, WRITE_VIP, WWW},
    TempDir,
};

/// The web service's health checks in the soak's config (the demo's):
/// `interval_ms = 250`, `fall = 2`.
const HEALTH_INTERVAL: Duration = Duration::from_millis(250);
const HEALTH_FALL: u32 = 2;
/// The MySQL monitors' `interval_ms` and `timeout_ms` (the demo's).
const MYSQL_INTERVAL: Duration = Duration::from_millis(250);
const MYSQL_TIMEOUT: Duration = Duration::from_millis(200);
/// Long-lived HTTP connections held from the client.
const HELD: usize = 8;
/// How long a stopped web server stays down, and the daemon stays killed.
const WEB_DOWN: Duration = Duration::from_millis(1500);
const DAEMON_DOWN: Duration = Duration::from_secs(2);
/// Time limit of each database operation of the load.
const DB_OP_TIMEOUT: Duration = Duration::from_secs(3);

/// One kind of operation of the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    /// An HTTP GET on a new connection (also a long-lived one's (re)opening).
    Http,
    /// A GET on a long-lived keep-alive connection.
    Held,
    /// A MySQL write on a new connection through the write VIP (also a
    /// pooled connection's (re)opening).
    Write,
    /// A MySQL write on the pooled (long-lived) connection.
    PooledWrite,
    /// A MySQL read on a new connection through the read VIP.
    Read,
}

impl Op {
    const ALL: [Op; 5] = [Op::Http, Op::Held, Op::Write, Op::PooledWrite, Op::Read];

    fn label(self) -> &'static str {
        match self {
            Op::Http => "HTTP requests, new connections",
            Op::Held => "HTTP requests, long-lived connections",
            Op::Write => "MySQL writes, new connections",
            Op::PooledWrite => "MySQL writes, pooled connections",
            Op::Read => "MySQL reads, new connections",
        }
    }
}

/// A failed operation.
#[derive(Debug, Clone)]
struct Failure {
    op: Op,
    start: Instant,
    end: Instant,
    error: String,
    /// The backend ("web1") or server ("db1") the connection was on, when known.
    on: Option<String>,
    /// When that connection was opened.
    since: Option<Instant>,
    /// A server answered, with an error (an HTTP status other than 200, a
    /// body not the app's): never excused by an event.
    answered: bool,
}

impl Failure {
    /// A failure no server answered, on no known connection (a connect that
    /// failed, a request on a fresh connection).
    fn unanswered(op: Op, start: Instant, end: Instant, error: String) -> Failure {
        Failure {
            op,
            start,
            end,
            error,
            on: None,
            since: None,
            answered: false,
        }
    }
}

/// An acknowledged write.
#[derive(Debug, Clone)]
struct Ack {
    seq: u64,
    /// `@@server_id` of the connection that took it.
    server: u32,
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct Log {
    done: BTreeMap<Op, u64>,
    failures: Vec<Failure>,
    /// Long-lived connections answered by another backend than their first.
    moved: Vec<String>,
    acks: Vec<Ack>,
    /// Reads served, by `@@server_id`.
    reads_by_server: BTreeMap<u32, u64>,
    /// New-connection HTTP answers, by web server.
    http_by_web: BTreeMap<String, u64>,
}

type Shared = Arc<Mutex<Log>>;

fn ok(log: &Shared, op: Op) {
    *log.lock().unwrap().done.entry(op).or_default() += 1;
}

fn fail(log: &Shared, f: Failure) {
    let mut l = log.lock().unwrap();
    *l.done.entry(f.op).or_default() += 1;
    l.failures.push(f);
}

/// "web1 -> app1: hello" -> "web1".
fn web_of(body: &str) -> String {
    body.split_whitespace().next().unwrap_or("").to_owned()
}

fn www() -> SocketAddr {
    SocketAddrV4::new(WWW, 80).into()
}

/// GETs of `/` on new connections, one every `pause`.
fn http_new(stop: Arc<AtomicBool>, log: Shared, pause: Duration) {
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let r = http::get(www(), "/");
        let end = Instant::now();
        match r {
            Ok((200, body)) if body.contains(": hello") => {
                ok(&log, Op::Http);
                *log.lock()
                    .unwrap()
                    .http_by_web
                    .entry(web_of(&body))
                    .or_default() += 1;
            }
            other => fail(
                &log,
                Failure {
                    op: Op::Http,
                    start,
                    end,
                    answered: other.is_ok(),
                    error: format!("{other:?}"),
                    on: None,
                    since: None,
                },
            ),
        }
        std::thread::sleep(pause);
    }
}

/// `HELD` keep-alive connections, each used once a round; one that ends is
/// recorded and opened again at the next round.
fn http_held(stop: Arc<AtomicBool>, log: Shared, pause: Duration) {
    struct Slot {
        conn: Option<http::Conn>,
        web: String,
        since: Instant,
    }
    let mut slots: Vec<Slot> = (0..HELD)
        .map(|_| Slot {
            conn: None,
            web: String::new(),
            since: Instant::now(),
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        for (i, s) in slots.iter_mut().enumerate() {
            let start = Instant::now();
            let Some(c) = s.conn.as_mut() else {
                // (Re)opening is a new connection's request.
                let r = http::Conn::open(www()).and_then(|mut c| c.get("/").map(|a| (c, a)));
                match r {
                    Ok((c, (200, body))) if body.contains(": hello") => {
                        ok(&log, Op::Http);
                        *s = Slot {
                            conn: Some(c),
                            web: web_of(&body),
                            since: start,
                        };
                    }
                    other => fail(
                        &log,
                        Failure {
                            op: Op::Http,
                            start,
                            end: Instant::now(),
                            answered: other.is_ok(),
                            error: format!(
                                "opening long-lived connection {i}: {:?}",
                                other.map(|x| x.1)
                            ),
                            on: None,
                            since: None,
                        },
                    ),
                }
                continue;
            };
            match c.get("/") {
                Ok((200, body)) if web_of(&body) == s.web => ok(&log, Op::Held),
                Ok((200, body)) => {
                    ok(&log, Op::Held);
                    log.lock().unwrap().moved.push(format!(
                        "long-lived connection {i}, opened on {} at {:?}, answered by {}",
                        s.web,
                        s.since,
                        body.trim()
                    ));
                    s.conn = None;
                }
                other => {
                    fail(
                        &log,
                        Failure {
                            op: Op::Held,
                            start,
                            end: Instant::now(),
                            answered: other.is_ok(),
                            error: format!("long-lived connection {i}: {other:?}"),
                            on: Some(s.web.clone()),
                            since: Some(s.since),
                        },
                    );
                    s.conn = None;
                }
            }
        }
        std::thread::sleep(pause);
    }
}

async fn db_connect(to: Ipv4Addr) -> Result<(mysql_async::Conn, u32), String> {
    use mysql_async::prelude::Queryable;
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(to.to_string())
        .tcp_port(3306)
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .db_name(Some("appdb"))
        .prefer_socket(false);
    let mut c = tokio::time::timeout(DB_OP_TIMEOUT, mysql_async::Conn::new(opts))
        .await
        .map_err(|_| "connect: timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let id: Option<u32> = tokio::time::timeout(DB_OP_TIMEOUT, c.query_first("SELECT @@server_id"))
        .await
        .map_err(|_| "SELECT @@server_id: timed out".to_owned())?
        .map_err(|e| format!("SELECT @@server_id: {e}"))?;
    Ok((c, id.unwrap_or(0)))
}

async fn db_insert(c: &mut mysql_async::Conn, seq: u64, writer: &str) -> Result<(), String> {
    use mysql_async::prelude::Queryable;
    tokio::time::timeout(
        DB_OP_TIMEOUT,
        c.exec_drop(
            "INSERT INTO soak (seq, server, writer) VALUES (?, @@server_id, ?)",
            (seq, writer),
        ),
    )
    .await
    .map_err(|_| "INSERT: timed out".to_owned())?
    .map_err(|e| format!("INSERT: {e}"))
}

/// Connections from the app servers that a database server still holds once
/// every load thread ended (and so closed or dropped its connections): a
/// server told of none of them (a reset that reached only the client, as
/// `on_demotion = "reset"` once did) keeps them until its keepalive, and
/// every switchover added more. Waits up to 5 s for closes in flight.
fn server_connections_left_open(seed: &Seed) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut open = Vec::new();
        for db in ["db1", "db2"] {
            let ss = seed
                .ns(db)
                .exec("ss", &["-Htn", "state", "established", "( sport = :3306 )"]);
            open.extend(ss.lines().filter(|l| l.contains(" 10.0.2.")).map(|l| {
                format!(
                    "{db}: {}",
                    l.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            }));
        }
        if open.is_empty() || Instant::now() > deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The database load of one app server's namespace: writes on new
/// connections, writes on a pooled connection and reads, until `stop`.
async fn db_load(
    name: String,
    stop: Arc<AtomicBool>,
    log: Shared,
    seq: Arc<AtomicU64>,
    pause: Duration,
) {
    use mysql_async::prelude::Queryable;
    let writer = async {
        while !stop.load(Ordering::Relaxed) {
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let r = async {
                let (mut c, id) = db_connect(WRITE_VIP).await?;
                db_insert(&mut c, n, &name).await?;
                let _ = c.disconnect().await;
                Ok::<u32, String>(id)
            }
            .await;
            let end = Instant::now();
            match r {
                Ok(server) => {
                    ok(&log, Op::Write);
                    log.lock().unwrap().acks.push(Ack {
                        seq: n,
                        server,
                        start,
                        end,
                    });
                }
                Err(error) => fail(&log, Failure::unanswered(Op::Write, start, end, error)),
            }
            tokio::time::sleep(pause).await;
        }
    };
    let pooled = async {
        let mut session: Option<(mysql_async::Conn, u32, Instant)> = None;
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let Some((c, server, since)) = session.as_mut() else {
                match db_connect(WRITE_VIP).await {
                    Ok((c, id)) => session = Some((c, id, start)),
                    Err(error) => {
                        let end = Instant::now();
                        let error = format!("opening the pooled connection: {error}");
                        fail(&log, Failure::unanswered(Op::Write, start, end, error));
                        tokio::time::sleep(pause).await;
                    }
                }
                continue;
            };
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let r = db_insert(c, n, &name).await;
            let end = Instant::now();
            match r {
                Ok(()) => {
                    ok(&log, Op::PooledWrite);
                    log.lock().unwrap().acks.push(Ack {
                        seq: n,
                        server: *server,
                        start,
                        end,
                    });
                }
                Err(error) => {
                    let f = Failure {
                        op: Op::PooledWrite,
                        start,
                        end,
                        error,
                        on: Some(format!("db{server}")),
                        since: Some(*since),
                        answered: false,
                    };
                    fail(&log, f);
                    session = None;
                }
            }
            tokio::time::sleep(pause).await;
        }
    };
    let reader = async {
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let r = async {
                let (mut c, id) = db_connect(READ_VIP).await?;
                let _: Option<u64> =
                    tokio::time::timeout(DB_OP_TIMEOUT, c.query_first("SELECT COUNT(*) FROM soak"))
                        .await
                        .map_err(|_| "SELECT: timed out".to_owned())?
                        .map_err(|e| format!("SELECT: {e}"))?;
                let _ = c.disconnect().await;
                Ok::<u32, String>(id)
            }
            .await;
            let end = Instant::now();
            match r {
                Ok(server) => {
                    ok(&log, Op::Read);
                    *log.lock()
                        .unwrap()
                        .reads_by_server
                        .entry(server)
                        .or_default() += 1;
                }
                Err(error) => fail(&log, Failure::unanswered(Op::Read, start, end, error)),
            }
            tokio::time::sleep(pause).await;
        }
    };
    tokio::join!(writer, pooled, reader);
}

/// What the chaos loop did.
#[derive(Debug)]
enum Happened {
    /// A web server's nginx stopped (`stopped`: it had exited), then
    /// restarted from `restart_began`.
    WebStop {
        web: String,
        stopped: Instant,
        marked_down: Option<Duration>,
        restart_began: Instant,
    },
    Reload,
    DaemonKill,
    Swap,
    /// A planned switchover from `old` to `new` (server ids).
    Switchover {
        old: u32,
        new: u32,
        /// The old primary's `read_only = 1` had returned.
        demoted: Instant,
        promoted: Instant,
        /// From the promotion to `lb status` naming the new primary.
        seen_after: Option<Duration>,
    },
}

#[derive(Debug)]
struct Event {
    n: usize,
    start: Instant,
    end: Instant,
    what: Happened,
}

impl Event {
    fn kind(&self) -> &'static str {
        match self.what {
            Happened::WebStop { .. } => "web server stopped and restarted",
            Happened::Reload => "config reloaded (weights), SIGHUP confirmed",
            Happened::DaemonKill => "daemon SIGKILLed, restarted",
            Happened::Swap => "program swapped (stop --keep-datapath, new build)",
            Happened::Switchover { .. } => "MySQL planned switchover",
        }
    }
}

/// The failures the design allows, each bounded by its event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Allowance {
    BackendStoppedNewConnections,
    BackendStoppedHeldConnections,
    SwitchoverWritesRefused,
    SwitchoverReadsRefused,
    DemotedPrimaryConnectionReset,
}

impl Allowance {
    const ALL: [Allowance; 5] = [
        Allowance::BackendStoppedNewConnections,
        Allowance::BackendStoppedHeldConnections,
        Allowance::SwitchoverWritesRefused,
        Allowance::SwitchoverReadsRefused,
        Allowance::DemotedPrimaryConnectionReset,
    ];

    fn name(self) -> &'static str {
        match self {
            Allowance::BackendStoppedNewConnections => "backend-stopped/new-connections",
            Allowance::BackendStoppedHeldConnections => "backend-stopped/long-lived-connections",
            Allowance::SwitchoverWritesRefused => "switchover/writes-refused",
            Allowance::SwitchoverReadsRefused => "switchover/reads-refused",
            Allowance::DemotedPrimaryConnectionReset => "switchover/demoted-primary-reset",
        }
    }

    fn bound(self) -> String {
        let ms = |d: Duration| d.as_millis();
        match self {
            Allowance::BackendStoppedNewConnections => format!(
                "new-connection requests overlapping [stop begins, server exited + interval x fall + interval = {} ms]: until the health check routes around it",
                ms(HEALTH_INTERVAL * (HEALTH_FALL + 1))
            ),
            Allowance::BackendStoppedHeldConnections => {
                "long-lived connections on the stopped server, failing between its stop and its restart: they end with it".into()
            }
            Allowance::SwitchoverWritesRefused => format!(
                "writes on new connections overlapping [old primary set read-only, promotion + monitor interval + timeout = {} ms], refused at once (a reset or the read-only error, never a timeout): no primary until the balancer sees the new one",
                ms(MYSQL_INTERVAL + MYSQL_TIMEOUT)
            ),
            Allowance::SwitchoverReadsRefused => {
                "reads overlapping the same window, refused at once (never a timeout): neither a fit replica nor a primary seen (reads fall back to the primary)".into()
            }
            Allowance::DemotedPrimaryConnectionReset => {
                "a pooled write connection held on the old primary (opened before the window closed) fails at its first write after the demotion: read-only error or reset (on_demotion = \"reset\")".into()
            }
        }
    }
}

/// Whether the operation's span `[f.start, f.end]` meets `[from, to]`.
fn overlaps(f: &Failure, from: Instant, to: Instant) -> bool {
    f.start <= to && f.end >= from
}

/// The allowance (and event) that explains a failure, if any.
fn classify(f: &Failure, events: &[Event]) -> Option<(Allowance, usize)> {
    if f.answered {
        return None;
    }
    for e in events {
        match &e.what {
            Happened::WebStop {
                web,
                stopped,
                restart_began,
                ..
            } => {
                let routed_around = *stopped + HEALTH_INTERVAL * (HEALTH_FALL + 1);
                if f.op == Op::Http && overlaps(f, e.start, routed_around) {
                    return Some((Allowance::BackendStoppedNewConnections, e.n));
                }
                if f.op == Op::Held
                    && f.on.as_deref() == Some(web.as_str())
                    && overlaps(f, e.start, *restart_began)
                {
                    return Some((Allowance::BackendStoppedHeldConnections, e.n));
                }
            }
            Happened::Switchover { old, promoted, .. } => {
                let seen = *promoted + MYSQL_INTERVAL + MYSQL_TIMEOUT;
                // Refused, fast: a write or read that hangs is not the design's.
                let fast = !f.error.contains("timed out");
                if f.op == Op::Write && fast && overlaps(f, e.start, seen) {
                    return Some((Allowance::SwitchoverWritesRefused, e.n));
                }
                if f.op == Op::Read && fast && overlaps(f, e.start, seen) {
                    return Some((Allowance::SwitchoverReadsRefused, e.n));
                }
                if f.op == Op::PooledWrite
                    && fast
                    && f.on == Some(format!("db{old}"))
                    && f.since.is_some_and(|s| s <= seen)
                    && f.end >= e.start
                {
                    return Some((Allowance::DemotedPrimaryConnectionReset, e.n));
                }
            }
            _ => {}
        }
    }
    None
}

struct Args {
    minutes: f64,
    seed: u64,
    upgrade: Option<PathBuf>,
    prefix: String,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        minutes: 30.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        upgrade: std::env::var_os("LB_TEST_UPGRADE_OBJECT").map(PathBuf::from),
        prefix: format!("sk{}", std::process::id() % 100_000),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--minutes" => {
                a.minutes = v()?
                    .parse()
                    .map_err(|e| format!("--minutes: {e}"))?
            }
            "--seed" => a.seed = v()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--upgrade-object" => a.upgrade = Some(PathBuf::from(v()?)),
            "--prefix" => a.prefix = v()?,
            _ => {
                return Err(format!(
                    "unknown argument {k}\nusage: lb-soak [--minutes N] [--seed S] [--upgrade-object PATH] [--prefix P]"
                ))
            }
        }
    }
    if a.prefix.len() > 10 {
        return Err("--prefix: at most 10 characters (namespace names are <prefix>-dbsw)".into());
    }
    Ok(a)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The demo's config with the web service on weighted round robin (weights
/// 1 and 1), so that reloads can change its weights.
fn soak_config(dir: &Path) -> Result<PathBuf, String> {
    let demo = root().join("config/demo.toml");
    let text = std::fs::read_to_string(&demo).map_err(|e| format!("{}: {e}", demo.display()))?;
    let split = text
        .find("# HTTPS passes")
        .ok_or("config/demo.toml: the web service's block ends at \"# HTTPS passes\"")?;
    let (web, rest) = text.split_at(split);
    for want in [
        "interval_ms = 250",
        "fall = 2",
        "scheduler = \"round-robin\"",
    ] {
        if !web.contains(want) {
            return Err(format!(
                "config/demo.toml's web service no longer has `{want}`: update the soak's bounds"
            ));
        }
    }
    let web = web
        .replace(
            "scheduler = \"round-robin\"",
            "scheduler = \"weighted-round-robin\"",
        )
        .replace(
            "address = \"10.0.2.11\"",
            "address = \"10.0.2.11\"\nweight = 1",
        )
        .replace(
            "address = \"10.0.2.12\"",
            "address = \"10.0.2.12\"\nweight = 1",
        );
    let cfg = dir.join("demo.toml");
    std::fs::write(&cfg, format!("{web}{rest}")).map_err(|e| e.to_string())?;
    std::fs::copy(
        root().join("config/mysql-monitor.pass"),
        dir.join("mysql-monitor.pass"),
    )
    .map_err(|e| format!("config/mysql-monitor.pass: {e}"))?;
    Ok(cfg)
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mysql_primary(lb: &LbDaemon) -> Option<String> {
    let st = lb.status();
    st["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "mysql-write")?["mysql"]["primary"]
        .as_str()
        .map(str::to_owned)
}

/// The soak's running state: the seed, the events so far and problems the
/// events themselves ran into (a server never marked down, and so on).
struct Chaos<'a> {
    seed: &'a mut Seed,
    t0: Instant,
    events: Vec<Event>,
    problems: Vec<String>,
    weights: (u32, u32),
    primary: u32,
    upgrade: Option<PathBuf>,
    on_upgrade: bool,
    web_turn: usize,
}

impl Chaos<'_> {
    fn at(&self, t: Instant) -> String {
        format!(
            "{:7.1}s",
            t.saturating_duration_since(self.t0).as_secs_f64()
        )
    }

    fn record(&mut self, start: Instant, what: Happened, detail: String) {
        let n = self.events.len() + 1;
        let end = Instant::now();
        println!(
            "[{}] #{n} {}: {detail} ({:.1} s)",
            self.at(start),
            match what {
                Happened::WebStop { .. } => "web stop",
                Happened::Reload => "reload",
                Happened::DaemonKill => "daemon kill",
                Happened::Swap => "program swap",
                Happened::Switchover { .. } => "switchover",
            },
            (end - start).as_secs_f64()
        );
        self.events.push(Event {
            n,
            start,
            end,
            what,
        });
    }

    fn problem(&mut self, p: String) {
        println!("    PROBLEM: {p}");
        self.problems.push(p);
    }

    fn web_stop(&mut self) {
        let i = self.web_turn % 2;
        self.web_turn += 1;
        let web = format!("web{}", i + 1);
        let start = Instant::now();
        self.seed.webs[i].stop();
        let stopped = Instant::now();
        let lb = &self.seed.lb;
        let marked_down = wait_until(Duration::from_secs(5), || {
            lb.backend("web", &web)["state"] == "down"
        })
        .map(|_| stopped.elapsed());
        if marked_down.is_none() {
            self.problem(format!(
                "{web} was not marked down within 5 s of its nginx stopping"
            ));
        }
        std::thread::sleep(WEB_DOWN.saturating_sub(stopped.elapsed()));
        let restart_began = Instant::now();
        let ns = Netns::attach(&format!("{}-{web}", self.seed.prefix));
        self.seed.webs[i].restart(&ns);
        let lb = &self.seed.lb;
        if wait_until(Duration::from_secs(10), || {
            lb.backend("web", &web)["state"] == "up"
        })
        .is_none()
        {
            self.problem(format!(
                "{web} was not up within 10 s of its nginx restarting"
            ));
        }
        let detail = format!(
            "{web}'s nginx stopped, marked down after {}, restarted, up again",
            marked_down.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
        );
        self.record(
            start,
            Happened::WebStop {
                web,
                stopped,
                marked_down,
                restart_began,
            },
            detail,
        );
    }

    fn reload(&mut self, rng: &mut Rng) {
        let (o1, o2) = self.weights;
        let mut w = (o1, o2);
        while w == (o1, o2) {
            w = (1 + rng.below(3) as u32, 1 + rng.below(3) as u32);
        }
        let start = Instant::now();
        let lb = &self.seed.lb;
        let text = std::fs::read_to_string(&lb.config).expect("reading the daemon's config");
        let new = text
            .replace(
                &format!("address = \"10.0.2.11\"\nweight = {o1}"),
                &format!("address = \"10.0.2.11\"\nweight = {}", w.0),
            )
            .replace(
                &format!("address = \"10.0.2.12\"\nweight = {o2}"),
                &format!("address = \"10.0.2.12\"\nweight = {}", w.1),
            );
        assert_ne!(new, text, "the weights are in the config");
        let before = lb.reloads();
        lb.write_config(&new);
        lb.sighup_and_wait(before, true);
        let got = (
            lb.backend("web", "web1")["weight"].as_u64(),
            lb.backend("web", "web2")["weight"].as_u64(),
        );
        if got != (Some(w.0 as u64), Some(w.1 as u64)) {
            self.problem(format!("weights after the reload: {got:?}, not {w:?}"));
        }
        self.weights = w;
        self.record(
            start,
            Happened::Reload,
            format!(
                "web weights {o1}:{o2} -> {}:{} (rename, SIGHUP, confirmed)",
                w.0, w.1
            ),
        );
    }

    fn daemon_kill(&mut self) {
        let start = Instant::now();
        let adopted = |lb: &LbDaemon| lb.log_text().matches("adopted the pinned maps").count();
        let before = adopted(&self.seed.lb);
        self.seed.lb.kill();
        std::thread::sleep(DAEMON_DOWN);
        self.seed.lb.restart(&[]);
        if adopted(&self.seed.lb) <= before {
            self.problem("the restarted daemon did not adopt the pinned maps".into());
        }
        self.record(
            start,
            Happened::DaemonKill,
            format!(
                "down {} s, restarted, adopted the pins",
                DAEMON_DOWN.as_secs()
            ),
        );
    }

    fn swap(&mut self) {
        let start = Instant::now();
        let lb_ns = Netns::attach(&format!("{}-lb", self.seed.prefix));
        let before = lb_ns.attached_program("eth0");
        let (ok, out) = self.seed.lb.cli(&["stop", "--keep-datapath"]);
        if !ok {
            self.problem(format!("lb stop --keep-datapath: {out}"));
        }
        self.seed.lb.wait_exit(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
        let to = match (&self.upgrade, self.on_upgrade) {
            (Some(o), false) => {
                self.seed.lb.restart_with_object(o);
                "the upgrade build (LB_TEST_UPGRADE_OBJECT)"
            }
            (Some(_), true) => {
                self.seed.lb.restart_with_built_in_object();
                "the built-in program"
            }
            (None, _) => {
                self.seed.lb.restart(&[]);
                "the same build (no upgrade object given)"
            }
        };
        let after = lb_ns.attached_program("eth0");
        let tag = |p: &Option<String>| {
            p.as_deref()
                .and_then(|s| s.split(" tag ").nth(1))
                .unwrap_or("")
                .to_owned()
        };
        if self.upgrade.is_some() {
            self.on_upgrade = !self.on_upgrade;
            if tag(&before) == tag(&after) {
                self.problem(format!(
                    "the program on eth0 did not change: {before:?} -> {after:?}"
                ));
            }
        }
        let detail = format!(
            "to {to}: eth0 {} -> {}",
            before.unwrap_or_default(),
            after.unwrap_or_default()
        );
        self.record(start, Happened::Swap, detail);
    }

    fn switchover(&mut self) {
        let (old, new): (&MariaDb, &MariaDb) = if self.primary == 1 {
            (&self.seed.db1, &self.seed.db2)
        } else {
            (&self.seed.db2, &self.seed.db1)
        };
        let (old_id, new_id, old_name, new_name) = (
            old.server_id,
            new.server_id,
            old.name.clone(),
            new.name.clone(),
        );
        let start = Instant::now();
        let (demoted, promoted) = new.take_over_from(old);
        let lb = &self.seed.lb;
        let seen = wait_until(Duration::from_secs(5), || {
            mysql_primary(lb).as_deref() == Some(new_name.as_str())
        })
        .map(|_| promoted.elapsed());
        // Steady again: the old primary serves reads as a replica.
        let replica = wait_until(Duration::from_secs(10), || {
            lb.backend("mysql-read", &old_name)["mysql"]["role"] == "replica"
        });
        self.primary = new_id;
        if seen.is_none() {
            self.problem(format!(
                "the write VIP did not follow {new_name} within 5 s"
            ));
        }
        if replica.is_none() {
            self.problem(format!(
                "{old_name} was not a replica for reads within 10 s"
            ));
        }
        let detail = format!(
            "{old_name} -> {new_name}: read-only to writable {} ms, write VIP followed {} after the promotion",
            (promoted - demoted).as_millis(),
            seen.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
        );
        self.record(
            start,
            Happened::Switchover {
                old: old_id,
                new: new_id,
                demoted,
                promoted,
                seen_after: seen,
            },
            detail,
        );
    }
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lb-soak: {e}");
            return ExitCode::from(2);
        }
    };
    lb_tests::require_root();
    let interrupted = watch_signals();
    match soak(&a, &interrupted) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\nsoak failed: {e}\n(everything it created is being removed)");
            ExitCode::FAILURE
        }
    }
}

/// Blocks SIGINT and SIGTERM (threads started later inherit the mask) and
/// turns them into a flag, so an interrupted soak still removes what it made.
fn watch_signals() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // SAFETY: plain signal-mask calls on a zeroed, then initialised, sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: set was initialised above and its signals are blocked.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nlb-soak: interrupted; stopping and cleaning up");
        f.store(true, Ordering::Relaxed);
    });
    flag
}

/// Runs the soak; Ok(true) when nothing the design does not allow happened.
fn soak(a: &Args, interrupted: &AtomicBool) -> Result<bool, String> {
    let run_for = Duration::from_secs_f64(a.minutes * 60.0);
    println!(
        "== lb soak: {} min of load and chaos, seed {} (replay: --seed {}), namespaces {}-* ==",
        a.minutes, a.seed, a.seed, a.prefix
    );
    if let Some(o) = &a.upgrade {
        if !o.exists() {
            return Err(format!("the upgrade object {} is missing", o.display()));
        }
    }
    let cfg_dir = TempDir::new("soak-config");
    let opts = Options {
        prefix: a.prefix.clone(),
        config: soak_config(cfg_dir.path())?,
        // The socket's directory names the pin directory the testbed's
        // `LbDaemon` removes when it drops (`topology::pin_dir_for`): both
        // are this run's own, never another daemon's.
        socket: PathBuf::from(format!("/run/lb-{}/lb.sock", a.prefix)),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/lb-{}", a.prefix)),
    };
    let mut n = Narrator::new(None);
    let mut seed = seed::up(&opts, &mut n)?;
    seed.db1.sql(
        "CREATE TABLE appdb.soak (seq BIGINT PRIMARY KEY, server INT NOT NULL, writer VARCHAR(16))",
    );
    seed.db2.catch_up(&seed.db1);
    if mysql_primary(&seed.lb).as_deref() != Some("db1") {
        return Err("the write VIP's primary is not db1 at the start".into());
    }

    // The load.
    let log: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(1));
    let mut workers = Vec::new();
    {
        let (s, l) = (stop.clone(), log.clone());
        workers.push(
            seed.ns("cli")
                .spawn(move || http_new(s, l, Duration::from_millis(40))),
        );
        let (s, l) = (stop.clone(), log.clone());
        workers.push(
            seed.ns("cli")
                .spawn(move || http_held(s, l, Duration::from_millis(200))),
        );
        for app in ["app1", "app2"] {
            let (s, l, q, name) = (stop.clone(), log.clone(), seq.clone(), app.to_owned());
            workers.push(seed.ns(app).spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime")
                    .block_on(db_load(name, s, l, q, Duration::from_millis(150)))
            }));
        }
    }
    let t0 = Instant::now();
    println!("[    0.0s] load running: HTTP new connections, {HELD} long-lived connections, MySQL writes (new and pooled connections) and reads from app1 and app2");
    std::thread::sleep(Duration::from_secs(2));

    // The chaos loop: rounds of every kind of event in a seeded order.
    let mut rng = Rng(a.seed);
    let mut chaos = Chaos {
        seed: &mut seed,
        t0,
        events: Vec::new(),
        problems: Vec::new(),
        weights: (1, 1),
        primary: 1,
        upgrade: a.upgrade.clone(),
        on_upgrade: false,
        web_turn: rng.below(2) as usize,
    };
    'chaos: loop {
        let mut kinds = [0, 1, 2, 3, 4];
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for k in kinds {
            if t0.elapsed() >= run_for || interrupted.load(Ordering::Relaxed) {
                break 'chaos;
            }
            match k {
                0 => chaos.web_stop(),
                1 => chaos.reload(&mut rng),
                2 => chaos.daemon_kill(),
                3 => chaos.swap(),
                _ => chaos.switchover(),
            }
            // Steady load between events (their windows never overlap).
            std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut panicked = Vec::new();
    for w in workers {
        if let Err(e) = w.join() {
            panicked.push(format!("a load thread panicked: {e:?}"));
        }
    }
    let elapsed = t0.elapsed();
    let Chaos {
        events,
        mut problems,
        primary,
        ..
    } = chaos;
    problems.extend(panicked);
    if interrupted.load(Ordering::Relaxed) {
        problems.push("interrupted before the end".into());
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    let left_open = server_connections_left_open(&seed);

    // Writes: every acknowledged one on the final primary, recorded by the
    // server that acknowledged it, which was the primary at the time.
    let (primary_db, replica_db) = if primary == 1 {
        (&seed.db1, &seed.db2)
    } else {
        (&seed.db2, &seed.db1)
    };
    replica_db.catch_up(primary_db);
    let rows: HashMap<u64, u32> = primary_db
        .sql("SELECT seq, server FROM appdb.soak")
        .lines()
        .filter_map(|l| {
            let (s, v) = l.split_once('\t')?;
            Some((s.parse().ok()?, v.parse().ok()?))
        })
        .collect();
    let replica_rows = replica_db.sql("SELECT COUNT(*) FROM appdb.soak");
    if replica_rows.trim() != rows.len().to_string() {
        problems.push(format!(
            "the replica {} holds {} rows, the primary {}",
            replica_db.name,
            replica_rows.trim(),
            rows.len()
        ));
    }
    // Who was primary when: db1 from the start; at each switchover the old
    // one takes no write after its `read_only = 1` returned, and the new one
    // none before (it is promoted after catching up with the old one).
    let mut reigns: Vec<(u32, Option<Instant>, Option<Instant>)> = vec![(1, None, None)];
    for e in &events {
        if let Happened::Switchover { new, demoted, .. } = e.what {
            if let Some(last) = reigns.last_mut() {
                last.2 = Some(demoted);
            }
            reigns.push((new, Some(demoted), None));
        }
    }
    let primary_during = |server: u32, from: Instant, to: Instant| {
        reigns.iter().any(|&(s, a, b)| {
            s == server && a.is_none_or(|a| a <= to) && b.is_none_or(|b| b >= from)
        })
    };
    let (mut lost, mut misdirected) = (Vec::new(), Vec::new());
    for ack in &log.acks {
        match rows.get(&ack.seq) {
            None => lost.push(format!(
                "write {} acknowledged by server {} at {:.1}s is not on the primary",
                ack.seq,
                ack.server,
                (ack.end - t0).as_secs_f64()
            )),
            Some(&s) if s != ack.server => misdirected.push(format!(
                "write {}: acknowledged by server {}, recorded by server {s}",
                ack.seq, ack.server
            )),
            Some(_) if !primary_during(ack.server, ack.start, ack.end) => {
                misdirected.push(format!(
                    "write {} landed on server {} at {:.1}s-{:.1}s, when it was not the primary",
                    ack.seq,
                    ack.server,
                    (ack.start - t0).as_secs_f64(),
                    (ack.end - t0).as_secs_f64()
                ))
            }
            Some(_) => {}
        }
    }

    // Failures, against the events.
    let mut allowed: BTreeMap<Allowance, usize> = BTreeMap::new();
    let mut example: BTreeMap<Allowance, &Failure> = BTreeMap::new();
    let mut allowed_by_op: BTreeMap<Op, u64> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for f in &log.failures {
        match classify(f, &events) {
            Some((al, _)) => {
                *allowed.entry(al).or_default() += 1;
                example.entry(al).or_insert(f);
                *allowed_by_op.entry(f.op).or_default() += 1;
            }
            None => unexplained.push(f),
        }
    }
    let failed_by_op = |op: Op| log.failures.iter().filter(|f| f.op == op).count() as u64;

    // The report.
    let at = |t: Instant| (t.saturating_duration_since(t0)).as_secs_f64();
    println!();
    println!(
        "== soak summary: {:.1} min of load, {} events, seed {} ==",
        elapsed.as_secs_f64() / 60.0,
        events.len(),
        a.seed
    );
    println!();
    println!("{:<52} {:>6}", "events", "count");
    let mut by_kind: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in &events {
        by_kind.entry(e.kind()).or_default().push(e);
    }
    for (kind, es) in &by_kind {
        let extra = match es[0].what {
            Happened::WebStop { .. } => {
                let d: Vec<u128> = es
                    .iter()
                    .filter_map(|e| match e.what {
                        Happened::WebStop { marked_down, .. } => marked_down.map(|d| d.as_millis()),
                        _ => None,
                    })
                    .collect();
                format!(
                    "  marked down after {}-{} ms",
                    d.iter().min().unwrap_or(&0),
                    d.iter().max().unwrap_or(&0)
                )
            }
            Happened::Switchover { .. } => {
                let d: Vec<u128> = es
                    .iter()
                    .filter_map(|e| match e.what {
                        Happened::Switchover { seen_after, .. } => {
                            seen_after.map(|d| d.as_millis())
                        }
                        _ => None,
                    })
                    .collect();
                format!(
                    "  write VIP followed {}-{} ms after the promotion",
                    d.iter().min().unwrap_or(&0),
                    d.iter().max().unwrap_or(&0)
                )
            }
            Happened::Swap if a.upgrade.is_none() => "  (same build: no upgrade object)".into(),
            _ => String::new(),
        };
        println!("  {kind:<50} {:>6}{extra}", es.len());
    }
    println!();
    println!(
        "{:<52} {:>8} {:>8} {:>8} {:>12}",
        "load", "done", "failed", "allowed", "not allowed"
    );
    for op in Op::ALL {
        let done = log.done.get(&op).copied().unwrap_or(0);
        let failed = failed_by_op(op);
        let al = allowed_by_op.get(&op).copied().unwrap_or(0);
        println!(
            "  {:<50} {done:>8} {failed:>8} {al:>8} {:>12}",
            op.label(),
            failed - al
        );
    }
    println!(
        "  (new-connection answers by web server: {:?}; reads by server_id: {:?})",
        log.http_by_web, log.reads_by_server
    );
    println!();
    println!("{:<52} {:>8}", "allowed failures, by allowance", "count");
    for al in Allowance::ALL {
        println!(
            "  {:<50} {:>8}\n      {}",
            al.name(),
            allowed.get(&al).copied().unwrap_or(0),
            al.bound()
        );
        if let Some(f) = example.get(&al) {
            let mut e = f.error.clone();
            e.truncate(110);
            println!("      e.g. {e}");
        }
    }
    println!();
    println!("{:<52} {:>8}", "checks", "count");
    println!("  {:<50} {:>8}", "writes acknowledged", log.acks.len());
    println!("  {:<50} {:>8}", "rows on the final primary", rows.len());
    println!("  {:<50} {:>8}", "acknowledged writes lost", lost.len());
    println!("  {:<50} {:>8}", "writes misdirected", misdirected.len());
    println!(
        "  {:<50} {:>8}",
        "long-lived connections moved to another backend",
        log.moved.len()
    );
    println!("  {:<50} {:>8}", "failures not allowed", unexplained.len());
    println!("  {:<50} {:>8}", "event problems", problems.len());
    println!(
        "  {:<50} {:>8}",
        "database connections left open on a server",
        left_open.len()
    );

    let nearest = |t: Instant| {
        events
            .iter()
            .min_by_key(|e| {
                if t < e.start {
                    e.start - t
                } else if t > e.end {
                    t - e.end
                } else {
                    Duration::ZERO
                }
            })
            .map(|e| {
                format!(
                    "#{} {} at {:.1}s-{:.1}s",
                    e.n,
                    e.kind(),
                    at(e.start),
                    at(e.end)
                )
            })
            .unwrap_or_default()
    };
    let mut bad = false;
    if !unexplained.is_empty() {
        bad = true;
        println!(
            "\nFailures the design does not allow ({}):",
            unexplained.len()
        );
        for f in unexplained.iter().take(40) {
            println!(
                "  {:.3}s-{:.3}s {:?}{}: {} (nearest event: {})",
                at(f.start),
                at(f.end),
                f.op,
                f.on.as_deref()
                    .map(|o| format!(" on {o}"))
                    .unwrap_or_default(),
                f.error,
                nearest(f.start)
            );
        }
    }
    for (what, list) in [
        ("Acknowledged writes lost", &lost),
        ("Writes misdirected", &misdirected),
        ("Long-lived connections moved", &log.moved),
        ("Event problems", &problems),
        ("Database connections left open on a server", &left_open),
    ] {
        if !list.is_empty() {
            bad = true;
            println!("\n{what} ({}):", list.len());
            for l in list.iter().take(40) {
                println!("  {l}");
            }
        }
    }
    for op in Op::ALL {
        if log.done.get(&op).copied().unwrap_or(0) == failed_by_op(op) {
            bad = true;
            println!("\nNo {} succeeded at all.", op.label());
        }
    }
    println!(
        "\nsoak {}",
        if bad {
            "FAILED: see above"
        } else {
            "passed: every failure is one the design allows"
        }
    );
    drop(seed);
    let _ = std::fs::remove_dir_all(format!("/run/lb-{}", a.prefix));
    Ok(!bad)
}
