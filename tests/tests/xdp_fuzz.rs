//! Differential fuzzing (root): random and mutated frames through the real XDP
//! program (BPF_PROG_TEST_RUN) and through the reference model
//! (`lb_tests::model`); the action, every output byte and, at the end, every
//! outcome counter must agree. Any difference fails and prints the frame.
//!
//! `LB_FUZZ_FRAMES` sets how many frames (default 1,000,000), `LB_FUZZ_SEED`
//! replays a run (the seed is printed at the start). A longer run by hand:
//! `LB_FUZZ_FRAMES=20000000 cargo test -p lb-tests --test xdp_fuzz -- --nocapture`.

use std::net::Ipv4Addr;

use lb_tests::{
    frames::{Frame, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    model::Model,
    netns::Netns,
    require_root,
    testrun::{self, TestRunNet, B1, B2, CLIENT, VIP, X0_MAC, X1_MAC},
    unique,
};
use lb_userspace::{
    config::{Cidr, ClosedPorts, FirewallConfig, Protocol, SourceRules},
    dataplane::{BackendSpec, Dataplane, ServiceSpec},
};

const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
/// A backend whose neighbour is unknown: its packets go to the kernel.
const B3: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 13);
/// A router on the client side that sends ICMP errors.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 254);

/// SplitMix64: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn backend(name: &str, address: Ipv4Addr, port: u16) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        address,
        port,
        ring_weight: 1,
        drop_flows: false,
        reset_flows: false,
    }
}

fn cidr(text: &str) -> Cidr {
    Cidr::parse(text).unwrap()
}

/// The services of the first half of the run; `changed` gives the second
/// half's: a backend removed (its flows' generation no longer matches), one
/// added, one draining its flows, the firewall's other settings.
fn services(changed: bool) -> Vec<ServiceSpec> {
    let mut web = vec![backend("b1", B1, 8080), backend("b2", B2, 8080)];
    let mut b3 = backend("b3", B3, 8080);
    b3.reset_flows = true;
    web.push(b3);
    if changed {
        web.remove(1);
        web.push(backend("b4", B2, 8081));
        // Drained: its flows go on, SYNs on their ports are new connections.
        web[0].ring_weight = 0;
    }
    let mut dns_b2 = backend("b2", B2, 5353);
    dns_b2.drop_flows = changed;
    let mut db = backend("db1", B1, 3306);
    db.ring_weight = 0;
    vec![
        ServiceSpec {
            name: "web".into(),
            vip: VIP,
            port: 80,
            protocol: Protocol::Tcp,
            udp_idle: None,
            maglev: None,
            reset_if_empty: false,
            rules: SourceRules {
                allow: vec![],
                deny: vec![cidr("10.0.1.8/32")],
            },
            backends: web,
        },
        ServiceSpec {
            name: "dns".into(),
            vip: VIP,
            port: 53,
            protocol: Protocol::Udp,
            // The model has no clock: flows never idle out here.
            udp_idle: None,
            maglev: None,
            reset_if_empty: false,
            rules: SourceRules::default(),
            backends: vec![backend("b1", B1, 5353), dns_b2],
        },
        ServiceSpec {
            name: "hashed".into(),
            vip: VIP2,
            port: 80,
            protocol: Protocol::Tcp,
            udp_idle: None,
            maglev: Some((1021, 7)),
            reset_if_empty: false,
            rules: SourceRules {
                allow: vec![cidr("10.0.1.0/29"), cidr("10.0.2.0/24")],
                deny: vec![cidr("10.0.1.4/32")],
            },
            backends: vec![backend("b1", B1, 9090), backend("b2", B2, 9090)],
        },
        ServiceSpec {
            name: "db".into(),
            vip: VIP,
            port: 3306,
            protocol: Protocol::Tcp,
            udp_idle: None,
            maglev: None,
            reset_if_empty: true,
            rules: SourceRules::default(),
            backends: vec![db],
        },
    ]
}

