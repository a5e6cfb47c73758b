//! What the XDP program and the daemon must agree on: map layouts, capacities,
//! counter indices, and the pure helpers (checksums, schedulers) both sides use.
//!
//! Every type that crosses the kernel boundary is `#[repr(C)]` with explicit
//! padding and a size pinned at compile time. Addresses and ports are kept in
//! network byte order (`[u8; N]`) so the data path never converts them.
#![no_std]

pub mod checksum;
pub mod firewall;
pub mod maglev;
pub mod maps;
pub mod reset;
pub mod ring;

/// Most services one program instance carries (size of the service and ring maps).
pub const MAX_SERVICES: u32 = 256;
/// Most backends across all services (backend ids are `0..MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 4096;
/// Longest scheduling ring of one service: a backend of weight `w` takes `w`
/// slots, so the sum of a service's weights is bounded by this.
pub const RING_SIZE: u32 = 1024;
/// Each service owns two ring halves; the service entry names the live one, so a
/// new ring is written into the other half and switched in by one map update.
pub const RING_MAP_SIZE: u32 = MAX_SERVICES * 2 * RING_SIZE;
/// Entries of the connection table (and of the reverse-NAT table): established
/// flows only, LRU-evicted only when established flows exceed it.
pub const CONNTRACK_SIZE: u32 = 262_144;
/// Entries of the transient table: flows whose handshake is not complete
/// (half-open) and flows that ended and linger, two entries each (client
/// side and reply side), LRU-evicted. A SYN flood churns this table only.
pub const TRANSIENT_SIZE: u32 = 65_536;

/// Interfaces the TC hook knows by index (`IFACES`): indexes at or above it
/// are sent through the device's egress.
pub const MAX_IFINDEX: u32 = 4096;
/// `IFACES` flag: the interface is a veth whose peer lives in another network
/// namespace, so the TC hook sends into the peer's ingress directly
/// (`bpf_redirect_peer`) instead of through this side's egress.
pub const IFACE_F_PEER: u32 = 1;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of the service map: the address, port and protocol a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service arrays (counters, round-robin position).
    pub id: u32,
    /// First slot of the live ring half in the ring map (the Maglev map for
    /// `SERVICE_F_MAGLEV` services).
    pub ring_base: u32,
    /// Slots used in the live ring half (the Maglev table size); 0 means no
    /// backend can take new flows.
    pub ring_len: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// Seed of the flow hash (Maglev services).
    pub hash_seed: u32,
    /// A UDP flow idle for longer than this many ticks (`bpf_jiffies64`) is
    /// over: its next packet is a new flow. 0: never.
    pub idle_ticks: u32,
}

/// New flows are placed by Maglev consistent hashing of their 5-tuple, and a
/// mid-flow TCP packet of an unknown flow is placed the same way (it lands on
/// the backend it started on, while the backend set is unchanged).
pub const SERVICE_F_MAGLEV: u32 = 1;
/// A TCP connection the service cannot take (no backend) is refused at once
/// with a reset from the VIP, so clients fail fast instead of retrying SYNs
/// (the write VIP while there is no primary).
pub const SERVICE_F_RESET_IF_EMPTY: u32 = 2;
/// The service has source rules in the `FW_RULES` trie: look the source up.
pub const SERVICE_F_FIREWALL: u32 = 4;
/// The service has allow rules: a source no rule matches is denied.
pub const SERVICE_F_ALLOWLIST: u32 = 8;

/// Most Maglev services (each owns two tables of up to `maglev::MAX_TABLE_SIZE`).
pub const MAX_MAGLEV_SERVICES: u32 = 8;
/// Entries of the Maglev map: two halves per Maglev service.
pub const MAGLEV_MAP_SIZE: u32 = MAX_MAGLEV_SERVICES * 2 * maglev::MAX_TABLE_SIZE;

