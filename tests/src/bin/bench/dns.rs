//! `cargo xtask bench dns`: queries per second of `boxd server`'s authoritative DNS (the
//! shipped process: the zone comes from the replicated state, one record per machine
//! made through the SSH API) against Knot serving the same names, both driven by
//! dnsperf on loopback in the same run, interleaved (ours, Knot, ours, Knot, ...).
//!
//! Lost queries and answers other than NOERROR / NXDOMAIN are counted as errors; a run
//! over the error budget prints no figure. Neither server rate-limits (Knot's default;
//! boxd's `[dns] rate_limit = 0`): the load comes from one source address.

use anyhow::{Context, Result, bail};
use boxd_tests::Killed;
use boxd_tests::api::{Options, Server, ZONE};
use boxd_tests::bench::{self, Better};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SSH_PORT: u16 = 22300;
const KNOT: u16 = 5392;
/// dnsperf's settings, the same for both servers.
const CLIENTS: u32 = 8;
const OUTSTANDING: u32 = 256;
/// Names queried that no machine has (NXDOMAIN answers), one query in this many.
const NXDOMAIN_EVERY: usize = 10;

/// One dnsperf round.
struct Round {
    qps: f64,
    sent: u64,
    errors: u64,
}

pub fn dns(rounds: usize, seconds: u64, machines: usize) -> Result<()> {
    bench::check_rounds(rounds)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = 250.min(64 * cores);
    if !(1..=most).contains(&machines) {
        bail!(
            "--machines {machines}: give 1 to {most} (the bench server's pool is a /24, and it places 64 vCPUs per core)"
        );
    }
    let dir = std::env::temp_dir().join(format!("boxd-bench-dns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    // Ours: a node whose zone holds `machines` machines, made the way users make them.
    // Their VMMs cannot matter here (and cannot boot Linux on a host without hardware
    // virtualization), so each is stopped as soon as it is recorded.
    let opts = Options {
        machine_quota: machines as u32,
        memory: "256M",
        settings: vec![
            ("dns", "rate_limit = 0".into()),
            // One vCPU each, on this host's cores (the server allows 64 per core).
            (
                "machines",
                format!("cpu_overcommit = {}", (machines / cores + 1).min(64)),
            ),
            ("machines", "memory_overcommit = 16.0".into()),
        ],
        ..Default::default()
    };
    let s = Server::start(&dir.join("server"), SSH_PORT, &opts, &["bench"])?;
    let step = Instant::now();
    let mut names = Vec::with_capacity(machines);
    for i in 0..machines {
        let name = format!("m{i}");
        s.json("bench", &["new", "--name", &name, "--no-wait"])?;
        s.json("bench", &["stop", &name])?;
        names.push(name);
    }
    eprintln!(
        "made and stopped {machines} machines through the SSH API in {:.1} s",
        step.elapsed().as_secs_f64()
    );
    let ours = s.dns_port();
    wait_answering(ours, &format!("{}.{ZONE}", names[names.len() - 1]))
        .with_context(|| format!("boxd server's DNS on port {ours}"))?;

    // The peer: Knot with the same records (SOA, NS, apex, one A per machine, all
    // pointing at the address boxd's records point at).
    let records = zone_file(&s, &names)?;
    std::fs::write(dir.join("zone.db"), records)?;
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n    listen: 127.0.0.1@{KNOT}\n    rundir: {d}\n    udp-workers: {cores}\n    tcp-workers: 1\n    background-workers: 1\n\
             database:\n    storage: {d}\n\
             log:\n  - target: stderr\n    any: warning\n\
             zone:\n  - domain: {ZONE}\n    file: {d}/zone.db\n    storage: {d}\n",
            d = dir.display()
        ),
    )?;
    let _knot = Killed(
        Command::new("knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("knot.log"))?)
            .spawn()
            .context("start knotd (package knot)")?,
    );
    wait_answering(KNOT, &format!("{}.{ZONE}", names[0])).context("knot")?;

    // Queries: most for machines, one in NXDOMAIN_EVERY for names nobody has, shuffled.
    let mut q = String::new();
    let mut x = 0x2545f4914f6cdd1du64;
    for i in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if i % NXDOMAIN_EVERY == NXDOMAIN_EVERY - 1 {
            q.push_str(&format!("nx{}.{ZONE} A\n", x % 100_000));
        } else {
            q.push_str(&format!(
                "{}.{ZONE} A\n",
                names[(x % machines as u64) as usize]
            ));
        }
    }
    std::fs::write(dir.join("queries.txt"), q)?;

    let (mut o, mut p) = (Vec::new(), Vec::new());
    let (mut sent, mut errors_o, mut sent_p, mut errors_p) = (0, 0, 0, 0);
    for i in 0..rounds {
        for (port, who) in [(ours, "boxd"), (KNOT, "knot")] {
            let r = dnsperf(&dir, port, seconds)?;
            eprintln!(
                "  round {} {who}: {:.0} qps, {} errors in {} queries",
                i + 1,
                r.qps,
                r.errors,
                r.sent
            );
            if who == "boxd" {
                o.push(r.qps);
                sent += r.sent;
                errors_o += r.errors;
            } else {
                p.push(r.qps);
                sent_p += r.sent;
                errors_p += r.errors;
            }
        }
    }
    println!(
        "dnsperf on loopback, {machines} machine names (1 query in {NXDOMAIN_EVERY} NXDOMAIN), {cores} UDP threads each:"
    );
    bench::check_errors("boxd server DNS", sent, errors_o)?;
    bench::check_errors("knot", sent_p, errors_p)?;
    bench::compare("dns-qps", "qps", &o, &p, "knot", Better::Higher);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    bench::settings(
        "dns",
        &[
            ("rounds", rounds.to_string()),
            ("seconds", seconds.to_string()),
            ("machines", machines.to_string()),
            ("dnsperf_clients", CLIENTS.to_string()),
            ("dnsperf_outstanding", OUTSTANDING.to_string()),
            ("threads", cores.to_string()),
            ("rate_limit", "off".into()),
            ("transport", "udp".into()),
        ],
    );
    Ok(())
}

