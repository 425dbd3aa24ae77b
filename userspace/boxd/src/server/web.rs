//! The node's web front: the HTTPS proxy's routes and certificates from the replicated
//! state, and the internal CA's certificates kept issued and renewed.

use crate::certs::{self, Store};
use crate::proxy::{Challenges, DEFAULT_PORTS, MACHINE_LINK_ADDR, Route, Table};
use anyhow::{Result, bail};
use boxd_control::node::Node;
use boxd_control::reconcile::Reconciler;
use boxd_control::state::StateMachine;
use boxd_control::types::{CertRow, Command, MachineState, NodeId, Query, QueryReply, WebMode};
use std::collections::HashMap;
use std::sync::Arc;

/// The internal CA's name for a zone (a CA is limited to its zone).
pub fn ca_name(zone: &str) -> String {
    format!("{}:{zone}", certs::INTERNAL_CA)
}

async fn stored(node: &Node) -> Result<Vec<CertRow>> {
    match node.read(Query::Certificates, true).await {
        Ok(QueryReply::Certificates { certs }) => Ok(certs),
        Ok(other) => bail!("unexpected reply to a certificates query: {other:?}"),
        Err(e) => bail!("read certificates: {e}"),
    }
}

async fn put(node: &Node, name: &str, c: &certs::Issued) -> Result<()> {
    let cmd = Command::PutCertificate {
        name: name.to_string(),
        cert_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.clone(),
        not_after_ms: c.not_after_ms,
        issuer: "internal".into(),
    };
    match node.write(node.request("operator", cmd)).await {
        Ok(r) => r
            .result
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("store certificate {name}: {e}")),
        Err(e) => bail!("store certificate {name}: {e}"),
    }
}

/// Makes sure the zone has an internal CA and a current wildcard certificate from it
/// (an ACME certificate for the zone, when there is one, is left alone).
pub async fn ensure_certificates(node: &Node, zone: &str) -> Result<()> {
    let rows = stored(node).await?;
    let wildcard = format!("*.{zone}");
    let ca_row = rows.iter().find(|r| r.name == ca_name(zone));
    let ca = match ca_row {
        Some(r) if !certs::due(r.not_after_ms) => certs::Issued {
            cert_pem: r.cert_pem.clone(),
            key_pem: r.key_pem.clone(),
            not_after_ms: r.not_after_ms,
        },
        _ => {
            let ca = certs::new_ca(zone)?;
            put(node, &ca_name(zone), &ca).await?;
            tracing::info!(zone, "made an internal CA for the zone");
            ca
        }
    };
    let current = rows.iter().find(|r| r.name == wildcard);
    // An ACME certificate is kept until it has expired (renewing it is ACME's job; the
    // internal one would be a step down for every client that does not trust our CA).
    let fresh = current.is_some_and(|r| {
        if r.issuer == "acme" {
            // Replaced by an internal one only in its last 13 hours (this runs every
            // 12), so the zone is never served an expired certificate.
            r.not_after_ms > boxd_control::node::now_ms() + 13 * 3_600_000
        } else {
            !certs::due(r.not_after_ms) && ca_row.is_some()
        }
    });
    if !fresh {
        let leaf = certs::issue(&ca, &[zone.to_string(), wildcard.clone()])?;
        put(node, &wildcard, &leaf).await?;
        tracing::info!(zone, "issued the zone's certificate from the internal CA");
    }
    Ok(())
}

/// Keeps the proxy's routes and certificates in line with the replicated state.
pub struct WebReconciler {
    pub table: Arc<Table>,
    pub certs: Arc<Store>,
    /// ACME HTTP-01 answers, from the replicated state.
    pub challenges: Arc<Challenges>,
    /// `ssh -p PORT HOST`, for the hints on error pages.
    pub ssh: String,
    /// The zone and certificates (name, updated) last loaded.
    pub loaded: Option<(String, Vec<(String, u64)>)>,
}

