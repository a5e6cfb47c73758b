//! Kernel tests (root): the real programs, verifier included, run on crafted
//! frames through BPF_PROG_TEST_RUN. Each test builds a small namespace whose
//! FIB and neighbour table make the program's route lookups deterministic, so
//! the expected output bytes (addresses, ports, MACs, TTL, checksums) are exact.
//! Every test runs twice, on a fresh data path each time: once through the XDP
//! program, once through the TC program (its actions read as XDP's, see
//! `Harness::try_run`), and both must produce the same bytes.

use std::net::Ipv4Addr;

use lb_common::Traffic;
use lb_tests::{
    frames::{checksums_ok, Frame, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    netns::Netns,
    require_root,
    testrun::{
        self, TestRunNet, B1, B1_MAC, B2, B2_MAC, CLIENT, CLIENT_MAC, VIP, X0_MAC, X1_MAC,
        XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
    unique,
};
use lb_userspace::{
    config::{BackendConfig, DownPolicy, Protocol, Scheduler, ServiceConfig, Steering},
    dataplane::{Dataplane, ServiceSpec},
    reconcile::desired_service,
};

/// The balancer's namespace for these tests: x0 faces the client (10.0.1.1),
/// x1 the backends (10.0.2.1), with static neighbours so MACs are known.
struct Env {
    x: Netns,
    _net: TestRunNet,
}

impl Env {
    fn new() -> Env {
        require_root();
        let net = TestRunNet::new(&format!("tr{}{}", std::process::id() % 100_000, unique()));
        Env {
            x: Netns::attach(&net.x.name),
            _net: net,
        }
    }

    /// Runs `f` with a loaded data path carrying the standard services, on a
    /// thread inside the namespace (so ifindexes and route lookups resolve
    /// there): once with the XDP program, then with the TC program on a
    /// fresh data path.
    fn with_dataplane(&self, f: impl Fn(&mut Harness) + Send + Sync + 'static) {
        self.x.run(move || {
            for hook in [Hook::Xdp, Hook::Tc] {
                let mut dp = Dataplane::load().expect("loading the programs (verifier)");
                let specs: Vec<ServiceSpec> =
                    services().iter().map(|s| desired_service(s, 0)).collect();
                dp.apply(&specs).expect("writing the maps");
                let mut h = Harness {
                    dp,
                    hook,
                    x0: lb_userspace::config::if_index("x0").unwrap(),
                    x1: lb_userspace::config::if_index("x1").unwrap(),
                };
                println!("through the {hook:?} program");
                f(&mut h)
            }
        })
    }
}

fn backend(name: &str, address: Ipv4Addr, port: u16) -> BackendConfig {
    BackendConfig {
        name: name.into(),
        address,
        port,
        weight: 1,
        health: None,
    }
}

/// web: VIP:80/tcp -> backends :8080 (port rewritten); dns: VIP:53/udp -> :5353.
fn services() -> Vec<ServiceConfig> {
    vec![
        ServiceConfig {
            name: "web".into(),
            vip: VIP,
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::RoundRobin,
            on_backend_down: DownPolicy::KeepFlows,
            steering: Steering::None,
            health: None,
            firewall: Default::default(),
            backends: vec![backend("b1", B1, 8080), backend("b2", B2, 8080)],
            udp_idle_timeout: std::time::Duration::from_secs(60),
        },
        ServiceConfig {
            name: "dns".into(),
            vip: VIP,
            port: 53,
            protocol: Protocol::Udp,
            scheduler: Scheduler::RoundRobin,
            on_backend_down: DownPolicy::KeepFlows,
            steering: Steering::None,
            health: None,
            firewall: Default::default(),
            backends: vec![backend("b1", B1, 5353), backend("b2", B2, 5353)],
            udp_idle_timeout: std::time::Duration::from_secs(60),
        },
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

struct Harness {
    dp: Dataplane,
    hook: Hook,
    x0: u32,
    x1: u32,
}

impl Harness {
    /// Runs one frame as if received on `ifindex`; returns the action (the
    /// TC program's read as XDP's: a redirect is XDP_REDIRECT, which is what
    /// the XDP program returns for everything these tests send on) and the
    /// frame as the program left it.
    fn try_run(&mut self, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>), String> {
        match self.hook {
            Hook::Xdp => {
                testrun::run(self.dp.program_mut(), frame, ifindex, 1).map(|(a, out, _)| (a, out))
            }
            Hook::Tc => {
                testrun::run_tc(self.dp.tc_program_mut(), frame, ifindex, 1).map(|(a, out, _)| {
                    let a = match a {
                        testrun::TC_ACT_OK => XDP_PASS,
                        testrun::TC_ACT_SHOT => XDP_DROP,
                        testrun::TC_ACT_REDIRECT => XDP_REDIRECT,
                        other => 1000 + other,
                    };
                    (a, out)
                })
            }
        }
    }

    /// Frames shorter than this the kernel refuses to run the program on:
    /// an Ethernet header for XDP; for TC, a network header too (found by
    /// trying, see xdp_fuzz.rs).
    fn shortest_run(&self) -> usize {
        match self.hook {
            Hook::Xdp => 14,
            Hook::Tc => 34,
        }
    }

    fn run(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.try_run(frame, ifindex)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN failed: {e}"))
    }

    fn send_from_client(&mut self, f: &Frame) -> (u32, Vec<u8>) {
        let x0 = self.x0;
        self.run(&f.build(), x0)
    }

    fn send_from_backend(&mut self, f: &Frame) -> (u32, Vec<u8>) {
        let x1 = self.x1;
        self.run(&f.build(), x1)
    }

    fn counter(&self, name: &str) -> u64 {
        self.dp.counters().unwrap()[name]
    }

    fn backend_traffic(&self, service: &str, backend: &str) -> Traffic {
        self.dp.backend_traffic(service, backend).unwrap()
    }
}

/// A client frame as the balancer should emit it towards backend `to`.
fn expect_to_backend(f: &Frame, to: Ipv4Addr, to_mac: [u8; 6], port: u16) -> Vec<u8> {
    let mut e = f.clone();
    e.dst = to;
    e.ttl -= 1;
    e.src_mac = X1_MAC;
    e.dst_mac = to_mac;
    match &mut e.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
        L4::Other { .. } => unreachable!(),
    }
    e.build()
}

fn client_frame(sport: u16, flags: u8) -> Frame {
    let mut f = Frame::tcp((CLIENT, sport), (VIP, 80), flags);
    f.src_mac = CLIENT_MAC;
    f.dst_mac = X0_MAC;
    f
}

#[test]
fn root_syn_to_vip_is_rewritten_exactly_and_round_robined() {
    let env = Env::new();
    env.with_dataplane(|h| {
        for (i, (sport, to, mac)) in [
            (40000, B1, B1_MAC),
            (40001, B2, B2_MAC),
            (40002, B1, B1_MAC),
        ]
        .into_iter()
        .enumerate()
        {
            let syn = client_frame(sport, TCP_SYN);
            let (action, out) = h.send_from_client(&syn);
            assert_eq!(
                action, XDP_REDIRECT,
                "SYN #{i} must be redirected to the backend side"
            );
            assert_eq!(
                out,
                expect_to_backend(&syn, to, mac, 8080),
                "SYN #{i} bytes"
            );
            checksums_ok(&out).unwrap_or_else(|e| panic!("SYN #{i}: {e}"));
        }
        // Every later packet of a flow stays on the flow's backend, even with
        // payload and other flags.
        for (sport, to, mac) in [(40001, B2, B2_MAC), (40000, B1, B1_MAC)] {
            let mut data = client_frame(sport, TCP_ACK | TCP_PSH);
            data.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            let (action, out) = h.send_from_client(&data);
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(out, expect_to_backend(&data, to, mac, 8080));
            checksums_ok(&out).unwrap();
        }
        // A retransmitted SYN does not take a new turn.
        let (_, out) = h.send_from_client(&client_frame(40001, TCP_SYN));
        assert_eq!(
            out,
            expect_to_backend(&client_frame(40001, TCP_SYN), B2, B2_MAC, 8080)
        );

        assert_eq!(h.counter("new_flows"), 3);
        assert_eq!(h.counter("forwarded"), 6);
        let b1 = h.backend_traffic("web", "b1");
        let b2 = h.backend_traffic("web", "b2");
        assert_eq!((b1.new_flows, b1.packets), (2, 3));
        assert_eq!((b2.new_flows, b2.packets), (1, 3));
        let syn_len = client_frame(1, TCP_SYN).build().len() as u64;
        let data_len = {
            let mut d = client_frame(1, TCP_ACK | TCP_PSH);
            d.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            d.build().len() as u64
        };
        assert_eq!(b1.bytes, 2 * syn_len + data_len);
        assert_eq!(b2.bytes, 2 * syn_len + data_len);
    });
}

#[test]
fn root_backend_reply_is_rewritten_back_to_the_vip() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let (_, _) = h.send_from_client(&client_frame(41000, TCP_SYN));
        let mut synack = Frame::tcp((B1, 8080), (CLIENT, 41000), TCP_SYN | TCP_ACK);
        synack.src_mac = B1_MAC;
        synack.dst_mac = X1_MAC;
        let (action, out) = h.send_from_backend(&synack);
        assert_eq!(action, XDP_REDIRECT);
        let mut want = synack.clone();
        want.src = VIP;
        want.ttl -= 1;
        want.src_mac = X0_MAC;
        want.dst_mac = CLIENT_MAC;
        if let L4::Tcp { sport, .. } = &mut want.l4 {
            *sport = 80;
        }
        assert_eq!(out, want.build(), "the client must only ever see the VIP");
        checksums_ok(&out).unwrap();
        assert_eq!(h.counter("replies"), 1);
        assert_eq!(h.backend_traffic("web", "b1").reply_packets, 1);

        // A reply this instance did not track (its flow came through another
        // balancer of an active-active group) is left alone by default: it
        // could as well be traffic that reached the backend without the VIP.
        let mut other = Frame::tcp((B2, 8080), (CLIENT, 41001), TCP_ACK);
        other.dst_mac = X1_MAC;
        let (action, out) = h.send_from_backend(&other);
        assert_eq!((action, out), (XDP_PASS, other.build()));
        // With stateless replies on, it is rewritten: B2:8080 serves one VIP
        // only, so its address says which.
        h.dp.set_stateless_replies(true);
        let specs: Vec<ServiceSpec> = services().iter().map(|s| desired_service(s, 0)).collect();
        h.dp.apply(&specs).unwrap();
        let (action, out) = h.send_from_backend(&other);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(&out[14 + 12..14 + 16], &VIP.octets());
        assert_eq!(&out[14 + 20..14 + 22], &80u16.to_be_bytes());
        checksums_ok(&out).unwrap();

        // From a port no service uses: not a reply of ours, passed untouched.
        let stray = Frame::tcp((B2, 9999), (CLIENT, 41000), TCP_ACK);
        let (action, out) = h.send_from_backend(&stray);
        assert_eq!((action, out), (XDP_PASS, stray.build()));

        // To the balancer's own address (the answer to its health check): the
        // kernel's, even from a backend's service port.
        let check_reply = Frame::tcp(
            (B1, 8080),
            (Ipv4Addr::new(10, 0, 2, 1), 50000),
            TCP_SYN | TCP_ACK,
        );
        let (action, out) = h.send_from_backend(&check_reply);
        assert_eq!((action, out), (XDP_PASS, check_reply.build()));
    });
}

