//! The run's ledger: what a test run did that the test harness's own counts cannot
//! tell. libtest counts a skipped test as passed, and a test that re-ran inside the
//! emulated KVM host as one that passed on this host; `cargo xtask test` points
//! `BOXD_TEST_LEDGER` at a file, tests append one JSON line per event, and the summary
//! moves those tests to where they belong.

use std::io::Write;
use std::path::Path;

/// The ledger file's path, when a run keeps one.
pub const ENV: &str = "BOXD_TEST_LEDGER";

/// Largest ledger read back (a run writes a few lines per test).
const READ_MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A test that could not run here (only outside strict runs: there it fails).
    Skipped { test: String, reason: String },
    /// A test whose body ran inside the emulated KVM host, and whether it passed there.
    TestHost { test: String, passed: bool },
}

impl Entry {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Entry::Skipped { test, reason } => {
                serde_json::json!({"kind": "skipped", "test": test, "reason": reason})
            }
            Entry::TestHost { test, passed } => {
                serde_json::json!({"kind": "testhost", "test": test, "passed": passed})
            }
        }
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        let test = v["test"].as_str()?.to_string();
        match v["kind"].as_str()? {
            "skipped" => Some(Entry::Skipped {
                test,
                reason: v["reason"].as_str().unwrap_or_default().to_string(),
            }),
            "testhost" => Some(Entry::TestHost {
                test,
                passed: v["passed"].as_bool()?,
            }),
            _ => None,
        }
    }
}

/// Appends `entry` to the run's ledger, if the run keeps one. One `write` of one line
/// on an O_APPEND file, so test processes running side by side never interleave.
pub fn record(entry: Entry) {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let line = format!("{}\n", entry.to_json());
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // Losing the record would make the summary lie: say so loudly.
        panic!("cannot append to the test ledger {path:?}: {e}");
    }
}

/// The entries of a ledger file (none when it does not exist).
pub fn read(path: &Path) -> Vec<Entry> {
    use std::io::Read;
    let mut text = String::new();
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let _ = file.take(READ_MAX_BYTES).read_to_string(&mut text);
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter_map(|v| Entry::from_json(&v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_the_round_trip() {
        for e in [
            Entry::Skipped {
                test: "a::b".into(),
                reason: "no \"curl\"\nat all".into(),
            },
            Entry::TestHost {
                test: "api_machines".into(),
                passed: false,
            },
        ] {
            assert_eq!(Entry::from_json(&e.to_json()), Some(e));
        }
    }
}