fn firewall(changed: bool) -> FirewallConfig {
    FirewallConfig {
        deny: vec![cidr("10.0.1.9/32"), cidr("192.168.0.0/16")],
        closed_ports: if changed {
            ClosedPorts::Pass
        } else {
            ClosedPorts::Drop
        },
        icmp_echo_reply: !changed,
        source_new_flows_per_sec: 0,
        source_new_flows_burst: 0,
        new_flows_per_sec: 0,
        new_flows_burst: 0,
    }
}

/// Makes frames: most start from a packet the data path has a rule for (a
/// new or established flow, a reply, ICMP about a flow, closed ports, denied
/// sources, other protocols, not IPv4), drawn from small pools of addresses
/// and ports so flows recur; some are then mutated (truncated, bad IHL,
/// options, fragments, VLAN tags, odd flags, zero and bad checksums, random
/// bytes); a few are random bytes from the start.
struct Gen {
    rng: Rng,
}

const CLIENTS: [Ipv4Addr; 9] = [
    CLIENT,
    CLIENT,
    CLIENT,
    Ipv4Addr::new(10, 0, 1, 3),
    Ipv4Addr::new(10, 0, 1, 4),
    Ipv4Addr::new(10, 0, 1, 5),
    Ipv4Addr::new(10, 0, 1, 8),
    Ipv4Addr::new(10, 0, 1, 9),
    Ipv4Addr::new(192, 168, 7, 7),
];
const BACKENDS: [Ipv4Addr; 3] = [B1, B2, B3];
const BACKEND_PORTS: [u16; 5] = [8080, 8081, 9090, 5353, 3306];
const SERVICE_PORTS: [u16; 5] = [80, 53, 3306, 81, 22];

impl Gen {
    fn addr(&mut self) -> Ipv4Addr {
        match self.rng.below(10) {
            0 => Ipv4Addr::from(self.rng.next() as u32),
            1 => self.rng.pick(&[
                Ipv4Addr::new(10, 0, 1, 1),
                Ipv4Addr::new(10, 0, 2, 1),
                Ipv4Addr::new(10, 0, 1, 255),
                Ipv4Addr::new(10, 0, 0, 102),
            ]),
            2..=4 => self.rng.pick(&BACKENDS),
            5..=7 => self.rng.pick(&CLIENTS),
            _ => self.rng.pick(&[VIP, VIP2]),
        }
    }

    fn client_port(&mut self) -> u16 {
        40000 + self.rng.below(24) as u16
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.below(8) {
            0..=2 => TCP_SYN,
            3 | 4 => TCP_ACK | TCP_PSH,
            5 => TCP_FIN | TCP_ACK,
            6 => self
                .rng
                .pick(&[TCP_RST, TCP_SYN | TCP_ACK, TCP_ACK, 0, 0xff]),
            _ => self.rng.byte(),
        }
    }

    /// Returns the frame and whether it arrives from the backends' side.
    fn template(&mut self) -> (Frame, bool) {
        let client = self.rng.pick(&CLIENTS);
        let vip = if self.rng.chance(75) { VIP } else { VIP2 };
        match self.rng.below(20) {
            // Client to a service (or a closed port) over TCP.
            0..=6 => {
                let port = self.rng.pick(&SERVICE_PORTS);
                let flags = self.tcp_flags();
                (
                    Frame::tcp((client, self.client_port()), (vip, port), flags),
                    false,
                )
            }
            // Client to a service over UDP.
            7 | 8 => {
                let port = self.rng.pick(&[53, 53, 54, 80]);
                let mut f = Frame::udp((client, self.client_port()), (vip, port));
                if self.rng.chance(20) {
                    f.l4 = L4::Udp {
                        sport: self.client_port(),
                        dport: port,
                        zero_checksum: true,
                    };
                }
                (f, false)
            }
            // A backend's reply.
            9..=12 => {
                let b = self.rng.pick(&BACKENDS);
                let port = self.rng.pick(&BACKEND_PORTS);
                let f = if self.rng.chance(75) {
                    let flags = self.rng.pick(&[
                        TCP_SYN | TCP_ACK,
                        TCP_ACK,
                        TCP_ACK | TCP_FIN,
                        TCP_RST | TCP_ACK,
                    ]);
                    Frame::tcp((b, port), (client, self.client_port()), flags)
                } else {
                    Frame::udp((b, port), (client, self.client_port()))
                };
                (f, true)
            }
            // ICMP.
            13..=15 => self.icmp(client, vip),
            // Another protocol.
            16 => (
                Frame {
                    l4: L4::Other {
                        proto: self.rng.pick(&[47, 50, 132, 2]),
                    },
                    ..Frame::udp((client, 1), (self.addr(), 2))
                },
                false,
            ),
            // Anything from anywhere to anywhere.
            _ => {
                let (src, dst) = (self.addr(), self.addr());
                let f = if self.rng.chance(60) {
                    let flags = self.tcp_flags();
                    Frame::tcp(
                        (src, self.rng.next() as u16),
                        (dst, self.rng.pick(&SERVICE_PORTS)),
                        flags,
                    )
                } else {
                    Frame::udp((src, self.rng.next() as u16), (dst, self.rng.next() as u16))
                };
                (f, self.rng.chance(50))
            }
        }
    }

