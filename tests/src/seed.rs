//! The seed's whole infrastructure in namespaces, and the story the demo
//! tells with it (`cargo xtask demo`; the end-to-end suite runs the same story
//! and asserts each step).
//!
//! ```text
//!                     dns (dnsmasq: www.foobar.com -> 10.0.0.100)
//!                      │
//!  client ── lb (eBPF) ┼─ web LAN: web1, web2 (nginx, TLS) -> app1, app2
//!                      └─ db LAN:  db1 (primary) -> db2 (replica)
//! ```
//! The app servers reach the databases through the balancer's write VIP
//! (10.0.0.101) and read VIP (10.0.0.102); the balancer's kernel forwards
//! nothing (netfilter drops it), so every balanced packet is carried by the data path.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use crate::{
    daemon::LbDaemon,
    mariadb::{MariaDb, APP_PASSWORD, APP_USER},
    netns::{veth, Netns},
    nginx::Nginx,
    sh, TempDir,
};

pub const WWW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const WRITE_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
pub const READ_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 53);

/// Prints the story and keeps a transcript of it.
pub struct Narrator {
    file: Option<std::fs::File>,
}

impl Narrator {
    pub fn new(transcript: Option<&Path>) -> Narrator {
        let file = transcript.map(|p| {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            std::fs::File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()))
        });
        Narrator { file }
    }

    pub fn say(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{}", line.as_ref());
        }
    }
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// /etc/netns/<ns>/resolv.conf: what `ip netns exec <ns>` shows programs as
/// /etc/resolv.conf. Removed on drop.
struct Resolver(PathBuf);

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything the story brought up; dropping it removes all of it (fields
/// drop in order: the balancer and servers first, the namespaces last).
pub struct Seed {
    pub lb: LbDaemon,
    apps: Vec<Proc>,
    /// nginx on web1 and web2, in that order.
    pub webs: Vec<Nginx>,
    pub db1: MariaDb,
    pub db2: MariaDb,
    _dns: Proc,
    _resolver: Resolver,
    /// cli, dns, lb, sw, dbsw, then web1, web2, app1, app2, db1, db2.
    pub namespaces: Vec<Netns>,
    /// The certificate nginx serves for www.foobar.com.
    pub cert: PathBuf,
    pub dir: TempDir,
    pub prefix: String,
}

impl Seed {
    /// Pids of every process the story started.
    pub fn pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.apps.iter().map(|a| a.0.id()).collect();
        p.push(self._dns.0.id());
        p
    }

    /// The namespace of host `name` ("cli", "lb", "web1", "app2", "db1", ...).
    pub fn ns(&self, name: &str) -> &Netns {
        let full = format!("{}-{name}", self.prefix);
        self.namespaces
            .iter()
            .find(|n| n.name == full)
            .unwrap_or_else(|| panic!("no namespace {full}"))
    }
}

/// What each step of the story saw (the suite asserts on it).
#[derive(Debug, Default)]
pub struct Report {
    pub dns: String,
    pub round_robin: Vec<String>,
    pub https: String,
    pub write: String,
    pub read: String,
    pub web1_down_after: Duration,
    pub after_failover: Vec<String>,
    pub switchover: Duration,
    pub write_after_switchover: String,
    /// Whether the client got an answer from the write VIP's MySQL port.
    pub client_reached_database: bool,
    /// What a scan of the web VIP's ports 1-1024 found open.
    pub open_ports: Vec<u16>,
}

/// Where and how to run the story.
pub struct Options {
    /// Namespace name prefix (short: names are `<prefix>-web1` and so on).
    pub prefix: String,
    /// The balancer's config (config/demo.toml); its control socket and pin
    /// directory are replaced by these two.
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
}