#[test]
fn root_udp_flows_round_robin_and_keep_their_backend_with_and_without_checksum() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let dgram = |sport: u16, zero: bool| {
            let mut f = Frame::udp((CLIENT, sport), (VIP, 53));
            f.src_mac = CLIENT_MAC;
            f.dst_mac = X0_MAC;
            if let L4::Udp { zero_checksum, .. } = &mut f.l4 {
                *zero_checksum = zero;
            }
            f
        };
        for (sport, zero, to, mac) in [
            (5000, false, B1, B1_MAC),
            (5001, true, B2, B2_MAC),
            (5000, false, B1, B1_MAC),
            (5001, true, B2, B2_MAC),
            (5002, true, B1, B1_MAC),
        ] {
            let f = dgram(sport, zero);
            let (action, out) = h.send_from_client(&f);
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(out, expect_to_backend(&f, to, mac, 5353), "sport {sport}");
            checksums_ok(&out).unwrap();
            if zero {
                assert_eq!(
                    &out[14 + 20 + 6..14 + 20 + 8],
                    &[0, 0],
                    "a zero UDP checksum stays zero"
                );
            } else {
                assert_ne!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
            }
        }
        assert_eq!(h.counter("new_flows"), 3);
        // The UDP reply is un-NATed too.
        let mut reply = Frame::udp((B2, 5353), (CLIENT, 5001));
        reply.dst_mac = X1_MAC;
        let (action, out) = h.send_from_backend(&reply);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(&out[14 + 12..14 + 16], &VIP.octets());
        assert_eq!(&out[14 + 20..14 + 22], &53u16.to_be_bytes());
        checksums_ok(&out).unwrap();
    });
}

#[test]
fn root_mid_flow_tcp_without_a_flow_is_dropped_and_counted() {
    let env = Env::new();
    env.with_dataplane(|h| {
        for flags in [TCP_ACK, TCP_ACK | TCP_PSH, TCP_RST, TCP_SYN | TCP_ACK] {
            let (action, _) = h.send_from_client(&client_frame(42000, flags));
            assert_eq!(action, XDP_DROP, "flags {flags:#x}");
        }
        assert_eq!(h.counter("drop_tcp_no_flow"), 4);
        assert_eq!(
            h.counter("new_flows"),
            0,
            "no flow may be created by a non-SYN"
        );
    });
}

#[test]
fn root_traffic_that_is_not_for_a_service_passes_unchanged() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
        let mut to_lb = Frame::tcp((CLIENT, 5555), (Ipv4Addr::new(10, 0, 1, 1), 22), TCP_SYN);
        to_lb.dst_mac = X0_MAC;
        cases.push((
            "TCP to the balancer's own address",
            to_lb.build(),
            "pass_no_service",
        ));
        let mut other_port = Frame::tcp((CLIENT, 40000), (VIP, 81), TCP_SYN);
        other_port.dst_mac = X0_MAC;
        cases.push((
            "TCP to the VIP on a port with no service",
            other_port.build(),
            "pass_no_service",
        ));
        let udp_other = Frame::udp((CLIENT, 5000), (VIP, 54));
        cases.push((
            "UDP to the VIP on a port with no service",
            udp_other.build(),
            "pass_no_service",
        ));
        let mut icmp = Frame::tcp((CLIENT, 0), (VIP, 0), 0);
        icmp.l4 = L4::Other { proto: 1 };
        icmp.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        cases.push(("ICMP echo to the VIP", icmp.build(), "pass_other_proto"));
        let mut frag = client_frame(40000, TCP_SYN);
        frag.frag = 0x2000; // MF: first fragment
        cases.push(("first fragment to the VIP", frag.build(), "pass_fragment"));
        let mut later = client_frame(40000, TCP_SYN);
        later.frag = 0x0010; // offset 128 bytes
        cases.push(("later fragment to the VIP", later.build(), "pass_fragment"));
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[0; 20]);
        cases.push(("ARP", arp, "pass_not_ipv4"));
        let mut v6 = client_frame(40000, TCP_SYN).build();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        cases.push(("IPv6", v6, "pass_not_ipv4"));
        let mut vlan = client_frame(40000, TCP_SYN).build();
        vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        cases.push(("VLAN-tagged IPv4 to the VIP", vlan, "pass_not_ipv4"));

        for (what, frame, counter) in cases {
            let before = h.counter(counter);
            let (action, out) = h.run(&frame, h.x0);
            assert_eq!(action, XDP_PASS, "{what}");
            assert_eq!(out, frame, "{what}: must pass unchanged");
            assert_eq!(
                h.counter(counter),
                before + 1,
                "{what}: counted as {counter}"
            );
        }
        assert_eq!(h.counter("forwarded"), 0);
        assert_eq!(h.counter("new_flows"), 0);
    });
}

