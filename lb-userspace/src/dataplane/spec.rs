//! What the maps should carry, as the reconciler computes it: services and
//! their backends, each with what the data path needs to know of it.

use std::net::Ipv4Addr;

use crate::config::{Protocol, SourceRules};

/// What the maps should say about one service: its address and its backends,
/// each with the ring weight it gets (0: no new flows) and whether its
/// established flows are dropped. The reconciler computes these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Maglev table size and hash seed; None: the round-robin ring.
    pub maglev: Option<(u32, u32)>,
    /// Refuse TCP connections with a reset while no backend can take them.
    pub reset_if_empty: bool,
    /// Which sources may reach it.
    pub rules: SourceRules,
    pub backends: Vec<BackendSpec>,
    /// UDP: how long a flow may idle before it is over.
    pub udp_idle: Option<std::time::Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Slots in the scheduling ring, or Maglev weight: 0 takes no new flows.
    pub ring_weight: u32,
    pub drop_flows: bool,
    /// Answer its established TCP flows' packets with resets.
    pub reset_flows: bool,
}
