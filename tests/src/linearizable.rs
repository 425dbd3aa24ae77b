//! A linearizability checker for histories of read/write registers (Wing & Gong's
//! search with Lowe's memoisation, the algorithm Knossos and Porcupine use).
//!
//! A history is a set of operations with the time each was invoked and, if the client
//! saw an answer, the time it returned. An operation without an answer (timeout, lost
//! connection) may have taken effect at any time after its invocation, or never. The
//! history is linearizable if every answered operation can be put in one order that
//! respects real time (an operation that returned before another was invoked comes
//! first) and the register's semantics (a read returns the latest write before it).
//! Keys are independent registers and are checked one by one.

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    Write(String),
    /// What the read returned (None: the key had no value).
    Read(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Op {
    pub key: String,
    pub kind: Kind,
    /// Nanoseconds from the start of the run.
    pub call: u64,
    /// None: no answer was seen.
    pub ret: Option<u64>,
}

/// Checks every key's sub-history; on failure, names the key and the operations.
pub fn check(history: &[Op]) -> Result<(), String> {
    let mut keys: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        // A read without an answer says nothing.
        if op.ret.is_none() && matches!(op.kind, Kind::Read(_)) {
            continue;
        }
        keys.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in keys {
        check_register(&ops).map_err(|e| format!("key {key:?}: {e}"))?;
    }
    Ok(())
}

/// Bound on search states, so a pathological history fails loudly instead of hanging.
const MAX_STATES: usize = 20_000_000;

fn check_register(ops: &[&Op]) -> Result<(), String> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let ret = |i: usize| ops[i].ret.unwrap_or(u64::MAX);
    let must: usize = ops.iter().filter(|o| o.ret.is_some()).count();
    // Depth-first search over (linearized set, register value).
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<String>, usize)> = vec![(vec![0; words], None, 0)];
    let mut best = 0usize;
    while let Some((done, value, answered)) = stack.pop() {
        if answered == must {
            return Ok(());
        }
        best = best.max(answered);
        if !seen.insert((done.clone(), value.clone())) {
            continue;
        }
        if seen.len() > MAX_STATES {
            return Err(format!(
                "search exceeded {MAX_STATES} states ({n} operations)"
            ));
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        // The earliest return among pending operations: only operations invoked before
        // it can be linearized next.
        let horizon = (0..n)
            .filter(|&i| !is_done(i))
            .map(ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in (0..n).filter(|&i| !is_done(i) && ops[i].call <= horizon) {
            let next = match &ops[i].kind {
                Kind::Write(v) => Some(v.clone()),
                Kind::Read(r) if *r == value => value.clone(),
                Kind::Read(_) => continue,
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            stack.push((d, next, answered + usize::from(ops[i].ret.is_some())));
        }
    }
    let mut sorted: Vec<&&Op> = ops.iter().collect();
    sorted.sort_by_key(|o| o.call);
    let shown: Vec<String> = sorted
        .iter()
        .take(40)
        .map(|o| {
            format!(
                "{:?} [{}..{}]",
                o.kind,
                o.call,
                o.ret.map_or("?".into(), |r| r.to_string())
            )
        })
        .collect();
    Err(format!(
        "not linearizable: at most {best} of {must} answered operations could be ordered; first operations: {}",
        shown.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &str, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: "k".into(),
            kind: Kind::Write(v.into()),
            call,
            ret,
        }
    }
    fn r(v: Option<&str>, call: u64, ret: u64) -> Op {
        Op {
            key: "k".into(),
            kind: Kind::Read(v.map(String::from)),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn accepts_linearizable_histories() {
        // Sequential.
        check(&[
            w("a", 0, Some(1)),
            r(Some("a"), 2, 3),
            w("b", 4, Some(5)),
            r(Some("b"), 6, 7),
        ])
        .unwrap();
        // Concurrent write and read: the read may see either.
        check(&[
            w("a", 0, Some(1)),
            w("b", 2, Some(10)),
            r(Some("a"), 3, 4),
            r(Some("b"), 5, 6),
        ])
        .unwrap();
        // A write without an answer that did happen...
        check(&[w("a", 0, Some(1)), w("b", 2, None), r(Some("b"), 20, 21)]).unwrap();
        // ...and one that never did.
        check(&[w("a", 0, Some(1)), w("b", 2, None), r(Some("a"), 20, 21)]).unwrap();
        // Nothing written yet.
        check(&[r(None, 0, 1), w("a", 2, Some(3))]).unwrap();
    }

    #[test]
    fn rejects_stale_reads_lost_writes_and_time_travel() {
        // A stale read after a newer write returned.
        assert!(check(&[w("a", 0, Some(1)), w("b", 2, Some(3)), r(Some("a"), 4, 5)]).is_err());
        // A value never written.
        assert!(check(&[w("a", 0, Some(1)), r(Some("z"), 2, 3)]).is_err());
        // Reads that go back: b then a, with a's write finished before b's began.
        assert!(
            check(&[
                w("a", 0, Some(1)),
                w("b", 2, Some(10)),
                r(Some("b"), 3, 4),
                r(Some("a"), 5, 6)
            ])
            .is_err()
        );
        // An acknowledged write lost: the register reads empty afterwards.
        assert!(check(&[w("a", 0, Some(1)), r(None, 2, 3)]).is_err());
    }
}
