//! Kernel tests (root) of the firewall: the real program through
//! BPF_PROG_TEST_RUN. The rate limits (which depend on the clock, so the
//! differential fuzz test leaves them off), and ICMP errors whose rewritten
//! checksums are verified by full recomputation, not by the incremental
//! arithmetic under test.

use std::net::Ipv4Addr;

use lb_common::{checksum, counter};
use lb_tests::{
    frames::{Frame, L4, TCP_ACK, TCP_SYN},
    model::Model,
    netns::Netns,
    require_root,
    testrun::{self, TestRunNet, B1, B2, CLIENT, VIP, XDP_DROP, XDP_REDIRECT},
    unique,
};
use lb_userspace::{
    config::{ClosedPorts, FirewallConfig, Protocol, SourceRules},
    dataplane::{BackendSpec, Dataplane, ServiceSpec},
};

fn service(name: &str, port: u16, protocol: Protocol, backend_port: u16) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: VIP,
        port,
        protocol,
        udp_idle: None,
        maglev: None,
        reset_if_empty: false,
        rules: SourceRules::default(),
        backends: [("b1", B1), ("b2", B2)]
            .into_iter()
            .map(|(n, a)| BackendSpec {
                name: n.into(),
                address: a,
                port: backend_port,
                ring_weight: 1,
                drop_flows: false,
                reset_flows: false,
            })
            .collect(),
    }
}

fn no_limits() -> FirewallConfig {
    FirewallConfig {
        deny: vec![],
        closed_ports: ClosedPorts::Drop,
        icmp_echo_reply: true,
        source_new_flows_per_sec: 0,
        source_new_flows_burst: 0,
        new_flows_per_sec: 0,
        new_flows_burst: 0,
    }
}

struct Harness {
    dp: Dataplane,
    /// Run through the TC program instead of the XDP one.
    tc: bool,
    x0: u32,
    x1: u32,
}

impl Harness {
    /// Runs one frame; the TC program's action is read as XDP's (a redirect
    /// as XDP_REDIRECT, which is what the XDP program returns for the
    /// answers and errors these tests send on).
    fn run(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        if !self.tc {
            let (a, out, _) = testrun::run(self.dp.program_mut(), frame, ingress, 1).unwrap();
            return (a, out);
        }
        let (a, out, _) = testrun::run_tc(self.dp.tc_program_mut(), frame, ingress, 1).unwrap();
        (testrun::xdp_action_of(a), out)
    }

    fn counters(&self) -> Vec<u64> {
        Model::kernel_counts(&self.dp)
    }
}

/// Runs `f` on a thread in a fresh testrun namespace, pinned to CPU 0 (the
/// global cap is enforced per CPU), with web (VIP:80/tcp -> :8080) and dns
/// (VIP:53/udp -> :5353) loaded under `firewall`: through the XDP program,
/// then through the TC program on a fresh data path.
fn with_dataplane(firewall: FirewallConfig, f: impl Fn(&mut Harness) + Send + Sync + 'static) {
    require_root();
    let net = TestRunNet::new(&format!("fw{}{}", std::process::id() % 100_000, unique()));
    let x = Netns::attach(&net.x.name);
    x.run(move || {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        for tc in [false, true] {
            let mut dp = Dataplane::load().expect("loading the programs (verifier)");
            dp.set_firewall(&firewall).unwrap();
            dp.apply(&[
                service("web", 80, Protocol::Tcp, 8080),
                service("dns", 53, Protocol::Udp, 5353),
            ])
            .unwrap();
            let mut h = Harness {
                x0: lb_userspace::config::if_index("x0").unwrap(),
                x1: lb_userspace::config::if_index("x1").unwrap(),
                tc,
                dp,
            };
            println!("through the {} program", if tc { "TC" } else { "XDP" });
            f(&mut h)
        }
    })
}

fn syn_from(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    Frame::tcp((src, sport), (VIP, 80), TCP_SYN).build()
}

