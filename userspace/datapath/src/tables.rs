//! Typed views of the pinned maps: what `boxd bpf vms|routes|domains|nodes|stats` print
//! and what the reconciler diffs against.

use crate::common::{
    self, Config, DomainEntry, FlowKey, NodeEntry, RateLimit, Steer, VmCounters, VmEntry, maps,
    stat,
};
use crate::netdev;
use crate::{NodeConfig, PinDir, Result, bpf_err, chain, key_addr, open_map};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, xdp::DevMapHash};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A pinned hash map, typed.
pub(crate) fn hash<K: aya::Pod, V: aya::Pod>(
    pin: &PinDir,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    HashMap::try_from(open_map(pin, name)?).map_err(|e| bpf_err(format!("map {name}"))(chain(&e)))
}

pub(crate) fn devmap(pin: &PinDir) -> Result<DevMapHash<MapData>> {
    DevMapHash::try_from(open_map(pin, maps::DEVMAP)?)
        .map_err(|e| bpf_err("map BOXD_DEVMAP")(chain(&e)))
}

pub(crate) fn vm_stats(pin: &PinDir) -> Result<PerCpuArray<MapData, VmCounters>> {
    PerCpuArray::try_from(open_map(pin, maps::VM_STATS)?)
        .map_err(|e| bpf_err("map BOXD_VM_STATS")(chain(&e)))
}

/// Every (key, value) of a hash map; bounded by the map's own size.
pub(crate) fn entries<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for kv in m.iter() {
        match kv {
            Ok(kv) => out.push(kv),
            // An entry deleted while we iterate: skip it.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(bpf_err("iterating a map")(chain(&e))),
        }
    }
    Ok(out)
}