#[test]
fn root_ip_options_are_carried_and_ttl_expiry_is_left_to_the_kernel() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let mut syn = client_frame(43000, TCP_SYN);
        syn.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let (action, out) = h.send_from_client(&syn);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, expect_to_backend(&syn, B1, B1_MAC, 8080));
        checksums_ok(&out).unwrap();

        let mut dying = client_frame(43001, TCP_SYN);
        dying.ttl = 1;
        let (action, _) = h.send_from_client(&dying);
        assert_eq!(
            action, XDP_PASS,
            "TTL 1 must go to the kernel for ICMP time exceeded"
        );
        assert_eq!(h.counter("pass_ttl_expired"), 1);
    });
}

#[test]
fn root_malformed_and_truncated_frames_are_never_forwarded() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let tcp = {
            let mut f = client_frame(44000, TCP_SYN);
            f.payload.clear();
            f.build()
        };
        let udp = {
            let mut f = Frame::udp((CLIENT, 5000), (VIP, 53));
            f.dst_mac = X0_MAC;
            f.payload.clear();
            f.build()
        };
        let mut refused_by_kernel = 0;
        for full in [&tcp, &udp] {
            let header_len = if full == &tcp {
                14 + 20 + 20
            } else {
                14 + 20 + 8
            };
            for len in 0..=header_len {
                let frame = &full[..len.min(full.len())];
                match h.try_run(frame, h.x0) {
                    // The kernel refuses to run the program on frames this short.
                    Err(_) if len < h.shortest_run() => refused_by_kernel += 1,
                    Err(e) => panic!("length {len}: test run failed: {e}"),
                    Ok((action, _)) => {
                        if len == header_len {
                            assert_eq!(action, XDP_REDIRECT, "the whole frame is forwarded");
                        } else {
                            assert!(
                                action == XDP_PASS || action == XDP_DROP,
                                "length {len}: action {action} for a truncated frame"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(
            refused_by_kernel,
            2 * h.shortest_run(),
            "only lengths below {} may be refused, for both frames",
            h.shortest_run()
        );
        assert_eq!(
            h.counter("new_flows"),
            2,
            "only the two complete frames make flows"
        );

        // Invalid IPv4 headers are dropped and counted.
        let bad_ihl = {
            let mut f = tcp.clone();
            f[14] = 0x44;
            f
        };
        let bad_version = {
            let mut f = tcp.clone();
            f[14] = 0x65;
            f
        };
        let long_total = {
            let mut f = tcp.clone();
            f[16..18].copy_from_slice(&2000u16.to_be_bytes());
            f
        };
        let bad_doff = {
            let mut f = client_frame(44001, TCP_SYN).build();
            f[14 + 20 + 12] = 4 << 4;
            f
        };
        let before = h.counter("drop_malformed");
        for (what, f) in [
            ("IHL 4", bad_ihl),
            ("version 6 in an IPv4 frame", bad_version),
            ("total length past the frame", long_total),
            ("TCP data offset 4", bad_doff),
        ] {
            let (action, _) = h.run(&f, h.x0);
            assert_eq!(action, XDP_DROP, "{what}");
        }
        assert_eq!(h.counter("drop_malformed"), before + 4);
    });
}

#[test]
fn root_established_flows_follow_their_backends_state() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let web = |b1: Option<(&str, bool)>| -> Vec<ServiceSpec> {
            let mut s = desired_service(&services()[0], 0);
            s.backends.retain(|b| b.name != "b1");
            if let Some((name, drop_flows)) = b1 {
                let mut b = desired_service(&services()[0], 0).backends[0].clone();
                b.name = name.into();
                b.drop_flows = drop_flows;
                b.ring_weight = 0;
                s.backends.insert(0, b);
            }
            vec![s]
        };
        let (_, _) = h.send_from_client(&client_frame(45000, TCP_SYN));
        let ack = client_frame(45000, TCP_ACK);
        assert_eq!(h.send_from_client(&ack).0, XDP_REDIRECT);

        // b1 out of the ring (drained): its established flow continues.
        h.dp.apply(&web(Some(("b1", false)))).unwrap();
        let (action, out) = h.send_from_client(&ack);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, expect_to_backend(&ack, B1, B1_MAC, 8080));
        assert_eq!(
            expect_to_backend(&client_frame(45001, TCP_SYN), B2, B2_MAC, 8080),
            h.send_from_client(&client_frame(45001, TCP_SYN)).1,
            "new flows avoid it"
        );

        // Down under the drop-flows policy: its flows are dropped, and counted.
        h.dp.apply(&web(Some(("b1", true)))).unwrap();
        assert_eq!(h.send_from_client(&ack).0, XDP_DROP);
        assert_eq!(h.counter("drop_backend_down"), 1);

        // Removed, and its slot given to a new backend at the same address:
        // the old flow must not follow the slot.
        h.dp.apply(&web(None)).unwrap();
        assert_eq!(h.send_from_client(&ack).0, XDP_DROP);
        h.dp.apply(&web(Some(("b1-new", false)))).unwrap();
        assert_eq!(h.send_from_client(&ack).0, XDP_DROP);
        assert_eq!(h.counter("drop_backend_gone"), 2);
    });
}

#[test]
fn root_a_syn_after_the_client_closed_is_a_new_connection() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let (_, out) = h.send_from_client(&client_frame(46000, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B1.octets());
        // A retransmitted SYN of a live flow keeps its backend...
        let (_, out) = h.send_from_client(&client_frame(46000, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B1.octets());
        assert_eq!(h.counter("new_flows"), 1);
        // ...but after the client's FIN, a SYN on the same ports is a new
        // connection and takes the next turn.
        let fin = client_frame(46000, TCP_FIN | TCP_ACK);
        assert_eq!(
            h.send_from_client(&fin).1,
            expect_to_backend(&fin, B1, B1_MAC, 8080)
        );
        let (_, out) = h.send_from_client(&client_frame(46000, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B2.octets());
        assert_eq!(h.counter("new_flows"), 2);
    });
}

