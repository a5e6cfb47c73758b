//! End-to-end (root): the data path outlives the daemon. A SIGKILLed daemon
//! breaks no connection and its successor adopts the connection table; a new
//! program replaces the old one atomically on the pinned links; two balancers
//! with the same Maglev config carry each other's flows.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use lb_tests::{
    daemon::{Launch, LbDaemon},
    http,
    load::{Load, Sample},
    nginx::Nginx,
    require_root,
    topology::{lb_config, pin_dir_for, service_block, ActiveActive, Topology, VIP},
    unique,
};

fn prefix() -> String {
    format!("r{}{}", std::process::id() % 10_000, unique())
}

fn vip() -> SocketAddr {
    SocketAddrV4::new(VIP, 80).into()
}

/// Long-lived keep-alive connections exercised in a loop until stopped; each
/// must keep answering from the backend it started on. Returns the rounds done.
struct Holders {
    stop: Arc<AtomicBool>,
    /// Rounds done so far (every connection answered once per round).
    done: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<(Vec<String>, usize)>,
}

impl Holders {
    fn start(ns: &lb_tests::netns::Netns, n: usize) -> Holders {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let d = done.clone();
        let thread = ns.spawn(move || {
            let mut conns: Vec<http::Conn> = (0..n)
                .map(|i| http::Conn::open(vip()).unwrap_or_else(|e| panic!("opening {i}: {e}")))
                .collect();
            let first: Vec<String> = conns.iter_mut().map(|c| c.get("/").unwrap().1).collect();
            let mut rounds = 0;
            while !s.load(Ordering::Relaxed) {
                for (i, c) in conns.iter_mut().enumerate() {
                    match c.get("/") {
                        Ok((200, b)) if b == first[i] => {}
                        other => panic!("long-lived connection {i} broke or moved after {rounds} rounds: {other:?}"),
                    }
                }
                rounds += 1;
                d.store(rounds, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
            (first, rounds)
        });
        Holders { stop, done, thread }
    }

    /// Rounds done so far: taken before an event, it lets a test check that
    /// the connections were used after it, not only before.
    fn rounds(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("a long-lived connection broke")
    }
}

fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.answer.is_err()).collect()
}

#[test]
fn root_sigkilled_daemon_breaks_nothing_and_its_successor_adopts_the_flows() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    // Round robin: only the connection table can keep a mid-flow packet on
    // its backend, so surviving connections prove the table survived.
    let mut lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    let holders = Holders::start(&t.client, 50);
    let load = Load::start(&t.client, vip(), Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(500));

    let forwarded = |lb: &LbDaemon| lb.status()["counters"]["forwarded"].as_u64().unwrap();
    let before_kill = forwarded(&lb);
    lb.kill();
    println!("daemon SIGKILLed; down for 5 s");
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        pin_dir_for(&lb.socket)
            .join(lb_common::maps::CONNTRACK)
            .exists(),
        "maps stay pinned"
    );
    lb.restart(&[]);
    assert!(
        lb.log_text().contains("adopted the pinned maps"),
        "{}",
        lb.log_text()
    );
    let after_restart = forwarded(&lb);
    println!("packets forwarded: {before_kill} before the kill, {after_restart} after the restart");
    assert!(
        after_restart > before_kill,
        "counters are monotonic across the restart (and counted while it was down)"
    );
    let web1 = lb.backend("web", "web1");
    let web2 = lb.backend("web", "web2");
    let active = web1["active_flows"].as_u64().unwrap() + web2["active_flows"].as_u64().unwrap();
    println!("after the restart the connection table holds {active} active flows");
    assert!(
        active >= 50,
        "the old flows are still in the table: {web1} {web2}"
    );
    std::thread::sleep(Duration::from_millis(500));

    let samples = load.stop();
    let (first, rounds) = holders.finish();
    println!(
        "{} new connections across the kill, {} failed; 50 long-lived connections ({} on web1), {rounds} rounds each",
        samples.len(),
        failures(&samples).len(),
        first.iter().filter(|b| b.trim() == "web1").count()
    );
    assert!(
        failures(&samples).is_empty(),
        "{:?}",
        &failures(&samples)[..failures(&samples).len().min(5)]
    );
    assert!(
        rounds >= 50,
        "the connections were exercised while the daemon was down"
    );

    // A clean stop detaches and removes the pins.
    let (ok, out) = lb.cli(&["stop"]);
    assert!(ok, "{out}");
    lb.wait_exit(Duration::from_secs(10));
    assert!(
        !pin_dir_for(&lb.socket).exists(),
        "lb stop removes the pins"
    );
    for i in ["eth0", "eth1"] {
        assert_eq!(t.lb.attached_program(i), None, "and detaches from {i}");
    }
}