/// Key of the backend-address map: a backend as it appears in its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the backend array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// The service id it belongs to (lets a restarted daemon adopt the maps).
    pub service: u32,
    /// Bumped each time the slot is given to a new backend: a flow remembers
    /// the generation it was scheduled with, so a flow of a removed backend is
    /// never sent to whichever backend reuses its id.
    pub generation: u32,
}

/// The backend slot holds a configured backend (a zeroed slot is free).
pub const BACKEND_F_PRESENT: u32 = 1;
/// Packets of established flows on this backend are dropped (it is down and
/// its service's policy is `drop-flows`); by default they keep flowing.
pub const BACKEND_F_DROP_FLOWS: u32 = 2;
/// Client packets of established TCP flows on this backend are answered with
/// a reset (a demoted MySQL primary: clients reconnect, to the new primary).
pub const BACKEND_F_RESET_FLOWS: u32 = 4;
/// The backend takes no new flows (down, drained, disabled, weight 0): a SYN
/// that matches one of its tracked flows opens a new connection (the earlier
/// one on those ports was refused or never answered) and is scheduled afresh.
pub const BACKEND_F_NO_NEW_FLOWS: u32 = 8;

/// A flow as the load balancer sees it on the wire, in one direction.
/// Client to VIP in the connection table, backend to client in the reverse table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of a flow, built with four word stores: a literal with a
    /// 3-byte zeroed pad compiles to a `memset` call in BPF, which costs a
    /// real function call per packet.
    #[inline(always)]
    pub fn new(src: [u8; 4], dst: [u8; 4], sport: [u8; 2], dport: [u8; 2], proto: u8) -> FlowKey {
        let ports = [sport[0], sport[1], dport[0], dport[1]];
        let words = [
            u32::from_ne_bytes(src),
            u32::from_ne_bytes(dst),
            u32::from_ne_bytes(ports),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is #[repr(C)], 16 bytes, every bit pattern valid;
        // the last word is the protocol followed by three zero bytes.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }
}

/// Value of the connection table: where a client flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    pub service: u32,
    /// `bpf_jiffies64()` of the last packet seen on the flow (the kernel's
    /// tick counter: read without a helper call, see `clock` in the daemon).
    pub last_seen: u64,
    /// The backend's generation when the flow was scheduled.
    pub generation: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
}

/// The client or the backend sent FIN or RST: the flow is ending, and a new
/// SYN on the same addresses and ports is a new connection to be scheduled afresh.
pub const FLOW_F_CLOSING: u32 = 1;
/// The client sent FIN.
pub const FLOW_F_FIN_CLIENT: u32 = 2;
/// The backend sent FIN. With both FINs (or one RST) the flow is closed: it
/// leaves the connection table for the transient one, where it lingers.
pub const FLOW_F_FIN_BACKEND: u32 = 4;
/// The balancer reset the backend's side of the flow (its backend's flows
/// are to be reset): the client's next segment is answered with a reset.
pub const FLOW_F_BACKEND_RESET: u32 = 8;

/// Value of the transient table, keyed by a flow's client side (client to
/// VIP) and by its reply side (backend to client): a TCP flow whose
/// handshake is not complete, or that ended and lingers so that
/// retransmitted FINs and the last ACK still find their way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Transient {
    /// Tick (`bpf_jiffies64`) of the SYN (half-open) or of the end (closed).
    pub since: u64,
    pub backend: u32,
    pub service: u32,
    /// The backend's generation when the flow was scheduled.
    pub generation: u32,
    /// The VIP side, for the reply-side entry's rewrite.
    pub vip: [u8; 4],
    pub vport: [u8; 2],
    /// `TRANSIENT_HALF_OPEN` or `TRANSIENT_CLOSED`.
    pub state: u8,
    /// 1 in the entry keyed by the reply side.
    pub reply: u8,
    pub _pad: u32,
}

/// Only the client's SYN went through; its ACK makes the flow established.
pub const TRANSIENT_HALF_OPEN: u8 = 1;
/// The flow ended (both FINs, or an RST); it lingers for `Settings::linger_ticks`.
pub const TRANSIENT_CLOSED: u8 = 2;