#[test]
fn root_a_syn_on_ports_whose_connection_was_refused_or_whose_backend_left_is_a_new_connection() {
    let env = Env::new();
    env.with_dataplane(|h| {
        // The backend refuses the connection (RST): the client may reuse its
        // port, and that SYN must not be pinned to the refusal.
        let (_, out) = h.send_from_client(&client_frame(47000, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B1.octets());
        let mut rst = Frame::tcp((B1, 8080), (CLIENT, 47000), TCP_RST | TCP_ACK);
        rst.src_mac = B1_MAC;
        rst.dst_mac = X1_MAC;
        assert_eq!(
            h.send_from_backend(&rst).0,
            XDP_REDIRECT,
            "the reset reaches the client"
        );
        let (_, out) = h.send_from_client(&client_frame(47000, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B2.octets(), "scheduled afresh");

        // A SYN whose flow is on a backend that takes no new flows any more
        // (down, drained) is a new connection too; other packets of the flow
        // stay where they are.
        let (_, out) = h.send_from_client(&client_frame(47001, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B1.octets());
        let mut web = desired_service(&services()[0], 0);
        web.backends[0].ring_weight = 0;
        h.dp.apply(&[web]).unwrap();
        let ack = client_frame(47001, TCP_ACK);
        assert_eq!(
            h.send_from_client(&ack).1,
            expect_to_backend(&ack, B1, B1_MAC, 8080)
        );
        let (_, out) = h.send_from_client(&client_frame(47001, TCP_SYN));
        assert_eq!(&out[14 + 16..14 + 20], &B2.octets());
        assert_eq!(h.counter("new_flows"), 4);
    });
}

#[test]
fn root_maglev_places_new_and_unknown_mid_flow_packets_where_the_table_says() {
    let env = Env::new();
    env.with_dataplane(|h| {
        const SEED: u32 = 7;
        let mut web = desired_service(&services()[0], SEED);
        web.maglev = Some((lb_common::maglev::DEFAULT_TABLE_SIZE, SEED));
        h.dp.apply(&[web]).unwrap();
        // The same table, built independently (the model's own Maglev, not
        // lb-common's that the daemon uses).
        let table = lb_tests::model::maglev::table(
            &["b1", "b2"],
            &[1, 1],
            SEED,
            lb_common::maglev::DEFAULT_TABLE_SIZE,
        )
        .expect("a table");
        let expect = |sport: u16| {
            let hsh = lb_tests::model::maglev::flow_hash(
                CLIENT.octets(),
                VIP.octets(),
                sport.to_be_bytes(),
                80u16.to_be_bytes(),
                6,
                SEED,
            );
            match table[(hsh % lb_common::maglev::DEFAULT_TABLE_SIZE) as usize] {
                0 => (B1, B1_MAC),
                _ => (B2, B2_MAC),
            }
        };
        let mut seen = [0; 2];
        for sport in 50000..50100u16 {
            let (to, mac) = expect(sport);
            seen[(to == B2) as usize] += 1;
            let syn = client_frame(sport, TCP_SYN);
            let (action, out) = h.send_from_client(&syn);
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(out, expect_to_backend(&syn, to, mac, 8080), "sport {sport}");
        }
        assert!(
            seen[0] > 25 && seen[1] > 25,
            "both backends take flows: {seen:?}"
        );
        // A mid-flow segment of a flow this table never saw (a restarted
        // daemon's, another balancer's) goes where Maglev says, and is tracked.
        for sport in 51000..51020u16 {
            let (to, mac) = expect(sport);
            let ack = client_frame(sport, TCP_ACK | TCP_PSH);
            let (action, out) = h.send_from_client(&ack);
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(out, expect_to_backend(&ack, to, mac, 8080));
        }
        assert_eq!(h.counter("flows_recovered"), 20);
        assert_eq!(h.counter("drop_tcp_no_flow"), 0);
    });
}

#[test]
fn root_refused_and_reset_connections_get_a_tcp_reset_from_the_vip() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let spec = |weights: u32, reset_flows: bool| {
            let mut s = desired_service(&services()[0], 0);
            s.reset_if_empty = true;
            for b in &mut s.backends {
                b.ring_weight = weights;
                b.reset_flows = reset_flows;
            }
            vec![s]
        };
        // No backend can take the connection: refused at once, not dropped.
        h.dp.apply(&spec(0, false)).unwrap();
        let mut syn = client_frame(47000, TCP_SYN);
        syn.payload.clear();
        let (action, out) = h.send_from_client(&syn);
        assert_eq!(
            action, XDP_REDIRECT,
            "the reset goes back out where the SYN came in"
        );
        assert_eq!(out.len(), 14 + 40, "bare headers");
        assert_eq!(&out[0..6], &CLIENT_MAC);
        assert_eq!(&out[6..12], &X0_MAC);
        assert_eq!(&out[14 + 12..14 + 16], &VIP.octets(), "from the VIP");
        assert_eq!(&out[14 + 16..14 + 20], &CLIENT.octets());
        let tcp = &out[34..54];
        assert_eq!(&tcp[0..2], &80u16.to_be_bytes());
        assert_eq!(&tcp[2..4], &47000u16.to_be_bytes());
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        assert_eq!(&tcp[8..12], &1001u32.to_be_bytes(), "acknowledges the SYN");
        checksums_ok(&out).unwrap();
        assert_eq!(h.counter("reset_no_backend"), 1);

        // An established flow on a backend whose flows are to be reset.
        h.dp.apply(&spec(1, false)).unwrap();
        let (action, _) = h.send_from_client(&client_frame(47001, TCP_SYN));
        assert_eq!(action, XDP_REDIRECT);
        let (action, _) = h.send_from_client(&client_frame(47001, TCP_ACK));
        assert_eq!(action, XDP_REDIRECT);
        h.dp.apply(&spec(1, true)).unwrap();
        // The backend's side first: the client's segment goes on to it as a
        // reset (its sequence number the one the backend expects next), so
        // that the backend does not keep its side of the connection open.
        let data = client_frame(47001, TCP_ACK | TCP_PSH);
        let (action, out) = h.send_from_client(&data);
        let (to, mac) = if out[30..34] == B1.octets() {
            (B1, B1_MAC)
        } else {
            (B2, B2_MAC)
        };
        let mut as_reset = data.clone();
        if let L4::Tcp { flags, .. } = &mut as_reset.l4 {
            *flags = TCP_RST | TCP_ACK;
        }
        assert_eq!(
            (action, out.clone()),
            (XDP_REDIRECT, expect_to_backend(&as_reset, to, mac, 8080)),
            "the segment made a reset, to the flow's backend"
        );
        checksums_ok(&out).unwrap();
        assert_eq!(h.counter("reset_flow"), 1);
        assert_eq!(h.counter("forwarded"), 2, "the handshake only");
        // Then the client's: its next segment is answered with a reset.
        let (action, out) = h.send_from_client(&data);
        assert_eq!(action, XDP_REDIRECT);
        let tcp = &out[34..54];
        assert_eq!(tcp[13], TCP_RST);
        assert_eq!(
            &tcp[4..8],
            &2000u32.to_be_bytes(),
            "at the segment's ack number"
        );
        checksums_ok(&out).unwrap();
        assert_eq!(h.counter("reset_flow"), 2);
        // A reset from the client is never answered.
        let (action, _) = h.send_from_client(&client_frame(47001, TCP_RST));
        assert_eq!(action, XDP_DROP);
    });
}

