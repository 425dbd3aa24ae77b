//! What every benchmark prints, and how: rounds interleaved with the peer's (so a drift
//! of the machine hits both alike), the median of each side with its spread, errors
//! counted and a run refused when they pass [`ERROR_RATE_MAX`], `BENCH` lines, and one
//! closing `SETTINGS` line from which the run can be repeated.
//!
//! A peer figure is always measured in the same run. A published number may be
//! printed for context, labelled as published ([`published`]), never as a ratio.

use anyhow::{Result, bail};
use std::fmt::Write as _;

/// Fewer rounds than this cannot tell a 10 % difference from the machine's own noise
/// (measured: proxy rounds of one side ranged 33-43k rps within a run).
pub const ROUNDS_MIN: usize = 5;
/// A run with more errors than this (a fraction of the operations) prints no figure.
pub const ERROR_RATE_MAX: f64 = 0.001;

/// Refuses arguments a bench program does not know (a misspelt option must not be
/// ignored): `with_value` take the next argument, `flags` stand alone.
pub fn check_args(args: &[String], with_value: &[&str], flags: &[&str]) -> Result<()> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if with_value.contains(&a) {
            i += 2;
        } else if flags.contains(&a) {
            i += 1;
        } else {
            bail!(
                "unknown argument {a:?}; this bench takes {}",
                with_value
                    .iter()
                    .map(|v| format!("{v} VALUE"))
                    .chain(flags.iter().map(|f| f.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// The value after `--name` in a bench program's arguments, or `default`.
pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match args.iter().position(|a| a == name) {
        Some(i) => {
            let v = args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
            v.parse().map_err(|e| anyhow::anyhow!("{name} {v}: {e}"))
        }
        None => Ok(default),
    }
}

/// Refuses fewer than [`ROUNDS_MIN`] rounds, saying why.
pub fn check_rounds(rounds: usize) -> Result<()> {
    if rounds < ROUNDS_MIN {
        bail!(
            "--rounds {rounds}: at least {ROUNDS_MIN} rounds are needed to report a median and a spread that mean something"
        );
    }
    Ok(())
}

/// One side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ours,
    Peer,
}

/// Runs `rounds` rounds of ours then the peer's (interleaved, so that a drift of the
/// machine hits both alike), printing each round's pair; both series.
pub fn interleave(
    what: &str,
    rounds: usize,
    mut run: impl FnMut(Side) -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut o, mut p) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for i in 0..rounds {
        o.push(run(Side::Ours)?);
        p.push(run(Side::Peer)?);
        eprintln!(
            "  {what} round {}: boxd {} | peer {}",
            i + 1,
            num(o[i]),
            num(p[i])
        );
    }
    Ok((o, p))
}

/// Which way is better for a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Rates: the ratio is ours / peer's.
    Higher,
    /// Times: the ratio is peer's / ours.
    Lower,
}

/// The median (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "median of no samples");
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The smallest and largest sample.
pub fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// The p-th percentile (0-100) of `v`, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    assert!(!v.is_empty(), "percentile of no samples");
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Decimal places that keep a figure readable at its size.
fn places(x: f64) -> usize {
    match x.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    }
}

fn num(x: f64) -> String {
    format!("{x:.*}", places(x))
}

/// `median (min-max)` of a series.
pub fn describe(v: &[f64]) -> String {
    let (lo, hi) = spread(v);
    format!("{} (min {} max {})", num(median(v)), num(lo), num(hi))
}

/// The ratio of two medians, > 1 when ours is better.
pub fn ratio(ours: f64, peer: f64, better: Better) -> f64 {
    match better {
        Better::Higher => ours / peer,
        Better::Lower => peer / ours,
    }
}

/// Prints one figure against its peer: both series (median and spread) on a line for
/// people, and the `BENCH` line of the medians.
pub fn compare(
    name: &str,
    unit: &str,
    ours: &[f64],
    peer: &[f64],
    peer_name: &str,
    better: Better,
) {
    let (o, p) = (median(ours), median(peer));
    println!(
        "  {name}: boxd {} | {peer_name} {} {unit} ({} rounds each, interleaved)",
        describe(ours),
        describe(peer),
        ours.len()
    );
    println!(
        "BENCH {name} {} {unit} peer={} ratio={:.2}",
        num(o),
        num(p),
        ratio(o, p, better)
    );
}

/// Prints a figure that has no peer in this run (the `BENCH` line carries no ratio).
pub fn alone(name: &str, unit: &str, ours: &[f64], what: &str) {
    println!("  {name}: boxd {} {unit} ({what})", describe(ours));
    println!("BENCH {name} {} {unit}", num(median(ours)));
}

/// A number someone published elsewhere, printed for context only: never a ratio.
pub fn published(name: &str, value: &str, source: &str) {
    println!("  (published, not measured here: {name} {value}, {source})");
}

/// Errors counted over a run: refused above [`ERROR_RATE_MAX`] of `operations`.
pub fn check_errors(what: &str, operations: u64, errors: u64) -> Result<()> {
    let rate = if operations == 0 {
        1.0
    } else {
        errors as f64 / operations as f64
    };
    println!(
        "  {what}: {errors} errors in {operations} operations ({:.3} %)",
        rate * 100.0
    );
    if operations == 0 {
        bail!("{what}: no operation completed; no figure");
    }
    if rate > ERROR_RATE_MAX {
        bail!(
            "{what}: {errors} errors in {operations} operations is over {:.1} %; no figure from this run",
            ERROR_RATE_MAX * 100.0
        );
    }
    Ok(())
}

/// The closing line: the bench and every setting that shaped its figures.
pub fn settings(bench: &str, settings: &[(&str, String)]) {
    let mut line = format!("SETTINGS bench={bench}");
    for (k, v) in settings {
        let _ = write!(line, " {k}={v}");
    }
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_spreads_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (1.0, 3.0));
        assert_eq!(ratio(2.0, 1.0, Better::Higher), 2.0);
        assert_eq!(ratio(2.0, 1.0, Better::Lower), 0.5);
        assert_eq!(percentile(&[5.0, 1.0, 4.0, 2.0, 3.0], 99.0), 5.0);
        assert_eq!(percentile(&[5.0, 1.0, 4.0, 2.0, 3.0], 50.0), 3.0);
    }

    #[test]
    fn too_many_errors_or_too_few_rounds_refuse_the_run() {
        assert!(check_errors("x", 10_000, 10).is_ok());
        assert!(check_errors("x", 10_000, 11).is_err());
        assert!(check_errors("x", 0, 0).is_err());
        assert!(check_rounds(4).is_err());
        assert!(check_rounds(5).is_ok());
    }
}