#[test]
fn root_a_source_over_its_new_flow_rate_is_dropped_and_others_are_not() {
    let fw = FirewallConfig {
        source_new_flows_per_sec: 1,
        source_new_flows_burst: 5,
        ..no_limits()
    };
    with_dataplane(fw, |h| {
        let x0 = h.x0;
        let before = h.counters();
        let actions: Vec<u32> = (0..20)
            .map(|i| h.run(&syn_from(CLIENT, 40_000 + i), x0).0)
            .collect();
        assert_eq!(
            actions,
            [vec![XDP_REDIRECT; 5], vec![XDP_DROP; 15]].concat(),
            "a burst of 5 new flows, then none (1 a second)"
        );
        // Established flows of the limited source go on.
        let (a, _) = h.run(
            &Frame::tcp((CLIENT, 40_000), (VIP, 80), TCP_ACK).build(),
            x0,
        );
        assert_eq!(a, XDP_REDIRECT, "an established flow is not a new flow");
        // Another source has its own budget.
        let other = Ipv4Addr::new(10, 0, 1, 3);
        let (a, _) = h.run(&syn_from(other, 1), x0);
        assert_eq!(a, XDP_REDIRECT, "another source is not limited");
        let after = h.counters();
        let c = counter::DROP_SOURCE_RATE as usize;
        assert_eq!(after[c] - before[c], 15);
        assert_eq!(
            after[counter::NEW_FLOWS as usize] - before[counter::NEW_FLOWS as usize],
            6,
            "refused SYNs create no state"
        );
    });
}

#[test]
fn root_the_global_new_flow_cap_holds_across_sources() {
    // 2 a second shared by the CPUs, bursts of 6: each CPU's share is a
    // burst of 6 / CPUs (at least one flow).
    let fw = FirewallConfig {
        new_flows_per_sec: 2,
        new_flows_burst: 6,
        ..no_limits()
    };
    with_dataplane(fw, |h| {
        let cpus = aya::util::nr_cpus().unwrap() as u64;
        let share = (6 / cpus).max(1) as usize;
        let x0 = h.x0;
        let actions: Vec<u32> = (0..20u8)
            .map(|i| {
                h.run(&syn_from(Ipv4Addr::new(10, 0, 1, 100 + i), 1000), x0)
                    .0
            })
            .collect();
        let admitted = actions.iter().take_while(|&&a| a != XDP_DROP).count();
        assert_eq!(admitted, share, "{actions:?}");
        assert!(
            actions[share..].iter().all(|&a| a == XDP_DROP),
            "{actions:?}"
        );
        let c = h.counters()[counter::DROP_GLOBAL_RATE as usize];
        assert_eq!(c, (20 - share) as u64);
    });
}

/// The full Internet checksum of `data` verifies (sums to 0xffff).
fn verifies(data: &[u8]) -> bool {
    checksum::verifies(data, 0)
}

/// Checks, by full recomputation, every checksum of an IPv4 ICMP error frame:
/// the outer IPv4 header, the ICMP message, the quoted IPv4 header and the
/// quoted TCP/UDP segment (the quote must hold it whole).
fn icmp_error_checksums_ok(f: &[u8]) {
    let ip = &f[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert!(verifies(&ip[..ihl]), "outer IPv4 checksum");
    let icmp = &ip[ihl..tot];
    assert!(verifies(icmp), "ICMP checksum");
    let q = &icmp[8..];
    let qihl = ((q[0] & 0x0f) as usize) * 4;
    assert!(verifies(&q[..qihl]), "quoted IPv4 checksum");
    let qtot = u16::from_be_bytes([q[2], q[3]]) as usize;
    let seg = &q[qihl..qtot];
    let src: [u8; 4] = q[12..16].try_into().unwrap();
    let dst: [u8; 4] = q[16..20].try_into().unwrap();
    let proto = q[9];
    let pseudo = checksum::sum(&src, 0);
    let pseudo = checksum::sum(&dst, pseudo);
    let pseudo = pseudo + proto as u32 + seg.len() as u32;
    assert!(
        checksum::verifies(seg, pseudo),
        "quoted L4 checksum ({proto})"
    );
}

/// An ICMP error of `kind`/`code` from `src` to `dst` quoting the whole of
/// `quoted` (a frame), checksum computed.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    m.extend_from_slice(&quoted[14..]);
    let c = checksum::full(&m);
    m[2..4].copy_from_slice(&c);
    let mut f = Frame::udp((src, 0), (dst, 0));
    f.l4 = L4::Other { proto: 1 };
    f.payload = m;
    f.build()
}

