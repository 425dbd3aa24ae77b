//! The reconciler: given the desired set of VMs, nodes, domains and proxy addresses,
//! compute what the maps (and the VM ports' TC attachments) should hold and apply the
//! difference. It is idempotent (a second apply changes nothing) and restartable
//! (it reads the current state from the maps, not from memory).
//!
//! The control plane calls [`apply`] with what the replicated state says; operators and
//! tests can do the same with `boxd bpf apply FILE`.

use crate::common::{
    self, DomainEntry, NodeEntry, PortEntry, RateLimit, VmCounters, VmEntry, maps, sni,
};
use crate::tables::{devmap, entries, hash, read_config, vm_stats};
use crate::{DpError, NodeConfig, PinDir, Result, addr_key, bpf_err, chain, key_addr, netdev};
use aya::maps::{HashMap, MapData, PerCpuValues};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The MAC every guest has on its link (DESIGN.md: every VM sees the same link).
pub const DEFAULT_VM_MAC: &str = "06:b0:c5:00:00:02";

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    #[serde(default)]
    pub vms: Vec<VmSpec>,
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub domains: Vec<DomainSpec>,
    /// Addresses the HTTPS proxy listens on: TLS to them goes through the SNI parser.
    #[serde(default)]
    pub proxies: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub id: u32,
    pub public: Ipv4Addr,
    /// The node that runs it (default: this node).
    #[serde(default)]
    pub node: Option<u32>,
    /// running, paused, suspended or stopped.
    pub state: String,
    /// Its host port (TAP) when it runs on this node.
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub vm_mac: Option<String>,
    /// Egress limit in bytes per second (absent or 0: none).
    #[serde(default)]
    pub rate_bytes_per_s: Option<u64>,
    #[serde(default)]
    pub burst_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: u32,
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    pub name: String,
    /// The public address of the VM it belongs to.
    pub public: Ipv4Addr,
}

pub fn parse_state(s: &str) -> Result<u8> {
    Ok(match s {
        "running" => common::VM_RUNNING,
        "paused" => common::VM_PAUSED,
        "suspended" => common::VM_SUSPENDED,
        "stopped" => common::VM_STOPPED,
        _ => {
            return Err(DpError::Invalid(format!(
                "VM state {s:?} is not one of running, paused, suspended, stopped"
            )));
        }
    })
}

/// A DNS name the proxy can serve: 1..=253 bytes, labels of 1..=63 letters, digits and
/// hyphens (not at a label's ends), at least two labels. Returned lowercased.
pub fn check_domain(name: &str) -> Result<String> {
    let bad = |why: &str| Err(DpError::Invalid(format!("domain {name:?}: {why}")));
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() || lower.len() > common::NAME_MAX {
        return bad("must be 1 to 253 bytes");
    }
    let labels: Vec<&str> = lower.split('.').collect();
    if labels.len() < 2 {
        return bad("needs at least two labels (name.zone)");
    }
    for l in labels {
        if l.is_empty() || l.len() > 63 {
            return bad("every label must be 1 to 63 bytes");
        }
        if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || l.starts_with('-')
            || l.ends_with('-')
        {
            return bad("labels are letters, digits and inner hyphens");
        }
    }
    Ok(lower)
}

/// The maps' content as computed from a desired state: validated, resolved.
struct Plan {
    vms: BTreeMap<u32, VmEntry>,
    rates: BTreeMap<u32, (u64, u64)>,
    ports: BTreeMap<u32, PortEntry>,
    nodes: BTreeMap<u32, NodeEntry>,
    domains: BTreeMap<u64, DomainEntry>,
    proxies: BTreeSet<u32>,
}

