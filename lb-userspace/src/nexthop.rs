//! Placeholder: replaced by the rtnetlink watcher.
use std::net::Ipv4Addr;

/// Where a backend's packets leave, as the data path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u32,
}

#[derive(Debug)]
pub enum Event {
    Invalidate,
    Hops(Vec<(u32, Option<Hop>)>),
}

pub fn _unused(_: Ipv4Addr) {}
