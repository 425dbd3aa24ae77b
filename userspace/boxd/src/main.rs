//! `boxd`: every role of a boxd host in one binary, chosen by subcommand.

mod bpf;
mod cluster;
mod net;
mod reconcile;
mod signals;
mod vmm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "boxd",
    version,
    about = "Instant remote computers: persistent, forkable Linux VMs over SSH"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The per-VM monitor: run a VM, or control a running one.
    Vmm {
        #[command(subcommand)]
        command: vmm::VmmCommand,
    },
    /// The vhost-user network backend.
    Net {
        #[command(subcommand)]
        command: net::NetCommand,
    },
    /// The eBPF data path: set up, program and read the XDP/TC programs and their maps.
    Bpf {
        #[command(flatten)]
        pin: bpf::Pin,
        #[command(subcommand)]
        command: bpf::BpfCommand,
    },
    /// The control plane's cluster: create, join, inspect, change membership.
    Cluster {
        #[command(flatten)]
        dir: cluster::DataDir,
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Run a control-plane node (Raft over QUIC, the replicated state, the admin socket).
    Control {
        #[command(flatten)]
        dir: cluster::DataDir,
        #[command(subcommand)]
        command: cluster::ControlCommand,
    },
    /// The in-guest agent (started by systemd inside every VM).
    Agent,
}

fn main() {
    // A CLI whose output is piped into `head` exits quietly when the pipe closes.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOXD_LOG")
                .unwrap_or_else(|_| "info,openraft=warn,quinn_udp=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Vmm { command } => vmm::main(command),
        Command::Net { command } => net::main(command),
        Command::Bpf { pin, command } => bpf::main(pin, command),
        Command::Cluster { dir, command } => cluster::main(dir, command),
        Command::Control { dir, command } => cluster::control_main(dir, command),
        Command::Agent => boxd_agent::server::run()
            .map(|()| 0)
            .map_err(|e| anyhow::anyhow!("agent: {e}")),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("boxd: {e:#}");
            std::process::exit(1);
        }
    }
}

/// What a subcommand's `main` returns: the process exit code.
pub type Exit = anyhow::Result<i32>;

/// Prints rows as an aligned table (the first row is the header).
pub fn table(rows: Vec<Vec<String>>) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