impl Reconciler for WebReconciler {
    fn name(&self) -> &'static str {
        "proxy"
    }

    fn reconcile(&mut self, state: &StateMachine, me: NodeId) -> Result<usize, String> {
        let zone = match state.query(&Query::Setting { key: "zone".into() }) {
            Ok(QueryReply::Setting { value: Some(z) }) => z,
            Ok(_) => String::new(),
            Err(e) => return Err(format!("read the zone: {e}")),
        };
        let rows = match state.query(&Query::Certificates) {
            Ok(QueryReply::Certificates { certs }) => certs,
            Ok(other) => return Err(format!("unexpected reply: {other:?}")),
            Err(e) => return Err(format!("read certificates: {e}")),
        };
        // Parsing keys costs: only when a certificate (or the zone) changed.
        let seen: Vec<(String, u64)> = rows
            .iter()
            .map(|r| (r.name.clone(), r.updated_ms))
            .collect();
        if self.loaded.as_ref() != Some(&(zone.clone(), seen.clone())) {
            let errors = self.certs.load(&rows, &ca_name(&zone));
            for e in &errors {
                tracing::warn!("stored certificate not served: {e}");
            }
            if let Some(k) = self.certs.find(&zone) {
                self.certs.set_default_arc(k);
            }
            self.loaded = Some((zone.clone(), seen));
        }
        match state.query(&Query::AcmeChallenges) {
            Ok(QueryReply::AcmeChallenges { challenges }) => self.challenges.replace(
                challenges
                    .into_iter()
                    .filter(|c| c.kind == "http-01")
                    .map(|c| (c.name, c.value))
                    .collect(),
            ),
            Ok(other) => return Err(format!("unexpected reply: {other:?}")),
            Err(e) => return Err(format!("read ACME challenges: {e}")),
        }
        let machines = match state.query(&Query::Machines { owner: None }) {
            Ok(QueryReply::Machines { machines }) => machines,
            Ok(other) => return Err(format!("unexpected reply: {other:?}")),
            Err(e) => return Err(format!("read machines: {e}")),
        };
        let mut routes = HashMap::new();
        if !zone.is_empty() {
            for m in machines {
                let host = format!("{}.{zone}", m.name);
                let down = |why: String, retry: bool| Route::Down {
                    name: m.name.clone(),
                    why,
                    retry,
                };
                let route = if m.node != me {
                    down(
                        format!("runs on node {}; this node cannot reach it yet", m.node),
                        false,
                    )
                } else {
                    match m.state {
                        MachineState::Running => Route::Backend {
                            name: m.name.clone(),
                            device: Some(crate::reconcile::port_name(m.id)),
                            addr: MACHINE_LINK_ADDR,
                            ports: match m.ports.first() {
                                Some(p) => vec![*p],
                                None => DEFAULT_PORTS.to_vec(),
                            },
                        },
                        MachineState::Creating => {
                            down("is starting; try again in a few seconds".into(), true)
                        }
                        MachineState::Stopped => down(
                            format!(
                                "is stopped; its owner can start it with `{} start {}`",
                                self.ssh, m.name
                            ),
                            false,
                        ),
                        // A request wakes it: from memory (paused) or from disk
                        // (suspended); its connection waits meanwhile.
                        MachineState::Paused | MachineState::Suspended => Route::Asleep {
                            name: m.name.clone(),
                            owner: m.owner.clone(),
                            passthrough: m.web == WebMode::Passthrough,
                        },
                    }
                };
                let route = match m.web {
                    WebMode::Public => route,
                    WebMode::Private => Route::Private {
                        name: m.name.clone(),
                        hint: format!(
                            "`{} -L 8080:{}:80` and then http://localhost:8080",
                            self.ssh, m.name
                        ),
                    },
                    WebMode::Passthrough => match route {
                        Route::Backend {
                            name, device, addr, ..
                        } => Route::Passthrough { name, device, addr },
                        other => other,
                    },
                };
                for d in &m.domains {
                    routes.insert(d.clone(), route.clone());
                }
                routes.insert(host, route);
            }
        }
        self.table.set(routes);
        Ok(0)
    }
}

/// Wakes a sleeping machine for the proxy: the state goes back to running (audited as
/// the proxy's doing), and the worker resumes the VMM.
pub struct NodeWaker {
    pub node: Arc<Node>,
    /// The server's runtime: the proxy's threads run event loops of their own.
    pub rt: tokio::runtime::Handle,
}

impl crate::proxy::Waker for NodeWaker {
    fn wake(
        &self,
        owner: &str,
        name: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        let node = self.node.clone();
        let cmd = Command::WakeMachine {
            owner: owner.to_string(),
            name: name.to_string(),
        };
        let write = self.rt.spawn(async move {
            match node.write(node.request("proxy", cmd)).await {
                Ok(r) => r.result.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        Box::pin(async move { write.await.map_err(|e| e.to_string())? })
    }
}
