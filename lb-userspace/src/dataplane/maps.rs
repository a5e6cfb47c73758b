//! The data path's maps, each taken out of the loaded object once, under its
//! type. Nothing else in the daemon names a map: the names are
//! `lb_common::maps`', which the program's own definitions are checked
//! against at compile time.

use std::{
    collections::HashSet,
    os::fd::{AsFd, OwnedFd},
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    Ebpf,
};
use lb_common::{
    firewall::{Firewall, RuleKey},
    maps as names, Backend, BackendKey, Flow, FlowKey, NextHop, ReverseFlow, Service, ServiceKey,
    Settings, Traffic, Transient, MAX_BACKENDS,
};

use super::{plan::Found, DataplaneError, Result};
use crate::config::Cidr;

/// Typed handles on every map the daemon reads or writes. (The program's
/// own scratch space and rate buckets stay in the object: the daemon only
/// pins them.)
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub services_by_id: Array<MapData, Service>,
    pub backends: Array<MapData, Backend>,
    pub rings: Array<MapData, u32>,
    pub maglev: Array<MapData, u32>,
    pub backend_vips: HashMap<MapData, BackendKey, ReverseFlow>,
    pub rr_position: Array<MapData, u64>,
    pub conntrack: HashMap<MapData, FlowKey, Flow>,
    pub reverse: HashMap<MapData, FlowKey, ReverseFlow>,
    pub transient: HashMap<MapData, FlowKey, Transient>,
    pub active: PerCpuArray<MapData, i64>,
    pub active_reclaimed: Array<MapData, u64>,
    pub counters: PerCpuArray<MapData, u64>,
    pub service_traffic: PerCpuArray<MapData, Traffic>,
    pub backend_traffic: PerCpuArray<MapData, Traffic>,
    pub vips: HashMap<MapData, [u8; 4], u32>,
    pub firewall: Array<MapData, Firewall>,
    pub fw_deny: LpmTrie<MapData, [u8; 4], u32>,
    pub fw_rules: LpmTrie<MapData, RuleKey, u32>,
    pub ifaces: Array<MapData, u32>,
    pub prefilter: Array<MapData, u32>,
    pub hops: Array<MapData, NextHop>,
    pub hop_generation: Array<MapData, u32>,
    pub settings: Array<MapData, Settings>,
    /// Descriptors of the connection and reply tables kept aside, from
    /// which a walk off the daemon's loop gets its own.
    conntrack_fd: OwnedFd,
    reverse_fd: OwnedFd,
    nr_cpus: usize,
}

/// Which flow table a walk reads.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Conntrack,
    Reverse,
}

impl Maps {
    /// Takes every map out of the loaded object.
    pub fn take(ebpf: &mut Ebpf, nr_cpus: usize) -> Result<Maps> {
        let conntrack_fd = table_fd(ebpf, names::CONNTRACK)?;
        let reverse_fd = table_fd(ebpf, names::REVERSE)?;
        Ok(Maps {
            services: take(ebpf, names::SERVICES)?,
            services_by_id: take(ebpf, names::SERVICES_BY_ID)?,
            backends: take(ebpf, names::BACKENDS)?,
            rings: take(ebpf, names::RINGS)?,
            maglev: take(ebpf, names::MAGLEV)?,
            backend_vips: take(ebpf, names::BACKEND_VIPS)?,
            rr_position: take(ebpf, names::RR_POSITION)?,
            conntrack: take(ebpf, names::CONNTRACK)?,
            reverse: take(ebpf, names::REVERSE)?,
            transient: take(ebpf, names::TRANSIENT)?,
            active: take(ebpf, names::ACTIVE)?,
            active_reclaimed: take(ebpf, names::ACTIVE_RECLAIMED)?,
            counters: take(ebpf, names::COUNTERS)?,
            service_traffic: take(ebpf, names::SERVICE_TRAFFIC)?,
            backend_traffic: take(ebpf, names::BACKEND_TRAFFIC)?,
            vips: take(ebpf, names::VIPS)?,
            firewall: take(ebpf, names::FIREWALL)?,
            fw_deny: take(ebpf, names::FW_DENY)?,
            fw_rules: take(ebpf, names::FW_RULES)?,
            ifaces: take(ebpf, names::IFACES)?,
            prefilter: take(ebpf, names::PREFILTER)?,
            hops: take(ebpf, names::HOPS)?,
            hop_generation: take(ebpf, names::HOP_GENERATION)?,
            settings: take(ebpf, names::SETTINGS)?,
            conntrack_fd,
            reverse_fd,
            nr_cpus,
        })
    }

    /// A descriptor of its own for a flow table, for a walk off the
    /// daemon's loop.
    pub fn walk_handle(&self, table: Table) -> Result<MapData> {
        let (name, fd) = match table {
            Table::Conntrack => (names::CONNTRACK, &self.conntrack_fd),
            Table::Reverse => (names::REVERSE, &self.reverse_fd),
        };
        let fd = fd.try_clone().map_err(DataplaneError::Dup)?;
        MapData::from_fd(fd).map_err(map_err(name))
    }

    pub fn nr_cpus(&self) -> usize {
        self.nr_cpus
    }

    /// `v` as a per-CPU value: on the first CPU, zero on the others.
    pub fn on_first_cpu<T: aya::Pod + Default>(&self, v: T) -> Result<PerCpuValues<T>> {
        let mut all = vec![T::default(); self.nr_cpus.max(1)];
        all[0] = v;
        PerCpuValues::try_from(all).map_err(|e| DataplaneError::Cpus(e.to_string()))
    }

    /// A per-CPU traffic slot, summed over CPUs.
    pub fn traffic(
        map: &PerCpuArray<MapData, Traffic>,
        id: u32,
        name: &'static str,
    ) -> Result<Traffic> {
        let mut total = Traffic::default();
        for t in map.get(&id, 0).map_err(map_err(name))?.iter() {
            total.add(t);
        }
        Ok(total)
    }

    /// What the maps hold now, for the planner (an earlier daemon's pins,
    /// or nothing).
    pub fn found(&self) -> Result<Found> {
        let backends: Vec<Backend> = (0..MAX_BACKENDS)
            .map(|i| self.backends.get(&i, 0).unwrap_or_default())
            .collect();
        let mut with_traffic = HashSet::new();
        for bid in 0..MAX_BACKENDS {
            if Maps::traffic(&self.backend_traffic, bid, names::BACKEND_TRAFFIC)?
                != Traffic::default()
            {
                with_traffic.insert(bid);
            }
        }
        let rules = self
            .fw_rules
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| {
                let d = k.data();
                let cidr = Cidr {
                    addr: d.addr.into(),
                    len: (k.prefix_len() - 32) as u8,
                };
                ((u32::from_be_bytes(d.service), cidr), v)
            })
            .collect();
        Ok(Found {
            services: self.services.iter().filter_map(|r| r.ok()).collect(),
            backends,
            with_traffic,
            prefilter: self.prefilter.iter().map(|r| r.unwrap_or(0)).collect(),
            vips: self.vips.keys().filter_map(|k| k.ok()).collect(),
            rules,
            backend_vips: self.backend_vips.keys().filter_map(|k| k.ok()).collect(),
        })
    }
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    M::try_from(m).map_err(map_err(name))
}

/// A second descriptor of the hash table `name`.
fn table_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd> {
    match ebpf.map(name) {
        Some(Map::LruHashMap(m)) | Some(Map::HashMap(m)) => m
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(DataplaneError::Dup),
        _ => Err(DataplaneError::MissingMap(name)),
    }
}

pub fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}
