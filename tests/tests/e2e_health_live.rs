//! End-to-end (root): health checks and live backend management under load,
//! with real nginx, the real `lb` daemon and its real CLI, in namespaces.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LbDaemon,
    http,
    load::{Hang, Load, Sample},
    nginx::Nginx,
    require_root,
    topology::{backend_addr, lb_config, Topology, VIP},
    unique,
};

fn prefix() -> String {
    format!("h{}{}", std::process::id() % 10_000, unique())
}

fn vip(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

/// A `[[service]]` with the given extra service keys (health, scheduler...)
/// over backends `(name, index, port, extra backend keys)`.
fn service(name: &str, port: u16, extra: &str, backends: &[(&str, usize, u16, &str)]) -> String {
    let mut s = format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"tcp\"\n{extra}\n"
    );
    for (bname, i, bport, bextra) in backends {
        s += &format!(
            "\n[[service.backend]]\nname = \"{bname}\"\naddress = \"{}\"\nport = {bport}\n{bextra}\n",
            backend_addr(*i)
        );
    }
    s + "\n"
}

fn count(samples: &[Sample]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in samples {
        let k = match &s.answer {
            Ok(b) => b.clone(),
            Err(_) => "failed".into(),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// `n` requests, each on a new connection, from the client; who answered each.
fn burst(t: &Topology, port: u16, n: usize) -> Vec<String> {
    t.client.run(move || {
        (0..n)
            .map(|i| match http::get(vip(port), "/") {
                Ok((200, b)) => b.trim().to_owned(),
                other => panic!("request {i} to port {port}: {other:?}"),
            })
            .collect()
    })
}

fn tally(answers: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(a.as_str()).or_default() += 1;
    }
    m
}

const INTERVAL_MS: u64 = 250;
const RISE: u64 = 2;
const FALL: u64 = 2;

#[test]
fn root_killed_backend_is_routed_around_within_fall_intervals_and_returns_after_rise() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let mut webs = t.start_webs();
    let health = format!(
        "[service.health]\nkind = \"http\"\npath = \"/\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 200\nrise = {RISE}\nfall = {FALL}\n"
    );
    let svc = service(
        "web",
        80,
        &health,
        &[("web1", 1, 80, ""), ("web2", 2, 80, "")],
    );
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &svc));
    for w in ["web1", "web2"] {
        lb.wait_backend("web", w, Duration::from_secs(5), "checked and up", |b| {
            b["state"] == "up" && b["health"]["last"]["ok"] == true
        });
    }

    let load = Load::start(&t.client, vip(80), Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(1000));
    // The kill is when nginx has exited (SIGTERM handled), not when the
    // signal was sent: the window below is the checker's, not nginx's.
    let stopping = Instant::now();
    webs[1].stop();
    let killed = Instant::now();
    let down = lb.wait_backend("web", "web2", Duration::from_secs(5), "down", |b| {
        b["state"] == "down"
    });
    let marked_down = killed.elapsed();
    println!(
        "web2 marked down {marked_down:?} after the kill; last check: {}",
        down["health"]["last"]
    );
    assert_eq!(down["health"]["last"]["ok"], false);
    std::thread::sleep(Duration::from_millis(1500));

    // Its return is when nginx listens again: the bound below is the
    // checker's rise, not nginx's start-up.
    webs[1].restart(&t.backends[1]);
    let restarted = Instant::now();
    lb.wait_backend("web", "web2", Duration::from_secs(5), "up again", |b| {
        b["state"] == "up"
    });
    let marked_up = restarted.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    let samples = load.stop();

    let window = Duration::from_millis(INTERVAL_MS * FALL + INTERVAL_MS);
    let failures: Vec<&Sample> = samples.iter().filter(|s| s.answer.is_err()).collect();
    let last_failure = failures
        .iter()
        .map(|s| s.at.saturating_duration_since(killed))
        .max();
    let last_to_web2 = samples
        .iter()
        .filter(|s| s.at >= killed && s.at < restarted && s.answer.as_deref() == Ok("web2"))
        .map(|s| s.at.saturating_duration_since(killed))
        .max();
    let back = samples
        .iter()
        .filter(|s| s.at >= restarted && s.answer.as_deref() == Ok("web2"))
        .map(|s| s.at.saturating_duration_since(restarted))
        .min();
    println!(
        "{} requests, {} failed; last failure {last_failure:?} after the kill (bound {window:?}); \
         last answer from web2 {last_to_web2:?} after it; web2 up {marked_up:?} after its restart, \
         first answer {back:?} after it",
        samples.len(),
        failures.len()
    );
    for f in &failures {
        assert!(f.at >= stopping, "a request failed before the kill: {f:?}");
        assert!(
            f.at.saturating_duration_since(killed) <= window,
            "a request failed {:?} after the kill, past the {window:?} window: {f:?}",
            f.at.saturating_duration_since(killed)
        );
    }
    assert!(last_to_web2.is_none(), "a dead server cannot answer");
    let back = back.expect("web2 receives traffic again after its restart");
    assert!(
        back <= Duration::from_millis(INTERVAL_MS * (RISE + 1)) + Duration::from_millis(300),
        "web2 came back {back:?} after its restart"
    );
    let after = count(
        &samples
            .iter()
            .filter(|s| s.at >= restarted + back)
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert!(
        after.contains_key("web1") && after.contains_key("web2"),
        "{after:?}"
    );
}

