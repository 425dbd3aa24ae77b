//! `boxd-bench`: the benchmarks that drive the shipped process (`boxd server`, `boxd
//! vmm`) against a peer measured in the same run. `cargo xtask bench <what>` installs
//! what is missing, builds boxd and the images, builds this program and runs it.
//!
//! Those that boot Linux guests run themselves again inside the emulated KVM host when
//! this host's KVM cannot run guest kernels at hardware speed.

mod api;
mod boot;
mod dns;
mod proxy;
mod snapshot;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "boxd-bench", about = "boxd's benchmarks, each against a peer")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// VMM start to kernel entry and to agent ready: boxd vs QEMU (microvm).
    Boot {
        #[arg(long, default_value_t = bench::ROUNDS_MIN)]
        rounds: usize,
        /// Already inside the place where guests boot (set by the bench itself).
        #[arg(long, hide = true)]
        inside: bool,
    },
    /// `ssh host ls --json` against OpenSSH's sshd, then `new` to SSH-ready.
    Api {
        #[arg(long, default_value_t = bench::ROUNDS_MIN)]
        rounds: usize,
        /// Machines made in the `new` part.
        #[arg(long, default_value_t = bench::ROUNDS_MIN)]
        runs: usize,
        #[arg(long, hide = true)]
        inside: bool,
    },
    /// HTTPS through `boxd server`'s proxy to a machine against nginx (wrk).
    Proxy {
        #[arg(long, default_value_t = bench::ROUNDS_MIN)]
        rounds: usize,
        /// Seconds per round and side.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Open connections of the load generator.
        #[arg(long, default_value_t = 64)]
        connections: u32,
    },
    /// Snapshot save, restore, resume and what a suspended machine holds, natively with
    /// a tiny guest (`boxd vmm run --raw`, `snapshot`, `restore`).
    Snapshot {
        #[arg(long, default_value_t = bench::ROUNDS_MIN)]
        rounds: usize,
    },
    /// Queries per second of `boxd server`'s DNS against Knot (dnsperf).
    Dns {
        #[arg(long, default_value_t = bench::ROUNDS_MIN)]
        rounds: usize,
        /// Seconds per round and side.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Machines (names) in the zone.
        #[arg(long, default_value_t = 100)]
        machines: usize,
    },
}

use boxd_tests::bench;

fn main() -> Result<()> {
    match Cli::parse().what {
        What::Boot { rounds, inside } => {
            if inside || boxd_tests::guest::guests_boot_here()? {
                return boot::boot(rounds);
            }
            again_inside(&["boot", "--rounds", &rounds.to_string()])
        }
        What::Api {
            rounds,
            runs,
            inside,
        } => {
            if inside {
                return api::api_new(runs);
            }
            api::api_ls(rounds)?;
            if boxd_tests::guest::guests_boot_here()? {
                return api::api_new(runs);
            }
            again_inside(&["api", "--runs", &runs.to_string()])
        }
        What::Proxy {
            rounds,
            seconds,
            connections,
        } => proxy::proxy(rounds, seconds, connections),
        What::Dns {
            rounds,
            seconds,
            machines,
        } => dns::dns(rounds, seconds, machines),
        What::Snapshot { rounds } => snapshot::snapshot(rounds),
    }
}

/// Runs this program again, with `args` and `--inside`, in the emulated KVM host.
fn again_inside(args: &[&str]) -> Result<()> {
    let mut argv = vec![std::env::current_exe()?.display().to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv.push("--inside".into());
    boxd_tests::guest::run_in_testhost(argv, Duration::from_secs(60 * 60))?;
    Ok(())
}
