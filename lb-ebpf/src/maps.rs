//! Every map of the data path, in one place. Each is named by its static
//! (`#[map]`), as `lb_common::maps` names it for the daemon.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    counter,
    firewall::{
        Firewall, RuleKey, TokenBucket, MAX_DENY_RULES, MAX_SERVICE_RULES, SOURCE_RATE_SIZE,
    },
    Backend, BackendKey, Flow, FlowKey, NextHop, ReverseFlow, Service, ServiceKey, Settings,
    Traffic, Transient, CONNTRACK_SIZE, MAGLEV_MAP_SIZE, MAX_BACKENDS, MAX_IFINDEX, MAX_SERVICES,
    PREFILTER_WORDS, RING_MAP_SIZE, TRANSIENT_SIZE,
};

/// Hash maps the daemon updates while packets read them are not
/// preallocated: a replaced element is then freed after an RCU grace period.
/// Preallocated, the kernel hands a replaced element to the very next update
/// (its per-CPU spare), so a packet still holding the old pointer could read
/// another service's value halfway through.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// (VIP, port, protocol) -> service. Replaced whole, so a packet sees one version.
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(MAX_SERVICES, NO_PREALLOC);

/// Service id -> the same value: what an established flow needs of its
/// service, read by the id its flow entry holds (an array read, no hashing).
#[map]
pub static SERVICES_BY_ID: Array<Service> = Array::with_max_entries(MAX_SERVICES, 0);

/// Two bitmaps (`lb_common::prefilter_bit`): VIP addresses, then backend
/// addresses. A packet whose destination is no VIP and whose source is no
/// backend is passed before any hash lookup.
#[map]
pub static PREFILTER: Array<u32> = Array::with_max_entries(2 * PREFILTER_WORDS, 0);

/// Backend id -> its next hop, kept by the daemon (see `lb_common::NextHop`).
#[map]
pub static HOPS: Array<NextHop> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The current next-hop generation (one entry): a cached hop of another
/// generation is stale.
#[map]
pub static HOP_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Backend id -> address and port.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Scheduling rings of backend ids, two halves per service (see `lb_common::RING_MAP_SIZE`).
#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(RING_MAP_SIZE, 0);

/// Maglev lookup tables of backend ids, two halves per Maglev service.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_MAP_SIZE, 0);

/// A backend's address, port and protocol -> the VIP side of its service, for
/// backends that serve one VIP only: any balancer instance can then rewrite any
/// reply, whether or not it saw the flow's first packet (active-active).
#[map]
pub static BACKEND_VIPS: HashMap<BackendKey, ReverseFlow> =
    HashMap::with_max_entries(MAX_BACKENDS, NO_PREALLOC);

/// Service id -> position in its ring, advanced atomically by every new flow on any CPU.
#[map]
pub static RR_POSITION: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);

/// Client flow -> backend: keeps every packet of a flow on the backend it started on.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(CONNTRACK_SIZE, 0);

/// Backend-to-client flow -> VIP and port to put back as the source of replies.
#[map]
pub static REVERSE: LruHashMap<FlowKey, ReverseFlow> =
    LruHashMap::with_max_entries(CONNTRACK_SIZE, 0);

/// Half-open and closed flows, by client side and by reply side (see
/// `lb_common::Transient`).
#[map]
pub static TRANSIENT: LruHashMap<FlowKey, Transient> =
    LruHashMap::with_max_entries(TRANSIENT_SIZE, 0);

/// Per-CPU count of established flows per backend id: +1 when a flow
/// enters the connection table, -1 when it leaves it (the daemon sums the
/// CPUs: O(backends), whatever the number of flows).
#[map]
pub static ACTIVE: PerCpuArray<i64> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-CPU scratch memory for the subprograms off the fast path (the FIB
/// lookup's parameters, table values being written), one slot each: the
/// verifier counts a call chain's stack frames together against 512 bytes,
/// and the fast path's frame takes most of them.
#[map]
pub static SCRATCH: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

/// `SCRATCH` slots.
pub const SCRATCH_FIB: u32 = 0;
pub const SCRATCH_VALUE: u32 = 1;
pub const SCRATCH_PLAN: u32 = 2;
pub const SCRATCH_SLOTS: u32 = 3;

/// Per backend id: established flows the daemon reclaimed (UDP flows idle
/// past their timeout, deleted by its sweep), to subtract from `ACTIVE`.
/// Written by the daemon only; the program never reads it.
#[map]
pub static ACTIVE_RECLAIMED: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The data path's settings (one entry).
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-CPU packet counts by outcome (`lb_common::counter`); forwarded
/// packets are counted in `BACKEND_TRAFFIC` instead.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per service id: the traffic of its backends since removed, folded in by
/// the daemon (the data path counts per backend only).
#[map]
pub static SERVICE_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per-CPU traffic per backend id.
#[map]
pub static BACKEND_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Every VIP address (value unused): traffic to a VIP that no service takes
/// is the firewall's to drop, and echo requests to it are answered.
#[map]
pub static VIPS: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The firewall's settings (one entry).
#[map]
pub static FIREWALL: Array<Firewall> = Array::with_max_entries(1, 0);

/// The global deny list: source CIDRs whose every packet is dropped.
#[map]
pub static FW_DENY: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_DENY_RULES, 0);

/// Per-service source rules: (service id, source CIDR) -> `RULE_ALLOW` or `RULE_DENY`.
#[map]
pub static FW_RULES: LpmTrie<RuleKey, u32> = LpmTrie::with_max_entries(MAX_SERVICE_RULES, 0);

/// New-flow credit of each recently seen source (SYN-flood guard).
#[map]
pub static SOURCE_RATE: LruHashMap<[u8; 4], TokenBucket> =
    LruHashMap::with_max_entries(SOURCE_RATE_SIZE, 0);

/// This CPU's share of the global new-flow cap.
#[map]
pub static GLOBAL_RATE: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(1, 0);

/// Interface index -> `IFACE_F_*` flags, written by the daemon (how the TC
/// hook sends out of each interface).
#[map]
pub static IFACES: Array<u32> = Array::with_max_entries(MAX_IFINDEX, 0);

/// Every map here is named as `lb_common::maps` names it (the daemon opens
/// and pins them by those names), and every name there is a map here.
macro_rules! named_as_in_common {
    ($($m:ident),* $(,)?) => {
        const _: () = {
            $(assert!(lb_common::maps::same(stringify!($m), lb_common::maps::$m));)*
            assert!([$(stringify!($m)),*].len() == lb_common::maps::ALL.len());
        };
        /// Each name above is a map of this file.
        #[allow(dead_code)]
        fn defined() {
            $(let _ = &$m;)*
        }
    };
}

named_as_in_common!(
    SERVICES,
    SERVICES_BY_ID,
    BACKENDS,
    RINGS,
    MAGLEV,
    BACKEND_VIPS,
    RR_POSITION,
    CONNTRACK,
    REVERSE,
    TRANSIENT,
    ACTIVE,
    ACTIVE_RECLAIMED,
    COUNTERS,
    SERVICE_TRAFFIC,
    BACKEND_TRAFFIC,
    VIPS,
    FIREWALL,
    FW_DENY,
    FW_RULES,
    SOURCE_RATE,
    GLOBAL_RATE,
    IFACES,
    PREFILTER,
    HOPS,
    HOP_GENERATION,
    SETTINGS,
    SCRATCH,
);
