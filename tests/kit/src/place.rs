//! Where a test (or a bench) that boots Linux guests runs: right here when this host's
//! KVM runs guest kernels at hardware speed (or this is the emulated KVM host), else
//! inside the emulated KVM host.

use crate::ledger;
use crate::testhost::{Outcome, TestHost, Wedged};
use anyhow::{Context, Result, bail};
use std::time::Duration;

/// Where a test that boots Linux guests runs.
pub enum Place {
    /// Right here: this host has hardware-speed KVM, or this is the test host.
    Here,
    /// The test was run inside the emulated KVM host; it passed.
    RanInTestHost,
}

/// Whether Linux guests can boot right here: this is the test host, or this host's KVM
/// runs ring 0 at hardware speed (measured by `boxd vmm probe`, the VMM's own probe).
pub fn guests_boot_here() -> Result<bool> {
    if std::env::var_os("BOXD_IN_TESTHOST").is_some() {
        return Ok(true);
    }
    let boxd = crate::boxd_binary()?;
    let out = std::process::Command::new(&boxd)
        .args(["vmm", "probe", "--json"])
        .output()
        .with_context(|| format!("run {} vmm probe", boxd.display()))?;
    if !out.status.success() {
        bail!(
            "the KVM probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`boxd vmm probe --json` printed {:?}", out.stdout))?;
    let hardware = v["hardware_speed"]
        .as_bool()
        .context("`boxd vmm probe --json` lacks hardware_speed")?;
    if !hardware {
        eprintln!(
            "this host's KVM runs ring 0 at {:.0} ns/instruction (emulated, no VT-x/AMD-V): using the emulated KVM host",
            v["ns_per_instruction"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(hardware)
}

/// Retries of a run spoiled by the emulated host itself (wedge, host panic, nested
/// triple fault); measured here at about one spoiled run in ten for the network test.
const EMULATION_RETRIES: u32 = 2;

/// Printed by a test whose guest rebooted itself: under the emulated KVM host that is a
/// triple fault of nested SVM under TCG (docs/testing.md), not the code under test, and
/// the launcher outside retries such a run.
pub const EMULATION_FLAW: &str = "BOXD-EMULATION-FLAW:";

/// Runs `argv` inside the emulated KVM host, failing unless it exits 0; returns what
/// it printed. The command inherits strictness (see [`crate::strict`]) and keeps a
/// ledger of its own, merged into this run's.
pub fn run_in_testhost(argv: Vec<String>, timeout: Duration) -> Result<Outcome> {
    run_in_testhost_with(argv, timeout, "")
}

fn run_in_testhost_with(argv: Vec<String>, timeout: Duration, prefix: &str) -> Result<Outcome> {
    let mut env = Vec::new();
    for k in ["CI", crate::STRICT_ENV, "RUST_BACKTRACE", "BOXD_KEEP"] {
        if let Ok(v) = std::env::var(k) {
            env.push((k.to_string(), v));
        }
    }
    let host = TestHost {
        timeout,
        env,
        output_prefix: prefix.to_string(),
        inner_ledger: true,
        ..Default::default()
    };
    // A wedged or crashed emulated host, or a nested guest that triple-faulted, says
    // nothing about the code under test: such a run is retried in a fresh host,
    // loudly, up to EMULATION_RETRIES times. A test that fails on its own is not.
    let flawed = |o: &Outcome| {
        o.exit_code != 0
            && (String::from_utf8_lossy(&o.stderr).contains(EMULATION_FLAW)
                || String::from_utf8_lossy(&o.stdout).contains(EMULATION_FLAW))
    };
    let mut attempt = 0;
    let outcome = loop {
        attempt += 1;
        let last = attempt > EMULATION_RETRIES;
        match host.run(&argv) {
            Err(e) if e.downcast_ref::<Wedged>().is_some() && !last => {
                eprintln!(
                    "WARNING: {e}\nretrying in a fresh emulated KVM host (attempt {attempt})"
                );
            }
            Ok(o) if flawed(&o) && !last => {
                eprintln!(
                    "WARNING: the nested guest rebooted itself (emulation flaw); retrying in a fresh emulated KVM host (attempt {attempt})"
                );
            }
            other => break other?,
        }
    };
    for entry in &outcome.ledger {
        ledger::record(entry.clone());
    }
    eprintln!("(the emulated KVM host booted in {:.1}s)", outcome.boot_s);
    if outcome.exit_code != 0 {
        bail!(
            "{} failed inside the emulated KVM host (exit {})",
            argv.join(" "),
            outcome.exit_code
        );
    }
    Ok(outcome)
}

/// Decides where the calling test runs. On a host without hardware virtualization the
/// test binary re-runs just this test (found by the name of the test's thread) inside
/// the emulated KVM host, and this returns `RanInTestHost` once it passed there. A
/// re-run that ran no test, or more than one, fails: a renamed or filtered-out test must
/// not pass as a run of nothing.
pub fn place() -> Result<Place> {
    if guests_boot_here()? {
        return Ok(Place::Here);
    }
    let test = crate::current_test()
        .context("place() re-runs the calling test by name: call it from the test's own thread")?;
    let exe = std::env::current_exe()?;
    let argv = vec![
        exe.display().to_string(),
        test.clone(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let outcome = run_in_testhost_with(argv, Duration::from_secs(20 * 60), "  [testhost] ");
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            ledger::record(ledger::Entry::TestHost {
                test: test.clone(),
                passed: false,
            });
            return Err(e);
        }
    };
    let ran = tests_run(&String::from_utf8_lossy(&outcome.stdout));
    if ran != Some(1) {
        ledger::record(ledger::Entry::TestHost {
            test: test.clone(),
            passed: false,
        });
        bail!(
            "re-running {test} inside the emulated KVM host ran {} (the test harness printed no \
             `running 1 test`): a renamed, ignored or filtered-out test must not pass as a run \
             of nothing",
            match ran {
                Some(n) => format!("{n} tests"),
                None => "no test harness".into(),
            }
        );
    }
    ledger::record(ledger::Entry::TestHost { test, passed: true });
    Ok(Place::RanInTestHost)
}

/// How many tests libtest said it was running (`running N tests`), from its output.
pub fn tests_run(stdout: &str) -> Option<usize> {
    stdout.lines().find_map(|l| {
        let rest = l.strip_prefix("running ")?;
        let (n, what) = rest.split_once(' ')?;
        matches!(what, "test" | "tests")
            .then(|| n.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::tests_run;

    #[test]
    fn the_harness_count_is_read_from_its_first_line() {
        assert_eq!(tests_run("\nrunning 1 test\ntest a ... ok\n"), Some(1));
        assert_eq!(tests_run("running 0 tests\n\ntest result: ok."), Some(0));
        assert_eq!(tests_run("running 12 tests\n"), Some(12));
        assert_eq!(tests_run("error: no such binary\n"), None);
        assert_eq!(tests_run("running late\n"), None);
    }

    #[test]
    fn a_test_thread_knows_its_own_name() {
        let name = crate::current_test().expect("libtest names the thread");
        assert!(name.ends_with("a_test_thread_knows_its_own_name"), "{name}");
    }
}
