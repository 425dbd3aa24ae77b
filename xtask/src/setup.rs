//! `cargo xtask setup`: install what a fresh machine lacks, idempotently.
//!
//! Every requirement is a check plus an install. The check is cheap, so running setup on
//! a machine that already has everything takes well under a second.

use crate::util::{Step, is_root, output, run};
use anyhow::{Result, bail};
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
];

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
    Ok(())
}

/// Packages from the list that are not installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (name, _) in DEBIAN_PACKAGES {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", name])
            .output()?;
        let installed = status.status.success()
            && String::from_utf8_lossy(&status.stdout).contains("install ok installed");
        if !installed {
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
    let still = missing_packages()?;
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