/// The soak's read timeouts: a pooled connection through one VIP is reset
/// by the balancer (its backend demoted, `on_demotion = "reset"`), and the
/// backend does not learn it (before the backend's side was reset too; now
/// should that reset be lost) and keeps its side open. Later the client reuses
/// the port for a connection through another VIP that the same backend
/// serves; the backend answers that SYN from its old connection (a
/// challenge ACK). That answer must reach the client from the new flow's
/// VIP, so that the client's reset (through the new flow) clears the
/// backend's stale side and the retried SYN succeeds. Sent from the old
/// VIP, no client socket takes it and every retried SYN meets the same
/// answer until the connection times out.
#[test]
fn root_a_reset_flows_reply_entry_does_not_capture_a_new_flow_through_another_vip() {
    let env = Env::new();
    env.with_dataplane(|h| {
        const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
        let mut write = services()[0].clone();
        write.backends.truncate(1);
        let mut read = write.clone();
        read.name = "read".into();
        read.vip = VIP2;
        let specs = |reset: bool| {
            let mut w = desired_service(&write, 7);
            w.backends[0].reset_flows = reset;
            vec![w, desired_service(&read, 7)]
        };
        h.dp.apply(&specs(false)).unwrap();
        assert_eq!(
            h.send_from_client(&client_frame(46000, TCP_SYN)).0,
            XDP_REDIRECT
        );
        assert_eq!(
            h.send_from_client(&client_frame(46000, TCP_ACK)).0,
            XDP_REDIRECT
        );
        // Demoted: the client's next segment goes on as a reset (lost here,
        // say), the one after is answered with a reset.
        h.dp.apply(&specs(true)).unwrap();
        let data = client_frame(46000, TCP_ACK | TCP_PSH);
        let (action, out) = h.send_from_client(&data);
        assert_eq!((action, &out[30..34]), (XDP_REDIRECT, &B1.octets()[..]));
        assert_eq!(out[34 + 13], TCP_RST | TCP_ACK);
        let (action, out) = h.send_from_client(&data);
        assert_eq!((action, &out[30..34]), (XDP_REDIRECT, &CLIENT.octets()[..]));
        assert_eq!(out[34 + 13], TCP_RST);
        assert_eq!(h.counter("reset_flow"), 2);
        // The same client port, through the other VIP, to the same backend.
        let mut syn = client_frame(46000, TCP_SYN);
        syn.dst = VIP2;
        let (action, out) = h.send_from_client(&syn);
        assert_eq!((action, &out[30..34]), (XDP_REDIRECT, &B1.octets()[..]));
        // b1 answers from its stale connection: a bare ACK.
        let mut challenge = Frame::tcp((B1, 8080), (CLIENT, 46000), TCP_ACK);
        challenge.dst_mac = X1_MAC;
        let (action, out) = h.send_from_backend(&challenge);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(
            &out[26..30],
            &VIP2.octets()[..],
            "the answer comes from the new flow's VIP, not the reset flow's"
        );
        checksums_ok(&out).unwrap();
        // The client's reset reaches b1 through the new flow.
        let mut rst = client_frame(46000, TCP_RST);
        rst.dst = VIP2;
        let (action, out) = h.send_from_client(&rst);
        assert_eq!((action, &out[30..34]), (XDP_REDIRECT, &B1.octets()[..]));
    });
}

#[test]
fn root_a_closed_flows_reply_entry_does_not_capture_a_new_direct_connection() {
    let env = Env::new();
    env.with_dataplane(|h| {
        // A flow through the VIP on client port 48000, to b1, then closed by the client.
        let (_, _) = h.send_from_client(&client_frame(48000, TCP_SYN));
        let (_, _) = h.send_from_client(&client_frame(48000, TCP_FIN | TCP_ACK));
        // The client reuses port 48000 to reach b1 directly (through this host
        // as a router): b1's SYN-ACK must not be rewritten to come from the VIP.
        let mut synack = Frame::tcp((B1, 8080), (CLIENT, 48000), TCP_SYN | TCP_ACK);
        synack.dst_mac = X1_MAC;
        let (action, out) = h.send_from_backend(&synack);
        assert_eq!(
            (action, out),
            (XDP_PASS, synack.build()),
            "not a reply of ours"
        );
        // And the stale entry is gone: the rest of that connection passes too.
        let mut data = Frame::tcp((B1, 8080), (CLIENT, 48000), TCP_ACK);
        data.dst_mac = X1_MAC;
        let (action, out) = h.send_from_backend(&data);
        assert_eq!((action, out), (XDP_PASS, data.build()));
        // A live flow's SYN-ACK is still rewritten.
        let (_, _) = h.send_from_client(&client_frame(48001, TCP_SYN));
        let mut live = Frame::tcp((B2, 8080), (CLIENT, 48001), TCP_SYN | TCP_ACK);
        live.dst_mac = X1_MAC;
        assert_eq!(h.send_from_backend(&live).0, XDP_REDIRECT);
    });
}

/// The number of entries in one of the data path's flow tables.
fn len<V: aya::Pod>(t: &aya::maps::HashMap<aya::maps::MapData, lb_common::FlowKey, V>) -> usize {
    t.keys().count()
}

/// A new flow takes its table entries only once nothing can refuse the
/// packet any more: a SYN with TTL 1 (left to the kernel to answer "time
/// exceeded") creates no entry in either table and counts no new flow; the
/// same SYN with a live TTL then creates exactly one of each.
#[test]
fn root_a_syn_the_balancer_does_not_forward_leaves_no_flow_behind() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let mut dying = client_frame(47000, TCP_SYN);
        dying.ttl = 1;
        let frame = dying.build();
        let (action, out) = h.run(&frame, h.x0);
        assert_eq!(action, XDP_PASS, "TTL 1: the kernel answers");
        assert_eq!(out, frame, "passed unchanged");
        assert_eq!(h.counter("pass_ttl_expired"), 1);
        assert_eq!(h.counter("new_flows"), 0);
        assert_eq!(len(&h.dp.maps().transient), 0, "no half-open entry");

        // A SYN that goes through: half-open, by both sides, and nothing in
        // the established tables yet.
        let (action, _) = h.send_from_client(&client_frame(47000, TCP_SYN));
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(h.counter("new_flows"), 1);
        assert_eq!(len(&h.dp.maps().transient), 2);
        assert_eq!(len(&h.dp.maps().conntrack), 0);
        assert_eq!(len(&h.dp.maps().reverse), 0);
    });
}

/// The backend's id as the data path knows it.
fn backend_id(dp: &Dataplane, addr: Ipv4Addr) -> u32 {
    dp.hop_targets()
        .into_iter()
        .find(|(_, a)| *a == addr)
        .map(|(id, _)| id)
        .expect("a backend with that address")
}

/// The reverse entry of the reply `reply` (backend to client).
fn reverse_entry(dp: &Dataplane, reply: &Frame) -> lb_common::ReverseFlow {
    let m = &dp.maps().reverse;
    let (sport, dport) = match reply.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
        L4::Other { .. } => unreachable!(),
    };
    let key = lb_common::FlowKey::new(
        reply.src.octets(),
        reply.dst.octets(),
        sport.to_be_bytes(),
        dport.to_be_bytes(),
        lb_common::IPPROTO_TCP,
    );
    m.get(&key, 0).expect("the flow's reverse entry")
}