    /// An echo request, or an error quoting a packet of a flow (one of ours
    /// or not): from the client side about a reply, or from the backend side
    /// about a packet we forwarded.
    fn icmp(&mut self, client: Ipv4Addr, vip: Ipv4Addr) -> (Frame, bool) {
        let cport = self.client_port();
        let (src, dst, message, from_backends) = match self.rng.below(4) {
            0 => {
                let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
                m.extend((0..self.rng.below(40)).map(|_| self.rng.byte()));
                (client, self.rng.pick(&[VIP, VIP2, B1]), m, false)
            }
            1 | 2 => {
                // About our reply vip -> client: from the client or a router.
                let quoted = if self.rng.chance(70) {
                    Frame::tcp((vip, self.rng.pick(&[80, 3306])), (client, cport), TCP_ACK)
                } else {
                    Frame::udp((vip, 53), (client, cport))
                };
                let from = if self.rng.chance(50) { client } else { ROUTER };
                (from, vip, self.error(&quoted), false)
            }
            _ => {
                // About a packet we sent client -> backend: from the backend or a router.
                let b = self.rng.pick(&BACKENDS);
                let port = self.rng.pick(&BACKEND_PORTS);
                let quoted = if self.rng.chance(70) {
                    Frame::tcp((client, cport), (b, port), TCP_SYN)
                } else {
                    Frame::udp((client, cport), (b, port))
                };
                let from = if self.rng.chance(50) {
                    b
                } else {
                    Ipv4Addr::new(10, 0, 2, 1)
                };
                (from, client, self.error(&quoted), true)
            }
        };
        let mut f = Frame::udp((src, 0), (dst, 0));
        f.l4 = L4::Other { proto: 1 };
        f.payload = message;
        (f, from_backends)
    }

    /// An ICMP error message quoting `quoted`'s IP header and some of its
    /// payload, with its checksum.
    fn error(&mut self, quoted: &Frame) -> Vec<u8> {
        let (kind, code) = self
            .rng
            .pick(&[(3, 4), (3, 3), (3, 1), (11, 0), (12, 0), (5, 0)]);
        let mut m = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
        let q = quoted.build();
        // The IP header and at least 8 bytes of TCP/UDP, sometimes less.
        let keep = match self.rng.below(4) {
            0 => 14 + 20 + self.rng.below(12) as usize,
            1 => 14 + 28,
            _ => q.len(),
        };
        m.extend_from_slice(&q[14..keep.min(q.len())]);
        let c = lb_common::checksum::full(&m);
        m[2..4].copy_from_slice(&c);
        m
    }