/// The data path's settings (one entry), written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// How long a closed flow lingers, in ticks.
    pub linger_ticks: u32,
    pub _pad: u32,
}

/// Value of the reverse-NAT table: how to make a backend's reply look like the VIP's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseFlow {
    pub vip: [u8; 4],
    pub vport: [u8; 2],
    pub _pad: [u8; 2],
    pub backend: u32,
    /// The generation of the backend slot the flow was given (see
    /// `Backend::generation`): a reply of a flow whose slot went to another
    /// backend since is not that backend's.
    pub generation: u32,
    /// The client side's next hop, filled by the data path from its first
    /// route lookup for the flow's replies (generation 0 until then; see
    /// [`NextHop`]).
    pub hop: NextHop,
}

/// Where a packet leaves: the egress interface, both MACs, and the MTU that
/// the kernel's route gives. Kept for each backend by the daemon (`HOPS`,
/// from the kernel's route, link and neighbour tables) and for each flow's
/// client side by the data path (in its reverse entry).
///
/// `generation` is the value of `HOP_GENERATION` the hop was resolved under.
/// The daemon bumps that value as soon as the kernel reports a change a hop
/// may depend on (a route, a link, an address, a neighbour's MAC), so every
/// cached hop is stale at once and the data path asks the kernel's FIB
/// instead, until the hop is resolved again. 0 is never current: a hop with
/// generation 0 is missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub generation: u32,
    pub ifindex: u32,
    /// The largest IPv4 packet (total length) the hop takes unfragmented.
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Words of each half of the address prefilter (`PREFILTER`): a bitmap of
/// 65,536 bits per half, indexed by [`prefilter_bit`].
pub const PREFILTER_WORDS: u32 = 2048;
/// First word of the half that marks VIP addresses (destinations).
pub const PREFILTER_VIPS: u32 = 0;
/// First word of the half that marks backend addresses (sources of replies).
pub const PREFILTER_BACKENDS: u32 = PREFILTER_WORDS;

/// The (word, bit) of `addr` in a prefilter half: a set bit means "maybe",
/// a clear bit means "certainly not" (two addresses may share a bit).
#[inline(always)]
pub fn prefilter_bit(addr: [u8; 4]) -> (u32, u32) {
    let x = u32::from_ne_bytes(addr);
    let h = (x ^ (x >> 16) ^ (x >> 11)) & 0xffff;
    (h >> 5, 1 << (h & 31))
}

/// Per-CPU traffic counters of one service or one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Traffic {
    /// Client-to-backend packets forwarded.
    pub packets: u64,
    /// Client-to-backend bytes forwarded (whole frames).
    pub bytes: u64,
    /// Flows that were scheduled (new entries in the connection table).
    pub new_flows: u64,
    /// Backend-to-client packets rewritten back to the VIP.
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl Traffic {
    /// Adds `other` field by field (summing the per-CPU copies).
    pub fn add(&mut self, other: &Traffic) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
    }
}