#[test]
fn root_next_hops_are_taken_from_the_cache_while_current_and_from_the_fib_otherwise() {
    let env = Env::new();
    env.with_dataplane(|h| {
        const ELSEWHERE: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];
        let lookups = |h: &Harness| h.counter("next_hop_lookups");
        let b1 = backend_id(&h.dp, B1);
        let syn = client_frame(42000, TCP_SYN);
        // Missing (no generation written yet): the FIB's answer, counted.
        let (action, out) = h.send_from_client(&syn);
        assert_eq!(
            (action, out),
            (XDP_REDIRECT, expect_to_backend(&syn, B1, B1_MAC, 8080))
        );
        assert_eq!(lookups(h), 1);

        // Current: the cached hop is what the frame leaves by, no lookup. A
        // MAC the FIB does not know proves the cache was read.
        h.dp.invalidate_hops().unwrap();
        let hop = lb_userspace::nexthop::Hop {
            ifindex: h.x1,
            smac: X1_MAC,
            dmac: ELSEWHERE,
            mtu: 1500,
        };
        h.dp.set_hops(&[(b1, Some(hop))]).unwrap();
        let ack = client_frame(42000, TCP_ACK);
        let (action, out) = h.send_from_client(&ack);
        assert_eq!(
            (action, out),
            (XDP_REDIRECT, expect_to_backend(&ack, B1, ELSEWHERE, 8080))
        );
        assert_eq!(lookups(h), 1, "a current hop costs no lookup");

        // Too big for the cached MTU: the FIB decides (it forwards: 1500).
        let tot_len = ack.build().len() as u32 - 14;
        h.dp.set_hops(&[(
            b1,
            Some(lb_userspace::nexthop::Hop {
                mtu: tot_len - 1,
                ..hop
            }),
        )])
        .unwrap();
        let (_, out) = h.send_from_client(&ack);
        assert_eq!(out, expect_to_backend(&ack, B1, B1_MAC, 8080));
        assert_eq!(lookups(h), 2);

        // Stale (the kernel reported a change): the FIB again, at once.
        h.dp.set_hops(&[(b1, Some(hop))]).unwrap();
        h.dp.invalidate_hops().unwrap();
        let (_, out) = h.send_from_client(&ack);
        assert_eq!(out, expect_to_backend(&ack, B1, B1_MAC, 8080));
        assert_eq!(lookups(h), 3);

        // Not resolvable (None): the FIB.
        h.dp.set_hops(&[(b1, None)]).unwrap();
        let (_, out) = h.send_from_client(&ack);
        assert_eq!(out, expect_to_backend(&ack, B1, B1_MAC, 8080));
        assert_eq!(lookups(h), 4);

        // A reply: its first one asks the FIB and caches the client side's
        // hop in the flow's reverse entry under the current generation; the
        // next is sent by the cache; a change makes it ask again.
        let mut reply = Frame::tcp((B1, 8080), (CLIENT, 42000), TCP_ACK);
        reply.src_mac = B1_MAC;
        reply.dst_mac = X1_MAC;
        let want_reply = |r: &Frame| {
            let mut w = r.clone();
            w.src = VIP;
            w.ttl -= 1;
            w.src_mac = X0_MAC;
            w.dst_mac = CLIENT_MAC;
            if let L4::Tcp { sport, .. } = &mut w.l4 {
                *sport = 80;
            }
            w.build()
        };
        let (action, out) = h.send_from_backend(&reply);
        assert_eq!((action, out), (XDP_REDIRECT, want_reply(&reply)));
        assert_eq!(lookups(h), 5);
        let generation = h.dp.invalidate_hops().unwrap();
        let (_, out) = h.send_from_backend(&reply);
        assert_eq!(out, want_reply(&reply));
        assert_eq!(lookups(h), 6, "cached under the old generation: stale");
        let cached = reverse_entry(&h.dp, &reply).hop;
        assert_eq!(
            (cached.generation, cached.ifindex, cached.smac, cached.dmac),
            (generation, h.x0, X0_MAC, CLIENT_MAC),
            "the client side's hop, cached"
        );
        println!("the cached reply hop's MTU: {}", cached.mtu);
        assert!(cached.mtu >= 1500 || cached.mtu == reply.build().len() as u32 - 14);
        let (_, out) = h.send_from_backend(&reply);
        assert_eq!(out, want_reply(&reply));
        assert_eq!(lookups(h), 6, "a current cached reply hop costs no lookup");
        assert_eq!(h.counter("forwarded"), 5);
        assert_eq!(h.counter("replies"), 3);
    });
}

/// The entries of a flow table, with their values.
fn entries<V: aya::Pod>(
    t: &aya::maps::HashMap<aya::maps::MapData, lb_common::FlowKey, V>,
) -> Vec<(lb_common::FlowKey, V)> {
    t.iter().map(|r| r.unwrap()).collect()
}

/// The data path's count of established flows of one backend.
fn active(h: &Harness, backend: &str) -> u64 {
    let service = if backend.starts_with("udp") {
        "dns"
    } else {
        "web"
    };
    let b = backend.trim_start_matches("udp-");
    h.dp.active_flows().unwrap()[&(service.to_owned(), b.to_owned())]
}

/// (half-open, closed) entries of the transient table.
fn transient_states(h: &Harness) -> (usize, usize) {
    let t = entries(&h.dp.maps().transient);
    let half = t
        .iter()
        .filter(|(_, v)| v.state == lb_common::TRANSIENT_HALF_OPEN)
        .count();
    (half, t.len() - half)
}

