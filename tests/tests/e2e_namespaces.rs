//! End-to-end (root): the real `lb` daemon in a namespace, real nginx on two
//! backends, real packets through veth pairs. In the balancer's namespace
//! netfilter drops every forwarded packet, so only XDP can carry traffic.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    daemon::LbDaemon,
    http,
    netns::Netns,
    nginx::Nginx,
    require_root,
    topology::{self, backend_addr, lb_config, service_block, Topology, VIP},
    udp::UdpNamer,
    unique,
};

fn prefix() -> String {
    format!("e{}{}", std::process::id() % 10_000, unique())
}

/// Counts, in a backend's own netfilter, packets arriving from the client on `port`.
fn count_arrivals(ns: &Netns, proto: &str, port: u16) {
    ns.exec(
        "nft",
        &[&format!(
            "add table inet seen; \
             add chain inet seen input {{ type filter hook input priority 0; }}; \
             add rule inet seen input ip saddr {} {proto} dport {port} counter",
            topology::CLIENT
        )],
    );
}

fn arrivals(ns: &Netns) -> u64 {
    topology::parse_nft_packets(&ns.exec("nft", &["list", "chain", "inet", "seen", "input"]))
}

fn vip(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

#[test]
fn root_http_new_connections_split_evenly_and_counters_agree_with_backends() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let webs: Vec<Nginx> = t.start_webs();
    for b in &t.backends {
        count_arrivals(b, "tcp", 80);
    }
    let lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });

    const N: usize = 1000;
    let (answers, per) = http::names(&t.client, vip(80), N);
    println!("split over {N} new connections: {per:?}");
    assert_eq!(per.len(), 2, "both backends answer: {per:?}");
    for name in ["web1", "web2"] {
        let n = per[name];
        assert!(n.abs_diff(N / 2) <= 1, "{name} answered {n} of {N}");
    }
    // Strict alternation: one client's sequential connections walk the ring.
    for w in answers.windows(2) {
        assert_ne!(w[0], w[1], "round robin alternates");
    }

    for (i, web) in webs.iter().enumerate() {
        let name = format!("web{}", i + 1);
        let traffic = lb.backend_traffic("web", &name);
        let seen_requests = web.requests();
        let seen_packets = arrivals(&t.backends[i]);
        println!(
            "{name}: lb counted {} flows / {} packets; nginx logged {seen_requests} requests, \
             its netfilter saw {seen_packets} packets",
            traffic["new_flows"], traffic["packets"]
        );
        assert_eq!(
            traffic["new_flows"].as_u64().unwrap(),
            seen_requests as u64,
            "{name} flows"
        );
        assert_eq!(
            traffic["packets"].as_u64().unwrap(),
            seen_packets,
            "{name} packets"
        );
        assert!(traffic["reply_packets"].as_u64().unwrap() >= 3 * seen_requests as u64);
    }
    let status = lb.status();
    assert_eq!(
        status["counters"]["pass_no_neigh"], 0,
        "next hops stay resolved"
    );
    assert_eq!(status["counters"]["drop_tcp_no_flow"], 0);
    assert_eq!(
        t.lb_kernel_forwarded(),
        0,
        "the kernel forwarded nothing: XDP carried it all"
    );
}

#[test]
fn root_long_lived_connection_keeps_its_backend_while_others_come_and_go() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let _webs: Vec<Nginx> = t.start_webs();
    let _lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });

    let (long, short) = t.client.run(|| {
        let mut conn = http::Conn::open(vip(80)).expect("opening the long-lived connection");
        let mut long = Vec::new();
        let mut short = Vec::new();
        for round in 0..30 {
            let (status, body) = conn
                .get("/")
                .unwrap_or_else(|e| panic!("long-lived request {round}: {e}"));
            assert_eq!(status, 200);
            long.push(body.trim().to_owned());
            for _ in 0..3 {
                let (_, b) = http::get(vip(80), "/").expect("short request");
                short.push(b.trim().to_owned());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (long, short)
    });
    println!("long-lived connection answered by {:?}", long[0]);
    assert!(
        long.iter().all(|b| b == &long[0]),
        "the long-lived connection moved: {long:?}"
    );
    assert!(
        short.iter().any(|b| b == "web1") && short.iter().any(|b| b == "web2"),
        "others spread"
    );
}

#[test]
fn root_udp_service_round_robins_new_flows_and_keeps_each_flow() {
    require_root();
    let t = Topology::new(&prefix(), 2);
    let servers: Vec<UdpNamer> = (1..=2)
        .map(|i| {
            UdpNamer::start(
                &t.backends[i - 1],
                SocketAddrV4::new(backend_addr(i), 5353).into(),
                &format!("web{i}"),
            )
        })
        .collect();
    for b in &t.backends {
        count_arrivals(b, "udp", 5353);
    }
    let lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("dns", 53, "udp", 2, 5353))
    });

    const FLOWS: usize = 10;
    const PER_FLOW: usize = 4;
    let flows = lb_tests::udp::flows_through(&t.client, vip(53), FLOWS, PER_FLOW);
    for (i, a) in flows.iter().enumerate() {
        assert!(
            a.iter().all(|x| x == &a[0]),
            "flow {i} moved between backends: {a:?}"
        );
        let want = if i % 2 == 0 { "web1" } else { "web2" };
        assert_eq!(a[0], want, "new flow {i} takes the next backend in turn");
    }
    for (i, s) in servers.iter().enumerate() {
        let name = format!("web{}", i + 1);
        let traffic = lb.backend_traffic("dns", &name);
        assert_eq!(traffic["new_flows"].as_u64().unwrap(), (FLOWS / 2) as u64);
        assert_eq!(s.received(), (FLOWS / 2 * PER_FLOW) as u64);
        assert_eq!(
            traffic["packets"].as_u64().unwrap(),
            arrivals(&t.backends[i])
        );
        assert_eq!(traffic["packets"].as_u64().unwrap(), s.received());
    }
}

