//! The names of the data path's maps: `lb-ebpf` defines each under its name
//! (and checks at compile time that the name is the one here), the daemon
//! opens and pins each by it.

macro_rules! names {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        $($(#[$doc])* pub const $name: &str = stringify!($name);)*
        /// Every map of the program, each pinned under its name.
        pub const ALL: &[&str] = &[$($name),*];
    };
}

names! {
    /// (VIP, port, protocol) -> service.
    SERVICES,
    /// Service id -> service (what an established flow needs of it).
    SERVICES_BY_ID,
    /// Backend id -> backend.
    BACKENDS,
    /// Round-robin rings, two halves per service.
    RINGS,
    /// Maglev lookup tables, two halves per Maglev service.
    MAGLEV,
    /// Backend address -> its one VIP (stateless replies).
    BACKEND_VIPS,
    /// Per service: the round-robin position.
    RR_POSITION,
    /// Established flows, keyed by the client side.
    CONNTRACK,
    /// Established flows, keyed by the backend side (replies).
    REVERSE,
    /// Half-open and closed flows.
    TRANSIENT,
    /// Per backend, per CPU: established flows entered minus left.
    ACTIVE,
    /// Per backend: flows the daemon's UDP sweep reclaimed.
    ACTIVE_RECLAIMED,
    /// Outcome counters, per CPU.
    COUNTERS,
    /// Per service traffic folded in from removed backends, per CPU.
    SERVICE_TRAFFIC,
    /// Per backend traffic, per CPU.
    BACKEND_TRAFFIC,
    /// The VIPs the firewall guards.
    VIPS,
    /// The firewall's settings.
    FIREWALL,
    /// The global deny list.
    FW_DENY,
    /// Per service source rules.
    FW_RULES,
    /// Per source new-flow token buckets.
    SOURCE_RATE,
    /// The global new-flow token bucket, per CPU.
    GLOBAL_RATE,
    /// Per interface index: how the TC hook sends out of it.
    IFACES,
    /// Bitmaps of VIPs and backend addresses.
    PREFILTER,
    /// Per backend: its cached next hop.
    HOPS,
    /// The generation cached next hops must carry to be used.
    HOP_GENERATION,
    /// Settings of the data path (closed flows' linger).
    SETTINGS,
    /// Per CPU scratch space of the data path's subprograms.
    SCRATCH,
}

/// Whether two names are equal, at compile time (`lb-ebpf` checks its map
/// definitions with it).
pub const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_compares_whole_names() {
        assert!(same("CONNTRACK", "CONNTRACK"));
        assert!(same("", ""));
        assert!(!same("CONNTRACK", "CONNTRACX"), "last byte differs");
        assert!(!same("XONNTRACK", "CONNTRACK"), "first byte differs");
        assert!(!same("HOPS", "HOPS_"), "a prefix is not the name");
        assert!(!same("HOPS_", "HOPS"));
    }

    #[test]
    fn every_map_has_its_own_name() {
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[..i] {
                assert!(!same(a, b), "{a} twice");
            }
        }
    }
}
