//! `boxd`: every role of a boxd host in one binary, chosen by subcommand.

mod net;
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
    /// The in-guest agent (started by systemd inside every VM).
    Agent,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOXD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Vmm { command } => vmm::main(command),
        Command::Net { command } => net::main(command),
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
