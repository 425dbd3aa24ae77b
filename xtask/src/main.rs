//! boxd's development tasks: `cargo xtask <task>`.

mod bench;
mod bench_dns;
mod bench_proxy;
mod cpio;
mod demo;
mod images;
mod setup;
mod util;

use anyhow::{Context, Result};
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
    /// The test suite, as CI runs it: setup, format and lint checks, images, every test
    /// (the ones that boot Linux run in the emulated KVM host where needed).
    Test,
    /// End-to-end scenarios with real Linux guests.
    E2e {
        #[arg(value_enum)]
        scenario: Scenario,
    },
    /// Benchmarks that print boxd's figure beside a peer's from the same run.
    Bench {
        #[arg(value_enum)]
        what: BenchKind,
        /// Boots per VMM (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// `net`: seconds per frame-rate measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// `net`: leave out the QEMU guest runs (about two minutes).
        #[arg(long)]
        skip_guest: bool,
        /// Already inside the place where guests boot (set by the task itself).
        #[arg(long, hide = true)]
        inside: bool,
    },
    /// Build what is missing, boot a demo machine and drive it, with timings.
    Demo {
        #[arg(long, hide = true)]
        inside: bool,
    },
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

#[derive(Clone, Copy, clap::ValueEnum)]
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
    /// The HTTPS proxy: requests per second and p99 through `boxd proxy serve` against
    /// nginx (wrk, same certificate and backend).
    Proxy,
    /// Authoritative DNS: queries per second of `boxd dns serve` against Knot (dnsperf).
    Dns,
    /// The SSH API: `ssh host ls --json` p50/p99 against OpenSSH's sshd running `true`,
    /// and `new` to SSH-ready (--runs machines).
    Api,
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
        Task::Test => test(),
        Task::E2e {
            scenario: Scenario::Boot,
        } => {
            let boxd = build_boxd()?;
            images::build(&boxd)?;
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
        Task::Bench {
            what: BenchKind::Net,
            seconds,
            skip_guest,
            ..
        } => bench::net(seconds, skip_guest),
        Task::Bench {
            what: BenchKind::Bpf,
            seconds,
            ..
        } => bench::bpf(seconds),
        Task::Bench {
            what: BenchKind::Proxy,
            seconds,
            ..
        } => bench_proxy::proxy(seconds.max(5.0)),
        Task::Bench {
            what: BenchKind::Dns,
            seconds,
            ..
        } => bench_dns::dns(seconds.max(5.0)),
        Task::Bench {
            what: BenchKind::Control,
            seconds,
            ..
        } => bench::control(seconds),
        Task::Bench {
            what: BenchKind::Api,
            runs,
            inside,
            ..
        } => {
            if inside {
                return bench::api_new(runs);
            }
            setup::setup()?;
            let here = prepare_guests()?;
            bench::api_ls()?;
            if here {
                return bench::api_new(runs);
            }
            let argv = vec![
                self_exe()?,
                "bench".into(),
                "api".into(),
                "--runs".into(),
                runs.to_string(),
                "--inside".into(),
            ];
            boxd_tests::guest::run_in_testhost(argv, std::time::Duration::from_secs(60 * 60))
        }
        Task::CaptureHellos { count } => {
            setup::setup()?;
            setup::ensure_packages(&[("chromium", "the browser whose ClientHellos are captured")])?;
            run(Command::new(env!("CARGO")).args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "boxd-tests",
                "--bin",
                "boxd-capture-hellos",
                "--",
                &count.to_string(),
            ]))
        }
        Task::Bench {
            what: BenchKind::Boot,
            runs,
            inside,
            ..
        } => {
            if !inside && !prepare_guests()? {
                let argv = vec![
                    self_exe()?,
                    "bench".into(),
                    "boot".into(),
                    "--runs".into(),
                    runs.to_string(),
                    "--inside".into(),
                ];
                return boxd_tests::guest::run_in_testhost(
                    argv,
                    std::time::Duration::from_secs(60 * 60),
                );
            }
            bench::boot(runs)
        }
        Task::Demo { inside } => {
            if !inside {
                setup::setup()?;
                if !prepare_guests()? {
                    let argv = vec![self_exe()?, "demo".into(), "--inside".into()];
                    return boxd_tests::guest::run_in_testhost(
                        argv,
                        std::time::Duration::from_secs(30 * 60),
                    );
                }
            }
            demo::run()
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

/// Builds boxd and the images; returns whether Linux guests boot on this host directly.
fn prepare_guests() -> Result<bool> {
    let boxd = build_boxd()?;
    images::build(&boxd)?;
    boxd_tests::guest::guests_boot_here()
}

fn self_exe() -> Result<String> {
    Ok(std::env::current_exe()?.display().to_string())
}

/// The README's test command (and CI's).
fn test() -> Result<()> {
    setup::setup()?;
    let cargo = env!("CARGO");
    let step = Step::start("cargo fmt --check");
    run(Command::new(cargo).args(["fmt", "--all", "--", "--check"]))?;
    step.done();
    let step = Step::start("cargo clippy -D warnings");
    run(Command::new(cargo).args([
        "clippy",
        "--quiet",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step.done();
    let boxd = build_boxd()?;
    let images = images::build(&boxd)?;
    images::prune(&images)?;
    let step = Step::start("cargo test --workspace");
    run(Command::new(cargo).args(["test", "--workspace"]))?;
    step.done();
    fuzz(FUZZ_SECONDS)
}

/// How long CI fuzzes the network backend's descriptor-chain parsers.
const FUZZ_SECONDS: u32 = 30;

/// Runs the vhost-net fuzz target for `seconds` (cargo-fuzz on the nightly toolchain;
/// installs cargo-fuzz from crates.io when missing).
fn fuzz(seconds: u32) -> Result<()> {
    let has_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_fuzz {
        let step = Step::start("cargo install cargo-fuzz (once, about 30 s)");
        run(Command::new(env!("CARGO")).args(["install", "--quiet", "--locked", "cargo-fuzz"]))?;
        step.done();
    }
    let step = Step::start(format!("cargo fuzz run chain ({seconds} s)"));
    let dir = boxd_tests::root().join("vhost-net/fuzz");
    std::fs::create_dir_all(dir.join("corpus/chain"))
        .context("creating the fuzz corpus directory")?;
    run(Command::new("cargo")
        .current_dir(&dir)
        // The fresh corpus first (new inputs go there), then the committed seeds:
        // every input that ever found a bug, replayed on every run.
        .args([
            "+nightly",
            "fuzz",
            "run",
            "chain",
            "corpus/chain",
            "seeds/chain",
            "--",
        ])
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1"))?;
    step.done();
    Ok(())
}

/// Builds the release `boxd` binary that guests and the test host run.
pub fn build_boxd() -> Result<PathBuf> {
    let step = Step::start("cargo build --release -p boxd");
    run(Command::new(env!("CARGO")).args(["build", "--quiet", "--release", "-p", "boxd"]))?;
    step.done();
    Ok(target_dir().join("release/boxd"))
}