#[test]
fn root_flow_stages_move_between_the_tables_exactly() {
    let env = Env::new();
    env.with_dataplane(|h| {
        h.dp.set_linger(std::time::Duration::from_secs(3600))
            .unwrap();
        let tables = |h: &Harness| {
            (
                len(&h.dp.maps().conntrack),
                len(&h.dp.maps().reverse),
                transient_states(h),
            )
        };
        let from_b1 = |flags: u8| {
            let mut f = Frame::tcp((B1, 8080), (CLIENT, 49000), flags);
            f.src_mac = B1_MAC;
            f.dst_mac = X1_MAC;
            f
        };
        // SYN: half-open, by both sides; nothing established.
        assert_eq!(
            h.send_from_client(&client_frame(49000, TCP_SYN)).0,
            XDP_REDIRECT
        );
        assert_eq!(tables(h), (0, 0, (2, 0)));
        let half: Vec<_> = entries(&h.dp.maps().transient);
        assert_eq!(
            half.iter().map(|(_, v)| v.reply).sum::<u8>(),
            1,
            "one entry by the client side, one by the reply side"
        );
        assert_eq!((h.counter("new_flows"), active(h, "b1")), (1, 0));
        // The SYN-ACK finds its VIP side in the half-open entry.
        let (a, out) = h.send_from_backend(&from_b1(TCP_SYN | TCP_ACK));
        assert_eq!(a, XDP_REDIRECT);
        assert_eq!(&out[26..30], &VIP.octets());
        // The client's ACK completes the handshake: established.
        assert_eq!(
            h.send_from_client(&client_frame(49000, TCP_ACK)).0,
            XDP_REDIRECT
        );
        assert_eq!(tables(h), (1, 1, (0, 0)));
        assert_eq!((h.counter("flows_established"), active(h, "b1")), (1, 1));
        // The client's FIN: closing, still established.
        let fin = client_frame(49000, TCP_FIN | TCP_ACK);
        assert_eq!(h.send_from_client(&fin).0, XDP_REDIRECT);
        let (_, f) = entries(&h.dp.maps().conntrack)[0];
        assert_eq!(
            f.flags,
            lb_common::FLOW_F_CLOSING | lb_common::FLOW_F_FIN_CLIENT
        );
        assert_eq!(tables(h), (1, 1, (0, 0)));
        // The backend's FIN: both sides done, the flow leaves the
        // connection table and lingers.
        assert_eq!(
            h.send_from_backend(&from_b1(TCP_FIN | TCP_ACK)).0,
            XDP_REDIRECT
        );
        assert_eq!(tables(h), (0, 0, (0, 2)));
        assert_eq!((h.counter("flows_closed"), active(h, "b1")), (1, 0));
        // Lingering: the last ACK and a retransmitted FIN still go through.
        let (a, out) = h.send_from_client(&client_frame(49000, TCP_ACK));
        assert_eq!((a, &out[30..34]), (XDP_REDIRECT, &B1.octets()[..]));
        assert_eq!(
            h.send_from_backend(&from_b1(TCP_FIN | TCP_ACK)).0,
            XDP_REDIRECT
        );
        // After the linger the flow is gone: a late segment is no flow's.
        h.dp.set_linger(std::time::Duration::ZERO).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(
            h.send_from_client(&client_frame(49000, TCP_ACK)).0,
            XDP_DROP
        );
        assert_eq!(h.counter("drop_tcp_no_flow"), 1);
        h.dp.set_linger(std::time::Duration::from_secs(3600))
            .unwrap();

        // An RST ends an established flow at once (port 49001, on b2).
        h.send_from_client(&client_frame(49001, TCP_SYN));
        h.send_from_client(&client_frame(49001, TCP_ACK));
        assert_eq!(active(h, "b2"), 1);
        assert_eq!(
            h.send_from_client(&client_frame(49001, TCP_RST)).0,
            XDP_REDIRECT
        );
        assert_eq!(len(&h.dp.maps().conntrack), 0);
        assert_eq!((h.counter("flows_closed"), active(h, "b2")), (2, 0));

        // A backend refusing the handshake (RST) closes the half-open flow;
        // the client's next SYN on those ports is a new connection.
        h.send_from_client(&client_frame(49002, TCP_SYN));
        let mut refuse = Frame::tcp((B1, 8080), (CLIENT, 49002), TCP_RST | TCP_ACK);
        refuse.dst_mac = X1_MAC;
        assert_eq!(h.send_from_backend(&refuse).0, XDP_REDIRECT);
        let new_before = h.counter("new_flows");
        h.send_from_client(&client_frame(49002, TCP_SYN));
        assert_eq!(h.counter("new_flows"), new_before + 1);

        // UDP: established at once, and over after its idle timeout (here
        // one tick): the next packet is scheduled afresh, the old entry's
        // count goes.
        let mut spec: Vec<ServiceSpec> = services().iter().map(|s| desired_service(s, 0)).collect();
        spec[1].udp_idle = Some(std::time::Duration::from_millis(1));
        h.dp.apply(&spec).unwrap();
        let mut dns = Frame::udp((CLIENT, 6000), (VIP, 53));
        dns.src_mac = CLIENT_MAC;
        dns.dst_mac = X0_MAC;
        let (_, out) = h.send_from_client(&dns);
        let first = out[30..34].to_vec();
        let conntrack = |h: &Harness| len(&h.dp.maps().conntrack);
        assert_eq!(conntrack(h), 1);
        let (_, out) = h.send_from_client(&dns);
        assert_eq!(
            out[30..34],
            first[..],
            "within the timeout: the same backend"
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (_, out) = h.send_from_client(&dns);
        assert_ne!(
            out[30..34],
            first[..],
            "idle past its timeout: a new flow, the next turn"
        );
        assert_eq!(conntrack(h), 1);
        assert_eq!(active(h, "udp-b1") + active(h, "udp-b2"), 1);
        // Idle past its timeout and never seen again: the daemon's sweep
        // reclaims its entries, and its count.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let sweep = h.dp.udp_sweep().unwrap().expect("a UDP service: a sweep");
        let reclaimed = sweep.run();
        assert_eq!(reclaimed.values().sum::<u64>(), 1);
        h.dp.reclaimed(&reclaimed).unwrap();
        assert_eq!((conntrack(h), len(&h.dp.maps().reverse)), (0, 0));
        assert_eq!(active(h, "udp-b1") + active(h, "udp-b2"), 0);
    });
}

/// The hash maps the daemon replaces values in while packets read them are
/// not preallocated: a replaced element must outlive the packets that hold
/// it (an RCU grace period), not be handed to the next update at once.
#[test]
fn root_maps_updated_under_readers_free_replaced_elements_after_a_grace_period() {
    require_root();
    let named = || -> Vec<aya::maps::MapInfo> {
        aya::maps::loaded_maps()
            .filter_map(|m| m.ok())
            .filter(|m| {
                matches!(
                    m.name_as_str(),
                    Some(lb_common::maps::SERVICES | lb_common::maps::BACKEND_VIPS)
                )
            })
            .collect()
    };
    // Other programs' maps of these names (a daemon's, a test's) are not ours.
    let before: Vec<u32> = named().iter().map(|m| m.id()).collect();
    let dp = Dataplane::load().expect("loading the programs");
    let ours: Vec<aya::maps::MapInfo> = named()
        .into_iter()
        .filter(|m| !before.contains(&m.id()))
        .collect();
    // (Tests running beside this one load the same object: theirs count too.)
    assert!(ours.len() >= 2, "both maps of the loaded program");
    for m in ours {
        assert_eq!(
            m.map_flags() & 1,
            1,
            "{:?} has BPF_F_NO_PREALLOC",
            m.name_as_str()
        );
    }
    drop(dp);
}

/// Runs the rest of the calling thread on `cpu` only.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
    // act on the calling thread (pid 0) with a set of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One TCP connection whose packets the kernel handles on alternating CPUs
/// (as RSS and the scheduler may): every stage and every per-CPU count
/// (outcomes, traffic, established flows per backend, which go +1 on one
/// CPU and -1 on another) adds up as on one CPU.
#[test]
fn root_a_connection_spread_over_both_cpus_is_counted_once() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs two CPUs (CI has 2); this machine has {cpus}"
    );
    let env = Env::new();
    env.with_dataplane(|h| {
        let from_b1 = |flags: u8| {
            let mut f = Frame::tcp((B1, 8080), (CLIENT, 49500), flags);
            f.src_mac = B1_MAC;
            f.dst_mac = X1_MAC;
            f
        };
        // (what, from the client, TCP flags, the CPU it runs on)
        let steps: [(&str, bool, u8, usize); 8] = [
            ("SYN", true, TCP_SYN, 1),
            ("SYN-ACK", false, TCP_SYN | TCP_ACK, 0),
            ("ACK", true, TCP_ACK, 0),
            ("data", true, TCP_ACK, 1),
            ("reply", false, TCP_ACK, 0),
            ("client FIN", true, TCP_FIN | TCP_ACK, 0),
            ("backend FIN", false, TCP_FIN | TCP_ACK, 1),
            ("last ACK", true, TCP_ACK, 0),
        ];
        let mut from_client = 0;
        let mut from_backend = 0;
        for (what, client, flags, cpu) in steps {
            pin_to_cpu(cpu);
            let (action, out) = if client {
                from_client += 1;
                h.send_from_client(&client_frame(49500, flags))
            } else {
                from_backend += 1;
                h.send_from_backend(&from_b1(flags))
            };
            assert_eq!(action, XDP_REDIRECT, "{what} on CPU {cpu}");
            if client {
                assert_eq!(&out[30..34], &B1.octets(), "{what} reaches b1");
            } else {
                assert_eq!(&out[26..30], &VIP.octets(), "{what} comes from the VIP");
            }
            if what == "ACK" {
                assert_eq!(active(h, "b1"), 1, "established, counted on CPU 0");
            }
        }
        // Opened on CPU 0, closed on CPU 1: +1 and -1, summing to none.
        let per_cpu = h.dp.maps().active.get(&backend_id(&h.dp, B1), 0).unwrap();
        assert_eq!(
            (per_cpu[0], per_cpu[1]),
            (1, -1),
            "the packets ran on both CPUs"
        );
        assert_eq!(active(h, "b1"), 0);
        assert_eq!(
            (
                h.counter("new_flows"),
                h.counter("flows_established"),
                h.counter("flows_closed")
            ),
            (1, 1, 1)
        );
        let t = h.dp.backend_traffic("web", "b1").unwrap();
        assert_eq!(
            (t.packets, t.reply_packets, t.new_flows),
            (from_client, from_backend, 1)
        );
        assert_eq!(
            (h.counter("forwarded"), h.counter("replies")),
            (from_client, from_backend)
        );
        assert_eq!(
            (len(&h.dp.maps().conntrack), len(&h.dp.maps().reverse)),
            (0, 0)
        );
    });
}

