//! End-to-end (root): a flow table that never drops a live connection. With
//! `conntrack_size = 4096`, idle keep-alive connections survive 50,000 short
//! connections coming and going (closed flows leave the table), and a
//! spoofed-source SYN flood beside legitimate new connections (half-open
//! flows wait apart): each idle connection answers afterwards on its own
//! socket, and the legitimate connections succeed.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LbDaemon,
    flood::{self, Sources},
    http,
    netns::Netns,
    require_root,
    topology::{lb_config, service_block, Topology, VIP},
    unique,
};

fn prefix() -> String {
    format!("f{}{}", std::process::id() % 10_000, unique())
}

fn vip() -> SocketAddr {
    SocketAddrV4::new(VIP, 80).into()
}

const TABLE: u32 = 4096;
const IDLE: usize = 20;

fn start(t: &Topology) -> LbDaemon {
    LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80)).replace(
            "hook = \"auto\"",
            &format!("hook = \"auto\"\nconntrack_size = {TABLE}"),
        )
    })
}

fn counter(lb: &LbDaemon, name: &str) -> u64 {
    lb.status()["counters"][name].as_u64().unwrap()
}

/// `n` keep-alive connections through the VIP, each answered once.
fn idle_connections(client: &Netns, n: usize) -> Vec<http::Conn> {
    client.run(move || {
        (0..n)
            .map(|_| {
                let mut c = http::Conn::open(vip()).expect("an idle connection opens");
                assert_eq!(c.get("/").unwrap().0, 200);
                c
            })
            .collect()
    })
}

/// Every idle connection answers again, on its own socket.
fn all_answer(client: &Netns, conns: Vec<http::Conn>) -> Vec<http::Conn> {
    client.run(move || {
        let mut conns = conns;
        for (i, c) in conns.iter_mut().enumerate() {
            match c.get("/") {
                Ok((200, _)) => {}
                other => panic!("idle connection {i} does not answer: {other:?}"),
            }
        }
        conns
    })
}

/// `n` short connections (one request each, closed), on `threads` threads.
fn short_connections(client: &Netns, n: u64, threads: u64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let done = done.clone();
            client.spawn(move || {
                let mut ok = 0;
                while done.fetch_add(1, Ordering::Relaxed) < n {
                    if http::get(vip(), "/").is_ok_and(|(code, _)| code == 200) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).sum()
}

#[test]
fn root_idle_connections_survive_50000_short_ones_in_a_4096_entry_table() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs = t.start_webs();
    let lb = start(&t);
    let conns = idle_connections(&t.client, IDLE);
    let started = Instant::now();
    let ok = short_connections(&t.client, 50_000, 2);
    let took = started.elapsed();
    let status = lb.status();
    println!(
        "50,000 short connections in {:.1} s, {ok} answered; established now {}, flows closed {}, \
         drop_tcp_no_flow {}",
        took.as_secs_f64(),
        status["conntrack"]["entries"],
        counter(&lb, "flows_closed"),
        counter(&lb, "drop_tcp_no_flow"),
    );
    assert_eq!(ok, 50_000, "every short connection is answered");
    let conns = all_answer(&t.client, conns);
    assert_eq!(
        counter(&lb, "drop_tcp_no_flow"),
        0,
        "no live flow was evicted"
    );
    assert!(
        counter(&lb, "flows_closed") >= 49_000,
        "closed flows left the table: {}",
        counter(&lb, "flows_closed")
    );
    // What is left established: the idle connections (and a few in flight).
    let established = lb.status()["conntrack"]["entries"].as_u64().unwrap();
    assert!(
        (IDLE as u64..IDLE as u64 + 10).contains(&established),
        "established flows after the churn: {established}"
    );
    drop(conns);
}

#[test]
fn root_idle_connections_and_new_ones_survive_a_spoofed_syn_flood() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs = t.start_webs();
    let lb = start(&t);
    let conns = idle_connections(&t.client, IDLE);
    // Legitimate new connections, one after another, while the flood runs.
    let stop = Arc::new(AtomicBool::new(false));
    let legit = {
        let stop = stop.clone();
        t.client.spawn(move || {
            let (mut ok, mut total) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                total += 1;
                if http::get(vip(), "/").is_ok_and(|(code, _)| code == 200) {
                    ok += 1;
                }
            }
            (ok, total)
        })
    };
    let f = flood::flood(
        &t.client,
        Sources::Spoofed,
        SocketAddrV4::new(VIP, 80),
        100_000,
        Duration::from_secs(30),
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, total) = legit.join().unwrap();
    let conns = all_answer(&t.client, conns);
    let rate = ok as f64 / total.max(1) as f64;
    println!(
        "spoofed flood: {} SYNs in {:.1} s ({:.0}/s); legitimate connections {ok}/{total} \
         ({:.2}%) answered; new_flows {}, drop_global_rate {}, drop_tcp_no_flow {}; established \
         now {}",
        f.sent,
        f.elapsed.as_secs_f64(),
        f.sent as f64 / f.elapsed.as_secs_f64(),
        100.0 * rate,
        counter(&lb, "new_flows"),
        counter(&lb, "drop_global_rate"),
        counter(&lb, "drop_tcp_no_flow"),
        lb.status()["conntrack"]["entries"],
    );
    assert!(
        f.sent >= 90_000,
        "the flood must be a flood: {} SYNs",
        f.sent
    );
    assert!(total >= 100, "the client made {total} connections");
    assert!(rate >= 0.99, "{ok}/{total} legitimate connections answered");
    assert_eq!(
        counter(&lb, "drop_tcp_no_flow"),
        0,
        "no live flow was evicted"
    );
    drop(conns);
}
