//! The data-path reconciler: the eBPF maps this node should hold, computed from the
//! replicated state, applied by diff (`boxd_datapath::desired::apply`).

use boxd_control::reconcile::Reconciler;
use boxd_control::state::StateMachine;
use boxd_control::types::{Machine, MachineState, NodeId, NodeRow, Query, QueryReply};
use boxd_datapath::PinDir;
use boxd_datapath::desired::{Desired, DomainSpec, NodeSpec, VmSpec};
use std::net::Ipv4Addr;

/// The host port of machine `id` on the node that runs it (the worker creates it).
pub fn port_name(id: u64) -> String {
    format!("bx{id}")
}

pub struct BpfMaps {
    pub pin: PinDir,
}

/// The desired data-path view of node `me`. Local machines appear once their port
/// exists (until then there is nothing to deliver to); other nodes' machines are routed
/// to their node.
pub fn desired(
    machines: &[Machine],
    nodes: &[NodeRow],
    proxies: &[Ipv4Addr],
    me: NodeId,
    port_exists: impl Fn(&str) -> bool,
) -> Desired {
    let mut d = Desired {
        proxies: proxies.to_vec(),
        ..Default::default()
    };
    for n in nodes.iter().filter(|n| n.id != me) {
        let ip = n
            .addr
            .rsplit_once(':')
            .map_or(n.addr.as_str(), |(ip, _)| ip);
        if let Ok(addr) = ip.parse() {
            d.nodes.push(NodeSpec {
                id: n.id as u32,
                addr,
            });
        }
    }
    for m in machines {
        let Ok(public) = m.ipv4.parse::<Ipv4Addr>() else {
            continue;
        };
        let state = match m.state {
            MachineState::Running => "running",
            MachineState::Paused => "paused",
            MachineState::Suspended => "suspended",
            MachineState::Creating | MachineState::Stopped => "stopped",
        };
        let port = (m.node == me).then(|| port_name(m.id));
        if let Some(p) = &port
            && !port_exists(p)
        {
            continue;
        }
        if m.node != me && !d.nodes.iter().any(|n| u64::from(n.id) == m.node) {
            continue;
        }
        d.vms.push(VmSpec {
            id: m.id as u32,
            public,
            node: Some(m.node as u32),
            state: state.into(),
            port,
            vm_mac: None,
            rate_bytes_per_s: None,
            burst_bytes: None,
        });
        if let Some(name) = &m.domain {
            d.domains.push(DomainSpec {
                name: name.clone(),
                public,
            });
        }
    }
    d
}

impl Reconciler for BpfMaps {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn reconcile(&mut self, state: &StateMachine, me: NodeId) -> Result<usize, String> {
        if !self.pin.is_up() {
            return Err(format!(
                "the data path is not up at {} (`boxd bpf up`)",
                self.pin.0.display()
            ));
        }
        let q = |q: Query| {
            state
                .query(&q)
                .map_err(|e| format!("reading the state: {e}"))
        };
        let QueryReply::Machines { machines } = q(Query::Machines { owner: None })? else {
            return Err("unexpected reply".into());
        };
        let QueryReply::Nodes { nodes } = q(Query::Nodes)? else {
            return Err("unexpected reply".into());
        };
        let QueryReply::Setting { value } = q(Query::Setting {
            key: "proxy_ipv4".into(),
        })?
        else {
            return Err("unexpected reply".into());
        };
        let proxies: Vec<Ipv4Addr> = value
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let d = desired(&machines, &nodes, &proxies, me, |p| {
            boxd_datapath::netdev::ifindex(p).is_ok()
        });
        let report = boxd_datapath::desired::apply(&self.pin, &d).map_err(|e| format!("{e:#}"))?;
        for w in &report.warnings {
            tracing::warn!("data path: {w}");
        }
        Ok(report.changes.len())
    }
}