#[test]
fn root_http_check_catches_errors_and_hangs_that_a_tcp_check_misses() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _web1 = Nginx::start(&t.backends[0], "web1", backend_addr(1), 80);
    let _web1b = Nginx::start(&t.backends[0], "web1", backend_addr(1), 81);
    let _web2 = Nginx::start_with_status(&t.backends[1], "web2", backend_addr(2), 80, 500);
    let _hang = Hang::start(
        &t.backends[1],
        SocketAddrV4::new(backend_addr(2), 81).into(),
    );
    // Timeouts with room on a loaded 2-core machine (web1 must never be
    // seen down): what is tested is which check sees what, not how fast.
    let http = "[service.health]\nkind = \"http\"\ninterval_ms = 500\ntimeout_ms = 400\nrise = 1\nfall = 1\n";
    let tcp = "[service.health]\nkind = \"tcp\"\ninterval_ms = 500\ntimeout_ms = 400\nrise = 1\nfall = 1\n";
    let both = |p: u16| [("web1", 1, p, ""), ("web2", 2, p, "")];
    // web2's own check expects its 500 (a per-backend override of one key:
    // kind, interval and timeout still come from the service's section).
    let expects_500 = [
        ("web1", 1, 80, ""),
        (
            "web2",
            2,
            80,
            "[service.backend.health]\nexpect_status = 500\n",
        ),
    ];
    let cfg = [
        service("http-500", 80, http, &both(80)),
        service("tcp-500", 8080, tcp, &both(80)),
        service("http-hang", 81, http, &both(81)),
        service("tcp-hang", 8081, tcp, &both(81)),
        service("http-500-expected", 8082, http, &expects_500),
    ]
    .concat();
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &cfg));
    let settled = |b: &serde_json::Value| !b["health"]["last"].is_null();
    for (svc, want, detail) in [
        ("http-500", "down", "HTTP 500"),
        ("tcp-500", "up", "connected"),
        ("http-hang", "down", "timed out after 400 ms"),
        ("tcp-hang", "up", "connected"),
        ("http-500-expected", "up", "HTTP 500"),
    ] {
        let b = lb.wait_backend(svc, "web2", Duration::from_secs(5), want, |b| {
            settled(b) && b["state"] == want
        });
        println!("{svc}: web2 {want}, last check {}", b["health"]["last"]);
        assert_eq!(b["health"]["last"]["detail"], detail, "{svc}");
        let w1 = lb.backend(svc, "web1");
        assert_eq!(w1["state"], "up", "{svc}: web1 is healthy");
    }
    // Traffic follows: the checked-down backend gets no new flows.
    assert!(burst(&t, 80, 20).iter().all(|b| b == "web1"));
    assert!(burst(&t, 81, 20).iter().all(|b| b == "web1"));
}

