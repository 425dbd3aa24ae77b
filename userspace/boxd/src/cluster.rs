//! `boxd cluster ...` and `boxd control run`: the control plane for operators.

use crate::{Exit, table};
use anyhow::{Context, Result, bail};
use boxd_control::admin::{AdminRequest, Client};
use boxd_control::node::{self, Node, Status};
use boxd_control::types::NodeRole;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct DataDir {
    /// The node's data directory (certificates, Raft log, state database, admin socket).
    #[arg(
        long,
        env = "BOXD_DATA_DIR",
        default_value = "/var/lib/boxd",
        global = true
    )]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Create a new cluster with this machine as its first voter (node 1) and a new CA.
    /// Then start it with `boxd control run`.
    Init {
        /// UDP address the node-to-node QUIC endpoint binds.
        #[arg(long, default_value = "0.0.0.0:7946")]
        listen: String,
        /// The address other nodes dial (default: --listen; required when that is 0.0.0.0).
        #[arg(long)]
        advertise: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Join an existing cluster with a one-time token from `boxd cluster token`. The node
    /// joins as a learner; `boxd cluster add-voter ID` makes it a voter.
    Join {
        token: String,
        #[arg(long, default_value = "0.0.0.0:7946")]
        listen: String,
        #[arg(long)]
        advertise: Option<String>,
        /// server (may become a voter, runs machines), worker (runs machines) or edge.
        #[arg(long, default_value = "worker")]
        role: String,
        #[arg(long)]
        json: bool,
    },
    /// Membership, leader, replication and the nodes' capacity.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print a one-time join token.
    Token {
        /// How long the token is valid, in seconds (60 to 604800).
        #[arg(long, default_value_t = node::TOKEN_TTL.as_secs())]
        ttl: u64,
        #[arg(long)]
        json: bool,
    },
    /// Promote a learner to voter (waits until it has caught up).
    AddVoter {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the cluster; its certificate stops working.
    Remove {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ControlCommand {
    /// Run this node of the control plane until SIGTERM or SIGINT.
    Run {
        /// Keep the eBPF data path pinned here in line with the replicated state
        /// (machines' public addresses, states, domains, other nodes).
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn client(dir: &Path) -> Result<Client> {
    Ok(Client::connect(
        &dir.join("admin.sock"),
        node::REQUEST_TIMEOUT + Duration::from_secs(5),
    )?)
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub fn control_main(dir: DataDir, cmd: ControlCommand) -> Exit {
    match cmd {
        ControlCommand::Run { bpf_pin_dir } => {
            let rt = runtime()?;
            rt.block_on(async {
                let node = Node::start(&dir.data_dir).await?;
                if let Some(pin) = bpf_pin_dir {
                    let pin = boxd_datapath::PinDir(pin);
                    boxd_control::reconcile::spawn(node.clone(), crate::reconcile::BpfMaps { pin });
                }
                tracing::info!(
                    id = node.cfg.id,
                    listen = node.cfg.listen,
                    "control plane node running"
                );
                node.serve(async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("SIGTERM handler");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                })
                .await?;
                anyhow::Ok(0)
            })
        }
    }
}

pub fn main(dir: DataDir, cmd: ClusterCommand) -> Exit {
    let dir = dir.data_dir;
    match cmd {
        ClusterCommand::Init {
            listen,
            advertise,
            json,
        } => {
            if advertise.is_none() && listen.starts_with("0.0.0.0:") {
                bail!(
                    "--listen {listen} is not an address other nodes can dial; add --advertise IP:PORT"
                );
            }
            let cfg = node::init(&dir, &listen, advertise.as_deref())?;
            if json {
                print_json(&cfg);
            } else {
                println!(
                    "initialised node {} in {} (advertised at {})",
                    cfg.id,
                    dir.display(),
                    cfg.advertise
                );
                println!(
                    "start it with: boxd control run --data-dir {}",
                    dir.display()
                );
            }
            Ok(0)
        }
        ClusterCommand::Join {
            token,
            listen,
            advertise,
            role,
            json,
        } => {
            let role = NodeRole::parse(&role)
                .with_context(|| format!("--role {role:?}: use server, worker or edge"))?;
            if advertise.is_none() && listen.starts_with("0.0.0.0:") {
                bail!(
                    "--listen {listen} is not an address other nodes can dial; add --advertise IP:PORT"
                );
            }
            let (cpus, memory) = node::host_capacity();
            let cfg = runtime()?.block_on(node::join(
                &dir,
                &token,
                &listen,
                advertise.as_deref(),
                role,
                cpus,
                memory,
            ))?;
            if json {
                print_json(&cfg);
            } else {
                println!(
                    "joined as node {} ({}) in {}",
                    cfg.id,
                    cfg.role.as_str(),
                    dir.display()
                );
                println!(
                    "start it with: boxd control run --data-dir {}",
                    dir.display()
                );
            }
            Ok(0)
        }
        ClusterCommand::Status { json } => {
            let s: Status = client(&dir)?.call(&AdminRequest::Status)?;
            if json {
                print_json(&s);
                return Ok(0);
            }
            println!(
                "node {} is {} (term {}, leader {}), log {}, applied {}",
                s.id,
                s.state,
                s.term,
                s.leader.map_or("none".into(), |l| l.to_string()),
                s.last_log_index.map_or("-".into(), |i| i.to_string()),
                s.applied.map_or("-".into(), |i| i.to_string()),
            );
            let mut rows = vec![
                [
                    "ID", "ADDRESS", "RAFT", "MATCHED", "ROLE", "HEALTHY", "VCPUS", "MEMORY",
                    "MACHINES",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for m in &s.members {
                let n = s.nodes.iter().find(|n| n.id == m.id);
                rows.push(vec![
                    m.id.to_string(),
                    m.addr.clone(),
                    if m.voter { "voter" } else { "learner" }.into(),
                    m.matched.map_or("-".into(), |i| i.to_string()),
                    n.map_or("-".into(), |n| n.role.as_str().into()),
                    n.map_or("-".into(), |n| if n.healthy { "yes" } else { "no" }.into()),
                    n.map_or("-".into(), |n| format!("{}/{}", n.used_cpus, n.cpus)),
                    n.map_or("-".into(), |n| {
                        format!("{}/{} MiB", n.used_memory_mib, n.memory_mib)
                    }),
                    n.map_or("-".into(), |n| n.machines.to_string()),
                ]);
            }
            table(rows);
            Ok(0)
        }
        ClusterCommand::Token { ttl, json } => {
            let t: String = client(&dir)?.call(&AdminRequest::Token { ttl_s: ttl })?;
            if json {
                print_json(&serde_json::json!({ "token": t, "ttl_s": ttl.clamp(60, 7 * 86400) }));
            } else {
                println!("{t}");
                eprintln!(
                    "one-time, valid {} s: boxd cluster join {t} --advertise IP:PORT",
                    ttl.clamp(60, 7 * 86400)
                );
            }
            Ok(0)
        }
        ClusterCommand::AddVoter { id, json } => {
            client(&dir)?.call::<()>(&AdminRequest::AddVoter { id })?;
            if json {
                print_json(&serde_json::json!({ "voter": id }));
            } else {
                println!("node {id} is a voter");
            }
            Ok(0)
        }
        ClusterCommand::Remove { id, json } => {
            client(&dir)?.call::<()>(&AdminRequest::Remove { id })?;
            if json {
                print_json(&serde_json::json!({ "removed": id }));
            } else {
                println!("node {id} removed");
            }
            Ok(0)
        }
    }
}