    fn mutate(&mut self, f: &mut Vec<u8>) {
        for _ in 0..1 + self.rng.below(3) {
            let len = f.len();
            match self.rng.below(13) {
                // The kernel takes no frame shorter than an Ethernet header
                // (nor does any NIC deliver one).
                0 => f.truncate(14 + self.rng.below(len.saturating_sub(13) as u64) as usize),
                1 if len > 14 => f[14] = (f[14] & 0xf0) | self.rng.below(16) as u8,
                2 if len > 14 => f[14] = self.rng.byte(),
                // Fragment bits: MF, an offset, or both.
                3 if len > 21 => {
                    let v = self.rng.pick(&[0x2000u16, 0x0001, 0x2010, 0x1fff, 0x8000]);
                    f[20..22].copy_from_slice(&v.to_be_bytes());
                }
                // Total length.
                4 if len > 17 => {
                    let v = self.rng.below(len as u64 + 8) as u16;
                    f[16..18].copy_from_slice(&v.to_be_bytes());
                }
                // TCP data offset and flags.
                5 if len > 47 => {
                    f[46] = self.rng.byte();
                    f[47] = self.rng.byte();
                }
                // Zero or bad checksums (IP, then TCP or UDP).
                6 if len > 25 => f[24..26].copy_from_slice(&[0, 0]),
                7 if len > 51 => {
                    let at = self.rng.pick(&[40usize, 50]);
                    let v = [self.rng.byte(), self.rng.byte()];
                    f[at..at + 2].copy_from_slice(&v);
                }
                // A VLAN tag.
                8 if len >= 14 => {
                    let tag = [0x81, 0x00, 0x00, self.rng.byte()];
                    f.splice(12..12, tag);
                }
                // TTL 0, 1 or 2.
                9 if len > 22 => f[22] = self.rng.below(3) as u8,
                // Bytes past the IPv4 packet (Ethernet padding).
                10 => f.extend((0..self.rng.below(20)).map(|_| self.rng.byte())),
                // Random bytes anywhere.
                _ if len > 0 => {
                    for _ in 0..1 + self.rng.below(4) {
                        let at = self.rng.below(len as u64) as usize;
                        f[at] = self.rng.byte();
                    }
                }
                _ => {}
            }
        }
    }

    /// The next frame, and whether it arrives on the backends' side.
    fn frame(&mut self) -> (Vec<u8>, bool) {
        match self.rng.below(100) {
            // Not IPv4: ARP, IPv6, random.
            0..=2 => {
                let ether = self.rng.pick(&[[0x08, 0x06], [0x86, 0xdd], [0x88, 0xcc]]);
                let mut f = vec![0u8; 14 + self.rng.below(80) as usize];
                f.iter_mut().for_each(|b| *b = self.rng.byte());
                f[12..14].copy_from_slice(&ether);
                (f, self.rng.chance(50))
            }
            3 | 4 => {
                let f = (0..14 + self.rng.below(120))
                    .map(|_| self.rng.byte())
                    .collect();
                (f, self.rng.chance(50))
            }
            _ => {
                let (mut t, backside) = self.template();
                if self.rng.chance(5) {
                    t.ip_options = vec![1, 1, 1, 0];
                }
                if self.rng.chance(3) {
                    t.payload = (0..self.rng.below(64)).map(|_| self.rng.byte()).collect();
                }
                if self.rng.chance(2) {
                    // Around the links' MTU (1500): some fit, some are too big.
                    let n = 1400 + self.rng.below(200) as usize;
                    t.payload = vec![0x5a; n];
                    if self.rng.chance(50) {
                        t.frag = 0; // DF clear
                    }
                }
                let (ours, theirs) = if backside {
                    (X1_MAC, [2, 0, 0, 0, 2, 0x11])
                } else {
                    (X0_MAC, [2, 0, 0, 0, 1, 2])
                };
                t.dst_mac = ours;
                t.src_mac = theirs;
                let mut f = t.build();
                if self.rng.chance(30) {
                    self.mutate(&mut f);
                }
                (f, backside)
            }
        }
    }
}

#[test]
fn root_the_xdp_program_agrees_with_its_model_on_random_and_mutated_frames() {
    fuzz(Hook::Xdp);
}

/// The same frames through the TC program: the same model, each action
/// mapped to TC's (`testrun::tc_action_of`), the same bytes and counters.
#[test]
fn root_the_tc_program_agrees_with_its_model_on_random_and_mutated_frames() {
    fuzz(Hook::Tc);
}