#[test]
fn root_weights_one_to_three_split_new_connections_a_quarter_and_three_quarters() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs = t.start_webs();
    let svc = service(
        "web",
        80,
        "scheduler = \"weighted-round-robin\"",
        &[("web1", 1, 80, "weight = 1"), ("web2", 2, 80, "weight = 3")],
    );
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &svc));
    let answers = burst(&t, 80, 2000);
    let m = tally(&answers);
    let share = |w: &str| 100.0 * m.get(w).copied().unwrap_or(0) as f64 / answers.len() as f64;
    println!(
        "weights 1:3 over 2000 new connections: web1 {:.1}%, web2 {:.1}%",
        share("web1"),
        share("web2")
    );
    assert!((share("web1") - 25.0).abs() <= 2.0, "{m:?}");
    assert!((share("web2") - 75.0).abs() <= 2.0, "{m:?}");
    assert_eq!(lb.backend("web", "web2")["weight"], 3);
}

#[test]
fn root_backends_added_removed_and_drained_live_without_moving_flows() {
    require_root();
    let t = Topology::new(&prefix(), 3);
    let _webs = t.start_webs();
    let svc = service("web", 80, "", &[("web1", 1, 80, ""), ("web2", 2, 80, "")]);
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &svc));

    // Two long-lived connections, one on each backend; they are checked after
    // every change.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (res_tx, res_rx) = std::sync::mpsc::channel::<Vec<String>>();
    let holder = t.client.spawn(move || {
        let mut conns: Vec<http::Conn> =
            (0..2).map(|_| http::Conn::open(vip(80)).unwrap()).collect();
        while rx.recv().is_ok() {
            let who = conns
                .iter_mut()
                .map(|c| match c.get("/") {
                    Ok((200, b)) => b.trim().to_owned(),
                    other => format!("broken: {other:?}"),
                })
                .collect();
            res_tx.send(who).unwrap();
        }
    });
    let long = |_: &str| -> Vec<String> {
        tx.send(()).unwrap();
        res_rx.recv_timeout(Duration::from_secs(10)).unwrap()
    };
    let first = long("start");
    assert_eq!(first, ["web1", "web2"]);

    let (ok, out) = lb.cli(&[
        "backend",
        "add",
        "web",
        "web3",
        &backend_addr(3).to_string(),
    ]);
    assert!(ok, "{out}");
    let m = tally(&burst(&t, 80, 300))
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect::<HashMap<_, _>>();
    println!("after adding web3, 300 new connections: {m:?}");
    for w in ["web1", "web2", "web3"] {
        assert_eq!(
            m.get(w).copied().unwrap_or(0),
            100,
            "{w} takes its share: {m:?}"
        );
    }
    assert_eq!(long("after add"), first, "adding moved no established flow");

    let (ok, out) = lb.cli(&["backend", "remove", "web", "web3"]);
    assert!(ok, "{out}");
    assert_eq!(
        long("after remove"),
        first,
        "removing web3 moved no flow of the others"
    );
    assert!(burst(&t, 80, 50).iter().all(|b| b != "web3"));

    let (ok, out) = lb.cli(&["backend", "drain", "web", "web1"]);
    assert!(ok && out.contains("web/web1 is draining"), "{out}");
    let after_drain = burst(&t, 80, 50);
    assert!(
        after_drain.iter().all(|b| b == "web2"),
        "new flows avoid a draining backend"
    );
    for _ in 0..3 {
        assert_eq!(
            long("while draining"),
            first,
            "the drained backend's connection lives on"
        );
    }
    let b = lb.backend("web", "web1");
    assert_eq!(b["state"], "draining");
    assert!(
        b["active_flows"].as_u64().unwrap() >= 1,
        "the long-lived flow is still active: {b}"
    );
    let (ok, status_text) = lb.cli(&["status"]);
    assert!(ok && status_text.contains("draining"), "{status_text}");

    let (ok, out) = lb.cli(&["backend", "enable", "web", "web1"]);
    assert!(ok, "{out}");
    assert!(burst(&t, 80, 10).iter().any(|b| b == "web1"));
    let (ok, out) = lb.cli(&["backend", "drain", "web", "nosuch"]);
    assert!(!ok && out.contains("no backend \"nosuch\""), "{out}");
    drop(tx);
    holder.join().unwrap();
}

