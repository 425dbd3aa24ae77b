//! `boxd bpf`: the eBPF data path for operators: set it up, program it, read it.

use crate::table;
use anyhow::{Context, Result, bail};
use boxd_datapath::{
    NodeConfig, PinDir, UpOptions,
    desired::{self, Desired},
    events, tables,
};
use clap::{Args, Subcommand};
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct Pin {
    /// The bpffs directory holding the pinned maps, programs and links.
    #[arg(long, env = "BOXD_BPF_PIN_DIR", default_value = boxd_datapath::common::DEFAULT_PIN_DIR, global = true)]
    pin_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum BpfCommand {
    /// Load the programs, pin them and their maps, attach the router. Idempotent: on an
    /// existing pin directory the maps (and their entries) are kept and the programs are
    /// swapped atomically inside the pinned links, so traffic never stops.
    Up {
        /// The uplink (public side); its MAC answers ARP for public addresses.
        #[arg(long)]
        uplink: String,
        /// The private interface between nodes, when it is another one.
        #[arg(long)]
        private: Option<String>,
        #[arg(long, default_value_t = 1)]
        node_id: u32,
        /// This node's private address (needed in a cluster: encapsulation endpoints).
        #[arg(long)]
        node_addr: Option<Ipv4Addr>,
        /// This node has no public uplink: its VMs' traffic goes out through --edge-node.
        #[arg(long)]
        no_edge: bool,
        #[arg(long, default_value_t = 1)]
        edge_node: u32,
        #[arg(long, default_value = "10.0.0.2")]
        vm_addr: Ipv4Addr,
        #[arg(long, default_value = "10.0.0.1")]
        gw_addr: Ipv4Addr,
        /// Least time between two wake events for one VM.
        #[arg(long, default_value_t = 1000)]
        wake_interval_ms: u64,
        /// Fall back to generic (skb) XDP on interfaces without native XDP.
        #[arg(long)]
        allow_generic: bool,
        #[arg(long)]
        json: bool,
    },
    /// Detach everything and remove the pin directory (the maps' entries go with it).
    Down {
        #[arg(long)]
        json: bool,
    },
    /// Make the maps hold a desired state (JSON: vms, nodes, domains, proxies); `-` reads
    /// standard input. Validated completely first: a refused file changes nothing.
    Apply {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Set one VM's state (running, paused, suspended, stopped).
    State {
        public: Ipv4Addr,
        state: String,
        #[arg(long)]
        json: bool,
    },
    /// VMs by public address: state, port, counters.
    Vms {
        #[arg(long)]
        json: bool,
    },
    /// Where each public address goes: a local port, or encapsulated to a node.
    Routes {
        #[arg(long)]
        json: bool,
    },
    /// Domains the SNI parser steers.
    Domains {
        #[arg(long)]
        json: bool,
    },
    /// Cluster nodes the router encapsulates to.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// Global counters, and the node's configuration.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Follow wake events (traffic for VMs that are not running).
    Events {
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Attach the pass-through XDP program (a veth peer must run XDP to receive frames
    /// redirected to it).
    Pass { interface: String },
}

pub fn main(pin: Pin, command: BpfCommand) -> Result<i32> {
    let pin = PinDir(pin.pin_dir);
    match command {
        BpfCommand::Up {
            uplink,
            private,
            node_id,
            node_addr,
            no_edge,
            edge_node,
            vm_addr,
            gw_addr,
            wake_interval_ms,
            allow_generic,
            json,
        } => {
            let mut interfaces = vec![uplink];
            interfaces.extend(private);
            let opts = UpOptions {
                pin,
                config: NodeConfig {
                    node_id,
                    node_addr,
                    vm_addr,
                    gw_addr,
                    edge: !no_edge,
                    edge_node: if no_edge { edge_node } else { node_id },
                    wake_interval_ms,
                },
                interfaces,
                allow_generic,
            };
            let t = Instant::now();
            let rep = boxd_datapath::up(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                for a in &rep.router {
                    println!(
                        "router {} on {} (ifindex {}, {} XDP)",
                        a.action, a.interface, a.ifindex, a.mode
                    );
                }
                for w in &rep.warnings {
                    eprintln!("warning: {w}");
                }
                if rep.ports_replaced > 0 {
                    println!("VM program replaced on {} port(s)", rep.ports_replaced);
                }
                println!(
                    "maps in {}: {} reused, {} created; node {}{} ({} ms)",
                    rep.pin_dir.display(),
                    rep.maps_reused,
                    rep.maps_created,
                    rep.config.node_id,
                    if rep.config.edge { ", edge" } else { "" },
                    t.elapsed().as_millis()
                );
            }
            Ok(0)
        }
        BpfCommand::Down { json } => {
            let n = boxd_datapath::down(&pin)?;
            if json {
                println!("{}", serde_json::json!({ "removed": n, "pin_dir": pin.0 }));
            } else if n == 0 {
                println!("nothing pinned in {}", pin.0.display());
            } else {
                println!(
                    "detached and removed {n} pinned objects from {}",
                    pin.0.display()
                );
            }
            Ok(0)
        }
        BpfCommand::Apply { file, json } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .take(64 << 20)
                    .read_to_string(&mut s)
                    .context("reading the desired state from standard input")?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let d: Desired = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a desired state (JSON with \"vms\", \"nodes\", \"domains\", \"proxies\")",
                    file.display()
                )
            })?;
            let rep = desired::apply(&pin, &d)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                for c in &rep.changes {
                    println!("{:<6}  {:<6}  {}", c.op, c.kind, c.key);
                }
                for w in &rep.warnings {
                    eprintln!("warning: {w}");
                }
                println!("{} changed, {} unchanged", rep.changes.len(), rep.unchanged);
            }
            Ok(0)
        }
        BpfCommand::State {
            public,
            state,
            json,
        } => {
            let changed = desired::set_state(&pin, public, &state)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "public": public, "state": state, "changed": changed })
                );
            } else {
                println!(
                    "{public} {}{state}",
                    if changed { "is now " } else { "was already " }
                );
            }
            Ok(0)
        }
        BpfCommand::Vms { json } => {
            let rows = tables::vms(&pin)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            if rows.is_empty() {
                println!("no VMs (program them with `boxd bpf apply`)");
                return Ok(0);
            }
            let mut t = vec![
                [
                    "PUBLIC",
                    "ID",
                    "NODE",
                    "STATE",
                    "PORT",
                    "RX-PKTS",
                    "RX-BYTES",
                    "TX-PKTS",
                    "TX-BYTES",
                    "SPOOFED",
                    "RATE-DROP",
                    "WAKES",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for r in rows {
                let c = &r.counters;
                t.push(vec![
                    r.public.to_string(),
                    r.vm_id.to_string(),
                    r.node.to_string(),
                    r.state.to_string(),
                    r.port.unwrap_or_else(|| "-".into()),
                    c.rx_packets.to_string(),
                    c.rx_bytes.to_string(),
                    c.tx_packets.to_string(),
                    c.tx_bytes.to_string(),
                    c.spoofed.to_string(),
                    c.rate_dropped.to_string(),
                    c.wakes.to_string(),
                ]);
            }
            table(t);
            Ok(0)
        }
        BpfCommand::Routes { json } => {
            let rows = tables::routes(&pin)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            if rows.is_empty() {
                println!("no routes (no VMs programmed)");
                return Ok(0);
            }
            let mut t = vec![
                ["PUBLIC", "VIA", "NODE", "TARGET", "PROBLEM"]
                    .map(String::from)
                    .to_vec(),
            ];
            for r in rows {
                let target = match (r.port, r.node_addr) {
                    (Some(p), _) => format!("port {p}"),
                    (None, Some(a)) => format!("ipip {a}"),
                    (None, None) => "-".into(),
                };
                t.push(vec![
                    r.public.to_string(),
                    r.via.into(),
                    r.node.to_string(),
                    target,
                    r.problem.unwrap_or_else(|| "-".into()),
                ]);
            }
            table(t);
            Ok(0)
        }
        BpfCommand::Domains { json } => {
            let rows = tables::domains(&pin)?;
            let proxies = tables::proxies(&pin)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "domains": rows, "proxies": proxies })
                    )?
                );
                return Ok(0);
            }
            if rows.is_empty() {
                println!("no domains");
            } else {
                let mut t = vec![["DOMAIN", "PUBLIC", "HASH"].map(String::from).to_vec()];
                for r in rows {
                    t.push(vec![r.name, r.public.to_string(), r.hash]);
                }
                table(t);
            }
            let p: Vec<String> = proxies.iter().map(|p| p.to_string()).collect();
            println!(
                "proxy addresses: {}",
                if p.is_empty() {
                    "none".into()
                } else {
                    p.join(", ")
                }
            );
            Ok(0)
        }
        BpfCommand::Nodes { json } => {
            let rows = tables::nodes(&pin)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            if rows.is_empty() {
                println!("no nodes (a single node needs none)");
                return Ok(0);
            }
            let mut t = vec![["ID", "ADDRESS", "LOCAL"].map(String::from).to_vec()];
            for r in rows {
                t.push(vec![
                    r.id.to_string(),
                    r.addr.to_string(),
                    if r.local { "yes" } else { "" }.into(),
                ]);
            }
            table(t);
            Ok(0)
        }
        BpfCommand::Stats { json } => {
            let stats = tables::stats(&pin)?;
            let (cfg, mac) = tables::read_config(&pin)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "config": cfg,
                        "uplink_mac": boxd_datapath::netdev::fmt_mac(&mac),
                        "counters": stats,
                    }))?
                );
                return Ok(0);
            }
            println!(
                "node {}{}, VM link {} via {}, wake interval {} ms",
                cfg.node_id,
                if cfg.edge { " (edge)" } else { "" },
                cfg.vm_addr,
                cfg.gw_addr,
                cfg.wake_interval_ms
            );
            let mut t = vec![["COUNTER", "VALUE"].map(String::from).to_vec()];
            for (k, v) in stats {
                t.push(vec![k.to_string(), v.to_string()]);
            }
            table(t);
            Ok(0)
        }
        BpfCommand::Events {
            json,
            count,
            timeout,
        } => {
            if let Some(t) = timeout
                && !(t > 0.0 && t <= 86_400.0)
            {
                bail!("--timeout {t} is out of range (0 < seconds <= 86400)");
            }
            let sub = events::subscribe(&pin)?;
            let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t));
            let mut seen = 0u64;
            if !json {
                eprintln!(
                    "following wake events of {} (Ctrl-C stops)",
                    pin.0.display()
                );
            }
            loop {
                if count.is_some_and(|c| seen >= c) || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break;
                }
                let Some(w) = sub.recv_timeout(Duration::from_millis(200)) else {
                    continue;
                };
                seen += 1;
                if json {
                    println!("{}", serde_json::to_string(&w)?);
                } else {
                    println!(
                        "{:>16}  wake  {:<15}  vm {:<6} node {:<4} {:<6} was {}",
                        w.ktime_ns, w.public, w.vm_id, w.node, w.reason, w.state
                    );
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
            if sub.dropped() > 0 {
                eprintln!(
                    "{} events were dropped (this reader fell behind)",
                    sub.dropped()
                );
            }
            Ok(0)
        }
        BpfCommand::Pass { interface } => {
            boxd_datapath::attach_pass(&pin, &interface)?;
            println!("XDP pass attached to {interface}");
            Ok(0)
        }
    }
}