/// Frames shorter than this (Ethernet's minimum) that this kernel's
/// BPF_PROG_TEST_RUN refuses for a TC program are not compared: it wants a
/// whole network header (found by trying: a 33-byte frame fails with EINVAL
/// whatever its EtherType, a 35-byte IPv6 one too). Any longer frame it
/// refuses fails the test.
const TC_TEST_RUN_SHORT: usize = 60;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hook {
    Xdp,
    Tc,
}

/// The seed every run starts with, so that CI runs the same frames each
/// time (a failure there replays by itself).
const FIXED_SEED: u64 = 0x6c62_2d66_757a_7a31;

/// A fixed-seed run of `LB_FUZZ_FRAMES` (1,000,000) frames, then a run of a
/// fifth as many from a seed of the clock, printed; `LB_FUZZ_SEED` runs that
/// seed alone.
fn fuzz(hook: Hook) {
    require_root();
    let frames: u64 = std::env::var("LB_FUZZ_FRAMES")
        .ok()
        .map(|v| v.parse().expect("LB_FUZZ_FRAMES is a number"))
        .unwrap_or(1_000_000);
    if let Ok(seed) = std::env::var("LB_FUZZ_SEED") {
        fuzz_run(
            hook,
            seed.parse().expect("LB_FUZZ_SEED is a number"),
            frames,
        );
        return;
    }
    fuzz_run(hook, FIXED_SEED, frames);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    fuzz_run(hook, clock, (frames / 5).max(100_000));
}

/// A MAC only the next-hop cache knows (see `fuzz_run`).
const CACHED_ONLY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xca, 0xce];

