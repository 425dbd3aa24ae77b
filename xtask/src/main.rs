//! boxd's development tasks: `cargo xtask <task>`.

mod cpio;
mod images;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;
use util::{Step, run, target_dir};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "boxd's build, image, test-host and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (Debian packages, toolchains); idempotent.
    Setup,
    /// Build the guest kernel, initramfs and root file system (cached by content).
    Images,
    /// Run a command inside the emulated KVM host (QEMU, software CPU with SVM).
    Testhost {
        /// Forward a TCP port from this machine's loopback into the test host: HOST:GUEST.
        #[arg(long = "forward", value_parser = parse_forward)]
        forwards: Vec<(u16, u16)>,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        #[arg(long, default_value_t = 6144)]
        memory_mib: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn parse_forward(s: &str) -> Result<(u16, u16), String> {
    let (h, g) = s
        .split_once(':')
        .ok_or("expected HOST:GUEST, e.g. 2222:2222")?;
    Ok((
        h.parse().map_err(|e| format!("host port {h}: {e}"))?,
        g.parse().map_err(|e| format!("guest port {g}: {e}"))?,
    ))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Images => {
            let boxd = build_boxd()?;
            let images = images::build(&boxd)?;
            images::prune(&images)?;
            println!(
                "kernel  {} ({})",
                images.kernel.display(),
                images.kernel_release
            );
            println!("initrd  {}", images.initrd.display());
            println!("rootfs  {}", images.rootfs.display());
            Ok(())
        }
        Task::Testhost {
            forwards,
            cpus,
            memory_mib,
            command,
        } => {
            let host = boxd_tests::testhost::TestHost {
                cpus,
                memory_mib,
                forwards,
                ..Default::default()
            };
            let outcome = host.run(&command)?;
            eprintln!(
                "test host: booted in {:.1}s, command exited {}",
                outcome.boot_s, outcome.exit_code
            );
            std::process::exit(outcome.exit_code);
        }
    }
}

/// Builds the release `boxd` binary that guests and the test host run.
fn build_boxd() -> Result<PathBuf> {
    let step = Step::start("cargo build --release -p boxd");
    run(Command::new(env!("CARGO")).args(["build", "--quiet", "--release", "-p", "boxd"]))?;
    step.done();
    Ok(target_dir().join("release/boxd"))
}
