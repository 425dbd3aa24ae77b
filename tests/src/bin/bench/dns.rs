//! `cargo xtask bench dns`: queries per second of `boxd dns serve` against Knot serving
//! the same zone, both driven by dnsperf on loopback in the same run, interleaved
//! (ours, Knot, ours, Knot, ...), each with one UDP worker per core and no response
//! rate limiting (Knot's default; boxd's limit is per source and this is one source).

use anyhow::{Context, Result, bail};
use boxd_tests::Killed;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Machine names in the zone.
const HOSTS: usize = 1000;
const OURS: u16 = 5391;
const KNOT: u16 = 5392;

pub fn dns(seconds: f64) -> Result<()> {
    crate::setup::ensure_packages(&[
        ("knot", "Knot DNS, the peer in `bench dns`"),
        ("dnsperf", "the load generator of `bench dns`"),
    ])?;
    crate::build_boxd()?;
    let dir = std::env::temp_dir().join(format!("boxd-bench-dns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let zone = "bench.boxd.test";
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // The same records for both: SOA, NS + glue, apex A, HOSTS machine A records.
    let hosts: Vec<(String, String)> = (0..HOSTS)
        .map(|i| {
            (
                format!("m{i}"),
                format!("100.64.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    let spec = serde_json::json!({
        "zone": zone,
        "nameservers": [[format!("ns1.{zone}"), "192.0.2.1"]],
        "apex": "192.0.2.1",
        "hosts": hosts,
        "txt": [],
    });
    std::fs::write(dir.join("zone.json"), spec.to_string())?;
    let mut zf = format!(
        "$ORIGIN {zone}.\n$TTL 30\n@ 3600 IN SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 30\n@ 3600 IN NS ns1.{zone}.\nns1 3600 IN A 192.0.2.1\n@ IN A 192.0.2.1\n"
    );
    for (h, a) in &hosts {
        zf.push_str(&format!("{h} IN A {a}\n"));
    }
    std::fs::write(dir.join("zone.db"), zf)?;
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n    listen: 127.0.0.1@{KNOT}\n    rundir: {d}\n    udp-workers: {cores}\n    tcp-workers: 1\n    background-workers: 1\n\
             database:\n    storage: {d}\n\
             log:\n  - target: stderr\n    any: warning\n\
             zone:\n  - domain: {zone}\n    file: {d}/zone.db\n    storage: {d}\n",
            d = dir.display()
        ),
    )?;
    // Queries: 90% names that exist, 10% that don't (NXDOMAIN), shuffled.
    let mut q = String::new();
    let mut x = 0x2545f4914f6cdd1du64;
    for i in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if i % 10 == 9 {
            q.push_str(&format!("nx{}.{zone} A\n", x % 100_000));
        } else {
            q.push_str(&format!("m{}.{zone} A\n", x % HOSTS as u64));
        }
    }
    std::fs::write(dir.join("queries.txt"), q)?;

    let boxd = boxd_tests::target_dir().join("release/boxd");
    let _ours = Killed(
        Command::new(&boxd)
            .args(["dns", "serve", "--zone-file"])
            .arg(dir.join("zone.json"))
            .args(["--listen", &format!("127.0.0.1:{OURS}")])
            .args(["--threads", &cores.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start boxd dns serve")?,
    );
    let _knot = Killed(
        Command::new("knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("knot.log"))?)
            .spawn()
            .context("start knotd (package knot)")?,
    );
    for (port, who) in [(OURS, "boxd"), (KNOT, "knot")] {
        wait_answering(port).with_context(|| format!("{who} on port {port}"))?;
    }

    let rounds = 3;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(dnsperf(&dir, OURS, seconds)?);
        peer.push(dnsperf(&dir, KNOT, seconds)?);
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (o, p) = (best(&ours), best(&peer));
    println!(
        "dnsperf on loopback, {HOSTS} names (10% of queries NXDOMAIN), {cores} UDP workers each, {rounds} rounds of {seconds} s interleaved; best round:"
    );
    println!("  boxd rounds: {ours:.0?}\n  knot rounds: {peer:.0?}");
    println!("BENCH dns-qps {o:.0} qps peer={p:.0} ratio={:.2}", o / p);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Waits (bounded) until `dig` gets an answer from the server on `port`.
fn wait_answering(port: u16) -> Result<()> {
    for _ in 0..100 {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+tries=1",
                "+time=1",
                "m1.bench.boxd.test",
                "A",
            ])
            .output()
            .context("run dig (package bind9-dnsutils)")?;
        if String::from_utf8_lossy(&out.stdout).contains("status: NOERROR") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no answer within 10 s")
}

/// One dnsperf run; its "Queries per second".
fn dnsperf(dir: &Path, port: u16, seconds: f64) -> Result<f64> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(dir.join("queries.txt"))
        .args([
            "-l",
            &format!("{seconds}"),
            "-c",
            "8",
            "-q",
            "256",
            "-T",
            "1",
        ])
        .output()
        .context("run dnsperf (package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lost = text
        .lines()
        .find(|l| l.contains("Queries lost:"))
        .unwrap_or("")
        .trim()
        .to_string();
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("dnsperf printed no rate:\n{text}"))?;
    eprintln!("  port {port}: {qps:.0} qps ({lost})");
    Ok(qps)
}
