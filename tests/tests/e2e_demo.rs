//! End-to-end (root): the demo's story (`cargo xtask demo`), run
//! non-interactively with its own namespace prefix, each step asserted; then
//! nothing of it may be left behind.

use std::path::PathBuf;

use lb_tests::{
    require_root,
    seed::{self, Narrator, Options, WWW},
    unique,
};

#[test]
fn root_the_seed_story_runs_end_to_end_and_leaves_nothing_behind() {
    require_root();
    let prefix = format!("s{}{}", std::process::id() % 10_000, unique());
    let tmp = lb_tests::TempDir::new("seed-test");
    let opts = Options {
        prefix: prefix.clone(),
        config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml"),
        socket: tmp.path().join("lb.sock"),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
    };
    // As the demo binary does: it takes Ctrl-C and SIGTERM for itself, and the
    // balancer it starts must still stop cleanly on SIGTERM.
    // SAFETY: plain signal-mask calls for this thread (children inherit it).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let transcript = tmp.path().join("transcript.txt");
    let mut n = Narrator::new(Some(&transcript));
    let (seed, r) = seed::run(&opts, &mut n).unwrap_or_else(|e| panic!("the story failed: {e}"));

    assert!(r.dns.starts_with(&WWW.to_string()), "DNS answer: {}", r.dns);
    let webs: Vec<&str> = r
        .round_robin
        .iter()
        .map(|a| a.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        webs,
        ["web1", "web2", "web1", "web2", "web1", "web2"],
        "round robin over the web servers"
    );
    assert!(
        r.round_robin.iter().all(|a| a.contains("-> app")),
        "each web server forwards to its app"
    );
    assert!(
        r.write
            .contains("-> app1: wrote 'hello-seed' on server_id 1"),
        "{}",
        r.write
    );
    assert!(
        r.read.contains("-> app2:")
            && r.read.contains("from server_id 2")
            && r.read.contains("hello-seed"),
        "a row written through app1 is read through app2, from the replica: {}",
        r.read
    );
    assert!(
        r.after_failover.iter().all(|a| a.starts_with("web2")),
        "web failover: {:?}",
        r.after_failover
    );
    println!("web1 marked down {:?} after it stopped", r.web1_down_after);
    assert!(
        r.write_after_switchover.ends_with("server_id 2"),
        "writes continue on the new primary"
    );
    println!(
        "writes reached the new primary {:?} after the promotion",
        r.switchover
    );
    assert!(
        r.switchover.as_secs_f64() < 1.0,
        "the write VIP followed within a second"
    );
    assert!(
        r.https.contains("-> app"),
        "HTTPS through the VIP: {}",
        r.https
    );
    assert!(
        !r.client_reached_database,
        "the database VIPs answer the web LAN only"
    );
    assert_eq!(
        r.open_ports,
        [80, 443],
        "a scan of the web VIP finds only its services"
    );
    let text = std::fs::read_to_string(&transcript).unwrap();
    assert!(
        text.contains("1. The user resolves www.foobar.com")
            && text.contains("7. The firewall the seed lacked")
            && text.contains("8. The balancer's view")
    );

    let pids = seed.pids();
    drop(seed);
    let left = lb_tests::sh("ip", &["netns", "list"]);
    assert!(
        !left.contains(&format!("{prefix}-")),
        "namespaces left behind:\n{left}"
    );
    assert!(
        !PathBuf::from(format!("/etc/netns/{prefix}-cli")).exists(),
        "resolver config left behind"
    );
    assert!(!opts.pin_dir.exists(), "pins left behind");
    assert!(!opts.socket.exists(), "control socket left behind");
    for pid in pids {
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "process {pid} left behind"
        );
    }
}