#[test]
fn root_fifty_reloads_under_load_break_nothing_and_a_bad_file_changes_nothing() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs = t.start_webs();
    let svc = |w2: u32| {
        service(
            "web",
            80,
            "scheduler = \"weighted-round-robin\"\n[service.health]\nkind = \"http\"\ninterval_ms = 500\ntimeout_ms = 400\n",
            &[("web1", 1, 80, "weight = 1"), ("web2", 2, 80, &format!("weight = {w2}"))],
        )
    };
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &svc(1)));
    let socket = lb.socket.clone();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let holder = t.client.spawn(move || {
        let mut conns: Vec<http::Conn> =
            (0..4).map(|_| http::Conn::open(vip(80)).unwrap()).collect();
        let first: Vec<String> = conns.iter_mut().map(|c| c.get("/").unwrap().1).collect();
        let mut rounds = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, c) in conns.iter_mut().enumerate() {
                match c.get("/") {
                    Ok((200, b)) if b == first[i] => {}
                    other => panic!("long-lived connection {i} broke or moved: {other:?}"),
                }
            }
            rounds += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        rounds
    });
    let load = Load::start(&t.client, vip(80), Duration::from_millis(2));

    for i in 0..50u32 {
        let before = lb.reloads();
        lb.write_config(&lb_config(&socket, &svc(1 + i % 3)));
        if i % 2 == 0 {
            let (ok, out) = lb.cli(&["reload"]);
            assert!(ok && out.contains("applied"), "reload {i}: {out}");
            assert_eq!(lb.reloads(), (before.0 + 1, before.1), "reload {i}");
        } else {
            lb.sighup_and_wait(before, true);
        }
        // Each reload's weight is in force before the next one.
        let want = 1 + i % 3;
        assert_eq!(lb.backend("web", "web2")["weight"], want, "reload {i}");
    }
    // The last file said weight 1 + 49 % 3 = 2 for web2.
    assert_eq!(lb.backend("web", "web2")["weight"], 2);

    // An invalid file: the reload is refused with its error, nothing changes.
    lb.write_config(
        &lb_config(&socket, &svc(3)).replace("weight = 1", "weight = 1\ncolour = \"red\""),
    );
    let before = lb.reloads();
    let (ok, out) = lb.cli(&["reload"]);
    assert!(!ok, "an invalid config must be refused: {out}");
    assert!(out.contains("unknown field `colour`"), "{out}");
    assert_eq!(lb.reloads(), (before.0, before.1 + 1));
    // The same by SIGHUP, confirmed handled before the weight is read.
    lb.sighup_and_wait(lb.reloads(), false);
    assert_eq!(
        lb.backend("web", "web2")["weight"],
        2,
        "the running configuration stays"
    );
    assert!(
        lb.log_text().contains("reload rejected"),
        "SIGHUP's refusal is logged"
    );

    let samples = load.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = holder.join().expect("long-lived connections survived");
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.answer.is_err()).collect();
    println!(
        "50 reloads: {} requests on new connections, {} failed; 4 long-lived connections, {rounds} rounds each",
        samples.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(samples.len() > 100 && rounds > 10);
    assert!(burst(&t, 80, 4).iter().all(|b| b == "web1" || b == "web2"));
}

