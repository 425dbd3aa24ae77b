//! Reconcilers: each node drives its local parts (the data path's maps, later the
//! worker's VMs, the proxy's routes, DNS) toward the replicated state. A reconciler
//! reads the whole desired view from the local state machine and applies the diff, so
//! it is idempotent and a restart simply reconciles again. It runs when the applied
//! index moves and at least every [`RESYNC`] (local parts can drift: a port appears, an
//! operator edits a map), with bounded backoff after failures.

use crate::node::Node;
use crate::state::StateMachine;
use crate::types::NodeId;
use std::sync::Arc;
use std::time::Duration;

/// Reconcile at least this often even when nothing was applied.
pub const RESYNC: Duration = Duration::from_secs(2);
/// Longest wait after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One local part driven from the replicated state.
pub trait Reconciler: Send + 'static {
    fn name(&self) -> &'static str;
    /// Brings the part in line with `state` for node `me`; how many changes it made.
    /// Runs on a blocking thread.
    fn reconcile(&mut self, state: &StateMachine, me: NodeId) -> Result<usize, String>;
}

/// Runs `r` for the life of the node.
pub fn spawn(node: Arc<Node>, mut r: impl Reconciler) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied = node.state.watch_applied();
        let mut backoff = Duration::ZERO;
        let me = node.cfg.id;
        loop {
            let state = node.state.clone();
            let name = r.name();
            let (back, res) = tokio::task::spawn_blocking(move || {
                let res = r.reconcile(&state, me);
                (r, res)
            })
            .await
            .expect("reconciler thread");
            r = back;
            match res {
                Ok(0) => backoff = Duration::ZERO,
                Ok(n) => {
                    tracing::info!(reconciler = name, changes = n, "reconciled");
                    backoff = Duration::ZERO;
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
                    tracing::warn!(
                        reconciler = name,
                        "reconcile failed (retry in {backoff:?}): {e}"
                    );
                    tokio::time::sleep(backoff).await;
                }
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
    })
}
