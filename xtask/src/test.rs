//! `cargo xtask test`, the README's test command and CI's: setup, the checks, every test
//! and the fuzz smoke run, then one line that counts what passed, failed and skipped
//! across every stage.
//!
//! The test harness's own counts are not enough: libtest reports a test that skipped
//! as passed, and a test that re-ran inside the emulated KVM host as one that passed on
//! this host. The tests keep a ledger (boxd_testkit::ledger) of both, which the summary
//! reads to put each test in its place. In this run a test that cannot run fails
//! (`BOXD_STRICT_TESTS=1`) unless `--allow-skips` is given outside CI.

use crate::util::{Step, run, target_dir};
use anyhow::{Context, Result, bail};
use boxd_testkit::ledger::{self, Entry};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// How long CI fuzzes the network backend's descriptor-chain parsers.
const FUZZ_SECONDS: u32 = 30;

/// Counts of one stage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    skipped: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

pub fn suite(allow_skips: bool, cargo_test: &[String]) -> Result<()> {
    if allow_skips && boxd_testkit::strict() {
        bail!(
            "--allow-skips is refused here (CI is set): on CI machines nothing a test needs may be missing"
        );
    }
    crate::setup::setup()?;
    let cargo = env!("CARGO");
    let step = Step::start("xtask's dependency graph needs no system package");
    crate::deps::check()?;
    step.done();
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
    crate::build_boxd_and_images()?;

    let ledger_path = target_dir().join("test-ledger.jsonl");
    let _ = std::fs::remove_file(&ledger_path);
    let step = Step::start(format!(
        "cargo test --workspace --no-fail-fast {}",
        cargo_test.join(" ")
    ));
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_test)
        .env(ledger::ENV, &ledger_path)
        .env(
            boxd_testkit::STRICT_ENV,
            if allow_skips { "0" } else { "1" },
        );
    let (harness, exit_ok) = run_counting(&mut cmd)?;
    step.done();
    let entries = ledger::read(&ledger_path);
    let (mut host, testhost) = split(harness, &entries);
    if !exit_ok && harness.failed == 0 {
        // A build error, or a test binary that died before its summary.
        eprintln!("cargo test failed without a failing test in its output (see above)");
        host.failed += 1;
    }

    let fuzz = match fuzz(FUZZ_SECONDS) {
        Ok(()) => Counts {
            passed: 1,
            ..Default::default()
        },
        Err(e) => {
            eprintln!("fuzz smoke run failed: {e:#}");
            Counts {
                failed: 1,
                ..Default::default()
            }
        }
    };

    let mut total = host;
    total += testhost;
    total += fuzz;
    for e in &entries {
        if let Entry::Skipped { test, reason } = e {
            eprintln!("SKIPPED {test}: {reason}");
        }
    }
    println!("tests on this host: {host}");
    println!("tests in the emulated KVM host: {testhost}");
    println!("fuzz smoke runs: {fuzz}");
    println!("{total}");
    if total.failed > 0 {
        bail!("{} failed", total.failed);
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and sums libtest's `test result:`
/// lines (the emulated KVM host's own output is indented, so it is not counted twice).
fn run_counting(cmd: &mut Command) -> Result<(Counts, bool)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("start cargo test")?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let mut counts = Counts::default();
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo test's output")?;
        writeln!(out, "{line}")?;
        if let Some(c) = parse_result(&line) {
            counts += c;
        }
    }
    let status = child.wait()?;
    Ok((counts, status.success()))
}

/// One libtest summary: `test result: ok. 3 passed; 1 failed; 2 ignored; ...`.
/// Ignored tests count as skipped.
fn parse_result(line: &str) -> Option<Counts> {
    let rest = line.strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut c = Counts::default();
    let mut seen = 0;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(Ok(n)), Some(what)) = (words.next().map(str::parse::<u64>), words.next()) else {
            continue;
        };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.skipped = n,
            _ => continue,
        }
        seen += 1;
    }
    (seen == 3).then_some(c)
}

/// Moves what the ledger knows out of the harness's counts: skipped tests out of
/// "passed", and tests whose body ran inside the emulated KVM host into that stage.
fn split(harness: Counts, entries: &[Entry]) -> (Counts, Counts) {
    let mut host = harness;
    let mut inside = Counts::default();
    for e in entries {
        match e {
            Entry::Skipped { .. } => {
                host.passed = host.passed.saturating_sub(1);
                host.skipped += 1;
            }
            Entry::TestHost { passed: true, .. } => {
                host.passed = host.passed.saturating_sub(1);
                inside.passed += 1;
            }
            Entry::TestHost { passed: false, .. } => {
                host.failed = host.failed.saturating_sub(1);
                inside.failed += 1;
            }
        }
    }
    (host, inside)
}

/// Runs the vhost-net fuzz target for `seconds` (cargo-fuzz on the pinned nightly,
/// which setup installed with it).
fn fuzz(seconds: u32) -> Result<()> {
    let step = Step::start(format!("cargo fuzz run chain ({seconds} s)"));
    let dir = boxd_testkit::root().join("vhost-net/fuzz");
    std::fs::create_dir_all(dir.join("corpus/chain"))
        .context("creating the fuzz corpus directory")?;
    run(Command::new("cargo")
        .current_dir(&dir)
        .arg(format!("+{}", crate::setup::nightly()?))
        // The fresh corpus first (new inputs go there), then the committed seeds:
        // every input that ever found a bug, replayed on every run.
        .args(["fuzz", "run", "chain", "corpus/chain", "seeds/chain", "--"])
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1"))?;
    step.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries_are_read() {
        assert_eq!(
            parse_result(
                "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 5 filtered out; finished in 0.01s"
            ),
            Some(Counts {
                passed: 3,
                failed: 1,
                skipped: 2
            })
        );
        assert_eq!(
            parse_result("  [testhost] test result: ok. 1 passed;"),
            None
        );
        assert_eq!(parse_result("test foo ... ok"), None);
    }

    #[test]
    fn the_ledger_moves_skips_and_re_runs_to_their_stage() {
        let harness = Counts {
            passed: 10,
            failed: 2,
            skipped: 0,
        };
        let entries = [
            Entry::Skipped {
                test: "a".into(),
                reason: "no curl".into(),
            },
            Entry::TestHost {
                test: "b".into(),
                passed: true,
            },
            Entry::TestHost {
                test: "c".into(),
                passed: false,
            },
        ];
        let (host, inside) = split(harness, &entries);
        assert_eq!(
            host,
            Counts {
                passed: 8,
                failed: 1,
                skipped: 1
            }
        );
        assert_eq!(
            inside,
            Counts {
                passed: 1,
                failed: 1,
                skipped: 0
            }
        );
    }
}