#[test]
fn root_a_new_program_replaces_the_old_one_on_the_pinned_links_without_breaking_flows() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    let mut lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    let prog_id = |t: &Topology| -> String {
        t.lb.attached_program("eth0")
            .expect("the data path is attached to eth0")
    };
    let variant = std::env::var_os("LB_TEST_UPGRADE_OBJECT").map(std::path::PathBuf::from).expect(
        "LB_TEST_UPGRADE_OBJECT names a second build of the XDP program: run this through `cargo xtask test`",
    );
    assert!(variant.exists(), "{} is missing", variant.display());
    let before = prog_id(&t);
    let holders = Holders::start(&t.client, 20);
    let load = Load::start(&t.client, vip(), Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(300));

    // The upgrade path: stop leaving the data path in place, start the new
    // build (here a second build of the program, with verbose-logs), which
    // loads its program and swaps it in on the links.
    let before_upgrade = holders.rounds();
    let (ok, out) = lb.cli(&["stop", "--keep-datapath"]);
    assert!(ok, "{out}");
    lb.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    lb.restart_with_object(&variant);
    let after = prog_id(&t);
    println!("program on eth0: {before} before, {after} after the upgrade");
    let tag = |s: &str| s.split(" tag ").nth(1).unwrap_or("").to_owned();
    assert_ne!(
        tag(&before),
        tag(&after),
        "the new build's program runs on the link"
    );
    assert!(
        lb.log_text().contains("LB_XDP_OBJECT"),
        "the daemon loaded the new object"
    );
    let st = lb.status();
    assert!(
        st["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["adopted"] == true),
        "{st}"
    );
    std::thread::sleep(Duration::from_millis(500));

    let samples = load.stop();
    let (_, rounds) = holders.finish();
    println!(
        "{} new connections across the upgrade, {} failed; 20 long-lived, {rounds} rounds \
         ({} of them from the stop on)",
        samples.len(),
        failures(&samples).len(),
        rounds - before_upgrade
    );
    assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));
    assert!(
        rounds - before_upgrade >= 5,
        "the long-lived connections were used across the upgrade: {} rounds",
        rounds - before_upgrade
    );
}

#[test]
fn root_active_active_balancers_carry_each_others_flows_when_one_goes_away() {
    require_root();
    let t = ActiveActive::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    let svc = service_block("web", 80, "tcp", 2, 80).replace("round-robin", "maglev");
    let cfg = |sock: &std::path::Path| {
        lb_config(sock, &svc).replace(
            "[daemon]\n",
            "[daemon]\nmaglev_seed = 42\nstateless_reverse_nat = true\n",
        )
    };
    let lb1 = LbDaemon::start(&t.lbs[0], cfg);
    let lb2 = LbDaemon::start(&t.lbs[1], cfg);

    let holders = Holders::start(&t.client, 40);
    std::thread::sleep(Duration::from_millis(500));
    let fwd = |lb: &LbDaemon| lb.status()["counters"]["forwarded"].as_u64().unwrap();
    let (f1, f2) = (fwd(&lb1), fwd(&lb2));
    println!("before: lb1 forwarded {f1} packets, lb2 {f2}");
    assert!(
        f1 > 0 && f2 > 0,
        "the router spreads flows over both balancers"
    );

    // lb1 goes away: withdrawn from the routes, its daemon stopped (XDP detached).
    let before_withdraw = holders.rounds();
    t.withdraw(0);
    drop(lb1);
    assert_eq!(t.lbs[0].attached_program("eth0"), None);
    std::thread::sleep(Duration::from_millis(1500));
    let recovered = lb2.status()["counters"]["flows_recovered"]
        .as_u64()
        .unwrap();
    let (first, rounds) = holders.finish();
    println!(
        "after lb1 went away: {rounds} rounds on 40 long-lived connections ({} on web1), \
         lb2 took over {recovered} flows it had never seen",
        first.iter().filter(|b| b.trim() == "web1").count()
    );
    assert!(recovered > 0, "lb2 carried flows that had come through lb1");
    assert!(
        rounds - before_withdraw >= 5,
        "the long-lived connections were used after lb1 went away: {} rounds",
        rounds - before_withdraw
    );
    let more = lb_tests::burst_ok(&t.client, vip(), 20);
    assert_eq!(more, 20, "new connections go through lb2");
}

