//! `cargo xtask setup`: install what a fresh machine lacks, idempotently.
//!
//! Every requirement is a check plus an install. The check is cheap, so running setup on
//! a machine that already has everything takes well under a second.

use crate::util::{Step, is_root, output, run};
use anyhow::{Context, Result, bail};
use std::process::Command;

/// Debian packages boxd's build, images, test host and tests need, and why.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-x86",
        "the emulated KVM host and the QEMU peer in boot benchmarks",
    ),
    ("mmdebstrap", "builds the guest root filesystem"),
    (
        "iperf3",
        "the host end of guest TCP throughput in `cargo xtask bench net`",
    ),
    (
        "e2fsprogs",
        "packs the root filesystem as ext4 (mkfs.ext4 -d)",
    ),
    ("busybox-static", "the project's initramfs"),
    (
        "acpica-tools",
        "iasl, to check the VMM's ACPI tables in tests",
    ),
    ("iproute2", "network namespaces and links in tests"),
    ("openssh-client", "real SSH clients in end-to-end tests"),
    (
        "bind9-dnsutils",
        "dig, the DNS client of the end-to-end tests",
    ),
    (
        "pebble",
        "Let's Encrypt's test ACME server, which the ACME tests order certificates from",
    ),
    (
        "python3",
        "the web backend and WebSocket client of the proxy tests (stdlib only)",
    ),
    (
        "openssh-server",
        "OpenSSH's sshd: the floor `cargo xtask bench api` measures the SSH API against",
    ),
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF programs with LLVM 22 (Debian's LLVM 14 is too old)",
    ),
    (
        "bpftool",
        "reading the pinned data-path maps by hand (`bpftool map dump pinned`)",
    ),
    (
        "ethtool",
        "data-path tests turn veth checksum offload off, as on a wire",
    ),
    (
        "iputils-ping",
        "data-path tests ping public addresses through the router",
    ),
    (
        "nftables",
        "the kernel DNAT peer in `cargo xtask bench bpf`",
    ),
    (
        "librocksdb-dev",
        "the Raft log's RocksDB, linked statically (with its compression libraries)",
    ),
    (
        "libclang-dev",
        "bindgen generates the RocksDB bindings at build time",
    ),
    ("etcd-server", "the peer in `cargo xtask bench control`"),
    ("curl", "a real TLS client for the SNI parser's tests"),
    (
        "openssl",
        "a real TLS client for the SNI parser's tests; test certificates (Pebble, bench proxy)",
    ),
];

/// bpf-linker, built against LLVM 22 (the pinned nightly's LLVM).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz, which runs the fuzz smoke test on the pinned nightly.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn setup() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        eprintln!(
            "setup: all {} Debian packages present",
            DEBIAN_PACKAGES.len()
        );
    } else {
        for name in &missing {
            let why = DEBIAN_PACKAGES
                .iter()
                .find(|(n, _)| n == name)
                .map_or("", |(_, w)| w);
            eprintln!("setup: installing {name} ({why})");
        }
        install_packages(&missing)?;
    }
    ebpf_toolchain()?;
    cargo_fuzz()
}

/// The nightly toolchain the eBPF programs are built with, as pinned by
/// ebpf/programs/rust-toolchain.toml (the one place it is written down).
pub fn nightly() -> Result<String> {
    let path = boxd_testkit::root().join("ebpf/programs/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .filter(|c| c.starts_with("nightly-"))
        .with_context(|| {
            format!(
                "{} pins no dated nightly (channel = \"nightly-YYYY-MM-DD\")",
                path.display()
            )
        })
}

/// The eBPF toolchain: the pinned nightly with rust-src, and bpf-linker against LLVM 22.
fn ebpf_toolchain() -> Result<()> {
    let nightly = nightly()?;
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to install the eBPF programs' nightly toolchain (https://rustup.rs)",
    )?;
    if !installed.lines().any(|l| l.starts_with(&nightly)) {
        let step = Step::start(format!(
            "rustup toolchain install {nightly} --profile minimal --component rust-src (about 600 MB)"
        ));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &nightly,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        step.done();
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        &nightly,
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        let step = Step::start(format!(
            "rustup component add rust-src --toolchain {nightly}"
        ));
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &nightly,
        ]))?;
        step.done();
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        let step = Step::start(format!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22, a few minutes)"
        ));
        run(Command::new(env!("CARGO"))
            .args([
                "install",
                "--quiet",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
        step.done();
    }
    Ok(())
}

/// cargo-fuzz for the fuzz smoke run of `cargo xtask test`.
fn cargo_fuzz() -> Result<()> {
    let have = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if !have.contains(CARGO_FUZZ_VERSION) {
        let step = Step::start(format!(
            "cargo install cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)"
        ));
        run(Command::new(env!("CARGO")).args([
            "install",
            "--quiet",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
        step.done();
    }
    Ok(())
}

/// Installs packages outside the standard list (used by tasks that need more).
pub fn ensure_packages(list: &[(&'static str, &'static str)]) -> Result<()> {
    let missing: Vec<&str> = missing_of(list)?;
    if !missing.is_empty() {
        for (n, why) in list.iter().filter(|(n, _)| missing.contains(n)) {
            eprintln!("setup: installing {n} ({why})");
        }
        install_packages(&missing)?;
    }
    Ok(())
}

/// Packages from the list that are not installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    missing_of(DEBIAN_PACKAGES)
}

fn installed(name: &str) -> Result<bool> {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()?;
    Ok(status.status.success()
        && String::from_utf8_lossy(&status.stdout).contains("install ok installed"))
}

fn missing_of(list: &[(&'static str, &'static str)]) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (name, _) in list {
        if !installed(name)? {
            missing.push(*name);
        }
    }
    Ok(missing)
}

fn install_packages(names: &[&str]) -> Result<()> {
    let step = Step::start(format!("apt-get install {}", names.join(" ")));
    let sudo = |args: &[&str]| {
        let mut cmd = if is_root() {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg(args[0]);
            c
        };
        cmd.args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(sudo(&["apt-get", "update", "-q"]).stdout(std::process::Stdio::null()))?;
    let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(names);
    run(sudo(&args).stdout(std::process::Stdio::null()))?;
    let still: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !installed(n).unwrap_or(false))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but {} still missing",
            still.join(", ")
        );
    }
    step.done();
    Ok(())
}

/// Whether a command exists on PATH (for checks that are not Debian packages).
#[allow(dead_code)]
pub fn have_command(name: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {name}")])).is_ok()
}