/// Reloads under load while an operator adds, drains and removes backends
/// and a backend's server goes down and comes back (a health flap, with a
/// SIGHUP in the middle of it): no request on a new connection fails except
/// in the flap's detection window, no long-lived connection breaks or moves,
/// and each step's state is in force before the next.
#[test]
fn root_reloads_and_live_changes_under_load_and_a_health_flap_break_nothing() {
    require_root();
    let t = Topology::new(&prefix(), 3);
    let mut webs = t.start_webs();
    let health = "[service.health]\nkind = \"http\"\ninterval_ms = 250\ntimeout_ms = 200\nrise = 2\nfall = 2\n";
    let svc = |w2: u32| {
        service(
            "web",
            80,
            &format!("scheduler = \"weighted-round-robin\"\n{health}"),
            &[
                ("web1", 1, 80, "weight = 2"),
                ("web2", 2, 80, &format!("weight = {w2}")),
            ],
        )
    };
    let lb = LbDaemon::start(&t.lb, |sock| lb_config(sock, &svc(1)));
    let socket = lb.socket.clone();
    for w in ["web1", "web2"] {
        lb.wait_backend("web", w, Duration::from_secs(5), "checked and up", |b| {
            b["state"] == "up" && b["health"]["last"]["ok"] == true
        });
    }
    // Long-lived connections on web1 (web2's server goes down below, and a
    // server that goes away takes its connections with it, by design).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let holder = t.client.spawn(move || {
        let mut conns = Vec::new();
        while conns.len() < 4 {
            let mut c = http::Conn::open(vip(80)).unwrap();
            if c.get("/").unwrap().1.trim() == "web1" {
                conns.push(c);
            }
        }
        let mut rounds = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, c) in conns.iter_mut().enumerate() {
                match c.get("/") {
                    Ok((200, b)) if b.trim() == "web1" => {}
                    other => panic!("long-lived connection {i} broke or moved: {other:?}"),
                }
            }
            rounds += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        rounds
    });
    let load = Load::start(&t.client, vip(80), Duration::from_millis(5));
    let op = |args: &[&str]| {
        let (ok, out) = lb.cli(args);
        assert!(ok, "{args:?}: {out}");
    };
    let web3 = format!("{}:80", backend_addr(3));
    for i in 0..6u32 {
        // An operator's round: web3 added, web2 drained and back, web3
        // drained then removed (drained first: removing cuts its flows).
        op(&["backend", "add", "web", "web3", &web3, "--weight", "1"]);
        assert_eq!(lb.backend("web", "web3")["state"], "up");
        op(&["backend", "drain", "web", "web2"]);
        assert_eq!(lb.backend("web", "web2")["admin"], "draining");
        std::thread::sleep(Duration::from_millis(50));
        op(&["backend", "enable", "web", "web2"]);
        op(&["backend", "drain", "web", "web3"]);
        std::thread::sleep(Duration::from_millis(100));
        op(&["backend", "remove", "web", "web3"]);
        // And a reload by SIGHUP with another weight, confirmed.
        let before = lb.reloads();
        lb.write_config(&lb_config(&socket, &svc(1 + i % 3)));
        lb.sighup_and_wait(before, true);
        assert_eq!(lb.backend("web", "web2")["weight"], 1 + i % 3);
    }

    // The flap: web2's server stops; while it is down a SIGHUP reloads a
    // changed file; the backend stays down (its health is kept across the
    // reload) until its server is back and passes `rise` checks.
    let stopping = Instant::now();
    webs[1].stop();
    let killed = Instant::now();
    lb.wait_backend("web", "web2", Duration::from_secs(5), "down", |b| {
        b["state"] == "down"
    });
    let before = lb.reloads();
    lb.write_config(&lb_config(&socket, &svc(3)));
    lb.sighup_and_wait(before, true);
    let b = lb.backend("web", "web2");
    assert_eq!(
        (b["state"].as_str(), b["weight"].as_u64()),
        (Some("down"), Some(3)),
        "down through the reload, at its new weight: {b}"
    );
    std::thread::sleep(Duration::from_millis(500));
    webs[1].restart(&t.backends[1]);
    let restarted = Instant::now();
    lb.wait_backend("web", "web2", Duration::from_secs(5), "up again", |b| {
        b["state"] == "up"
    });
    std::thread::sleep(Duration::from_millis(500));

    let samples = load.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = holder.join().expect("long-lived connections survived");
    let window = Duration::from_millis(250 * 2 + 250);
    let failures: Vec<&Sample> = samples.iter().filter(|s| s.answer.is_err()).collect();
    println!(
        "6 rounds of add/drain/enable/remove and SIGHUP, and a flap: {} requests, {} failed (all \
         within {window:?} of web2's stop), {rounds} rounds on 4 long-lived connections",
        samples.len(),
        failures.len()
    );
    for f in &failures {
        assert!(
            f.at >= stopping && f.at.saturating_duration_since(killed) <= window,
            "a request failed outside the flap's detection window: {f:?}"
        );
    }
    let on_web2_while_down = samples
        .iter()
        .filter(|s| s.at > killed && s.at < restarted && s.answer.as_deref() == Ok("web2"))
        .count();
    assert_eq!(on_web2_while_down, 0, "a stopped server answers nothing");
    assert!(samples.len() > 200 && rounds > 10);
}