#[test]
fn root_the_connection_table_takes_the_configured_size_and_a_pinned_one_keeps_its_own() {
    require_root();
    let t = Topology::new(&prefix(), 1);
    let _webs: Vec<Nginx> = t.start_webs();
    let config = |sock: &std::path::Path, size: u32| {
        lb_config(sock, &service_block("web", 80, "tcp", 1, 80)).replace(
            "hook = \"auto\"",
            &format!("hook = \"auto\"\nconntrack_size = {size}"),
        )
    };
    let mut lb = LbDaemon::start(&t.lb, |sock| config(sock, 4096));
    let pins = pin_dir_for(&lb.socket);
    let size = |map: &str| {
        aya::maps::MapInfo::from_pin(pins.join(map))
            .unwrap()
            .max_entries()
    };
    assert_eq!(
        (
            size(lb_common::maps::CONNTRACK),
            size(lb_common::maps::REVERSE)
        ),
        (4096, 4096)
    );
    assert_eq!(lb.status()["conntrack"]["capacity"], 4096);
    assert!(t
        .client
        .run(|| matches!(http::get(vip(), "/"), Ok((200, _)))));

    // Another size cannot adopt the pinned table: refused, and nothing changes.
    lb.kill();
    let socket = lb.socket.clone();
    std::fs::write(&lb.config, config(&socket, 8192)).unwrap();
    let out = lb_tests::netns::Netns::attach(&t.lb.name)
        .command_same_mounts(lb_tests::daemon::lb_binary())
        .args(["run", "--config"])
        .arg(&lb.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("4096 entries")
            && text.contains("conntrack_size")
            && text.contains("--fresh"),
        "{text}"
    );
    assert_eq!(
        size(lb_common::maps::CONNTRACK),
        4096,
        "the pinned table is untouched"
    );
    // Starting afresh takes the new size.
    lb.restart(&["--fresh"]);
    assert_eq!(
        (
            size(lb_common::maps::CONNTRACK),
            size(lb_common::maps::REVERSE)
        ),
        (8192, 8192)
    );
    assert!(t
        .client
        .run(|| matches!(http::get(vip(), "/"), Ok((200, _)))));
}

