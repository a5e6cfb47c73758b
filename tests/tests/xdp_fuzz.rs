//! Differential fuzzing (root): random and mutated frames through the real XDP
//! and TC programs (BPF_PROG_TEST_RUN) and through the reference model
//! (`lb_tests::model`), which works from the configuration the test applies,
//! not from the maps the daemon wrote. The action and every output byte must
//! agree for every frame; every frame sent on that was made unmutated must
//! also carry checksums that verify by full recomputation; and every 10,000
//! frames the outcome counters and each service's and backend's traffic
//! must agree. Any difference fails and prints the frame. A third run has a
//! nearly full connection table: the kernel's LRU then evicts flows at times
//! no model can predict, so before each frame the model forgets those of
//! its entries for the frame that the kernel no longer holds, and must
//! agree on what becomes of them (an evicted flow's packets are refused or
//! scheduled again by rule, never sent to another flow's backend).
//!
//! `LB_FUZZ_FRAMES` sets how many frames (default 1,000,000), `LB_FUZZ_SEED`
//! replays a run (the seed is printed at the start; with
//! `LB_FUZZ_NEARLY_FULL=1` for the nearly-full run). A longer run by hand:
//! `LB_FUZZ_FRAMES=20000000 cargo test -p lb-tests --test xdp_fuzz -- --nocapture`.

use std::net::Ipv4Addr;

