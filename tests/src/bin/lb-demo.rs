//! `cargo xtask demo`: the seed's load balancer in network namespaces on this
//! one machine, with our XDP balancer in HAProxy's place.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::ExitCode,
};

use std::{net::Ipv4Addr, time::Duration};

use lb_tests::{
    daemon::{lb_binary, LbDaemon},
    http,
    mariadb::{client, MariaDb},
    nginx::Nginx,
    topology::{backend_addr, Topology, CLIENT, VIP},
    TempDir,
};

const WRITE_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const READ_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);

const BURST: usize = 10;

fn main() -> ExitCode {
    let once = std::env::args().any(|a| a == "--once");
    lb_tests::require_root();
    // Ctrl-C and SIGTERM are taken synchronously below, so that every guard
    // (namespaces, nginx, lb) is dropped and cleans up after itself.
    let signals = block_signals();
    match story(once, &signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml")
}

fn story(once: bool, signals: &libc::sigset_t) -> Result<(), String> {
    println!("== lb demo: the seed's load balancer, in XDP ==\n");
    println!("Building the picture in network namespaces (lbdemo-*):");
    println!(
        "  client {CLIENT}  ->  lb (XDP on eth0 and eth1)  ->  switch  ->  web1 {}, web2 {}",
        backend_addr(1),
        backend_addr(2)
    );
    println!("  The balancer's kernel drops every forwarded packet (nftables), so only XDP carries traffic.");
    println!(
        "  db1 {} (MySQL primary) and db2 {} (its replica) sit behind a write VIP and a read VIP.",
        backend_addr(3),
        backend_addr(4)
    );
    let t = Topology::with_backends("lbdemo", &["web1", "web2", "db1", "db2"]);
    let _webs: Vec<Nginx> = (1..=2)
        .map(|i| Nginx::start(&t.backends[i - 1], &format!("web{i}"), backend_addr(i), 80))
        .collect();
    println!("  nginx answers on web1 and web2 with its own name.");
    let monitor_pass = std::fs::read_to_string(config_path().with_file_name("mysql-monitor.pass"))
        .map_err(|e| format!("reading config/mysql-monitor.pass: {e}"))?;
    let db1 = MariaDb::start(&t.backends[2], "db1", backend_addr(3), 1);
    let db2 = MariaDb::start(&t.backends[3], "db2", backend_addr(4), 2);
    db1.create_users_and_schema(monitor_pass.trim());
    db1.make_writable();
    db2.replicate_from(&db1);
    db2.catch_up(&db1);
    println!("  MariaDB runs on db1 (writable) and db2 (replicating from db1 with GTID).");

    let cfg = config_path();
    let cfg = cfg
        .canonicalize()
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
    let socket = PathBuf::from("/run/lb/demo.sock");
    println!("\nStarting: lb run --config {}", cfg.display());
    let lb = LbDaemon::start_file(&t.lb, &cfg, &socket, TempDir::new("demo"));
    for a in lb.status()["attachments"].as_array().into_iter().flatten() {
        println!(
            "  XDP attached to {} in {} mode",
            a["interface"].as_str().unwrap_or("?"),
            a["mode"].as_str().unwrap_or("?")
        );
    }

    let vip: SocketAddr = SocketAddrV4::new(VIP, 80).into();
    println!("\nThe client sends {BURST} requests to http://{VIP}/, each on a new TCP connection:");
    let answers: Vec<Result<String, String>> = t.client.run(move || {
        (0..BURST)
            .map(|_| match http::get(vip, "/") {
                Ok((200, body)) => Ok(body.trim().to_owned()),
                Ok((status, _)) => Err(format!("HTTP {status}")),
                Err(e) => Err(e.to_string()),
            })
            .collect()
    });
    for (i, a) in answers.iter().enumerate() {
        match a {
            Ok(who) => println!("  request {:>2}  ->  answered by {who}", i + 1),
            Err(e) => return Err(format!("request {} failed: {e}", i + 1)),
        }
    }
    let served = |name: &str| answers.iter().filter(|a| a.as_deref() == Ok(name)).count();
    println!(
        "  round robin: web1 served {}, web2 served {}",
        served("web1"),
        served("web2")
    );
    if served("web1").abs_diff(served("web2")) > 1 {
        return Err("the requests were not spread evenly".into());
    }

    println!("\nThe database, through the balancer:");
    let write = |v: &str| {
        client(
            &t.client,
            WRITE_VIP,
            3306,
            &format!(
                "INSERT INTO appdb.t (v, server) VALUES ('{v}', @@server_id); SELECT @@server_id"
            ),
        )
    };
    let read = || {
        client(
            &t.client,
            READ_VIP,
            3306,
            "SELECT @@server_id, COUNT(*) FROM appdb.t",
        )
    };
    let w = write("hello").map_err(|e| format!("a write through {WRITE_VIP} failed: {e}"))?;
    println!(
        "  a write through the write VIP {WRITE_VIP} lands on server_id {w} (db1, the primary)"
    );
    if w != "1" {
        return Err("the write VIP did not reach the primary".into());
    }
    db2.catch_up(&db1);
    let r = read().map_err(|e| format!("a read through {READ_VIP} failed: {e}"))?;
    println!("  a read through the read VIP {READ_VIP} is answered with server_id and rows {r:?} (db2, the replica)");
    if !r.starts_with('2') {
        return Err("the read VIP did not reach the replica".into());
    }

    println!("\nPlanned switchover: db1 goes read-only, db2 catches up and is promoted.");
    let (demoted, promoted) = db2.take_over_from(&db1);
    let followed = loop {
        if let Ok(id) = write("after-switchover") {
            if id == "2" {
                break promoted.elapsed();
            }
        }
        if promoted.elapsed() > Duration::from_secs(5) {
            return Err("the write VIP did not follow the promotion within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "  db1 read-only to db2 writable took {:?}; the same write VIP reached db2 {followed:?} after the promotion",
        promoted.duration_since(demoted)
    );
    println!("  (writes in between were refused at once with a TCP reset: none reached a read-only server)");

    println!(
        "\nThe balancer's counters (lb status --socket {}):",
        socket.display()
    );
    let out = std::process::Command::new(lb_binary())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .map_err(|e| format!("running lb status: {e}"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }

    if once {
        println!("\nDone: removing the namespaces, nginx and the balancer.");
        return Ok(());
    }
    println!("\nEverything stays up until Ctrl-C. Try, as root:");
    println!("  ip netns exec lbdemo-cli curl http://{VIP}/");
    println!("  ip netns exec lbdemo-cli mariadb --no-defaults -h {WRITE_VIP} -u app -papp-secret-3 -e 'SELECT @@server_id'");
    println!(
        "  {} status --socket {}",
        lb_binary().display(),
        socket.display()
    );
    println!("  ip netns exec lbdemo-lb ip link show    # prog/xdp on eth0 and eth1");
    wait_for(signals);
    println!("\nStopping: removing the namespaces, nginx and the balancer.");
    Ok(())
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a zeroed, then initialised, sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: set was initialised by block_signals and the signals are blocked.
    unsafe { libc::sigwait(set, &mut sig) };
}