fn plan(d: &Desired, cfg: &NodeConfig) -> Result<Plan> {
    let bad = |m: String| Err(DpError::Invalid(m));
    if d.vms.len() > common::MAX_VMS as usize {
        return bad(format!(
            "{} VMs is more than the data path holds ({})",
            d.vms.len(),
            common::MAX_VMS
        ));
    }
    if d.domains.len() > common::MAX_DOMAINS as usize {
        return bad(format!(
            "{} domains is more than the data path holds ({})",
            d.domains.len(),
            common::MAX_DOMAINS
        ));
    }
    if d.nodes.len() > common::MAX_NODES as usize {
        return bad(format!(
            "{} nodes is more than the data path holds ({})",
            d.nodes.len(),
            common::MAX_NODES
        ));
    }
    if d.proxies.len() > common::MAX_PROXIES as usize {
        return bad(format!(
            "{} proxy addresses is more than the data path holds ({})",
            d.proxies.len(),
            common::MAX_PROXIES
        ));
    }
    let mut nodes = BTreeMap::new();
    for n in &d.nodes {
        if n.id == 0 {
            return bad("node id 0 is reserved".into());
        }
        if n.addr.is_unspecified() || n.addr.is_broadcast() || n.addr.is_multicast() {
            return bad(format!(
                "node {} address {} is not a unicast address",
                n.id, n.addr
            ));
        }
        if nodes
            .insert(
                n.id,
                NodeEntry {
                    addr: addr_key(n.addr),
                    ..Default::default()
                },
            )
            .is_some()
        {
            return bad(format!("node {} is listed twice", n.id));
        }
    }
    let mut vms = BTreeMap::new();
    let mut rates = BTreeMap::new();
    let mut ports = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for v in &d.vms {
        let what = format!("VM {} ({})", v.id, v.public);
        let p = v.public;
        if p.is_unspecified() || p.is_broadcast() || p.is_multicast() || p.is_loopback() {
            return bad(format!("{what}: {p} cannot be a VM's public address"));
        }
        if p == cfg.vm_addr || p == cfg.gw_addr {
            return bad(format!(
                "{what}: {p} is the link address every VM has, not a public one"
            ));
        }
        if !ids.insert(v.id) {
            return bad(format!("VM id {} is listed twice", v.id));
        }
        let state = parse_state(&v.state).map_err(|e| DpError::Invalid(format!("{what}: {e}")))?;
        let node = v.node.unwrap_or(cfg.node_id);
        let vm_mac = netdev::parse_mac(v.vm_mac.as_deref().unwrap_or(DEFAULT_VM_MAC))
            .map_err(|e| DpError::Invalid(format!("{what}: {e}")))?;
        if vm_mac[0] & 1 != 0 {
            return bad(format!("{what}: a VM MAC must be unicast"));
        }
        let mut entry = VmEntry {
            vm_id: v.id,
            node,
            state,
            vm_mac,
            ..Default::default()
        };
        if node == cfg.node_id {
            let Some(port) = &v.port else {
                return bad(format!(
                    "{what} runs on this node (node {node}) but has no \"port\" (its TAP)"
                ));
            };
            let ifindex = netdev::ifindex(port)
                .map_err(|e| DpError::Invalid(format!("{what}: port: {e}")))?;
            entry.port_ifindex = ifindex;
            entry.port_mac = netdev::mac(port)?;
            if ports
                .insert(
                    ifindex,
                    PortEntry {
                        public_addr: addr_key(p),
                        vm_id: v.id,
                        slot: 0,
                    },
                )
                .is_some()
            {
                return bad(format!("{what}: port {port} is already another VM's"));
            }
        } else {
            if !nodes.contains_key(&node) {
                return bad(format!(
                    "{what} runs on node {node}, which is not in \"nodes\""
                ));
            }
            if v.port.is_some() {
                return bad(format!(
                    "{what} runs on node {node}, not here, so it has no port here"
                ));
            }
        }
        if vms.insert(addr_key(p), entry).is_some() {
            return bad(format!("public address {p} is given to two VMs"));
        }
        let rate = v.rate_bytes_per_s.unwrap_or(0);
        if rate > 0 {
            let burst = v.burst_bytes.unwrap_or(rate.max(64 * 1024));
            if burst < 1514 {
                return bad(format!(
                    "{what}: burst_bytes {burst} is smaller than one full frame (1514)"
                ));
            }
            if rate > 1 << 40 {
                return bad(format!(
                    "{what}: rate {rate} bytes/s is absurd (more than 1 TiB/s)"
                ));
            }
            rates.insert(addr_key(p), (rate, burst));
        } else if v.burst_bytes.is_some() {
            return bad(format!("{what}: burst_bytes without rate_bytes_per_s"));
        }
    }
    let mut domains = BTreeMap::new();
    for dm in &d.domains {
        let name = check_domain(&dm.name)?;
        if !vms.contains_key(&addr_key(dm.public)) {
            return bad(format!(
                "domain {name} points at {}, which no VM has",
                dm.public
            ));
        }
        let mut e = DomainEntry {
            public_addr: addr_key(dm.public),
            name_len: name.len() as u32,
            ..Default::default()
        };
        e.name[..name.len()].copy_from_slice(name.as_bytes());
        if domains.insert(sni::name_hash(name.as_bytes()), e).is_some() {
            return bad(format!("domain {name} is listed twice"));
        }
    }
    let mut proxies = BTreeSet::new();
    for p in &d.proxies {
        if vms.contains_key(&addr_key(*p)) {
            return bad(format!("proxy address {p} is also a VM's public address"));
        }
        proxies.insert(addr_key(*p));
    }
    Ok(Plan {
        vms,
        rates,
        ports,
        nodes,
        domains,
        proxies,
    })
}