#[test]
fn root_run_with_a_bad_config_changes_nothing_in_the_kernel() {
    require_root();
    let t = Topology::new(&prefix(), 1);
    let dir = lb_tests::TempDir::new("badcfg");
    let sock = dir.path().join("lb.sock");
    let cfg = dir.path().join("lb.toml");
    let bad = lb_config(&sock, &service_block("web", 80, "tcp", 1, 80))
        .replace("10.0.2.11", "10.0.2.311");
    std::fs::write(&cfg, bad).unwrap();
    let before = t.lb.ip(&["link", "show"]);
    // The data path's programs loaded in the kernel (any namespace).
    let ours = || -> std::collections::BTreeSet<u32> {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .filter(|p| matches!(p.name_as_str(), Some("lb" | "lb_tc")))
            .map(|p| p.id())
            .collect()
    };
    let programs_before = ours();
    let out =
        t.lb.command(lb_tests::daemon::lb_binary().to_str().unwrap())
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lb run must refuse a bad config");
    assert!(stderr.contains("service[0].backend[0].address"), "{stderr}");
    let after = t.lb.ip(&["link", "show"]);
    for i in ["eth0", "eth1"] {
        assert_eq!(t.lb.attached_program(i), None, "nothing attached to {i}");
    }
    assert_eq!(before, after, "interfaces unchanged");
    assert!(!sock.exists(), "no control socket was opened");
    let pins = lb_tests::topology::pin_dir_for(&sock);
    assert!(!pins.exists(), "no map was pinned ({})", pins.display());
    let loaded: Vec<u32> = ours().difference(&programs_before).copied().collect();
    assert!(loaded.is_empty(), "programs left loaded: {loaded:?}");
}

#[test]
fn root_path_mtu_discovery_works_across_the_balancer() {
    require_root();
    let t = Topology::new(&prefix(), 1);
    // The client's side of the balancer is a narrower link (a tunnel, say)
    // than the backend's: the client offers a 1460-byte MSS, the backend's
    // full-size segments do not fit, and only "fragmentation needed" from the
    // balancer teaches the backend to send smaller ones.
    t.lb.ip(&["link", "set", "eth0", "mtu", "1280"]);
    let site = lb_tests::TempDir::new("pmtu-site");
    let body: String = (0..200_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    std::fs::write(site.path().join("big"), &body).unwrap();
    let _web = Nginx::start_with_servers(
        &t.backends[0],
        "web1",
        SocketAddrV4::new(backend_addr(1), 80),
        &format!(
            "server {{\n    listen {}:80;\n    location / {{ root {}; }}\n  }}",
            backend_addr(1),
            site.path().display()
        ),
    );
    let lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 1, 80))
    });
    let got = t.client.run(|| http::get(vip(80), "/big"));
    let (status, answer) = got.expect("a 200 KB answer across the narrower link");
    assert_eq!(status, 200);
    assert!(
        answer == body,
        "the body arrived whole ({} bytes)",
        answer.len()
    );
    let too_big = lb.status()["counters"]["pass_too_big"].as_u64().unwrap();
    assert!(
        too_big >= 1,
        "the too-big segment went to the kernel, which told the backend"
    );
    println!("{too_big} too-big segment(s) passed to the kernel; the answer arrived whole");
}
