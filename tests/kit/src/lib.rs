//! What every boxd test run shares, built without any system package (so that `cargo
//! xtask`, which installs those packages, can link it): the paths of the workspace, the
//! emulated KVM host and the rule for where a Linux guest test runs, declared skips, and
//! the run's ledger that `cargo xtask test` counts from.
//!
//! A test that cannot run is not a test that passed. [`skip!`] says why; in CI
//! (`CI=true`) and under `cargo xtask test` it fails the test with that reason, and
//! elsewhere it prints `SKIPPED <test>: <reason>` and records the skip in the ledger.

pub mod ledger;
pub mod place;
pub mod testhost;

pub use place::{EMULATION_FLAW, Place, guests_boot_here, place, run_in_testhost};

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/kit is two levels down")
        .to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` the way cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        None => root().join("target"),
    }
}

/// The release `boxd` binary that `cargo xtask images` built (and put in the rootfs).
pub fn boxd_binary() -> anyhow::Result<PathBuf> {
    let p = target_dir().join("release/boxd");
    if !p.exists() {
        anyhow::bail!(
            "{} is missing; build it and the images with `cargo xtask images`",
            p.display()
        );
    }
    Ok(p)
}

/// Waits (at most 20 s) until something accepts TCP connections on loopback `port`.
pub fn wait_port(port: u16) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A child process killed and reaped when dropped, so nothing a test or bench starts
/// (a server, a backend, QEMU, a load generator) outlives it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether this run must not skip: CI (`CI=true`, as CI services set it) or `cargo
/// xtask test` (which sets `BOXD_STRICT_TESTS=1`). No capability is allowed to be
/// absent on the machines CI runs on: they have KVM (through the emulated host), root,
/// bpffs, network namespaces and every package `cargo xtask setup` installs.
pub fn strict() -> bool {
    let on = |k: &str| {
        std::env::var(k).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"))
    };
    on("CI") || on(STRICT_ENV)
}

/// Set to 1 by `cargo xtask test`: a test that cannot run fails.
pub const STRICT_ENV: &str = "BOXD_STRICT_TESTS";

/// The name of the test running on this thread, as the test harness knows it (libtest
/// names each test's thread after the test). Used to re-run a test elsewhere by name
/// and to say which test skipped.
pub fn current_test() -> Option<String> {
    let name = std::thread::current().name()?.to_string();
    (name != "main").then_some(name)
}

/// What [`skipped`] returns, so that a test can `return` it whatever its return type.
#[must_use = "a skipped test returns at once: use the skip! macro"]
pub struct Skipped;

impl From<Skipped> for () {
    fn from(_: Skipped) {}
}

impl From<Skipped> for anyhow::Result<()> {
    fn from(_: Skipped) -> Self {
        Ok(())
    }
}

/// The calling test cannot run here, for `reason`. In a strict run (see [`strict`])
/// that is a failure: this panics with the reason. Otherwise it prints `SKIPPED <test>:
/// <reason>` on stderr and records the skip in the ledger. Use [`skip!`].
pub fn skipped(reason: impl std::fmt::Display) -> Skipped {
    let test = current_test().unwrap_or_else(|| "(not a test thread)".into());
    if strict() {
        panic!(
            "{test} cannot run here: {reason}\n(CI and `cargo xtask test` count a test that \
             cannot run as failed; `cargo xtask setup` installs what the tests need)"
        );
    }
    eprintln!("SKIPPED {test}: {reason}");
    ledger::record(ledger::Entry::Skipped {
        test,
        reason: reason.to_string(),
    });
    Skipped
}

/// Ends the calling test as unable to run here, with a reason (format arguments): a
/// failure in CI and under `cargo xtask test`, a counted `SKIPPED` line elsewhere.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {
        return $crate::skipped(format!($($arg)*)).into()
    };
}

/// Whether we run as root (network namespaces, BPF, cgroups and TAPs need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `name` is a command on PATH.
pub fn have(name: &str) -> bool {
    testhost::which(name).is_some()
}

/// The first of `tools` that is not on PATH, as a skip reason.
pub fn missing_tools(tools: &[&str]) -> Option<String> {
    tools
        .iter()
        .find(|t| !have(t))
        .map(|t| format!("{t} is not installed (`cargo xtask setup` installs what the tests need)"))
}

/// Assembles a tiny guest (GNU as, from binutils, which the C toolchain brings) into
/// flat 64-bit code for the VMM's raw boot: `src` is its `.s`, the `.o` and `.bin` go
/// into `out`.
pub fn assemble(src: &Path, out: &Path) -> std::io::Result<Vec<u8>> {
    let stem = src
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".into());
    let obj = out.join(format!("{stem}.o"));
    let bin = out.join(format!("{stem}.bin"));
    let run = |cmd: &mut std::process::Command| -> std::io::Result<()> {
        let o = cmd.output().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot run {cmd:?}: {e}; install binutils (`cargo xtask setup` does)"),
            )
        })?;
        if !o.status.success() {
            return Err(std::io::Error::other(format!(
                "{cmd:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            )));
        }
        Ok(())
    };
    run(std::process::Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg(src))?;
    run(std::process::Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin))?;
    std::fs::read(bin)
}