fn fuzz_run(hook: Hook, seed: u64, frames: u64) {
    println!(
        "differential fuzz of the {hook:?} program: {frames} frames, seed {seed} \
         (replay with LB_FUZZ_SEED={seed})"
    );
    let net = TestRunNet::new(&format!("fz{}{}", std::process::id() % 100_000, unique()));
    let x = Netns::attach(&net.x.name);
    let started = std::time::Instant::now();
    let report = x.run(move || {
        let mut dp = Dataplane::load().expect("loading the XDP program (verifier)");
        let x0 = lb_userspace::config::if_index("x0").unwrap();
        let x1 = lb_userspace::config::if_index("x1").unwrap();
        dp.set_firewall(&firewall(false)).unwrap();
        // The model has no clock: closed flows linger longer than the run.
        dp.set_linger(std::time::Duration::from_secs(3600)).unwrap();
        dp.apply(&services(false)).unwrap();
        // Next hops as the daemon keeps them, with one MAC no FIB knows, so
        // that a packet sent by the cache shows it (hits); the second half
        // runs with them stale, then one backend's missing.
        let resolved = lb_userspace::nexthop::resolve_blocking(
            dp.hop_targets(),
            vec!["x0".into(), "x1".into()],
            // Some backends of the fuzz's services have no neighbour: their
            // hops stay missing.
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let first = resolved
            .iter()
            .position(|(_, h)| h.is_some())
            .expect("the testrun net's backends resolve");
        let marked: Vec<_> = resolved
            .iter()
            .enumerate()
            .map(|(i, (id, hop))| {
                let hop = hop.map(|h| lb_userspace::nexthop::Hop {
                    dmac: if i == first { CACHED_ONLY_MAC } else { h.dmac },
                    ..h
                });
                (*id, hop)
            })
            .collect();
        dp.invalidate_hops().unwrap();
        dp.set_hops(&marked).unwrap();
        let mut model = Model::from_maps(&dp, x0, x1);
        let before = Model::kernel_counts(&dp);
        let mut source = Gen { rng: Rng(seed) };
        let mut skipped = 0u64;
        for i in 0..frames {
            if i == frames / 2 {
                dp.set_firewall(&firewall(true)).unwrap();
                dp.apply(&services(true)).unwrap();
                // Stale, all of them; then the first backend's written again
                // (current) and the others' missing.
                dp.invalidate_hops().unwrap();
                let half: Vec<_> = marked
                    .iter()
                    .enumerate()
                    .map(|(i, (id, hop))| (*id, if i == first { *hop } else { None }))
                    .collect();
                dp.set_hops(&half).unwrap();
                model.reload(&dp);
            }
            let (frame, backside) = source.frame();
            let ingress = if backside { x1 } else { x0 };
            let ran = match hook {
                Hook::Xdp => testrun::run(dp.program_mut(), &frame, ingress, 1),
                Hook::Tc => testrun::run_tc(dp.tc_program_mut(), &frame, ingress, 1),
            };
            let (action, out, _) = match ran {
                Ok(r) => r,
                Err(_) if hook == Hook::Tc && frame.len() < TC_TEST_RUN_SHORT => {
                    // Not run, so not modelled either.
                    skipped += 1;
                    continue;
                }
                Err(e) => panic!("frame {i}: test run failed: {e}\n{frame:02x?}"),
            };
            let want = model.run(&frame, ingress);
            let want_action = match hook {
                Hook::Xdp => want.action,
                Hook::Tc => testrun::tc_action_of(want.action),
            };
            if (action, &out) != (want_action, &want.frame) {
                panic!(
                    "frame {i} (seed {seed}) on {}: the program returned {action} and\n  {out:02x?}\n\
                     the model {} (outcome {}) and\n  {:02x?}\ninput:\n  {frame:02x?}",
                    if backside { "x1" } else { "x0" },
                    want_action,
                    lb_common::counter::NAMES
                        .get(want.outcome as usize)
                        .unwrap_or(&"?"),
                    want.frame
                );
            }
        }
        let after = Model::kernel_counts(&dp);
        let kernel: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        (kernel, model.counts.clone(), skipped)
    });
    let (kernel, model, skipped) = report;
    if skipped > 0 {
        println!(
            "{skipped} frames shorter than {TC_TEST_RUN_SHORT} bytes were refused by the \
             kernel's test run for TC and not compared (the XDP run covers those lengths \
             through the same parser)"
        );
    }
    let mut table = String::new();
    for (i, name) in lb_common::counter::NAMES.iter().enumerate() {
        if kernel[i] != 0 || model[i] != 0 {
            table.push_str(&format!("  {name:<22} {:>9} {:>9}\n", kernel[i], model[i]));
        }
    }
    println!(
        "{frames} frames in {:.1} s; outcome counters (kernel, model):\n{table}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(kernel, model, "the outcome counters differ (seed {seed})");
    // The next-hop cache was used (hits), as well as bypassed (stale, missing).
    let c = |i: u32| kernel[i as usize];
    use lb_common::counter::{FORWARDED, NEXT_HOP_LOOKUPS, REPLIES};
    assert!(
        frames < 100_000 || c(NEXT_HOP_LOOKUPS) < c(FORWARDED) + c(REPLIES),
        "every forwarded packet looked its next hop up: the cache was never hit"
    );
    // The run must have reached the paths it is meant to compare.
    for c in [
        lb_common::counter::FORWARDED,
        lb_common::counter::REPLIES,
        lb_common::counter::DROP_MALFORMED,
        lb_common::counter::DROP_DENIED_GLOBAL,
        lb_common::counter::DROP_DENIED_SERVICE,
        lb_common::counter::DROP_CLOSED_PORT,
        lb_common::counter::ICMP_ECHO_REPLIED,
        lb_common::counter::ICMP_TO_BACKEND,
        lb_common::counter::ICMP_TO_CLIENT,
        lb_common::counter::RESET_NO_BACKEND,
        lb_common::counter::DROP_BACKEND_GONE,
        lb_common::counter::PASS_FRAGMENT,
        lb_common::counter::NEXT_HOP_LOOKUPS,
        lb_common::counter::FLOWS_ESTABLISHED,
        lb_common::counter::FLOWS_CLOSED,
    ] {
        assert!(
            frames < 100_000 || kernel[c as usize] > 0,
            "no frame reached {} (seed {seed}): the generator has lost a path",
            lb_common::counter::NAMES[c as usize]
        );
    }
}
