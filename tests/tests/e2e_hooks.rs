//! End-to-end (root): each hook the data path runs at, on veths with TX
//! checksum offload and GRO as `ip link` leaves them (offload on, GRO off) and
//! as a NIC would have them (offload off, GRO on), at every end. Each case
//! sends 1,000 HTTP requests (a new connection each) and UDP flows through the
//! VIP, checks the exact split, and checks that no receiver anywhere counted a
//! checksum error. A hook that cannot forward correctly is refused at start.

use std::net::{SocketAddr, SocketAddrV4};

use lb_tests::{
    daemon::{lb_binary, LbDaemon},
    http,
    netns::Netns,
    require_root,
    topology::{backend_addr, lb_config, service_block, Offloads, Topology, VIP},
    udp::UdpNamer,
    unique,
};

fn prefix() -> String {
    format!("h{}{}", std::process::id() % 10_000, unique())
}

/// (TCP, UDP) segments received with a bad checksum in `ns` (/proc/net/snmp).
fn csum_errors(ns: &Netns) -> (u64, u64) {
    let snmp = ns.exec("cat", &["/proc/net/snmp"]);
    let field = |proto: &str| -> u64 {
        let lines: Vec<&str> = snmp
            .lines()
            .filter(|l| l.starts_with(&format!("{proto}:")))
            .collect();
        assert_eq!(lines.len(), 2, "{proto} lines in /proc/net/snmp:\n{snmp}");
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let at = names
            .iter()
            .position(|n| *n == "InCsumErrors")
            .unwrap_or_else(|| panic!("no {proto} InCsumErrors in /proc/net/snmp"));
        values[at].parse().unwrap()
    };
    (field("Tcp"), field("Udp"))
}

fn vip(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

fn config(sock: &std::path::Path, hook: &str) -> String {
    let services =
        service_block("web", 80, "tcp", 2, 80) + &service_block("dns", 53, "udp", 2, 5353);
    let cfg = lb_config(sock, &services);
    assert!(cfg.contains("hook = \"auto\""));
    cfg.replace("hook = \"auto\"", &format!("hook = \"{hook}\""))
}

/// Where NIC-like settings go: every veth end, or only one side's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ends {
    All(Offloads),
    /// The client and the balancer's client-facing end NIC-like, the
    /// backends' side as `ip link` makes it.
    ClientSideNicLike,
    /// The other way round.
    BackendSideNicLike,
}

fn set_ends(t: &Topology, e: Ends) {
    let client_side = |ns: &str, i: &str| ns == t.client.name || (ns == t.lb.name && i == "eth0");
    let pick = match e {
        Ends::All(o) => return t.set_offloads(o),
        Ends::ClientSideNicLike => true,
        Ends::BackendSideNicLike => false,
    };
    for (ns, ifs) in t.veth_ends() {
        for i in ifs {
            if client_side(&ns.name, &i) == pick {
                ns.exec("ethtool", &["-K", &i, "tx", "off", "gro", "on"]);
            }
        }
    }
}

/// Runs one case: `hook` asked for, the veths set as `o`; `expect` is the
/// hook `lb status` must report on both interfaces.
fn forwards(hook: &str, o: Offloads, expect: &str) {
    forwards_with(hook, Ends::All(o), expect)
}