pub fn read_config(pin: &PinDir) -> Result<(NodeConfig, [u8; 6])> {
    let m: Array<MapData, Config> = Array::try_from(open_map(pin, maps::CONFIG)?)
        .map_err(|e| bpf_err("map BOXD_CONFIG")(chain(&e)))?;
    let c = m
        .get(&0, 0)
        .map_err(|e| bpf_err("reading the config")(chain(&e)))?;
    Ok((NodeConfig::from_map(&c), c.uplink_mac))
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VmRow {
    pub public: Ipv4Addr,
    pub vm_id: u32,
    pub node: u32,
    pub state: &'static str,
    /// The host port on this node (None when the VM runs on another node).
    pub port: Option<String>,
    pub vm_mac: String,
    /// Summed over CPUs.
    pub counters: VmCounters,
    pub rate_bytes_per_s: u64,
    pub burst_bytes: u64,
}

/// VMs by public address, with counters summed over CPUs.
pub fn vms(pin: &PinDir) -> Result<Vec<VmRow>> {
    pin.require_up()?;
    let vms: HashMap<_, u32, VmEntry> = hash(pin, maps::VMS)?;
    let rates: HashMap<_, u32, RateLimit> = hash(pin, maps::RATE)?;
    let stats = vm_stats(pin)?;
    let mut rows = Vec::new();
    for (k, v) in entries(&vms)? {
        let mut c = VmCounters::default();
        if v.slot != 0
            && let Ok(per_cpu) = stats.get(&v.slot, 0)
        {
            for pc in per_cpu.iter() {
                c.add(pc);
            }
        }
        let rate = rates.get(&k, 0).unwrap_or_default();
        rows.push(VmRow {
            public: key_addr(k),
            vm_id: v.vm_id,
            node: v.node,
            state: common::vm_state_name(v.state),
            port: (v.port_ifindex != 0).then(|| netdev::name_or_index(v.port_ifindex)),
            vm_mac: netdev::fmt_mac(&v.vm_mac),
            counters: c,
            rate_bytes_per_s: rate.bytes_per_s,
            burst_bytes: rate.burst,
        });
    }
    rows.sort_by_key(|r| r.public);
    Ok(rows)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteRow {
    pub public: Ipv4Addr,
    /// "local" (DNAT to the VM's port here) or "encap" (IPIP to the node running it).
    pub via: &'static str,
    pub node: u32,
    pub port: Option<String>,
    pub node_addr: Option<Ipv4Addr>,
    /// Problems the router would hit (a port missing from the device map, an unknown node).
    pub problem: Option<String>,
}

pub fn routes(pin: &PinDir) -> Result<Vec<RouteRow>> {
    pin.require_up()?;
    let (cfg, _) = read_config(pin)?;
    let vms: HashMap<_, u32, VmEntry> = hash(pin, maps::VMS)?;
    let nodes: HashMap<_, u32, NodeEntry> = hash(pin, maps::NODES)?;
    let dev = devmap(pin)?;
    let mut rows = Vec::new();
    for (k, v) in entries(&vms)? {
        let row = if v.node == cfg.node_id {
            let problem = if v.port_ifindex == 0 {
                Some("no port".to_string())
            } else if dev.get(v.port_ifindex, 0).is_err() {
                Some("port missing from the device map".to_string())
            } else {
                None
            };
            RouteRow {
                public: key_addr(k),
                via: "local",
                node: v.node,
                port: Some(netdev::name_or_index(v.port_ifindex)),
                node_addr: None,
                problem,
            }
        } else {
            let n = nodes.get(&v.node, 0).ok();
            RouteRow {
                public: key_addr(k),
                via: "encap",
                node: v.node,
                port: None,
                node_addr: n.map(|n| key_addr(n.addr)),
                problem: n.is_none().then(|| format!("node {} unknown", v.node)),
            }
        };
        rows.push(row);
    }
    rows.sort_by_key(|r| r.public);
    Ok(rows)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DomainRow {
    pub name: String,
    pub public: Ipv4Addr,
    /// The key in the map: FNV-1a of the lowercase name, as the SNI parser computes it.
    pub hash: String,
}

pub fn domains(pin: &PinDir) -> Result<Vec<DomainRow>> {
    pin.require_up()?;
    let m: HashMap<_, u64, DomainEntry> = hash(pin, maps::DOMAINS)?;
    let mut rows: Vec<_> = entries(&m)?
        .into_iter()
        .map(|(k, d)| DomainRow {
            name: String::from_utf8_lossy(&d.name[..(d.name_len as usize).min(common::NAME_MAX)])
                .into_owned(),
            public: key_addr(d.public_addr),
            hash: format!("{k:016x}"),
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeRow {
    pub id: u32,
    pub addr: Ipv4Addr,
    /// This node.
    pub local: bool,
}

pub fn nodes(pin: &PinDir) -> Result<Vec<NodeRow>> {
    pin.require_up()?;
    let (cfg, _) = read_config(pin)?;
    let m: HashMap<_, u32, NodeEntry> = hash(pin, maps::NODES)?;
    let mut rows: Vec<_> = entries(&m)?
        .into_iter()
        .map(|(id, n)| NodeRow {
            id,
            addr: key_addr(n.addr),
            local: id == cfg.node_id,
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn proxies(pin: &PinDir) -> Result<Vec<Ipv4Addr>> {
    pin.require_up()?;
    let m: HashMap<_, u32, u32> = hash(pin, maps::PROXIES)?;
    let mut v: Vec<_> = entries(&m)?.into_iter().map(|(k, _)| key_addr(k)).collect();
    v.sort();
    Ok(v)
}

/// Global counters by name, summed over CPUs.
pub fn stats(pin: &PinDir) -> Result<BTreeMap<&'static str, u64>> {
    pin.require_up()?;
    let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open_map(pin, maps::STATS)?)
        .map_err(|e| bpf_err("map BOXD_STATS")(chain(&e)))?;
    let mut out = BTreeMap::new();
    for (i, name) in stat::NAMES.iter().enumerate() {
        let v = m
            .get(&(i as u32), 0)
            .map_err(|e| bpf_err("reading BOXD_STATS")(chain(&e)))?;
        out.insert(*name, v.iter().sum());
    }
    Ok(out)
}

/// The steering decision the SNI parser recorded for a connection, if any.
pub fn steer(
    pin: &PinDir,
    client: std::net::SocketAddrV4,
    server: std::net::SocketAddrV4,
) -> Result<Option<Steer>> {
    let m: HashMap<_, FlowKey, Steer> = {
        let map = open_map(pin, maps::STEER)?;
        HashMap::try_from(map).map_err(|e| bpf_err("map BOXD_STEER")(chain(&e)))?
    };
    let key = FlowKey {
        saddr: crate::addr_key(*client.ip()),
        daddr: crate::addr_key(*server.ip()),
        sport: client.port().to_be(),
        dport: server.port().to_be(),
    };
    match m.get(&key, 0) {
        Ok(s) => Ok(Some(s)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(bpf_err("reading BOXD_STEER")(chain(&e))),
    }
}