use lb_tests::{
    frames::{Frame, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    model::{csum, verify_checksums, Model, Table},
    netns::Netns,
    require_root,
    rng::Rng,
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
/// added, one draining its flows, the Maglev service with a third backend
/// (its table changes: some flows recovered mid-stream move), the firewall's
/// other settings. The Maglev service comes after web, so that its new
/// backend takes the slot web's removed backend frees in the same apply: a
/// removed backend's late FIN or RST must end its flows under their own
/// generation, not the slot's new occupant's (the model found the program
/// sending the client's next packets to that occupant, another service's
/// backend, and counting the replies as its traffic; fixed).
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
    let mut hashed = vec![backend("b1", B1, 9090), backend("b2", B2, 9090)];
    if changed {
        hashed.push(backend("b4", B1, 9091));
    }
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
            backends: hashed,
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
const BACKEND_PORTS: [u16; 6] = [8080, 8081, 9090, 9091, 5353, 3306];
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
                let c = csum::full(&m);
                m[2..4].copy_from_slice(&c);
                (client, self.rng.pick(&[VIP, VIP2, B1]), m, false)
            }
            1 | 2 => {
                // About our reply vip -> client: from the client or a router.
                let mut quoted = if self.rng.chance(70) {
                    Frame::tcp((vip, self.rng.pick(&[80, 3306])), (client, cport), TCP_ACK)
                } else {
                    Frame::udp((vip, 53), (client, cport))
                };
                if self.rng.chance(25) {
                    quoted.ip_options = self.ip_options();
                }
                let from = if self.rng.chance(50) { client } else { ROUTER };
                (from, vip, self.error(&quoted), false)
            }
            _ => {
                // About a packet we sent client -> backend: from the backend or a router.
                let b = self.rng.pick(&BACKENDS);
                let port = self.rng.pick(&BACKEND_PORTS);
                let mut quoted = if self.rng.chance(70) {
                    Frame::tcp((client, cport), (b, port), TCP_SYN)
                } else {
                    Frame::udp((client, cport), (b, port))
                };
                if self.rng.chance(25) {
                    quoted.ip_options = self.ip_options();
                }
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
        let ihl = 20 + quoted.ip_options.len();
        let keep = match self.rng.below(4) {
            0 => 14 + 20 + self.rng.below(ihl as u64 - 8) as usize,
            1 => 14 + ihl + 8,
            _ => q.len(),
        };
        m.extend_from_slice(&q[14..keep.min(q.len())]);
        let c = csum::full(&m);
        m[2..4].copy_from_slice(&c);
        m
    }

    /// IPv4 options as routers and hosts send them (NOP, router alert,
    /// record route, timestamp, an early end of list), padded to a word,
    /// at most 40 bytes.
    fn ip_options(&mut self) -> Vec<u8> {
        let mut o: Vec<u8> = Vec::new();
        for _ in 0..1 + self.rng.below(3) {
            let next: Vec<u8> = match self.rng.below(5) {
                0 => vec![1],
                1 => vec![148, 4, 0, 0],
                2 => {
                    let n = 1 + self.rng.below(4) as u8;
                    let mut v = vec![7, 3 + 4 * n, 4];
                    v.resize(3 + 4 * n as usize, 0);
                    v
                }
                3 => {
                    let n = 1 + self.rng.below(3) as u8;
                    let mut v = vec![68, 4 + 4 * n, 5, 0];
                    v.resize(4 + 4 * n as usize, 0);
                    v
                }
                _ => vec![1, 1, 1, 0],
            };
            if o.len() + next.len() <= 40 {
                o.extend(next);
            }
        }
        while !o.len().is_multiple_of(4) {
            o.push(0);
        }
        o
    }

    /// TCP options as stacks send them: a SYN's (MSS, SACK permitted,
    /// timestamps, window scale), an established segment's (NOPs and
    /// timestamps, SACK blocks), or a mix ended by EOL; padded to a word.
    fn tcp_options(&mut self) -> Vec<u8> {
        let ts = |r: &mut Rng| -> Vec<u8> { (0..8).map(|_| r.byte()).collect() };
        let mut o: Vec<u8> = match self.rng.below(4) {
            0 => {
                let mut v = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
                v.extend(ts(&mut self.rng));
                v.extend([1, 3, 3, self.rng.below(15) as u8]);
                v
            }
            1 => {
                let mut v = vec![1, 1, 8, 10];
                v.extend(ts(&mut self.rng));
                v
            }
            2 => {
                let n = 1 + self.rng.below(3) as u8;
                let mut v = vec![1, 1, 5, 2 + 8 * n];
                v.extend((0..8 * n).map(|_| self.rng.byte()));
                v
            }
            _ => {
                let mut v = Vec::new();
                for _ in 0..1 + self.rng.below(5) {
                    match self.rng.below(4) {
                        0 => v.push(1),
                        1 => v.extend([2, 4, 0x02, 0x18]),
                        2 => v.extend([3, 3, 7]),
                        _ => v.extend([4, 2]),
                    }
                }
                v.push(0);
                v
            }
        };
        while !o.len().is_multiple_of(4) {
            o.push(if self.rng.chance(50) { 0 } else { 1 });
        }
        o
    }

    /// A well-formed IPv6 packet (TCP, UDP, ICMPv6 or a hop-by-hop header
    /// first): the data path passes it as not IPv4.
    fn ipv6(&mut self, backside: bool) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(if backside { X1_MAC } else { X0_MAC });
        f.extend([2, 0, 0, 0, 6, 6, 0x86, 0xdd]);
        let next = self.rng.pick(&[6u8, 17, 58, 0]);
        let mut l4: Vec<u8> = match next {
            6 => {
                let mut t = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN];
                t.extend([0xfa, 0xf0, 0, 0, 0, 0]);
                t
            }
            17 => vec![0x9c, 0x40, 0, 53, 0, 8, 0, 0],
            58 => vec![128, 0, 0, 0, 0x12, 0x34, 0, 1],
            _ => vec![17, 0, 1, 4, 0, 0, 0, 0],
        };
        l4.extend((0..self.rng.below(40)).map(|_| self.rng.byte()));
        f.extend([0x60, 0, 0, 0]);
        f.extend((l4.len() as u16).to_be_bytes());
        f.extend([next, 64]);
        let mut addr = |last: u8| {
            let mut a = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last];
            a[7] = self.rng.below(3) as u8;
            a
        };
        f.extend(addr(2));
        f.extend(addr(100));
        f.extend(l4);
        f
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

    /// The next frame, whether it arrives on the backends' side, and
    /// whether it was mutated after it was made.
    fn frame(&mut self) -> (Vec<u8>, bool, bool) {
        match self.rng.below(100) {
            // Not IPv4: ARP, IPv6, random.
            0..=2 => {
                let ether = self.rng.pick(&[[0x08, 0x06], [0x86, 0xdd], [0x88, 0xcc]]);
                let mut f = vec![0u8; 14 + self.rng.below(80) as usize];
                f.iter_mut().for_each(|b| *b = self.rng.byte());
                f[12..14].copy_from_slice(&ether);
                (f, self.rng.chance(50), true)
            }
            3 | 4 => {
                let f = (0..14 + self.rng.below(120))
                    .map(|_| self.rng.byte())
                    .collect();
                (f, self.rng.chance(50), true)
            }
            5 | 6 => {
                let backside = self.rng.chance(50);
                (self.ipv6(backside), backside, false)
            }
            _ => {
                let (mut t, backside) = self.template();
                if self.rng.chance(8) {
                    t.ip_options = self.ip_options();
                }
                if matches!(t.l4, L4::Tcp { .. }) && self.rng.chance(40) {
                    t.tcp_options = self.tcp_options();
                }
                // An ICMP message whose bytes are replaced is a mutation (its
                // checksum no longer holds); TCP and UDP checksums are
                // computed over the new payload.
                let mut mutated = false;
                if self.rng.chance(3) {
                    t.payload = (0..self.rng.below(64)).map(|_| self.rng.byte()).collect();
                    mutated |= matches!(t.l4, L4::Other { .. });
                }
                if self.rng.chance(3) {
                    // Around the links' MTU (1500): some fit, some are too
                    // big; and well above it, up to what a test run takes
                    // without splitting the frame (3.5 KB at XDP).
                    let n = if self.rng.chance(60) {
                        1400 + self.rng.below(200) as usize
                    } else {
                        1600 + self.rng.below(1700) as usize
                    };
                    t.payload = vec![0x5a; n];
                    mutated |= matches!(t.l4, L4::Other { .. });
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
                if self.rng.chance(2) {
                    // 802.1ad: a service tag (0x88a8) outside a customer
                    // tag (0x8100), as a provider's network carries it.
                    let tags = [
                        0x88,
                        0xa8,
                        0,
                        self.rng.byte(),
                        0x81,
                        0x00,
                        0,
                        self.rng.byte(),
                    ];
                    f.splice(12..12, tags);
                }
                if self.rng.chance(30) {
                    self.mutate(&mut f);
                    mutated = true;
                }
                (f, backside, mutated)
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
        let nearly_full = std::env::var_os("LB_FUZZ_NEARLY_FULL").map(|_| NEARLY_FULL);
        fuzz_run(
            hook,
            seed.parse().expect("LB_FUZZ_SEED is a number"),
            frames,
            nearly_full,
        );
        return;
    }
    fuzz_run(hook, FIXED_SEED, frames, None);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    fuzz_run(hook, clock, (frames / 5).max(100_000), None);
    fuzz_run(
        hook,
        FIXED_SEED.rotate_left(17),
        (frames / 5).max(100_000),
        Some(NEARLY_FULL),
    );
}

/// The connection table of the nearly-full run: this many entries, all but
/// [`HEADROOM`] taken by flows of addresses the generator never sends from
/// (198.18.0.0/16), written again every [`REFRESH_EVERY`] frames so that the
/// LRU takes them for live and evicts the frames' flows too.
const NEARLY_FULL: u32 = 1024;
const HEADROOM: u32 = 128;
const REFRESH_EVERY: u64 = 1000;

/// The nearly-full run's background flows.
fn background() -> impl Iterator<Item = lb_common::FlowKey> {
    (0..NEARLY_FULL - HEADROOM).map(|i| {
        lb_common::FlowKey::new(
            [198, 18, (i >> 8) as u8, i as u8],
            VIP.octets(),
            1234u16.to_be_bytes(),
            80u16.to_be_bytes(),
            lb_common::IPPROTO_TCP,
        )
    })
}

/// Whether the kernel's `table` holds `key`.
fn kernel_has(dp: &Dataplane, table: Table, key: &lb_common::FlowKey) -> bool {
    let m = dp.maps();
    match table {
        Table::Conntrack => m.conntrack.get(key, 0).is_ok(),
        Table::Reverse => m.reverse.get(key, 0).is_ok(),
        Table::Transient => m.transient.get(key, 0).is_ok(),
    }
}

/// A MAC only the next-hop cache knows (see `fuzz_run`).
const CACHED_ONLY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xca, 0xce];

/// The backend whose next hop is cached with [`CACHED_ONLY_MAC`].
const MARKED: (&str, &str, [u8; 6]) = ("web", "b1", CACHED_ONLY_MAC);

/// How often (in frames) the counters and the traffic are compared.
const COMPARE_EVERY: u64 = 10_000;

/// What the run did, for the report printed after it.
struct Report {
    kernel: Vec<u64>,
    model: Vec<u64>,
    skipped: u64,
    recomputed: u64,
    compared: u64,
    cache_hits: u64,
    evicted: u64,
}

/// One run; `nearly_full`: with a connection table of this many entries,
/// nearly full from the start.
fn fuzz_run(hook: Hook, seed: u64, frames: u64, nearly_full: Option<u32>) {
    let (table, replay) = match nearly_full {
        Some(n) => (
            format!(
                ", a nearly full connection table ({} of {n} taken)",
                n - HEADROOM
            ),
            " LB_FUZZ_NEARLY_FULL=1",
        ),
        None => (String::new(), ""),
    };
    println!(
        "differential fuzz of the {hook:?} program: {frames} frames{table}, seed {seed} \
         (replay with LB_FUZZ_SEED={seed}{replay})"
    );
    let net = TestRunNet::new(&format!("fz{}{}", std::process::id() % 100_000, unique()));
    let x = Netns::attach(&net.x.name);
    let started = std::time::Instant::now();
    let report = x.run(move || {
        let mut dp = match nearly_full {
            Some(n) => Dataplane::load_with_conntrack(n),
            None => Dataplane::load(),
        }
        .expect("loading the XDP program (verifier)");
        let x0 = lb_userspace::config::if_index("x0").unwrap();
        let x1 = lb_userspace::config::if_index("x1").unwrap();
        // The model is given what the daemon is given, never what it wrote.
        let mut model = Model::new(x0, x1);
        dp.set_firewall(&firewall(false)).unwrap();
        model.set_firewall(&firewall(false));
        // The model has no clock: closed flows linger longer than the run.
        dp.set_linger(std::time::Duration::from_secs(3600)).unwrap();
        dp.apply(&services(false)).unwrap();
        model.apply(&services(false));
        model.learn_slots(|s, b| dp.backend_id(s, b));
        if nearly_full.is_some() {
            dp.insert_flows("web", "b1", background()).unwrap();
        }
        // Next hops as the daemon keeps them, with one MAC no FIB knows, so
        // that a packet sent by the cache shows it (hits); the second half
        // runs with them stale, then all but that backend's missing.
        let resolved = lb_userspace::nexthop::resolve_blocking(
            dp.hop_targets(),
            vec!["x0".into(), "x1".into()],
            // Some backends of the fuzz's services have no neighbour: their
            // hops stay missing.
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let marked_id = dp.backend_id(MARKED.0, MARKED.1).unwrap();
        let marked: Vec<_> = resolved
            .iter()
            .map(|&(id, hop)| {
                let hop = hop.map(|h| lb_userspace::nexthop::Hop {
                    dmac: if id == marked_id { MARKED.2 } else { h.dmac },
                    ..h
                });
                (id, hop)
            })
            .collect();
        assert!(
            marked.iter().any(|(id, h)| *id == marked_id && h.is_some()),
            "the testrun net resolves {}/{}",
            MARKED.0,
            MARKED.1
        );
        dp.invalidate_hops().unwrap();
        dp.set_hops(&marked).unwrap();
        model.invalidate_hops();
        model.cache_hops(&[MARKED], false);
        let mut source = Gen { rng: Rng(seed) };
        let (mut skipped, mut recomputed, mut compared, mut cache_hits) = (0u64, 0, 0, 0);
        let mut evicted = 0u64;
        for i in 0..frames {
            if i == frames / 2 {
                dp.set_firewall(&firewall(true)).unwrap();
                model.set_firewall(&firewall(true));
                // Stateless replies for the second half: replies of flows
                // this instance never saw are un-NATed by backend address.
                dp.set_stateless_replies(true);
                model.set_stateless_replies(true);
                dp.apply(&services(true)).unwrap();
                model.apply(&services(true));
                model.learn_slots(|s, b| dp.backend_id(s, b));
                // Stale, all of them; then the marked backend's written
                // again (current) and the others' missing.
                dp.invalidate_hops().unwrap();
                let half: Vec<_> = marked
                    .iter()
                    .map(|&(id, hop)| (id, if id == marked_id { hop } else { None }))
                    .collect();
                dp.set_hops(&half).unwrap();
                model.invalidate_hops();
                model.cache_hops(&[MARKED], true);
            }
            if i % COMPARE_EVERY == 0 {
                compare_counts(&dp, &model, i, seed);
                compared += 1;
            }
            let (frame, backside, mutated) = source.frame();
            let ingress = if backside { x1 } else { x0 };
            if nearly_full.is_some() && i % REFRESH_EVERY == 0 && i > 0 {
                dp.insert_flows("web", "b1", background()).unwrap();
            }
            if nearly_full.is_some() {
                // What the kernel's LRU evicted since the last frame, of
                // what this frame may read: the model forgets it too.
                for (t, k) in model.entries_for(&frame) {
                    if !kernel_has(&dp, t, &k) {
                        model.forget(t, &k);
                        evicted += 1;
                    }
                }
            }
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
            let side = if backside { "x1" } else { "x0" };
            if (action, &out) != (want_action, &want.frame) {
                panic!(
                    "frame {i} (seed {seed}) on {side}: the program returned {action} and\n  {out:02x?}\n\
                     the model {} (outcome {}) and\n  {:02x?}\ninput:\n  {frame:02x?}",
                    want_action,
                    lb_common::counter::NAMES
                        .get(want.outcome as usize)
                        .unwrap_or(&"?"),
                    want.frame
                );
            }
            let sent = matches!(want.action, testrun::XDP_TX | testrun::XDP_REDIRECT);
            if sent && out[..6] == MARKED.2 {
                cache_hits += 1;
            }
            if sent && !mutated {
                if let Err(e) = recompute(&frame, &out) {
                    panic!(
                        "frame {i} (seed {seed}) on {side}: {e} in what the program sent:\n  \
                         {out:02x?}\ninput:\n  {frame:02x?}"
                    );
                }
                recomputed += 1;
            }
        }
        compare_counts(&dp, &model, frames, seed);
        compared += 1;
        Report {
            kernel: Model::kernel_counts(&dp),
            model: model.counts.clone(),
            skipped,
            recomputed,
            compared,
            cache_hits,
            evicted,
        }
    });
    let Report {
        kernel,
        model,
        skipped,
        recomputed,
        compared,
        cache_hits,
        evicted,
    } = report;
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
        "{frames} frames in {:.1} s; {recomputed} frames sent checked by full recomputation; \
         {cache_hits} sent by the next-hop cache; counters and traffic compared {compared} \
         times; {evicted} entries the frames needed had been evicted by the kernel's LRU \
         (forgotten by the model); outcome counters (kernel, model):\n{table}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        nearly_full.is_none() || frames < 100_000 || evicted > 0,
        "the nearly full table evicted none of the frames' flows (seed {seed}): \
         the run did not test eviction"
    );
    // The next-hop cache was used (hits: frames sent to the MAC only the
    // cache knows), as well as bypassed (stale, missing: lookups, below).
    assert!(
        frames < 100_000 || cache_hits > 0,
        "no frame was sent by the next-hop cache (seed {seed})"
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
        lb_common::counter::RESET_FLOW,
        lb_common::counter::DROP_BACKEND_GONE,
        lb_common::counter::DROP_BACKEND_DOWN,
        lb_common::counter::FLOWS_RECOVERED,
        lb_common::counter::PASS_FRAGMENT,
        lb_common::counter::PASS_TOO_BIG,
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

/// The outcome counters, and every service's and backend's traffic, as the
/// daemon reads them from the kernel and as the model counted them.
fn compare_counts(dp: &Dataplane, model: &Model, frame: u64, seed: u64) {
    let kernel = Model::kernel_counts(dp);
    if kernel != model.counts {
        let mut diff = String::new();
        for (i, name) in lb_common::counter::NAMES.iter().enumerate() {
            if kernel[i] != model.counts[i] {
                diff.push_str(&format!(
                    "  {name}: kernel {}, model {}\n",
                    kernel[i], model.counts[i]
                ));
            }
        }
        panic!("before frame {frame} (seed {seed}) the outcome counters differ:\n{diff}");
    }
    for spec in services(false).iter().chain(&services(true)) {
        let (k, m) = (
            dp.service_traffic(&spec.name).unwrap(),
            model.service_traffic(&spec.name),
        );
        assert_eq!(
            k, m,
            "before frame {frame} (seed {seed}): service {}'s traffic (kernel, then model)",
            spec.name
        );
    }
    for (svc, b) in model.backend_names() {
        let (k, m) = (
            dp.backend_traffic(&svc, &b).unwrap(),
            model.backend_traffic(&svc, &b),
        );
        assert_eq!(
            k, m,
            "before frame {frame} (seed {seed}): backend {svc}/{b}'s traffic (kernel, then model)"
        );
    }
}

/// What the program sent for an unmutated frame, checked by full
/// recomputation (`model::verify_checksums`, none of the model's
/// incremental code): its IPv4 header checksum, its TCP/UDP checksum over
/// the pseudo-header (or its ICMP checksum), and a UDP checksum of 0 (none)
/// still 0.
fn recompute(input: &[u8], out: &[u8]) -> Result<(), String> {
    verify_checksums(out)?;
    let l4 = |f: &[u8]| 14 + ((f[14] & 0x0f) as usize) * 4;
    if input[23] == 17 && out[23] == 17 && input[l4(input) + 6..l4(input) + 8] == [0, 0] {
        let at = l4(out) + 6;
        if out[at..at + 2] != [0, 0] {
            return Err("a UDP checksum of 0 (none) was rewritten".into());
        }
    }
    Ok(())
}