/// Gives every local VM a counter slot: the one it has (same address, same id), else
/// the lowest free one. Ports get their VM's slot.
fn assign_slots(pin: &PinDir, plan: &mut Plan) -> Result<()> {
    let m: HashMap<_, u32, VmEntry> = hash(pin, maps::VMS)?;
    let cur: BTreeMap<_, _> = entries(&m)?.into_iter().collect();
    let mut used = BTreeSet::new();
    for (k, v) in plan.vms.iter_mut() {
        if v.port_ifindex == 0 {
            continue;
        }
        if let Some(c) = cur.get(k)
            && c.vm_id == v.vm_id
            && c.slot != 0
            && used.insert(c.slot)
        {
            v.slot = c.slot;
        }
    }
    let mut next = 1u32;
    for v in plan.vms.values_mut() {
        if v.port_ifindex == 0 || v.slot != 0 {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        if next > common::MAX_LOCAL_VMS {
            return Err(DpError::Invalid(format!(
                "more than {} VMs on this node",
                common::MAX_LOCAL_VMS
            )));
        }
        v.slot = next;
        used.insert(next);
    }
    for p in plan.ports.values_mut() {
        if let Some(v) = plan.vms.get(&p.public_addr) {
            p.slot = v.slot;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub changes: Vec<Change>,
    pub unchanged: usize,
    /// Things that did not stop the apply but need a look (an unreachable node).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    /// "add", "update" or "remove".
    pub op: &'static str,
    /// "vm", "port", "node", "domain", "proxy", "rate".
    pub kind: &'static str,
    pub key: String,
}

/// Validates `d` completely, then applies the difference to the maps. A refused desired
/// state changes nothing.
pub fn apply(pin: &PinDir, d: &Desired) -> Result<Report> {
    pin.require_up()?;
    let (cfg, _) = read_config(pin)?;
    let mut plan = plan(d, &cfg)?;
    let mut warnings = Vec::new();
    // Other nodes' neighbours, for the router's encapsulation when the FIB has none.
    for (id, n) in plan.nodes.iter_mut() {
        if *id == cfg.node_id {
            continue;
        }
        match netdev::resolve_neighbour(key_addr(n.addr), std::time::Duration::from_secs(1)) {
            Ok((ifindex, dmac)) => {
                n.ifindex = ifindex;
                n.dmac = dmac;
                n.smac = netdev::mac(&netdev::name(ifindex)?)?;
            }
            // Not fatal: the FIB may resolve it later; until then encapsulated packets
            // to it wait for the kernel's neighbour entry.
            Err(e) => warnings.push(format!("node {id}: {e}")),
        }
    }
    assign_slots(pin, &mut plan)?;
    let mut rep = Report {
        warnings,
        ..Default::default()
    };
    let note = |rep: &mut Report, op, kind, key: String| rep.changes.push(Change { op, kind, key });

    // Nodes first: VMs on them are routed by them.
    let mut m_nodes: HashMap<_, u32, NodeEntry> = hash(pin, maps::NODES)?;
    let cur_nodes: BTreeMap<_, _> = entries(&m_nodes)?.into_iter().collect();
    for (id, n) in &plan.nodes {
        match cur_nodes.get(id) {
            Some(c) if c == n => rep.unchanged += 1,
            c => {
                m_nodes
                    .insert(id, n, 0)
                    .map_err(|e| bpf_err(format!("node {id}"))(chain(&e)))?;
                note(
                    &mut rep,
                    if c.is_some() { "update" } else { "add" },
                    "node",
                    id.to_string(),
                );
            }
        }
    }

    // Ports: device map entry and TC program before the VM entry routes to them.
    let mut m_ports: HashMap<_, u32, PortEntry> = hash(pin, maps::PORTS)?;
    let cur_ports: BTreeMap<_, _> = entries(&m_ports)?.into_iter().collect();
    let mut dev = devmap(pin)?;
    for (ifindex, p) in &plan.ports {
        let attached = crate::attach_port(pin, *ifindex)?;
        if dev.get(*ifindex, 0).is_err() {
            dev.insert(*ifindex, *ifindex, None, 0).map_err(|e| {
                bpf_err(format!("device map entry for ifindex {ifindex}"))(chain(&e))
            })?;
        }
        match cur_ports.get(ifindex) {
            Some(c) if c == p && !attached => rep.unchanged += 1,
            c => {
                m_ports
                    .insert(ifindex, p, 0)
                    .map_err(|e| bpf_err("port entry")(chain(&e)))?;
                note(
                    &mut rep,
                    if c.is_some() { "update" } else { "add" },
                    "port",
                    netdev::name_or_index(*ifindex),
                );
            }
        }
    }

    // VMs, their counters and rate limits.
    let mut m_vms: HashMap<_, u32, VmEntry> = hash(pin, maps::VMS)?;
    let cur_vms: BTreeMap<_, _> = entries(&m_vms)?.into_iter().collect();
    let mut stats = vm_stats(pin)?;
    let ncpus = aya::util::nr_cpus().map_err(|(w, e)| bpf_err(w)(e.to_string()))?;
    let mut m_rate: HashMap<_, u32, RateLimit> = hash(pin, maps::RATE)?;
    let cur_rate: BTreeMap<_, _> = entries(&m_rate)?.into_iter().collect();
    for (k, v) in &plan.vms {
        // A slot newly given to this VM starts from zero.
        let had = cur_vms
            .get(k)
            .is_some_and(|c| c.slot == v.slot && c.vm_id == v.vm_id);
        if v.slot != 0 && !had {
            let zero = PerCpuValues::try_from(vec![VmCounters::default(); ncpus])
                .map_err(|e| bpf_err("per-CPU counters")(e.to_string()))?;
            stats
                .set(v.slot, zero, 0)
                .map_err(|e| bpf_err("VM counters")(chain(&e)))?;
        }
        match (plan.rates.get(k), cur_rate.get(k)) {
            (Some(&(r, b)), Some(c)) if c.bytes_per_s == r && c.burst == b => {}
            (Some(&(r, b)), c) => {
                let e = RateLimit {
                    bytes_per_s: r,
                    burst: b,
                    tokens: b,
                    last_ns: 0,
                };
                m_rate
                    .insert(k, e, 0)
                    .map_err(|e| bpf_err("rate limit")(chain(&e)))?;
                note(
                    &mut rep,
                    if c.is_some() { "update" } else { "add" },
                    "rate",
                    key_addr(*k).to_string(),
                );
            }
            (None, Some(_)) => {
                let _ = m_rate.remove(k);
                note(&mut rep, "remove", "rate", key_addr(*k).to_string());
            }
            (None, None) => {}
        }
        match cur_vms.get(k) {
            Some(c) if c == v => rep.unchanged += 1,
            c => {
                m_vms
                    .insert(k, v, 0)
                    .map_err(|e| bpf_err(format!("VM {}", key_addr(*k)))(chain(&e)))?;
                note(
                    &mut rep,
                    if c.is_some() { "update" } else { "add" },
                    "vm",
                    key_addr(*k).to_string(),
                );
            }
        }
    }

    // Domains and proxies.
    let mut m_dom: HashMap<_, u64, DomainEntry> = hash(pin, maps::DOMAINS)?;
    let cur_dom: BTreeMap<_, _> = entries(&m_dom)?.into_iter().collect();
    for (h, e) in &plan.domains {
        let name = String::from_utf8_lossy(&e.name[..e.name_len as usize]).into_owned();
        match cur_dom.get(h) {
            Some(c) if c == e => rep.unchanged += 1,
            c => {
                m_dom
                    .insert(h, e, 0)
                    .map_err(|e| bpf_err(format!("domain {name}"))(chain(&e)))?;
                note(
                    &mut rep,
                    if c.is_some() { "update" } else { "add" },
                    "domain",
                    name,
                );
            }
        }
    }
    for (h, e) in &cur_dom {
        if !plan.domains.contains_key(h) {
            let _ = m_dom.remove(h);
            let name =
                String::from_utf8_lossy(&e.name[..(e.name_len as usize).min(common::NAME_MAX)])
                    .into_owned();
            note(&mut rep, "remove", "domain", name);
        }
    }
    let mut m_prox: HashMap<_, u32, u32> = hash(pin, maps::PROXIES)?;
    let cur_prox: BTreeSet<_> = entries(&m_prox)?.into_iter().map(|(k, _)| k).collect();
    for p in &plan.proxies {
        if cur_prox.contains(p) {
            rep.unchanged += 1;
        } else {
            m_prox
                .insert(p, 1, 0)
                .map_err(|e| bpf_err("proxy address")(chain(&e)))?;
            note(&mut rep, "add", "proxy", key_addr(*p).to_string());
        }
    }
    for p in cur_prox.difference(&plan.proxies) {
        let _ = m_prox.remove(p);
        note(&mut rep, "remove", "proxy", key_addr(*p).to_string());
    }

    // Removals: VMs, then their ports, then nodes nothing routes to any more.
    let mut m_wake: HashMap<_, u32, u64> = hash(pin, maps::WAKE_LAST)?;
    for k in cur_vms.keys() {
        if !plan.vms.contains_key(k) {
            let _ = m_vms.remove(k);
            let _ = m_rate.remove(k);
            let _ = m_wake.remove(k);
            note(&mut rep, "remove", "vm", key_addr(*k).to_string());
        }
    }
    let mut stale: BTreeSet<u32> = cur_ports.keys().copied().collect();
    stale.extend(crate::pinned_links(pin, "tc")?);
    for ifindex in stale {
        if !plan.ports.contains_key(&ifindex) {
            let _ = m_ports.remove(&ifindex);
            let _ = dev.remove(ifindex);
            crate::detach_port(pin, ifindex)?;
            note(&mut rep, "remove", "port", netdev::name_or_index(ifindex));
        }
    }
    for id in cur_nodes.keys() {
        if !plan.nodes.contains_key(id) {
            let _ = m_nodes.remove(id);
            note(&mut rep, "remove", "node", id.to_string());
        }
    }
    Ok(rep)
}

/// Sets one VM's state (the worker's fast path on pause, suspend and resume), leaving
/// everything else as it is.
pub fn set_state(pin: &PinDir, public: Ipv4Addr, state: &str) -> Result<bool> {
    pin.require_up()?;
    let state = parse_state(state)?;
    let mut m: HashMap<MapData, u32, VmEntry> = hash(pin, maps::VMS)?;
    let k = addr_key(public);
    let mut v = match m.get(&k, 0) {
        Ok(v) => v,
        Err(aya::maps::MapError::KeyNotFound) => {
            return Err(DpError::Invalid(format!(
                "no VM has public address {public} (see `boxd bpf vms`)"
            )));
        }
        Err(e) => return Err(bpf_err("reading BOXD_VMS")(chain(&e))),
    };
    if v.state == state {
        return Ok(false);
    }
    v.state = state;
    m.insert(k, v, 0)
        .map_err(|e| bpf_err("writing BOXD_VMS")(chain(&e)))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig::default()
    }

    fn vm(id: u32, public: [u8; 4], node: u32) -> VmSpec {
        VmSpec {
            id,
            public: Ipv4Addr::from(public),
            node: Some(node),
            state: "running".into(),
            port: None,
            vm_mac: None,
            rate_bytes_per_s: None,
            burst_bytes: None,
        }
    }

    #[test]
    fn refuses_bad_desired_states() {
        let node2 = NodeSpec {
            id: 2,
            addr: Ipv4Addr::new(10, 1, 0, 2),
        };
        let ok = Desired {
            vms: vec![vm(1, [203, 0, 113, 7], 2)],
            nodes: vec![node2.clone()],
            ..Default::default()
        };
        assert!(plan(&ok, &cfg()).is_ok());
        let cases: Vec<(Desired, &str)> = vec![
            (
                Desired {
                    vms: vec![vm(1, [203, 0, 113, 7], 3)],
                    ..ok.clone()
                },
                "not in \"nodes\"",
            ),
            (
                Desired {
                    vms: vec![vm(1, [203, 0, 113, 7], 2), vm(1, [203, 0, 113, 8], 2)],
                    ..ok.clone()
                },
                "listed twice",
            ),
            (
                Desired {
                    vms: vec![vm(1, [203, 0, 113, 7], 2), vm(2, [203, 0, 113, 7], 2)],
                    ..ok.clone()
                },
                "two VMs",
            ),
            (
                Desired {
                    vms: vec![vm(1, [10, 0, 0, 2], 2)],
                    ..ok.clone()
                },
                "link address",
            ),
            (
                Desired {
                    vms: vec![vm(1, [224, 0, 0, 1], 2)],
                    ..ok.clone()
                },
                "cannot be",
            ),
            (
                Desired {
                    vms: vec![VmSpec {
                        state: "asleep".into(),
                        ..vm(1, [203, 0, 113, 7], 2)
                    }],
                    ..ok.clone()
                },
                "not one of",
            ),
            (
                Desired {
                    vms: vec![vm(1, [203, 0, 113, 7], 1)],
                    ..ok.clone()
                },
                "no \"port\"",
            ),
            (
                Desired {
                    vms: vec![VmSpec {
                        rate_bytes_per_s: Some(1000),
                        burst_bytes: Some(100),
                        ..vm(1, [203, 0, 113, 7], 2)
                    }],
                    ..ok.clone()
                },
                "burst",
            ),
            (
                Desired {
                    vms: vec![VmSpec {
                        vm_mac: Some("01:00:00:00:00:01".into()),
                        ..vm(1, [203, 0, 113, 7], 2)
                    }],
                    ..ok.clone()
                },
                "unicast",
            ),
            (
                Desired {
                    domains: vec![DomainSpec {
                        name: "x.example".into(),
                        public: Ipv4Addr::new(203, 0, 113, 9),
                    }],
                    ..ok.clone()
                },
                "no VM has",
            ),
            (
                Desired {
                    domains: vec![DomainSpec {
                        name: "-bad.example".into(),
                        public: Ipv4Addr::new(203, 0, 113, 7),
                    }],
                    ..ok.clone()
                },
                "labels",
            ),
            (
                Desired {
                    domains: vec![DomainSpec {
                        name: "nodot".into(),
                        public: Ipv4Addr::new(203, 0, 113, 7),
                    }],
                    ..ok.clone()
                },
                "two labels",
            ),
            (
                Desired {
                    proxies: vec![Ipv4Addr::new(203, 0, 113, 7)],
                    ..ok.clone()
                },
                "also a VM",
            ),
            (
                Desired {
                    nodes: vec![node2.clone(), node2.clone()],
                    ..ok.clone()
                },
                "listed twice",
            ),
        ];
        for (d, want) in cases {
            let err = plan(&d, &cfg())
                .err()
                .unwrap_or_else(|| panic!("accepted {d:?}"))
                .to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }

    #[test]
    fn domains_are_lowercased_and_hashed_like_the_parser() {
        assert_eq!(
            check_domain("My-App.Boxd.Example").unwrap(),
            "my-app.boxd.example"
        );
        assert_eq!(
            sni::name_hash(b"my-app.boxd.example"),
            sni::name_hash(b"MY-APP.boxd.example")
        );
        assert!(check_domain(&format!("{}.example", "a".repeat(64))).is_err());
    }

    #[test]
    fn misspelt_fields_are_refused() {
        let e = serde_json::from_str::<Desired>(
            r#"{"vms":[{"id":1,"public":"203.0.113.7","state":"running","prot":"tap0"}]}"#,
        );
        assert!(e.is_err());
    }
}