fn forwards_with(hook: &str, o: Ends, expect: &str) {
    require_root();
    let t = Topology::new(&prefix(), 2);
    set_ends(&t, o);
    let webs = t.start_webs();
    let namers: Vec<UdpNamer> = (1..=2)
        .map(|i| {
            UdpNamer::start(
                &t.backends[i - 1],
                SocketAddrV4::new(backend_addr(i), 5353).into(),
                &format!("web{i}"),
            )
        })
        .collect();
    let lb = LbDaemon::start(&t.lb, |sock| config(sock, hook));
    let status = lb.status();
    for a in status["attachments"].as_array().unwrap() {
        assert_eq!(a["hook"], expect, "{hook} with {o:?} offloads: {a}");
        println!("{}: {} ({})", a["interface"], a["hook"], a["reason"]);
    }

    const N: usize = 1000;
    let (answers, per) = http::names(&t.client, vip(80), N);
    for w in answers.windows(2) {
        assert_ne!(w[0], w[1], "one client's new connections alternate");
    }
    println!("{hook}, {o:?} offloads: {N} requests split {per:?}");
    assert_eq!(per.get("web1"), Some(&(N / 2)), "{per:?}");
    assert_eq!(per.get("web2"), Some(&(N / 2)), "{per:?}");
    for (i, w) in webs.iter().enumerate() {
        assert_eq!(w.requests(), N / 2, "web{} logged every request", i + 1);
    }

    const FLOWS: usize = 10;
    const PER_FLOW: usize = 4;
    let flows = lb_tests::udp::flows_through(&t.client, vip(53), FLOWS, PER_FLOW);
    for (i, a) in flows.iter().enumerate() {
        let want = if i % 2 == 0 { "web1" } else { "web2" };
        assert!(a.iter().all(|x| x == want), "UDP flow {i}: {a:?}");
    }
    for n in &namers {
        assert_eq!(n.received(), (FLOWS / 2 * PER_FLOW) as u64);
    }

    for (ns, _) in t.veth_ends() {
        let (tcp, udp) = csum_errors(ns);
        println!("{}: TcpInCsumErrors {tcp}, UdpInCsumErrors {udp}", ns.name);
        assert_eq!(
            (tcp, udp),
            (0, 0),
            "{hook}, {o:?} offloads: {} counted checksum errors",
            ns.name
        );
    }
    let counters = &lb.status()["counters"];
    assert_eq!(counters["drop_tcp_no_flow"], 0);
    assert_eq!(counters["pass_no_neigh"], 0);
    assert_eq!(
        t.lb_kernel_forwarded(),
        0,
        "the kernel forwarded nothing: the data path carried it all"
    );
}

#[test]
fn root_tc_forwards_on_default_veths() {
    forwards("tc", Offloads::Default, "tc");
}

#[test]
fn root_tc_forwards_on_nic_like_veths() {
    forwards("tc", Offloads::NicLike, "tc");
}

#[test]
fn root_tc_forwards_with_offloads_on_at_the_client_side_only() {
    forwards_with("tc", Ends::BackendSideNicLike, "tc");
}

#[test]
fn root_tc_forwards_with_offloads_on_at_the_backend_side_only() {
    forwards_with("tc", Ends::ClientSideNicLike, "tc");
}

#[test]
fn root_auto_picks_tc_on_veths() {
    forwards("auto", Offloads::Default, "tc");
}

#[test]
fn root_generic_xdp_forwards_on_nic_like_veths() {
    forwards("xdp-generic", Offloads::NicLike, "xdp-generic");
}

#[test]
fn root_native_xdp_forwards_on_nic_like_veths() {
    forwards("xdp", Offloads::NicLike, "xdp");
}

/// Native XDP on veths left at their defaults would forward nothing (every
/// rewritten segment fails its checksum at the backend), and generic XDP
/// updates partial checksums wrongly (requests time out as soon as a device
/// on the way finishes them in software: seen with offload off on the
/// backends' side only): `lb run` refuses both, says what to change, and
/// attaches nothing.
#[test]
fn root_xdp_on_default_veths_is_refused_with_the_fix() {
    require_root();
    let t = Topology::new(&prefix(), 1);
    for (hook, what) in [("xdp", "native XDP"), ("xdp-generic", "generic XDP")] {
        let dir = lb_tests::TempDir::new("hookrefused");
        let sock = dir.path().join("lb.sock");
        let cfg = dir.path().join("lb.toml");
        std::fs::write(&cfg, config(&sock, hook)).unwrap();
        let out =
            t.lb.command(lb_binary().to_str().unwrap())
                .args(["run", "--config"])
                .arg(&cfg)
                .output()
                .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lb run must refuse {hook}");
        assert!(
            stderr.contains(&format!("{what} cannot forward on veth eth0"))
                && stderr.contains("TX checksum offload on")
                && stderr.contains("hook = \"tc\""),
            "the message says why and what to change:\n{stderr}"
        );
        for i in ["eth0", "eth1"] {
            assert_eq!(
                t.lb.attached_program(i),
                None,
                "{hook}: nothing attached to {i}"
            );
        }
    }
}
