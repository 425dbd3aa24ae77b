//! boxd's development tasks: `cargo xtask <task>`.
//!
//! xtask is what installs the system packages, so it must build without them: it
//! links nothing that needs libclang, RocksDB, LLVM or the eBPF toolchain (`cargo xtask
//! test` checks its dependency graph, see `deps.rs`). Tests, benchmarks and the demo are
//! Rust code of the tests crate, built by cargo once setup has run, and started from
//! here as programs.

mod cpio;
mod deps;
mod images;
mod setup;
mod test;
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
    /// Install what this machine lacks (Debian packages, the pinned nightly toolchain,
    /// bpf-linker, cargo-fuzz); idempotent.
    Setup,
    /// Build the guest kernel, initramfs and root file system (cached by content).
    Images,
    /// The test suite, as CI runs it: setup, the dependency check, format and lint
    /// checks, images, every test (the ones that boot Linux run in the emulated KVM host
    /// where needed), the fuzz smoke run; one summary line at the end.
    Test {
        /// Count a test that cannot run here as skipped instead of failed (refused in
        /// CI, where nothing may be missing).
        #[arg(long)]
        allow_skips: bool,
        /// More arguments for `cargo test` (after `--`): a package, a test binary, a
        /// filter, to run part of the suite the same way.
        #[arg(last = true)]
        cargo_test: Vec<String>,
    },
    /// Check that xtask's own dependency graph needs no system package.
    CheckDeps,
    /// End-to-end scenarios with real Linux guests.
    E2e {
        #[arg(value_enum)]
        scenario: Scenario,
    },
    /// Benchmarks that print boxd's figure beside a peer's from the same run. Arguments
    /// after the name go to the bench (`cargo xtask bench proxy -- --help`).
    Bench {
        #[arg(value_enum)]
        what: BenchKind,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what is missing, build boxd and the images, start a single node (`boxd
    /// server`) and drive a demo machine over SSH, with timings.
    Demo,
    /// Capture real Chromium ClientHellos into tests/fixtures/tls (installs chromium).
    CaptureHellos {
        #[arg(long, default_value_t = 8)]
        count: usize,
    },
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Scenario {
    /// Boot Debian under boxd vmm, drive the agent, restart, check the disk kept its data.
    Boot,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchKind {
    /// VMM start to kernel entry and to agent ready, boxd vs QEMU.
    Boot,
    /// The network backend: frame rates, TSO stream, latency (test frontend vs a
    /// direct TAP) and guest TCP through our backend vs QEMU's TAP backend.
    Net,
    /// The eBPF data path: ns per packet (router, SNAT, SNI parse) and forwarding on
    /// veth against the kernel's IP forwarding with an nftables DNAT rule.
    Bpf,
    /// The control plane: committed writes per second and commit latency with 1 and 3
    /// voters, against etcd with 1 and 3 members.
    Control,
    /// HTTPS requests per second and p99 through `boxd server`'s proxy to a machine,
    /// against nginx (wrk, same certificate and backend).
    Proxy,
    /// Authoritative DNS: queries per second of `boxd server` against Knot (dnsperf).
    Dns,
    /// The SSH API: `ssh host ls --json` p50/p99 against OpenSSH's sshd running `true`,
    /// and `new` to SSH-ready.
    Api,
    /// Snapshots: save, restore (1 and 8 GiB), resume from pause, and what a suspended
    /// machine holds on disk and in host memory (natively, with a tiny guest).
    Snapshot,
}

impl BenchKind {
    /// The program that runs the bench, and the arguments that pick it.
    fn program(self) -> (&'static str, &'static [&'static str]) {
        match self {
            BenchKind::Boot => ("boxd-bench", &["boot"]),
            BenchKind::Api => ("boxd-bench", &["api"]),
            BenchKind::Proxy => ("boxd-bench", &["proxy"]),
            BenchKind::Dns => ("boxd-bench", &["dns"]),
            BenchKind::Snapshot => ("boxd-bench", &["snapshot"]),
            BenchKind::Net => ("boxd-netbench", &[]),
            BenchKind::Bpf => ("boxd-bpfbench", &[]),
            BenchKind::Control => ("boxd-controlbench", &[]),
        }
    }

    /// Debian packages only this bench needs (its peer and load generator).
    fn packages(self) -> &'static [(&'static str, &'static str)] {
        match self {
            BenchKind::Proxy => &[
                ("nginx-light", "the peer (and the backend) in `bench proxy`"),
                ("wrk", "the HTTPS load generator of `bench proxy`"),
            ],
            BenchKind::Dns => &[
                ("knot", "Knot DNS, the peer in `bench dns`"),
                ("dnsperf", "the load generator of `bench dns`"),
            ],
            _ => &[],
        }
    }
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
            setup::setup()?;
            let images = build_boxd_and_images()?;
            println!(
                "kernel  {} ({})",
                images.kernel.display(),
                images.kernel_release
            );
            println!("initrd  {}", images.initrd.display());
            println!("rootfs  {}", images.rootfs.display());
            Ok(())
        }
        Task::Test {
            allow_skips,
            cargo_test,
        } => test::suite(allow_skips, &cargo_test),
        Task::CheckDeps => deps::check(),
        Task::E2e {
            scenario: Scenario::Boot,
        } => {
            setup::setup()?;
            build_boxd_and_images()?;
            run(Command::new(env!("CARGO")).args([
                "test",
                "-p",
                "boxd-tests",
                "--test",
                "boot",
                "--",
                "--nocapture",
            ]))
        }
        Task::Bench { what, args } => {
            setup::setup()?;
            setup::ensure_packages(what.packages())?;
            build_boxd_and_images()?;
            let (program, first) = what.program();
            run(Command::new(build_test_program(program)?)
                .args(first)
                .args(&args))
        }
        Task::Demo => {
            setup::setup()?;
            build_boxd_and_images()?;
            run(&mut Command::new(build_test_program("boxd-demo")?))
        }
        Task::CaptureHellos { count } => {
            setup::setup()?;
            setup::ensure_packages(&[("chromium", "the browser whose ClientHellos are captured")])?;
            run(Command::new(build_test_program("boxd-capture-hellos")?).arg(count.to_string()))
        }
        Task::Testhost {
            forwards,
            cpus,
            memory_mib,
            command,
        } => {
            let host = boxd_testkit::testhost::TestHost {
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

/// Builds the release `boxd` and the guest images (which carry it), and drops images
/// no longer current.
fn build_boxd_and_images() -> Result<images::Images> {
    let boxd = build_boxd()?;
    let images = images::build(&boxd)?;
    images::prune(&images)?;
    Ok(images)
}

/// Builds the release `boxd` binary that guests and the test host run.
pub fn build_boxd() -> Result<PathBuf> {
    let step = Step::start("cargo build --release -p boxd");
    run(Command::new(env!("CARGO")).args(["build", "--quiet", "--release", "-p", "boxd"]))?;
    step.done();
    Ok(target_dir().join("release/boxd"))
}

/// Builds one of the tests crate's programs (benches, the demo) in release mode; its
/// path.
fn build_test_program(bin: &str) -> Result<PathBuf> {
    let step = Step::start(format!("cargo build --release -p boxd-tests --bin {bin}"));
    run(Command::new(env!("CARGO")).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "boxd-tests",
        "--bin",
        bin,
    ]))?;
    step.done();
    Ok(target_dir().join("release").join(bin))
}