/// A daemon run with `lb run --netns NAME` from the host enters only the
/// network namespace: its pins are on the host's bpffs, so a SIGKILL under
/// load breaks nothing and its successor adopts everything. Started under
/// `ip netns exec` (a private mount namespace with a fresh /sys), it says at
/// start that its state will not survive, how to fix that, and `lb status`
/// says so too.
#[test]
fn root_lb_run_netns_survives_a_sigkill_and_ip_netns_exec_is_warned_about() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    let mut lb = LbDaemon::start_as(&t.lb, Launch::NetnsFlag, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    let st = lb.status();
    assert_eq!(st["state"]["survives_restart"], true, "{}", st["state"]);
    let holders = Holders::start(&t.client, 30);
    let load = Load::start(&t.client, vip(), Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(500));
    lb.kill();
    println!("lb run --netns {}: SIGKILLed; down for 5 s", t.lb.name);
    std::thread::sleep(Duration::from_secs(5));
    lb.restart(&[]);
    assert!(
        lb.log_text().contains("adopted the pinned maps"),
        "{}",
        lb.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let samples = load.stop();
    let (_, rounds) = holders.finish();
    println!(
        "{} new connections across the kill, {} failed; 30 long-lived connections, {rounds} rounds",
        samples.len(),
        failures(&samples).len()
    );
    assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));
    assert!(
        rounds >= 50,
        "the connections were exercised while the daemon was down"
    );
    drop(lb);

    let lb = LbDaemon::start_as(&t.lb, Launch::IpNetnsExec, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    let log = lb.log_text();
    assert!(
        log.contains("will not survive a restart") && log.contains("lb run --netns NAME"),
        "the daemon warns, with the fix:\n{log}"
    );
    let st = lb.status();
    assert_eq!(st["state"]["survives_restart"], false, "{}", st["state"]);
    let (ok, text) = lb.cli(&["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("state: DOES NOT survive a restart of the daemon"),
        "{text}"
    );
    println!(
        "under ip netns exec, lb status says:\n{}",
        text.lines().next().unwrap_or("")
    );
}

/// What a second daemon could change of the first one's state: the pins (by
/// inode), the programs on the links, and the contents of the maps that
/// carry the services.
fn snapshot(t: &Topology, pins: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut s = String::new();
    let mut names: Vec<_> = std::fs::read_dir(pins)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().ino(),
            )
        })
        .collect();
    names.sort();
    s += &format!("pins {names:?}\n");
    for i in ["eth0", "eth1"] {
        s += &format!("{i}: {:?}\n", t.lb.attached_program(i));
    }
    let map = |name: &str| {
        aya::maps::MapData::from_pin(pins.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let services: aya::maps::HashMap<_, lb_common::ServiceKey, lb_common::Service> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map(lb_common::maps::SERVICES)))
            .unwrap();
    let mut entries: Vec<String> = services
        .iter()
        .map(|r| {
            let (k, v) = r.unwrap();
            format!("{:?}", (bytes(&k), bytes(&v)))
        })
        .collect();
    entries.sort();
    s += &format!("SERVICES {entries:?}\n");
    for name in [
        lb_common::maps::BACKENDS,
        lb_common::maps::RINGS,
        lb_common::maps::IFACES,
    ] {
        let a: aya::maps::Array<_, u32> = if name == lb_common::maps::BACKENDS {
            let b: aya::maps::Array<_, lb_common::Backend> =
                aya::maps::Array::try_from(aya::maps::Map::Array(map(name))).unwrap();
            let v: Vec<Vec<u8>> = b.iter().map(|x| bytes(&x.unwrap())).collect();
            s += &format!("{name} {:x}\n", crc(&v.concat()));
            continue;
        } else {
            aya::maps::Array::try_from(aya::maps::Map::Array(map(name))).unwrap()
        };
        let v: Vec<u32> = a.iter().map(|x| x.unwrap()).collect();
        s += &format!(
            "{name} {:x}\n",
            crc(&v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<_>>())
        );
    }
    s
}

/// The bytes of a plain-old-data map value.
fn bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a repr(C) map type read out of the kernel: every byte is initialised.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

/// FNV-1a, to keep big arrays' snapshots short.
fn crc(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A second `lb run` against a running daemon's pin directory and control
/// socket, with the same config, another config, or `--fresh`: refused with
/// the first one named, before it reads, writes or removes any map, pin or
/// link; the running daemon's state is unchanged and it keeps answering.
#[test]
fn root_a_second_daemon_is_refused_and_touches_nothing_of_the_first() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    let lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    let pins = pin_dir_for(&lb.socket);
    let before = snapshot(&t, &pins);
    let dir = lb_tests::TempDir::new("second");
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        lb_config(&lb.socket, &service_block("web", 80, "tcp", 1, 80)),
    )
    .unwrap();
    let same = lb.config.clone();
    for (what, cfg, extra) in [
        ("the same config", &same, None),
        ("another config", &other, None),
        ("--fresh", &same, Some("--fresh")),
    ] {
        let out =
            t.lb.command_same_mounts(lb_tests::daemon::lb_binary())
                .arg("run")
                .arg("--config")
                .arg(cfg)
                .args(extra)
                .output()
                .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: a second daemon must not run"
        );
        assert!(
            stderr.contains("another lb daemon (pid ") && stderr.contains("runs with pin_dir"),
            "{what}: the refusal names the running daemon:\n{stderr}"
        );
        let after = snapshot(&t, &pins);
        assert_eq!(before, after, "{what}: the running daemon's state changed");
        println!("{what}: refused: {}", stderr.lines().last().unwrap_or(""));
    }
    assert_eq!(
        lb.status()["attachments"].as_array().unwrap().len(),
        2,
        "still running"
    );
    let got = t.client.run(|| http::get(vip(), "/"));
    assert_eq!(got.expect("still forwarding").0, 200);
}

