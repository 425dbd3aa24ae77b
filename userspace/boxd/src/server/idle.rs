//! The idle policy: a machine this node runs that nobody uses (no inbound traffic on
//! its network port, no exec, ssh, console or tunnel session) for `pause_after` is
//! paused, and after `suspend_after` suspended to disk. Anything that reaches it
//! afterwards wakes it (the data path, the proxy, the API). The state changes go
//! through the control plane like a user's, audited as `idle`.

use super::worker::Worker;
use boxd_control::node::Node;
use boxd_control::types::{Command, MachineState, Query, QueryReply};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often machines are looked at (a pause comes at most this late).
const TICK: Duration = Duration::from_secs(5);

/// What the policy remembers of one machine.
struct Seen {
    state: MachineState,
    rx_packets: Option<u64>,
    /// The last sign of use: traffic, a session, a change of state.
    active: Instant,
}

pub fn spawn(
    node: Arc<Node>,
    worker: Arc<Worker>,
    pause: Option<Duration>,
    suspend: Option<Duration>,
) {
    if pause.is_none() && suspend.is_none() {
        tracing::info!("idle policy off: machines run until they are paused, suspended or stopped");
        return;
    }
    tracing::info!(pause_after = ?pause, suspend_after = ?suspend, "idle policy");
    tokio::spawn(async move {
        let mut seen: HashMap<u64, Seen> = HashMap::new();
        loop {
            tokio::time::sleep(TICK).await;
            let machines = match node.read(Query::Machines { owner: None }, false).await {
                Ok(QueryReply::Machines { machines }) => machines,
                _ => continue,
            };
            let w = worker.clone();
            let rx = tokio::task::spawn_blocking(move || w.port_rx_packets())
                .await
                .unwrap_or_default();
            let now = Instant::now();
            let local: Vec<_> = machines.into_iter().filter(|m| worker.runs(m.id)).collect();
            seen.retain(|id, _| local.iter().any(|m| m.id == *id));
            for m in local {
                let rx_now = rx.get(&m.name).copied();
                let (open, last_session) = worker.sessions(m.id);
                let s = seen.entry(m.id).or_insert(Seen {
                    state: m.state,
                    rx_packets: rx_now,
                    active: now,
                });
                if s.state != m.state || s.rx_packets != rx_now || open > 0 {
                    s.active = now;
                }
                if let Some(t) = last_session {
                    s.active = s.active.max(t);
                }
                s.state = m.state;
                s.rx_packets = rx_now;
                let idle = now.saturating_duration_since(s.active);
                let next = match m.state {
                    MachineState::Running => match (pause, suspend) {
                        (Some(p), _) if idle >= p => Some(MachineState::Paused),
                        (None, Some(sus)) if idle >= sus => Some(MachineState::Suspended),
                        _ => None,
                    },
                    MachineState::Paused => suspend
                        .filter(|sus| idle >= *sus)
                        .map(|_| MachineState::Suspended),
                    _ => None,
                };
                let Some(next) = next else { continue };
                tracing::info!(
                    machine = m.name,
                    idle_s = idle.as_secs(),
                    "idle: {} it",
                    if next == MachineState::Paused {
                        "pausing"
                    } else {
                        "suspending"
                    }
                );
                let cmd = Command::SetMachineState {
                    owner: m.owner.clone(),
                    name: m.name.clone(),
                    state: next,
                };
                match node.write(node.request("idle", cmd)).await {
                    // Its own change is no sign of use: the suspend counts from the
                    // same idle start as the pause.
                    Ok(r) if r.result.is_ok() => s.state = next,
                    Ok(r) => tracing::warn!(machine = m.name, "idle policy: {:?}", r.result),
                    Err(e) => tracing::warn!(machine = m.name, "idle policy: {e}"),
                }
            }
        }
    });
}
