//! End-to-end (root): MySQL steering with real MariaDB servers and real GTID
//! replication in namespaces, behind a write VIP (:3306, the current primary)
//! and a read VIP (:3307, replicas within the lag limit).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LbDaemon,
    mariadb::{client, MariaDb, Session, MONITOR_PASSWORD, MONITOR_USER},
    require_root,
    topology::{backend_addr, lb_config, Topology, CLIENT, VIP},
    unique, TempDir,
};

const WRITE: u16 = 3306;
const READ: u16 = 3307;

struct Bed {
    t: Topology,
    db1: MariaDb,
    db2: MariaDb,
    lb: LbDaemon,
    _secret: TempDir,
}

/// db1 primary, db2 its replica, and the balancer with both VIPs.
fn bed() -> Bed {
    bed_with("", "")
}

/// [`bed`], with `services` added to the config and `daemon` to its
/// `[daemon]` table.
fn bed_with(services: &str, daemon: &str) -> Bed {
    require_root();
    let t = Topology::new(&format!("m{}{}", std::process::id() % 10_000, unique()), 2);
    let db1 = MariaDb::start(&t.backends[0], "db1", backend_addr(1), 1);
    let db2 = MariaDb::start(&t.backends[1], "db2", backend_addr(2), 2);
    db1.create_users_and_schema(MONITOR_PASSWORD);
    db1.make_writable();
    db2.replicate_from(&db1);
    db2.catch_up(&db1);
    let secret = TempDir::new("mysql-secret");
    let pass = secret.path().join("monitor.pass");
    std::fs::write(&pass, format!("{MONITOR_PASSWORD}\n")).unwrap();
    let svc = |name: &str, port: u16, steering: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"tcp\"\nsteering = \"{steering}\"\n\n\
             [service.mysql]\nuser = \"{MONITOR_USER}\"\npassword_file = \"{}\"\ninterval_ms = 250\ntimeout_ms = 200\nmax_replica_lag_s = 5\n\n\
             [[service.backend]]\nname = \"db1\"\naddress = \"{}\"\nport = 3306\n\n\
             [[service.backend]]\nname = \"db2\"\naddress = \"{}\"\nport = 3306\n\n",
            pass.display(),
            backend_addr(1),
            backend_addr(2)
        )
    };
    let cfg = format!(
        "{}{}{services}",
        svc("mysql-write", WRITE, "mysql-primary"),
        svc("mysql-read", READ, "mysql-replica")
    );
    let lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &cfg).replace("hook = \"auto\"", &format!("hook = \"auto\"\n{daemon}"))
    });
    let b = Bed {
        t,
        db1,
        db2,
        lb,
        _secret: secret,
    };
    b.wait_primary(Some("db1"), Duration::from_secs(5));
    b
}

impl Bed {
    fn write(&self, v: &str) -> Result<String, String> {
        client(
            &self.t.client,
            VIP,
            WRITE,
            &format!(
                "INSERT INTO appdb.t (v, server) VALUES ('{v}', @@server_id); SELECT @@server_id"
            ),
        )
    }

    fn read_server(&self) -> Result<String, String> {
        client(&self.t.client, VIP, READ, "SELECT @@server_id")
    }