/// The zone as Knot reads it, with the records boxd serves: its SOA and NS from a real
/// answer of the server, and one A per machine at the address boxd answers with.
fn zone_file(s: &Server, names: &[String]) -> Result<String> {
    let a = s.dig(&["+short", "A", &format!("{}.{ZONE}", names[0])])?;
    let addr = a.trim().to_string();
    if addr.is_empty() {
        bail!("boxd server's DNS has no A record for {}", names[0]);
    }
    let ns = s.dig(&["+short", "NS", ZONE])?;
    let ns = ns.trim().trim_end_matches('.').to_string();
    if ns.is_empty() {
        bail!("boxd server's DNS has no NS record for {ZONE}");
    }
    let mut zf = format!(
        "$ORIGIN {ZONE}.\n$TTL 30\n@ 3600 IN SOA {ns}. hostmaster.{ZONE}. 1 3600 600 86400 30\n\
         @ 3600 IN NS {ns}.\n{ns}. 3600 IN A {addr}\n@ IN A {addr}\n"
    );
    for n in names {
        zf.push_str(&format!("{n} IN A {addr}\n"));
    }
    Ok(zf)
}

/// Waits (bounded) until `dig` gets an answer for `name` from the server on `port`.
fn wait_answering(port: u16, name: &str) -> Result<()> {
    for _ in 0..100 {
        let out = Command::new("dig")
            .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=1"])
            .args([name, "A"])
            .output()
            .context("run dig (package bind9-dnsutils)")?;
        if String::from_utf8_lossy(&out.stdout).contains("status: NOERROR") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no answer for {name} within 10 s")
}

/// One dnsperf run: its rate, queries sent, and errors (lost queries, and answers
/// other than NOERROR and NXDOMAIN).
fn dnsperf(dir: &Path, port: u16, seconds: u64) -> Result<Round> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(dir.join("queries.txt"))
        .args(["-l", &seconds.to_string()])
        .args(["-c", &CLIENTS.to_string(), "-q", &OUTSTANDING.to_string()])
        .args(["-T", "1"])
        .output()
        .context("run dnsperf (package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_dnsperf(&text).with_context(|| {
        format!(
            "dnsperf printed no figures:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn parse_dnsperf(text: &str) -> Option<Round> {
    let first_number = |label: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(label)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    };
    let qps = first_number("Queries per second:")?;
    let sent = first_number("Queries sent:")? as u64;
    let lost = first_number("Queries lost:")? as u64;
    // "Response codes:       NOERROR 900 (90.00%), NXDOMAIN 100 (10.00%)"
    let codes = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Response codes:"))
        .unwrap_or("");
    let mut bad = 0u64;
    for part in codes.split(',') {
        let mut w = part.split_whitespace();
        let (Some(code), Some(n)) = (w.next(), w.next()) else {
            continue;
        };
        if !matches!(code, "NOERROR" | "NXDOMAIN") {
            bad += n.parse::<u64>().unwrap_or(0);
        }
    }
    Some(Round {
        qps,
        sent,
        errors: lost + bad,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dnsperf_output_is_read_with_its_errors() {
        let text = "  Queries sent:         1000\n  Queries completed:    990 (99.00%)\n  \
                    Queries lost:         10 (1.00%)\n\n  Response codes:       NOERROR 800 (80.81%), \
                    NXDOMAIN 180 (18.18%), SERVFAIL 10 (1.01%)\n  Queries per second:   12345.6\n";
        let r = super::parse_dnsperf(text).unwrap();
        assert_eq!((r.sent, r.errors), (1000, 20));
        assert_eq!(r.qps, 12345.6);
    }
}