/// A daemon killed and restarted with another backend set and a new service:
/// the successor adopts what the file still lists (web1's connections go
/// on, through the kill and the change), removes what it does not (web2:
/// its connections get nothing more from anyone), adds web3 and the new
/// service, and new connections see exactly that.
#[test]
fn root_a_successor_with_a_changed_config_keeps_what_stays_and_applies_the_rest() {
    require_root();
    let t = Topology::new(&prefix(), 3);
    let _webs: Vec<Nginx> = t.start_webs();
    let mut lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    // Long-lived connections, half on web1 and half on web2 (round robin).
    let held = t.client.run(|| {
        let mut conns: Vec<http::Conn> =
            (0..10).map(|_| http::Conn::open(vip()).unwrap()).collect();
        let first: Vec<String> = conns
            .iter_mut()
            .map(|c| c.get("/").unwrap().1.trim().to_owned())
            .collect();
        (conns, first)
    });
    let (mut conns, first) = held;
    assert_eq!(
        first.iter().filter(|b| *b == "web1").count(),
        5,
        "{first:?}"
    );
    lb.kill();
    // web2 leaves, web3 comes, and a new service on :8080.
    let web2 = format!(
        "\n[[service.backend]]\nname = \"web2\"\naddress = \"{}\"\nport = 80\n",
        lb_tests::topology::backend_addr(2)
    );
    let changed = service_block("web", 80, "tcp", 3, 80).replace(&web2, "")
        + &service_block("alt", 8080, "tcp", 1, 80);
    lb.write_config(&lb_config(&lb.socket.clone(), &changed));
    lb.restart(&[]);
    assert!(
        lb.log_text().contains("adopted the pinned maps"),
        "{}",
        lb.log_text()
    );
    let st = lb.status();
    let names = |svc: &serde_json::Value| -> Vec<String> {
        svc["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&st["services"][0]), ["web1", "web3"], "{st}");
    assert_eq!(st["services"][1]["name"], "alt");

    // The held connections: web1's answer as before; one of web2's gets no
    // answer from anyone (its slot is gone: dropped, never sent elsewhere;
    // one is enough, each waits out the client's 5 s timeout).
    let web2_conn = first.iter().position(|b| b == "web2").unwrap();
    let asked: Vec<usize> = (0..first.len())
        .filter(|&i| first[i] == "web1" || i == web2_conn)
        .collect();
    let outcomes = {
        let asked = asked.clone();
        t.client.run(move || {
            asked
                .iter()
                .map(|&i| {
                    conns[i]
                        .get("/")
                        .map(|(s, b)| (s, b.trim().to_owned()))
                        .map_err(|e| e.kind())
                })
                .collect::<Vec<_>>()
        })
    };
    for (&i, r) in asked.iter().zip(&outcomes) {
        if i == web2_conn {
            assert!(
                r.is_err(),
                "connection {i} on the removed web2 answered: {r:?}"
            );
        } else {
            assert_eq!(r, &Ok((200, "web1".to_owned())), "connection {i} on web1");
        }
    }

    // New connections: web1 and web3 in turn, never web2; the new service
    // answers from its one backend.
    let answers: Vec<String> = t.client.run(|| {
        (0..10)
            .map(|_| http::get(vip(), "/").unwrap().1.trim().to_owned())
            .collect()
    });
    assert!(
        answers.windows(2).all(|w| w[0] != w[1])
            && answers.iter().all(|a| a == "web1" || a == "web3"),
        "{answers:?}"
    );
    let alt = lb_tests::burst_ok(&t.client, SocketAddrV4::new(VIP, 8080).into(), 4);
    assert_eq!(alt, 4, "the new service answers");
}