/// Indices of the per-CPU outcome counters: what happened to each packet.
pub mod counter {
    /// Not an IPv4 frame (ARP, IPv6, VLAN-tagged, shorter than Ethernet): passed.
    pub const PASS_NOT_IPV4: u32 = 0;
    /// An IPv4 fragment: passed, the data path does not reassemble.
    pub const PASS_FRAGMENT: u32 = 1;
    /// IPv4 but neither TCP nor UDP (nor ICMP the data path answers or
    /// rewrites), not addressed to a VIP: passed.
    pub const PASS_OTHER_PROTO: u32 = 2;
    /// TCP/UDP that matches no service and no tracked reply: passed.
    pub const PASS_NO_SERVICE: u32 = 3;
    /// Rewritten, but the next hop's MAC is unresolved: handed to the kernel to forward.
    pub const PASS_NO_NEIGH: u32 = 4;
    /// TTL would expire here: passed so the kernel answers with ICMP time exceeded.
    pub const PASS_TTL_EXPIRED: u32 = 5;
    /// IPv4 header or L4 header truncated or invalid: dropped.
    pub const DROP_MALFORMED: u32 = 6;
    /// A new flow for a service with no usable backend: dropped.
    pub const DROP_NO_BACKEND: u32 = 7;
    /// A TCP segment other than a SYN for a flow the table does not know: dropped.
    pub const DROP_TCP_NO_FLOW: u32 = 8;
    /// No route to the backend or client (FIB lookup failed): dropped.
    pub const DROP_NO_ROUTE: u32 = 9;
    /// The connection table refused the new flow: dropped.
    pub const DROP_TABLE_FULL: u32 = 10;
    /// Client-to-backend packets forwarded. The data path counts them once,
    /// in their backend's `Traffic`; this slot holds what the daemon folded
    /// in from backends since removed, and the daemon reports the sum.
    pub const FORWARDED: u32 = 11;
    /// Backend-to-client packets rewritten to the VIP and forwarded (counted
    /// like `FORWARDED`).
    pub const REPLIES: u32 = 12;
    /// New flows scheduled.
    pub const NEW_FLOWS: u32 = 13;
    /// A packet of a flow whose backend was removed: dropped.
    pub const DROP_BACKEND_GONE: u32 = 14;
    /// A packet of a flow whose backend is down, under the `drop-flows` policy: dropped.
    pub const DROP_BACKEND_DOWN: u32 = 15;
    /// A mid-flow TCP packet of a flow the table did not know, placed by
    /// Maglev on the backend it hashes to (and the flow tracked again).
    pub const FLOWS_RECOVERED: u32 = 16;
    /// A new TCP connection refused with a reset: its service had no backend.
    pub const RESET_NO_BACKEND: u32 = 17;
    /// A packet of a flow whose backend resets its flows, made a reset: the
    /// client's first such segment goes on to the backend as a reset (the
    /// backend never saw the client go and would keep its side open), the
    /// next is answered to the client with one.
    pub const RESET_FLOW: u32 = 18;
    /// From a source on the global deny list (`[firewall] deny`): dropped.
    pub const DROP_DENIED_GLOBAL: u32 = 19;
    /// From a source a service's rules deny (`[service.firewall]`): dropped.
    pub const DROP_DENIED_SERVICE: u32 = 20;
    /// To a VIP on a port (or protocol) no service uses: dropped.
    pub const DROP_CLOSED_PORT: u32 = 21;
    /// A new flow over its source's rate (SYN-flood guard): dropped.
    pub const DROP_SOURCE_RATE: u32 = 22;
    /// A new flow over the global new-flow rate (SYN-flood guard): dropped.
    pub const DROP_GLOBAL_RATE: u32 = 23;
    /// An ICMP echo request to a VIP, answered by the data path.
    pub const ICMP_ECHO_REPLIED: u32 = 24;
    /// An ICMP error about a reply of a tracked flow, sent on to its backend.
    pub const ICMP_TO_BACKEND: u32 = 25;
    /// An ICMP error about a packet sent to a backend, rewritten for the client.
    pub const ICMP_TO_CLIENT: u32 = 26;
    /// ICMP to a VIP that is neither an answered echo nor an error about a
    /// tracked flow: dropped.
    pub const DROP_ICMP: u32 = 27;
    /// Bigger than the egress link's MTU: passed so the kernel sends its
    /// sender "fragmentation needed" (DF set, path MTU discovery) or
    /// fragments it (see forward.rs).
    pub const PASS_TOO_BIG: u32 = 28;
    /// A packet whose next hop was not cached, or cached under an older
    /// generation: looked up in the kernel's FIB (counted beside its outcome).
    pub const NEXT_HOP_LOOKUPS: u32 = 29;
    /// Not an outcome: TCP flows whose client completed the handshake (moved
    /// from the transient table to the connection table).
    pub const FLOWS_ESTABLISHED: u32 = 30;
    /// Not an outcome: flows that ended (both FINs, or an RST) and left the
    /// connection table to linger in the transient one.
    pub const FLOWS_CLOSED: u32 = 31;
    /// Not a slot: the outcome of a forwarded packet, already counted in
    /// its backend's traffic (one counter update per packet).
    pub const COUNTED: u32 = u32::MAX;
    /// Size of the counter array.
    pub const COUNT: u32 = 32;