    fn mysql_status(&self, service: &str) -> serde_json::Value {
        let st = self.lb.status();
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == service)
            .unwrap()["mysql"]
            .clone()
    }

    /// Waits until the write VIP's primary is `want`; returns how long it took.
    fn wait_primary(&self, want: Option<&str>, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let m = self.mysql_status("mysql-write");
            if m["primary"].as_str() == want {
                return start.elapsed();
            }
            if start.elapsed() > within {
                panic!("primary never became {want:?}: {m}\n{}", self.lb.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn root_writes_reach_the_primary_and_its_replica_and_reads_are_served_by_the_replica() {
    let b = bed();
    assert_eq!(
        b.write("first").unwrap(),
        "1",
        "the write VIP reaches db1, the primary"
    );
    b.db2.catch_up(&b.db1);
    assert_eq!(
        b.db2
            .sql("SELECT COUNT(*) FROM appdb.t WHERE v = 'first'")
            .trim(),
        "1",
        "replicated to db2"
    );
    for _ in 0..10 {
        assert_eq!(
            b.read_server().unwrap(),
            "2",
            "the read VIP reaches db2, the replica"
        );
    }
    let (ok, text) = b.lb.cli(&["status"]);
    assert!(
        ok && text.contains("role primary") && text.contains("role replica"),
        "{text}"
    );
    assert!(
        !b.lb.log_text().contains(MONITOR_PASSWORD),
        "the monitor's password is never logged"
    );
}

#[test]
fn root_connections_to_a_demoted_primary_are_reset_and_reconnect_to_the_new_one() {
    let b = bed();
    let held = Session::open(&b.t.client, VIP, WRITE).expect("connecting through the write VIP");
    assert_eq!(held.query("SELECT CAST(@@server_id AS CHAR)").unwrap(), "1");
    let (_, promoted) = b.db2.take_over_from(&b.db1);
    b.wait_primary(Some("db2"), Duration::from_secs(3));
    let r = held.query("SELECT CAST(@@server_id AS CHAR)");
    println!(
        "the connection held on the old primary, {:?} after the promotion: {r:?}",
        promoted.elapsed()
    );
    assert!(
        r.is_err(),
        "the demoted primary's connection is reset, not left writing into a read-only server"
    );
    assert!(b.lb.status()["counters"]["reset_flow"].as_u64().unwrap() >= 1);
    // The old primary's side is reset too (the client's next segment went
    // on to it as a reset): it keeps no connection from the client, which it
    // would otherwise hold until its keepalive, one more at every switchover.
    let peer = format!(" {CLIENT}:");
    let since = Instant::now();
    let open = loop {
        let ss = b.t.backends[0].exec("ss", &["-Htn", "state", "established", "( sport = :3306 )"]);
        let open: Vec<String> = ss
            .lines()
            .filter(|l| l.contains(&peer))
            .map(str::to_owned)
            .collect();
        if open.is_empty() || since.elapsed() > Duration::from_secs(2) {
            break open;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        open.is_empty(),
        "db1 still holds the client's connection after the reset: {open:?}"
    );
    let again = Session::open(&b.t.client, VIP, WRITE).expect("reconnecting");
    assert_eq!(
        again.query("SELECT CAST(@@server_id AS CHAR)").unwrap(),
        "2",
        "the reconnect reaches the new primary"
    );
}

#[test]
fn root_planned_switchover_moves_the_write_vip_within_a_second_and_no_write_reaches_the_old_primary(
) {
    let b = Arc::new(bed());
    let stop = Arc::new(AtomicBool::new(false));
    let (b2, s2) = (b.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut i = 0;
        while !s2.load(Ordering::Relaxed) {
            let at = Instant::now();
            log.push((at, b2.write(&format!("w{i}"))));
            i += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        log
    });
    std::thread::sleep(Duration::from_millis(1000));
    let (demoted, promoted) = b.db2.take_over_from(&b.db1);
    b.wait_primary(Some("db2"), Duration::from_secs(3));
    // From the moment the balancer says db2, it must not give db1 one more
    // connection: counted by the data path itself, not inferred from db1
    // refusing writes (a read-only server refuses them whatever we do).
    let new_flows = |backend: &str| {
        b.lb.backend_traffic("mysql-write", backend)["new_flows"]
            .as_u64()
            .expect("new_flows")
    };
    let (db1_at_switch, db2_at_switch) = (new_flows("db1"), new_flows("db2"));
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().unwrap();
    let (db1_after, db2_after) = (new_flows("db1"), new_flows("db2"));
    println!(
        "new connections after the switch: db1 {}, db2 {}",
        db1_after - db1_at_switch,
        db2_after - db2_at_switch
    );
    assert_eq!(
        db1_after, db1_at_switch,
        "the old primary got new connections after the balancer moved the write VIP"
    );
    assert!(
        db2_after > db2_at_switch + 10,
        "the writes of the last 1.5 s went to db2"
    );

    let first_on_db2 = log
        .iter()
        .find(|(at, r)| *at >= promoted && r.as_deref() == Ok("2"))
        .map(|(at, _)| at.duration_since(promoted))
        .expect("writes reach db2 after the switchover");
    let failed = log.iter().filter(|(_, r)| r.is_err()).count();
    println!(
        "{} writes; the write VIP followed the promotion in {first_on_db2:?}; {failed} writes failed \
         while there was no primary (old primary read-only to new one writable: {:?})",
        log.len(),
        promoted.duration_since(demoted)
    );
    assert!(
        first_on_db2 <= Duration::from_secs(1),
        "switch took {first_on_db2:?}"
    );
    for (at, r) in &log {
        if *at > demoted {
            assert_ne!(
                r.as_deref(),
                Ok("1"),
                "a write started after db1 went read-only was accepted by db1"
            );
        }
    }
    let after: Vec<_> = log
        .iter()
        .filter(|(at, _)| *at >= promoted + first_on_db2)
        .collect();
    assert!(
        after.iter().all(|(_, r)| r.as_deref() == Ok("2")),
        "every write after the switch lands on db2"
    );
}

#[test]
fn root_dead_primary_makes_writes_fail_fast_until_a_promotion_restores_them() {
    let mut b = bed();
    assert_eq!(b.write("before").unwrap(), "1");
    b.db1.kill();
    b.wait_primary(None, Duration::from_secs(3));
    let m = b.mysql_status("mysql-write");
    assert!(
        m["alarm"].as_str().unwrap().starts_with("no primary"),
        "{m}"
    );
    let t0 = Instant::now();
    let r = b.write("during");
    let took = t0.elapsed();
    println!("a write with no primary failed in {took:?}: {r:?}");
    assert!(r.is_err(), "no server may take the write");
    assert!(
        took < Duration::from_secs(1),
        "it fails fast (a reset from the VIP), not after a timeout"
    );
    assert!(
        b.lb.status()["counters"]["reset_no_backend"]
            .as_u64()
            .unwrap()
            >= 1
    );

    let promoted = b.db2.promote();
    let took = b.wait_primary(Some("db2"), Duration::from_secs(3));
    println!(
        "the write VIP followed the promotion in {:?}",
        promoted.elapsed().min(took)
    );
    assert_eq!(
        b.write("after").unwrap(),
        "2",
        "writes succeed again through the same VIP"
    );
}

#[test]
fn root_a_lagging_replica_leaves_the_read_vip_and_comes_back() {
    let b = bed();
    assert_eq!(b.read_server().unwrap(), "2");
    b.db2.sql("STOP SLAVE SQL_THREAD");
    b.write("while-lagging").unwrap();
    let start = Instant::now();
    while b.read_server().unwrap() != "1" {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "reads never fell back to the primary"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "with replication stopped, reads fell back to the primary in {:?}",
        start.elapsed()
    );
    let st = b.lb.status();
    let db2 = st["services"][1]["backends"][1]["mysql"]["observation"].clone();
    assert!(
        db2["lag_s"].is_null(),
        "lag unknown with the SQL thread stopped: {db2}"
    );

    b.db2.sql("START SLAVE SQL_THREAD");
    b.db2.catch_up(&b.db1);
    let start = Instant::now();
    while b.read_server().unwrap() != "2" {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the replica never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "caught up, the replica serves reads again after {:?}",
        start.elapsed()
    );
}

#[test]
fn root_two_writable_servers_keep_writes_on_the_primary_and_raise_an_alarm() {
    let b = bed();
    b.db2
        .sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0");
    let start = Instant::now();
    loop {
        let m = b.mysql_status("mysql-write");
        if m["alarm"]
            .as_str()
            .is_some_and(|a| a.contains("2 writable servers"))
        {
            assert_eq!(m["primary"], "db1");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "no alarm: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..10 {
        assert_eq!(
            b.write(&format!("two{i}")).unwrap(),
            "1",
            "writes stay on the current primary"
        );
    }
    let (_, text) = b.lb.cli(&["status"]);
    assert!(text.contains("ALARM: 2 writable servers"), "{text}");
    assert!(
        b.lb.log_text().contains("MySQL alarm"),
        "the alarm is logged"
    );
}

#[test]
fn root_an_idle_write_connection_survives_50000_others_coming_and_going() {
    // A 4,096-entry table, and nginx beside MariaDB on the same hosts for
    // the churn: 50,000 short HTTP connections through a web VIP.
    let b = bed_with(
        &lb_tests::topology::service_block("web", 80, "tcp", 2, 80),
        "conntrack_size = 4096",
    );
    let _webs = b.t.start_webs();
    let held = Session::open(&b.t.client, VIP, WRITE).expect("connecting through the write VIP");
    assert_eq!(held.query("SELECT CAST(@@server_id AS CHAR)").unwrap(), "1");
    let started = Instant::now();
    let answered = b.t.client.run(|| {
        let vip: std::net::SocketAddr = std::net::SocketAddrV4::new(VIP, 80).into();
        (0..50_000)
            .filter(|_| lb_tests::http::get(vip, "/").is_ok_and(|(code, _)| code == 200))
            .count()
    });
    println!(
        "50,000 short connections in {:.1} s ({answered} answered); flows closed {}, \
         drop_tcp_no_flow {}",
        started.elapsed().as_secs_f64(),
        b.lb.status()["counters"]["flows_closed"],
        b.lb.status()["counters"]["drop_tcp_no_flow"],
    );
    assert_eq!(answered, 50_000);
    assert_eq!(
        held.query("SELECT CAST(@@server_id AS CHAR)").unwrap(),
        "1",
        "the idle connection answers on the same socket, from the primary"
    );
    assert_eq!(b.lb.status()["counters"]["drop_tcp_no_flow"], 0);
}
