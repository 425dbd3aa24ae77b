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
#[command(name = "cargo xtask", about = "boxd's build, image, test-host and benchmark tasks")]
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
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Images => {
            let boxd = build_boxd()?;
            let images = images::build(&boxd)?;
            images::prune(&images)?;
            println!("kernel  {} ({})", images.kernel.display(), images.kernel_release);
            println!("initrd  {}", images.initrd.display());
            println!("rootfs  {}", images.rootfs.display());
            Ok(())
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