fn step<T>(what: &str, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Brings the whole seed up and tells the story; on success everything is
/// still running (drop the `Seed` to remove it).
pub fn run(opts: &Options, n: &mut Narrator) -> Result<(Seed, Report), String> {
    let mut seed = up(opts, n)?;
    let report = story(&mut seed, n)?;
    Ok((seed, report))
}

/// Brings the whole seed up, the balancer's web backends passing their
/// health checks, and tells none of the story (the soak starts here).
pub fn up(opts: &Options, n: &mut Narrator) -> Result<Seed, String> {
    let p = &opts.prefix;
    let dir = TempDir::new("seed");
    n.say("== The seed's infrastructure, with lb in HAProxy's place ==");
    n.say("");
    n.say(format!("Building it in network namespaces ({p}-*):"));
    n.say("  client ── lb (eBPF) ┬─ web LAN: web1, web2 (nginx, HTTP and HTTPS) -> app1, app2");
    n.say("     │                └─ db LAN:  db1 (MySQL primary) -> db2 (replica)");
    n.say("     └── dns (www.foobar.com -> 10.0.0.100)");

    // Namespaces and links.
    let ns = |s: &str| Netns::new(&format!("{p}-{s}"));
    let (client, dns, lb, web_sw, db_sw) = (ns("cli"), ns("dns"), ns("lb"), ns("sw"), ns("dbsw"));
    let hosts: Vec<(Netns, Ipv4Addr, bool)> = [
        ("web1", [10, 0, 2, 11], true),
        ("web2", [10, 0, 2, 12], true),
        ("app1", [10, 0, 2, 21], true),
        ("app2", [10, 0, 2, 22], true),
        ("db1", [10, 0, 4, 11], false),
        ("db2", [10, 0, 4, 12], false),
    ]
    .into_iter()
    .map(|(name, a, web_lan)| (ns(name), Ipv4Addr::from(a), web_lan))
    .collect();
    veth(&client, "eth0", &lb, "eth0");
    client.ip(&["addr", "add", "10.0.1.2/24", "dev", "eth0"]);
    client.ip(&["route", "add", "default", "via", "10.0.1.1"]);
    lb.ip(&["addr", "add", "10.0.1.1/24", "dev", "eth0"]);
    veth(&client, "eth1", &dns, "eth0");
    client.ip(&["addr", "add", "10.0.9.2/24", "dev", "eth1"]);
    dns.ip(&["addr", "add", &format!("{DNS}/24"), "dev", "eth0"]);
    for (sw, lb_if, lb_addr, port) in [
        (&web_sw, "eth1", "10.0.2.1/24", "p-lb"),
        (&db_sw, "eth2", "10.0.4.1/24", "p-lb"),
    ] {
        sw.ip(&["link", "add", "name", "br0", "type", "bridge"]);
        sw.ip(&["link", "set", "br0", "up"]);
        veth(&lb, lb_if, sw, port);
        sw.ip(&["link", "set", port, "master", "br0"]);
        lb.ip(&["addr", "add", lb_addr, "dev", lb_if]);
    }
    for (h, addr, web_lan) in &hosts {
        let (sw, gw) = if *web_lan {
            (&web_sw, "10.0.2.1")
        } else {
            (&db_sw, "10.0.4.1")
        };
        let port = format!("p-{}", h.name.rsplit('-').next().unwrap());
        veth(h, "eth0", sw, &port);
        sw.ip(&["link", "set", &port, "master", "br0"]);
        h.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        h.ip(&["route", "add", "default", "via", gw]);
        h.sysctl("net.ipv4.tcp_timestamps", "2");
    }
    client.sysctl("net.ipv4.tcp_timestamps", "2");
    lb.sysctl("net.ipv4.ip_forward", "1");
    lb.exec(
        "nft",
        &["add table inet lbdemo; add chain inet lbdemo forward { type filter hook forward priority 0; policy drop; }"],
    );

    // DNS: dnsmasq answers www.foobar.com; the client resolves through it.
    let dns_proc = Proc(
        dns.command("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={DNS}"),
                &format!("--address=/www.foobar.com/{WWW}"),
                &format!("--pid-file={}/dnsmasq.pid", dir.path().display()),
                "--log-facility=-",
                "--user=root",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting dnsmasq (is dnsmasq-base installed?): {e}"))?,
    );
    let netns_etc = PathBuf::from("/etc/netns").join(&client.name);
    std::fs::create_dir_all(&netns_etc).map_err(|e| format!("{}: {e}", netns_etc.display()))?;
    let resolver = Resolver(netns_etc.clone());
    std::fs::write(netns_etc.join("resolv.conf"), format!("nameserver {DNS}\n"))
        .map_err(|e| e.to_string())?;

    // Databases: db1 primary, db2 its replica.
    let monitor_pass = std::fs::read_to_string(opts.config.with_file_name("mysql-monitor.pass"))
        .map_err(|e| format!("reading the monitor's password file: {e}"))?;
    let db1 = MariaDb::start(&hosts[4].0, "db1", hosts[4].1, 1);
    let db2 = MariaDb::start(&hosts[5].0, "db2", hosts[5].1, 2);
    db1.create_users_and_schema(monitor_pass.trim());
    db1.make_writable();
    db2.replicate_from(&db1);
    db2.catch_up(&db1);

    // App servers, and nginx in front of each (HTTP and HTTPS).
    let app_pass = dir.path().join("app.pass");
    std::fs::write(&app_pass, APP_PASSWORD).map_err(|e| e.to_string())?;
    let app_bin = crate::daemon::lb_binary().with_file_name("lb-demo-app");
    let mut apps = Vec::new();
    for i in [2, 3] {
        let (h, addr, _) = &hosts[i];
        let name = format!("app{}", i - 1);
        let child = h
            .command(app_bin.to_str().unwrap())
            .args([
                &name,
                &format!("{addr}:8080"),
                &format!("{WRITE_VIP}:3306"),
                &format!("{READ_VIP}:3306"),
                APP_USER,
                app_pass.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {name} ({}): {e}", app_bin.display()))?;
        apps.push(Proc(child));
    }
    let (cert, key) = (dir.path().join("www.pem"), dir.path().join("www.key"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=www.foobar.com",
            "-addext",
            "subjectAltName=DNS:www.foobar.com",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let mut webs = Vec::new();
    for i in [0, 1] {
        let (h, addr, _) = &hosts[i];
        let (name, app) = (format!("web{}", i + 1), hosts[i + 2].1);
        let servers = format!(
            "server {{ listen {addr}:80; listen {addr}:443 ssl; server_name www.foobar.com;\n\
               ssl_certificate {}; ssl_certificate_key {};\n\
               location = /healthz {{ default_type text/plain; return 200 \"{name} ok\\n\"; }}\n\
               location / {{ proxy_pass http://{app}:8080; proxy_set_header X-Web {name}; }} }}",
            cert.display(),
            key.display()
        );
        webs.push(Nginx::start_with_servers(
            h,
            &name,
            std::net::SocketAddrV4::new(*addr, 80),
            &servers,
        ));
    }
    n.say("  dnsmasq, MariaDB on db1 and db2 (GTID replication), app1 and app2, nginx on web1 and web2: up.");

    // The balancer.
    let text = std::fs::read_to_string(&opts.config)
        .map_err(|e| format!("{}: {e}", opts.config.display()))?;
    let text = text
        .replace(
            "control_socket = \"/run/lb/demo.sock\"",
            &format!("control_socket = \"{}\"", opts.socket.display()),
        )
        .replace(
            "pin_dir = \"/sys/fs/bpf/lb-demo\"",
            &format!("pin_dir = \"{}\"", opts.pin_dir.display()),
        );
    let cfg = dir.path().join("lb.toml");
    std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("mysql-monitor.pass"), &monitor_pass)
        .map_err(|e| e.to_string())?;
    n.say(format!(
        "  lb run --config {} (on eth0, eth1, eth2: TC, the automatic choice on veth)",
        opts.config.display()
    ));
    // A demo starts from nothing: pins a crashed earlier run left are removed.
    let _ = lb_userspace::dataplane::remove_pins(&opts.pin_dir);
    let lbd = LbDaemon::start_file(&lb, &cfg, &opts.socket, TempDir::new("seed-lb"));
    wait_for(
        Duration::from_secs(10),
        "the web servers to pass their health checks",
        || {
            let st = lbd.status();
            let web = &st["services"][0]["backends"];
            web[0]["health"]["last"]["ok"] == true && web[1]["health"]["last"]["ok"] == true
        },
    )
    .map_err(|e| format!("{e}: {}", lbd.status()["services"][0]["backends"]))?;

    let mut namespaces = vec![client, dns, lb, web_sw, db_sw];
    namespaces.extend(hosts.into_iter().map(|(h, _, _)| h));
    Ok(Seed {
        lb: lbd,
        apps,
        webs,
        db1,
        db2,
        _dns: dns_proc,
        _resolver: resolver,
        namespaces,
        cert,
        dir,
        prefix: p.clone(),
    })
}

/// The demo's story, told and checked on a seed that [`up`] brought up.
pub fn story(seed: &mut Seed, n: &mut Narrator) -> Result<Report, String> {
    // Fields borrowed one by one: web1's nginx is stopped (mutably) on the way.
    let client = &seed.namespaces[0];
    let cert = &seed.cert;
    let lbd = &seed.lb;
    let (db1, db2) = (&seed.db1, &seed.db2);
    let socket = lbd.socket.clone();
    let mut report = Report::default();
    let curl = |url: &str| -> Result<String, String> {
        client
            .try_exec(
                "curl",
                &[
                    "-sS",
                    "--fail",
                    "--max-time",
                    "3",
                    "--cacert",
                    cert.to_str().unwrap(),
                    url,
                ],
            )
            .map(|s| s.trim().to_owned())
    };

    n.say("");
    n.say("1. The user resolves www.foobar.com (dnsmasq, through the client's resolver):");
    let dns_answer = step(
        "DNS",
        client.try_exec("getent", &["hosts", "www.foobar.com"]),
    )?;
    n.say(format!("   {}", dns_answer.trim()));
    if !dns_answer.starts_with(&WWW.to_string()) {
        return Err(format!(
            "DNS: www.foobar.com should resolve to {WWW}, got {dns_answer:?}"
        ));
    }
    report.dns = dns_answer.trim().to_owned();

    n.say("");
    n.say("2. Six requests to http://www.foobar.com/, each a new connection, spread round robin:");
    for _ in 0..6 {
        let a = step("HTTP through the VIP", curl("http://www.foobar.com/"))?;
        n.say(format!("   {a}"));
        report.round_robin.push(a);
    }
    let firsts: Vec<&str> = report
        .round_robin
        .iter()
        .map(|a| a.split(' ').next().unwrap_or(""))
        .collect();
    if firsts.windows(2).any(|w| w[0] == w[1])
        || !firsts.contains(&"web1")
        || !firsts.contains(&"web2")
    {
        return Err(format!(
            "round robin: web1 and web2 should alternate, got {firsts:?}"
        ));
    }

    n.say("");
    n.say("3. HTTPS: nginx terminates TLS; the balancer passes :443 through untouched:");
    report.https = step("HTTPS through the VIP", curl("https://www.foobar.com/"))?;
    n.say(format!("   https://www.foobar.com/ -> {}", report.https));

    n.say("");
    n.say("4. An app server writes through the write VIP; the other reads through the read VIP:");
    // Which app server answers follows the web tier's round robin: a few
    // tries find app1, and every answer on the way must be a write that
    // landed on the primary (a wrong one fails the demo, it is not retried).
    report.write = step(
        "write",
        first_of(4, "app1's answer", || {
            let a = curl("http://www.foobar.com/write?msg=hello-seed")?;
            if !a.ends_with("on server_id 1") {
                return Err(format!("a write landed off the primary db1: {a}"));
            }
            Ok(a.contains("-> app1: wrote").then_some(a))
        }),
    )?;
    n.say(format!("   {}", report.write));
    report.read = step(
        "read",
        first_of(4, "app2's answer", || {
            let a = curl("http://www.foobar.com/read")?;
            if !(a.contains("from server_id 2") && a.contains("hello-seed")) {
                return Err(format!(
                    "a read not served by the replica db2 with the row written: {a}"
                ));
            }
            Ok(a.contains("-> app2:").then_some(a))
        }),
    )?;
    n.say(format!("   {}", report.read));

    n.say("");
    n.say("5. web1's nginx stops. The seed's balancer kept sending to it; this one checks:");
    let stopped = Instant::now();
    seed.webs[0].stop();
    wait_for(Duration::from_secs(10), "web1 to be marked down", || {
        lbd.backend("web", "web1")["state"] == "down"
    })?;
    report.web1_down_after = stopped.elapsed();
    n.say(format!(
        "   web1 marked down after {:?}; six more requests:",
        report.web1_down_after
    ));
    for _ in 0..6 {
        let a = step("HTTP after web1 stopped", curl("http://www.foobar.com/"))?;
        n.say(format!("   {a}"));
        report.after_failover.push(a);
    }
    if report.after_failover.iter().any(|a| !a.starts_with("web2")) {
        return Err("web failover: every request should reach web2".into());
    }

    n.say("");
    n.say("6. Planned database switchover: db1 goes read-only, db2 catches up and is promoted.");
    let (demoted, promoted) = db2.take_over_from(db1);
    // Writes fail while there is no primary (by design: refused at once);
    // one that succeeds must have landed on db2.
    let mut wrong = None;
    report.write_after_switchover = step(
        "write after the switchover",
        until(Duration::from_secs(5), || {
            let a = curl("http://www.foobar.com/write?msg=after-switchover").ok()?;
            if !a.ends_with("server_id 2") {
                wrong.get_or_insert(a);
                return None;
            }
            Some(a)
        }),
    )?;
    if let Some(a) = wrong {
        return Err(format!("a write after the switchover landed on db1: {a}"));
    }
    report.switchover = promoted.elapsed();
    n.say(format!(
        "   db1 read-only to db2 writable: {:?}; writes continue through the same VIP:",
        promoted.duration_since(demoted)
    ));
    n.say(format!(
        "   {} (within {:?} of the promotion)",
        report.write_after_switchover, report.switchover
    ));

    n.say("");
    n.say("7. The firewall the seed lacked: the database VIPs answer the app servers only,");
    n.say("   and a scan of the web VIP finds nothing but the web:");
    let client_ip = Ipv4Addr::new(10, 0, 1, 2);
    report.client_reached_database = client.run(move || {
        let to = (WRITE_VIP, 3306).into();
        crate::http::Conn::open_from(client_ip, to, Duration::from_secs(1)).is_ok()
    });
    n.say(format!(
        "   client -> {WRITE_VIP}:3306: {}",
        if report.client_reached_database {
            "answered"
        } else {
            "no answer (dropped by the data path: drop_denied_service)"
        }
    ));
    let found = crate::scan::scan(
        client,
        client_ip,
        WWW,
        (1..=1024).collect(),
        Duration::from_millis(500),
    );
    report.open_ports = found.open.iter().copied().collect();
    n.say(format!(
        "   ports 1-1024 of {WWW}: open {:?}; {} silent (closed ports are dropped, not refused)",
        report.open_ports, found.silent
    ));

    n.say("");
    n.say(format!(
        "8. The balancer's view (lb status --socket {}):",
        socket.display()
    ));
    let (_, status) = lbd.cli(&["status"]);
    for l in status.lines() {
        n.say(format!("   {l}"));
    }

    Ok(report)
}

/// Up to `n` tries of `f`, until one gives a value; a try that errs ends it.
fn first_of<T>(
    n: usize,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    for _ in 0..n {
        if let Some(v) = f()? {
            return Ok(v);
        }
    }
    Err(format!("no {what} in {n} tries"))
}

fn until<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > within {
            return Err(format!("no expected answer within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<(), String> {
    until(within, || f().then_some(())).map_err(|_| format!("waited {within:?} for {what}"))
}