/// A Maglev service gains a backend while connections are established: each
/// keeps its backend (the connection table, not the new lookup table, holds
/// it), new connections are placed by the new table, some on the new backend.
#[test]
fn root_established_flows_keep_their_backend_when_a_maglev_service_changes() {
    let env = Env::new();
    env.with_dataplane(|h| {
        let mut web = services()[0].clone();
        web.scheduler = Scheduler::Maglev { table_size: 1009 };
        h.dp.apply(&[desired_service(&web, 7)]).unwrap();
        let backend_of = |out: &[u8]| -> ([u8; 4], u16) {
            (
                out[30..34].try_into().unwrap(),
                u16::from_be_bytes([out[36], out[37]]),
            )
        };
        let ports: Vec<u16> = (50_000..50_060).collect();
        let mut before = Vec::new();
        for &p in &ports {
            let (a, out) = h.send_from_client(&client_frame(p, TCP_SYN));
            assert_eq!(a, XDP_REDIRECT);
            before.push(backend_of(&out));
            assert_eq!(
                h.send_from_client(&client_frame(p, TCP_ACK)).0,
                XDP_REDIRECT
            );
        }
        // b3: B1's address, another port (a second server on that host).
        web.backends.push(backend("b3", B1, 8081));
        h.dp.apply(&[desired_service(&web, 7)]).unwrap();
        for (i, &p) in ports.iter().enumerate() {
            let (a, out) = h.send_from_client(&client_frame(p, TCP_ACK));
            assert_eq!(a, XDP_REDIRECT, "port {p}");
            assert_eq!(backend_of(&out), before[i], "flow {p} kept its backend");
        }
        // New connections follow the new table: b3 takes about a third.
        let on_b3 = (51_000..51_060u16)
            .filter(|&p| {
                let (a, out) = h.send_from_client(&client_frame(p, TCP_SYN));
                assert_eq!(a, XDP_REDIRECT);
                backend_of(&out) == (B1.octets(), 8081)
            })
            .count();
        assert!(
            (8..=32).contains(&on_b3),
            "{on_b3} of 60 new connections on the new backend"
        );
    });
}

/// More established connections than the connection table holds: the LRU
/// evicts the least recently used. An evicted connection's next segment is
/// dropped and counted (`drop_tcp_no_flow`), never sent to another backend;
/// every connection still in the table reaches its own backend.
#[test]
fn root_a_full_connection_table_evicts_flows_that_are_then_dropped_never_misforwarded() {
    let env = Env::new();
    env.x.run(|| {
        for hook in [Hook::Xdp, Hook::Tc] {
            const TABLE: u32 = 256;
            let mut dp = Dataplane::load_with_conntrack(TABLE).expect("loading the programs");
            let specs: Vec<ServiceSpec> =
                services().iter().map(|s| desired_service(s, 0)).collect();
            dp.apply(&specs).unwrap();
            let mut h = Harness {
                dp,
                hook,
                x0: lb_userspace::config::if_index("x0").unwrap(),
                x1: lb_userspace::config::if_index("x1").unwrap(),
            };
            let ports: Vec<u16> = (40_000..40_600).collect();
            let mut given = Vec::new();
            for &p in &ports {
                let (a, out) = h.send_from_client(&client_frame(p, TCP_SYN));
                assert_eq!(a, XDP_REDIRECT);
                given.push(out[30..34].to_vec());
                assert_eq!(h.send_from_client(&client_frame(p, TCP_ACK)).0, XDP_REDIRECT);
            }
            assert!(
                len(&h.dp.maps().conntrack) <= TABLE as usize,
                "{hook:?}: the table holds at most its size"
            );
            let (mut kept, mut dropped) = (0u64, 0u64);
            for (i, &p) in ports.iter().enumerate() {
                let (a, out) = h.send_from_client(&client_frame(p, TCP_ACK));
                match a {
                    XDP_REDIRECT => {
                        assert_eq!(out[30..34], given[i][..], "{hook:?}: flow {p} moved");
                        kept += 1;
                    }
                    XDP_DROP => dropped += 1,
                    other => panic!("{hook:?}: flow {p}: action {other}"),
                }
            }
            println!("{hook:?}: 600 connections in a {TABLE}-entry table: {kept} kept, {dropped} evicted and dropped");
            assert!(kept > 0 && kept <= TABLE as u64, "{hook:?}: {kept} kept");
            assert_eq!(h.counter("drop_tcp_no_flow"), dropped, "{hook:?}");
            // The most recent connections are the ones kept.
            let (a, _) = h.send_from_client(&client_frame(40_599, TCP_ACK));
            assert_eq!(a, XDP_REDIRECT, "{hook:?}: the newest connection is kept");
        }
    });
}

/// A removed backend's slot given to another service's backend in the same
/// apply; then the removed backend's late RST arrives. Its flow must not take
/// the new occupant's address or generation: the client's next packet is
/// still dropped as its backend's, never sent to the other service's
/// backend, and the reply is not counted as that backend's traffic. (Found
/// by the independent fuzz model.)
#[test]
fn root_a_removed_backends_late_rst_does_not_lend_its_flow_the_slots_next_backend() {
    let env = Env::new();
    env.with_dataplane(|h| {
        const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
        let mut web = services()[0].clone();
        let mut hashed = services()[0].clone();
        hashed.name = "hashed".into();
        hashed.vip = VIP2;
        hashed.scheduler = Scheduler::Maglev { table_size: 13 };
        hashed.backends = vec![backend("h1", B1, 9090)];
        h.dp.apply(&[desired_service(&web, 7), desired_service(&hashed, 7)])
            .unwrap();
        // A flow on b2 (round robin: the first SYN goes to b1).
        assert_eq!(
            h.send_from_client(&client_frame(40000, TCP_SYN)).0,
            XDP_REDIRECT
        );
        let (a, out) = h.send_from_client(&client_frame(40001, TCP_SYN));
        assert_eq!((a, &out[30..34]), (XDP_REDIRECT, &B2.octets()[..]));
        assert_eq!(
            h.send_from_client(&client_frame(40001, TCP_ACK)).0,
            XDP_REDIRECT
        );
        let b2_slot = backend_id(&h.dp, B2);
        // b2 leaves web; hashed's new h2 takes its slot.
        web.backends.truncate(1);
        hashed.backends.push(backend("h2", B2, 9091));
        h.dp.apply(&[desired_service(&web, 7), desired_service(&hashed, 7)])
            .unwrap();
        assert_eq!(
            h.dp.backend_id("hashed", "h2"),
            Some(b2_slot),
            "the case under test: the slot is given again"
        );
        assert_eq!(
            h.send_from_client(&client_frame(40001, TCP_ACK)).0,
            XDP_DROP
        );
        let gone = h.counter("drop_backend_gone");
        // b2's late RST: passed on to the client (its flow's reply)...
        let mut rst = Frame::tcp((B2, 8080), (CLIENT, 40001), TCP_RST | TCP_ACK);
        rst.src_mac = B2_MAC;
        rst.dst_mac = X1_MAC;
        assert_eq!(h.send_from_backend(&rst).0, XDP_REDIRECT);
        // ...but not h2's traffic,
        let t = h.dp.backend_traffic("hashed", "h2").unwrap();
        assert_eq!((t.packets, t.reply_packets), (0, 0), "h2 carried nothing");
        // and the client's next packet still goes nowhere.
        let (a, out) = h.send_from_client(&client_frame(40001, TCP_ACK));
        assert_eq!(a, XDP_DROP, "sent to {:?}", &out[30..38]);
        assert_eq!(h.counter("drop_backend_gone"), gone + 1);
    });
}