#[test]
fn root_icmp_errors_about_tracked_flows_reach_the_right_end_with_every_checksum_right() {
    with_dataplane(no_limits(), |h| {
        let (x0, x1) = (h.x0, h.x1);
        // A TCP flow client -> VIP:80, scheduled on b1 (round robin, first).
        let (a, fwd) = h.run(
            &Frame::tcp((CLIENT, 40_000), (VIP, 80), TCP_SYN).build(),
            x0,
        );
        assert_eq!(a, XDP_REDIRECT);
        assert_eq!(&fwd[30..34], &B1.octets());
        // The client's ACK completes the handshake: the flow is established
        // (ICMP errors are matched to established flows).
        let (a, _) = h.run(
            &Frame::tcp((CLIENT, 40_000), (VIP, 80), TCP_ACK).build(),
            x0,
        );
        assert_eq!(a, XDP_REDIRECT);

        // "Fragmentation needed" from a router on the client's side about our
        // reply VIP:80 -> client: it must reach b1, quoting b1:8080.
        let reply = Frame::tcp((VIP, 80), (CLIENT, 40_000), TCP_ACK | 0x08);
        let router = Ipv4Addr::new(10, 0, 1, 254);
        let err = icmp_error(router, VIP, 3, 4, &reply.build());
        let (a, out) = h.run(&err, x0);
        assert_eq!(a, XDP_REDIRECT, "sent on to the backend side");
        assert_eq!(&out[26..30], &router.octets(), "the sender stays");
        assert_eq!(&out[30..34], &B1.octets(), "addressed to the backend");
        assert_eq!(out[22], 63, "TTL decremented");
        let q = 14 + 20 + 8;
        assert_eq!(
            &out[q + 12..q + 16],
            &B1.octets(),
            "the quote is b1's own packet"
        );
        assert_eq!(&out[q + 20..q + 22], &8080u16.to_be_bytes());
        assert_eq!(&out[q + 16..q + 20], &CLIENT.octets());
        assert_eq!(out.len(), err.len());
        icmp_error_checksums_ok(&out);

        // A UDP flow client -> VIP:53, and a "port unreachable" from its
        // backend about it: the client must see it come from the VIP, about VIP:53.
        let (a, fwd) = h.run(&Frame::udp((CLIENT, 5000), (VIP, 53)).build(), x0);
        assert_eq!(a, XDP_REDIRECT);
        let backend = Ipv4Addr::new(fwd[30], fwd[31], fwd[32], fwd[33]);
        let sent = Frame::udp((CLIENT, 5000), (backend, 5353));
        let err = icmp_error(backend, CLIENT, 3, 3, &sent.build());
        let (a, out) = h.run(&err, x1);
        assert_eq!(a, XDP_REDIRECT, "sent on to the client side");
        assert_eq!(&out[26..30], &VIP.octets(), "from the VIP, not the backend");
        assert_eq!(&out[30..34], &CLIENT.octets());
        assert_eq!(&out[q + 16..q + 20], &VIP.octets(), "about the VIP");
        assert_eq!(&out[q + 22..q + 24], &53u16.to_be_bytes());
        icmp_error_checksums_ok(&out);

        // An error about a flow nobody tracks, to a VIP: dropped and counted.
        let stray = Frame::tcp((VIP, 80), (CLIENT, 40_001), TCP_ACK);
        let before = h.counters()[counter::DROP_ICMP as usize];
        let (a, _) = h.run(&icmp_error(router, VIP, 3, 4, &stray.build()), x0);
        assert_eq!(a, XDP_DROP);
        assert_eq!(h.counters()[counter::DROP_ICMP as usize], before + 1);
    });
}

#[test]
fn root_echo_requests_to_a_vip_are_answered_by_the_data_path() {
    with_dataplane(no_limits(), |h| {
        let x0 = h.x0;
        let mut f = Frame::udp((CLIENT, 0), (VIP, 0));
        f.l4 = L4::Other { proto: 1 };
        let mut m = vec![8, 0, 0, 0, 0xbe, 0xef, 0, 7];
        m.extend_from_slice(b"ping payload");
        let c = checksum::full(&m);
        m[2..4].copy_from_slice(&c);
        f.payload = m;
        let req = f.build();
        let (a, out) = h.run(&req, x0);
        assert_eq!(a, XDP_REDIRECT, "back out of the interface it came in on");
        assert_eq!(&out[0..6], &req[6..12], "to the sender's MAC");
        assert_eq!(&out[6..12], &req[0..6]);
        assert_eq!(&out[26..30], &VIP.octets());
        assert_eq!(&out[30..34], &CLIENT.octets());
        assert_eq!(out[22], 64);
        assert_eq!(out[34], 0, "an echo reply");
        assert_eq!(
            &out[38..],
            &req[38..],
            "identifier, sequence and data echoed"
        );
        assert!(verifies(&out[14..34]), "IPv4 checksum");
        assert!(verifies(&out[34..]), "ICMP checksum");
        assert_eq!(a, XDP_REDIRECT, "sent back out (by redirect, not XDP_TX)");
    });
}
