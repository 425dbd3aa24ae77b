//! `boxd net`: the vhost-user network backend daemon and its operator commands.

use crate::table;
use anyhow::{Context, Result};
use boxd_vhost_net::control::{self, DEFAULT_IP, DEFAULT_MAC};
use boxd_vhost_net::{Client, PortSpec, PortStats, Registry, Request};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where `boxd net serve` listens unless told otherwise.
pub const DEFAULT_CONTROL: &str = "/run/boxd/net.sock";

#[derive(Subcommand)]
pub enum NetCommand {
    /// Run the backend daemon: ports are added and removed through its control socket.
    Serve {
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Serve one VM port without a daemon (for a VM run by hand).
    Port {
        #[command(flatten)]
        port: PortArgs,
        /// Stop after this many VMM connections have come and gone (default: never).
        #[arg(long)]
        connections: Option<u64>,
    },
    /// Add a port to the running daemon.
    Add {
        #[command(flatten)]
        port: PortArgs,
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Remove a port from the running daemon (its TAP goes, held frames are dropped).
    Rm {
        name: String,
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// The daemon's ports.
    Ls {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Follow the daemon's events ("waiting": frames are held for a VM whose VMM is
    /// away), one line each, until interrupted.
    Events {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Per-port counters: packets, bytes, held frames, drops by reason.
    Stats {
        /// One port (default: all).
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
}

#[derive(Args)]
pub struct PortArgs {
    /// The port's name (the VM's).
    #[arg(long, default_value = "vm")]
    name: String,
    /// The vhost-user socket the VMM connects to (`boxd vmm run --net`).
    #[arg(long)]
    socket: PathBuf,
    /// The TAP device to create for the host side.
    #[arg(long)]
    tap: String,
    /// The VM's MAC: frames from any other source MAC are dropped.
    #[arg(long, default_value = DEFAULT_MAC)]
    mac: String,
    /// The VM's link address: IPv4 and ARP from any other source are dropped.
    #[arg(long, default_value = DEFAULT_IP)]
    ip: String,
    /// Queue pairs (one worker thread each).
    #[arg(long, default_value_t = 1)]
    queue_pairs: usize,
    /// Most frames held while the VM cannot take them.
    #[arg(long, default_value_t = boxd_vhost_net::hold::HoldLimits::default().frames)]
    hold_frames: usize,
    /// Most bytes held while the VM cannot take them.
    #[arg(long, default_value_t = boxd_vhost_net::hold::HoldLimits::default().bytes)]
    hold_bytes: usize,
}

impl PortArgs {
    fn spec(self) -> Result<PortSpec> {
        let socket = if self.socket.is_absolute() {
            self.socket
        } else {
            std::env::current_dir()?.join(self.socket)
        };
        let spec = PortSpec {
            name: self.name,
            tap: self.tap,
            socket,
            mac: self.mac,
            ip: self.ip,
            queue_pairs: self.queue_pairs,
            hold_frames: self.hold_frames,
            hold_bytes: self.hold_bytes,
        };
        spec.config()?;
        Ok(spec)
    }
}

fn client(control: &Path) -> Result<Client> {
    Ok(Client::connect(control)?)
}

pub fn main(cmd: NetCommand) -> Result<i32> {
    match cmd {
        NetCommand::Serve { control } => {
            if let Some(dir) = control.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            crate::signals::on_termination(move |sig| {
                tracing::info!("signal {sig}: removing every port and stopping");
                flag.store(true, Ordering::Release);
            })?;
            let registry = Arc::new(Registry::default());
            let r = control::serve(&control, registry.clone(), &stop);
            registry.stop_all();
            r?;
            Ok(0)
        }
        NetCommand::Port { port, connections } => {
            boxd_vhost_net::serve_port(port.spec()?, connections)?;
            Ok(0)
        }
        NetCommand::Add { port, control } => {
            let spec = port.spec()?;
            let name = spec.name.clone();
            client(&control)?.call(&Request::AddPort(spec))?;
            println!("port {name} added");
            Ok(0)
        }
        NetCommand::Rm { name, control } => {
            client(&control)?.call(&Request::RemovePort { name: name.clone() })?;
            println!("port {name} removed");
            Ok(0)
        }
        NetCommand::Ls { json, control } => {
            let ports = client(&control)?.call(&Request::List)?.ports;
            if json {
                println!("{}", serde_json::to_string_pretty(&ports)?);
            } else {
                print_ports(&ports);
            }
            Ok(0)
        }
        NetCommand::Events { json, control } => {
            for event in client(&control)?.watch()? {
                let e = event?;
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!("{:>13}  {:<8}  {}", e.unix_ms, e.event, e.port);
                }
            }
            Ok(0)
        }
        NetCommand::Stats {
            name,
            json,
            control,
        } => {
            let stats = client(&control)?.call(&Request::Stats { name })?.stats;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(0)
        }
    }
}

fn print_ports(ports: &[PortSpec]) {
    if ports.is_empty() {
        println!("no ports (add one with `boxd net add`)");
        return;
    }
    let mut rows = vec![
        ["NAME", "TAP", "MAC", "IP", "QUEUES", "SOCKET"]
            .map(String::from)
            .to_vec(),
    ];
    for p in ports {
        rows.push(vec![
            p.name.clone(),
            p.tap.clone(),
            p.mac.clone(),
            p.ip.clone(),
            p.queue_pairs.to_string(),
            p.socket.display().to_string(),
        ]);
    }
    table(rows);
}

fn print_stats(stats: &[PortStats]) {
    if stats.is_empty() {
        println!("no ports");
        return;
    }
    let mut rows = vec![
        [
            "NAME", "VMM", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES", "HELD", "DROPS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for s in stats {
        let drops: Vec<String> = [
            ("hold-full", s.rx_drop_hold_full),
            ("too-big", s.rx_drop_too_big),
            ("rx-malformed", s.rx_drop_malformed),
            ("runt", s.tx_drop_runt),
            ("spoofed-mac", s.tx_drop_spoofed_mac),
            ("spoofed-ip", s.tx_drop_spoofed_ip),
            ("spoofed-arp", s.tx_drop_spoofed_arp),
            ("ethertype", s.tx_drop_ethertype),
            ("tx-malformed", s.tx_drop_malformed),
            ("tx-errors", s.tx_errors),
            ("ring-errors", s.ring_errors),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what}={n}"))
        .collect();
        rows.push(vec![
            s.name.clone(),
            if s.attached { "attached" } else { "absent" }.into(),
            s.rx_packets.to_string(),
            s.rx_bytes.to_string(),
            s.tx_packets.to_string(),
            s.tx_bytes.to_string(),
            format!("{} ({} B)", s.held_frames, s.held_bytes),
            if drops.is_empty() {
                "-".into()
            } else {
                drops.join(",")
            },
        ]);
    }
    table(rows);
}