    /// What a counter counts: a packet's outcome, a kind of flow event, or
    /// next-hop lookups. Metrics and the status page label counters by it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        /// Packets the data path dealt with this way (`action`), for this
        /// `reason`: every packet counts in exactly one of these.
        Outcome {
            action: Action,
            reason: &'static str,
        },
        /// Flow events of this kind (`scheduled`, `recovered`, `established`,
        /// `closed`), counted beside the packet's outcome.
        Flows(&'static str),
        /// Next-hop lookups in the FIB, counted beside the packet's outcome.
        NextHopLookups,
    }

    /// What the data path did with a packet.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Action {
        /// Left to the kernel (`XDP_PASS`).
        Pass,
        Drop,
        /// Rewritten and sent on.
        Forward,
        /// Answered with a TCP reset.
        Reset,
        /// Answered (an ICMP echo reply).
        Reply,
    }

    impl Action {
        /// The label metrics give it.
        pub const fn name(self) -> &'static str {
            match self {
                Action::Pass => "pass",
                Action::Drop => "drop",
                Action::Forward => "forward",
                Action::Reset => "reset",
                Action::Reply => "reply",
            }
        }
    }

    /// One counter: its slot, its name (in `lb status`, the status JSON and
    /// the tests) and what it counts.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Description {
        pub index: u32,
        pub name: &'static str,
        pub kind: Kind,
    }

    const fn outcome(
        index: u32,
        name: &'static str,
        action: Action,
        reason: &'static str,
    ) -> Description {
        Description {
            index,
            name,
            kind: Kind::Outcome { action, reason },
        }
    }

    const fn flows(index: u32, name: &'static str, kind: &'static str) -> Description {
        Description {
            index,
            name,
            kind: Kind::Flows(kind),
        }
    }

    /// Every counter, in slot order: the one description of the counters.
    pub const TABLE: [Description; COUNT as usize] = [
        outcome(PASS_NOT_IPV4, "pass_not_ipv4", Action::Pass, "not_ipv4"),
        outcome(PASS_FRAGMENT, "pass_fragment", Action::Pass, "fragment"),
        outcome(
            PASS_OTHER_PROTO,
            "pass_other_proto",
            Action::Pass,
            "other_proto",
        ),
        outcome(
            PASS_NO_SERVICE,
            "pass_no_service",
            Action::Pass,
            "no_service",
        ),
        outcome(PASS_NO_NEIGH, "pass_no_neigh", Action::Pass, "no_neigh"),
        outcome(
            PASS_TTL_EXPIRED,
            "pass_ttl_expired",
            Action::Pass,
            "ttl_expired",
        ),
        outcome(DROP_MALFORMED, "drop_malformed", Action::Drop, "malformed"),
        outcome(
            DROP_NO_BACKEND,
            "drop_no_backend",
            Action::Drop,
            "no_backend",
        ),
        outcome(
            DROP_TCP_NO_FLOW,
            "drop_tcp_no_flow",
            Action::Drop,
            "tcp_no_flow",
        ),
        outcome(DROP_NO_ROUTE, "drop_no_route", Action::Drop, "no_route"),
        outcome(
            DROP_TABLE_FULL,
            "drop_table_full",
            Action::Drop,
            "table_full",
        ),
        outcome(FORWARDED, "forwarded", Action::Forward, "to_backend"),
        outcome(REPLIES, "replies", Action::Forward, "to_client"),
        flows(NEW_FLOWS, "new_flows", "scheduled"),
        outcome(
            DROP_BACKEND_GONE,
            "drop_backend_gone",
            Action::Drop,
            "backend_gone",
        ),
        outcome(
            DROP_BACKEND_DOWN,
            "drop_backend_down",
            Action::Drop,
            "backend_down",
        ),
        flows(FLOWS_RECOVERED, "flows_recovered", "recovered"),
        outcome(
            RESET_NO_BACKEND,
            "reset_no_backend",
            Action::Reset,
            "no_backend",
        ),
        outcome(RESET_FLOW, "reset_flow", Action::Reset, "flow"),
        outcome(
            DROP_DENIED_GLOBAL,
            "drop_denied_global",
            Action::Drop,
            "denied_global",
        ),
        outcome(
            DROP_DENIED_SERVICE,
            "drop_denied_service",
            Action::Drop,
            "denied_service",
        ),
        outcome(
            DROP_CLOSED_PORT,
            "drop_closed_port",
            Action::Drop,
            "closed_port",
        ),
        outcome(
            DROP_SOURCE_RATE,
            "drop_source_rate",
            Action::Drop,
            "source_rate",
        ),
        outcome(
            DROP_GLOBAL_RATE,
            "drop_global_rate",
            Action::Drop,
            "global_rate",
        ),
        outcome(
            ICMP_ECHO_REPLIED,
            "icmp_echo_replied",
            Action::Reply,
            "icmp_echo",
        ),
        outcome(
            ICMP_TO_BACKEND,
            "icmp_to_backend",
            Action::Forward,
            "icmp_to_backend",
        ),
        outcome(
            ICMP_TO_CLIENT,
            "icmp_to_client",
            Action::Forward,
            "icmp_to_client",
        ),
        outcome(DROP_ICMP, "drop_icmp", Action::Drop, "icmp"),
        outcome(PASS_TOO_BIG, "pass_too_big", Action::Pass, "too_big"),
        Description {
            index: NEXT_HOP_LOOKUPS,
            name: "next_hop_lookups",
            kind: Kind::NextHopLookups,
        },
        flows(FLOWS_ESTABLISHED, "flows_established", "established"),
        flows(FLOWS_CLOSED, "flows_closed", "closed"),
    ];

    /// Counter names, indexed like the constants above (from `TABLE`).
    pub const NAMES: [&str; COUNT as usize] = {
        let mut names = [""; COUNT as usize];
        let mut i = 0;
        while i < TABLE.len() {
            names[i] = TABLE[i].name;
            i += 1;
        }
        names
    };

    /// Whether every row of the table sits at its slot.
    const fn in_slot_order() -> bool {
        let mut i = 0;
        while i < TABLE.len() {
            if TABLE[i].index != i as u32 {
                return false;
            }
            i += 1;
        }
        true
    }

    // The table is indexed by slot: a row out of place is a build error.
    const _: () = assert!(in_slot_order());

    /// The counter of this name.
    pub fn by_name(name: &str) -> Option<&'static Description> {
        TABLE.iter().find(|d| d.name == name)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_table_is_in_slot_order_with_unique_names() {
            for (i, d) in TABLE.iter().enumerate() {
                assert_eq!(d.index, i as u32, "{} is out of place", d.name);
                assert_eq!(NAMES[i], d.name);
                for other in &TABLE[..i] {
                    assert_ne!(other.name, d.name, "two counters named {}", d.name);
                }
                assert_eq!(by_name(d.name), Some(d));
            }
        }

        #[test]
        fn actions_are_labelled_as_the_metrics_document() {
            let labels = [
                (Action::Pass, "pass"),
                (Action::Drop, "drop"),
                (Action::Forward, "forward"),
                (Action::Reset, "reset"),
                (Action::Reply, "reply"),
            ];
            for (action, label) in labels {
                assert_eq!(action.name(), label);
            }
        }

        #[test]
        fn outcome_reasons_are_unique_per_action() {
            for (i, d) in TABLE.iter().enumerate() {
                for other in &TABLE[..i] {
                    if let (Kind::Outcome { .. }, true) = (d.kind, d.kind == other.kind) {
                        panic!("{} and {} have the same labels", other.name, d.name);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_owns_two_whole_ring_halves_and_the_map_ends_with_the_last() {
        // The planner writes service `id`'s half `h` at (id * 2 + h) * RING_SIZE.
        let last_half_end = ((MAX_SERVICES - 1) * 2 + 1) * RING_SIZE + RING_SIZE;
        assert_eq!(RING_MAP_SIZE, last_half_end);
        assert_eq!(RING_MAP_SIZE, 524_288);
    }

    #[test]
    fn every_maglev_service_owns_two_tables_of_the_largest_size() {
        let last_table_end =
            ((MAX_MAGLEV_SERVICES - 1) * 2 + 1) * maglev::MAX_TABLE_SIZE + maglev::MAX_TABLE_SIZE;
        assert_eq!(MAGLEV_MAP_SIZE, last_table_end);
        assert_eq!(MAGLEV_MAP_SIZE, 2_097_136);
    }

    #[test]
    fn prefilter_bits_match_an_independent_computation() {
        // Computed in Python: x = little-endian u32 of the address,
        // h = (x ^ x >> 16 ^ x >> 11) & 0xffff, (h >> 5, 1 << (h & 31)).
        let cases = [
            ([10, 0, 0, 100], (1824, 0x400)),
            ([10, 0, 4, 11], (860, 0x4000)),
            ([192, 168, 1, 1], (1103, 0x10_0000)),
            ([255, 255, 255, 255], (2047, 0x8000_0000)),
            ([0, 0, 0, 1], (264, 0x1)),
        ];
        for (addr, want) in cases {
            assert_eq!(prefilter_bit(addr), want, "{addr:?}");
        }
    }

    #[test]
    fn a_subnet_spreads_over_distinct_prefilter_bits() {
        // The hosts of one /24 (a backend LAN, a VIP range) each get their
        // own bit, so marking one never says "maybe" for its neighbours.
        let bits: [(u32, u32); 256] = core::array::from_fn(|i| prefilter_bit([10, 0, 2, i as u8]));
        for (last, &(word, bit)) in bits.iter().enumerate() {
            assert!(word < PREFILTER_WORDS, "word {word} of 10.0.2.{last}");
            assert_eq!(bit.count_ones(), 1, "bit {bit:#x} of 10.0.2.{last}");
            assert!(
                !bits[..last].contains(&(word, bit)),
                "10.0.2.{last} shares a bit"
            );
        }
    }

    #[test]
    fn traffic_adds_field_by_field() {
        let mut t = Traffic {
            packets: 1,
            bytes: 2,
            new_flows: 3,
            reply_packets: 4,
            reply_bytes: 5,
        };
        t.add(&Traffic {
            packets: 10,
            bytes: 20,
            new_flows: 30,
            reply_packets: 40,
            reply_bytes: 50,
        });
        let want = Traffic {
            packets: 11,
            bytes: 22,
            new_flows: 33,
            reply_packets: 44,
            reply_bytes: 55,
        };
        assert_eq!(t, want);
    }
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<Service>() == 24);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<Flow>() == 24);
const _: () = assert!(core::mem::size_of::<ReverseFlow>() == 40);
const _: () = assert!(core::mem::size_of::<NextHop>() == 24);
const _: () = assert!(core::mem::size_of::<Transient>() == 32);
const _: () = assert!(core::mem::size_of::<Settings>() == 8);
const _: () = assert!(core::mem::size_of::<Traffic>() == 40);
const _: () = assert!(counter::NAMES.len() as u32 <= counter::COUNT);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], padding is explicit, and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ReverseFlow {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for Transient {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for firewall::RuleKey {}
    unsafe impl aya::Pod for firewall::Firewall {}
    unsafe impl aya::Pod for firewall::TokenBucket {}
}
