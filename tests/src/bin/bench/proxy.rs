//! `cargo xtask bench proxy`: HTTPS requests per second and p99 latency through
//! `boxd proxy serve` against nginx as a TLS-terminating reverse proxy, same
//! certificate, same backend (a third nginx serving a small page), same client (wrk:
//! HTTP/1.1 keep-alive over TLS, SNI and Host = the machine's name), same run,
//! interleaved rounds.

use anyhow::{Context, Result, bail};
use boxd_tests::Killed;
use std::path::Path;
use std::process::{Command, Stdio};

const BACKEND: u16 = 24080;
const OURS: u16 = 24443;
const NGINX: u16 = 24444;
const HOST: &str = "bench.boxd.test";

fn sh(dir: &Path, cmd: &str) -> Result<()> {
    let o = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()?;
    if !o.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

pub fn proxy(seconds: f64) -> Result<()> {
    crate::setup::ensure_packages(&[
        ("nginx-light", "the peer (and the backend) in `bench proxy`"),
        ("wrk", "the HTTPS load generator of `bench proxy`"),
    ])?;
    crate::build_boxd()?;
    let dir = std::env::temp_dir().join(format!("boxd-bench-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    sh(
        &dir,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
             -subj /CN={HOST} -addext subjectAltName=DNS:{HOST} -keyout key.pem -out cert.pem 2>/dev/null"
        ),
    )?;
    std::fs::write(dir.join("index.html"), "x".repeat(1024))?;
    let d = dir.display();
    // Two nginx instances: the backend on its own (as a machine is), and the peer
    // proxy. Serving both from one instance would put the peer's backend hop inside its
    // own worker processes, a shortcut boxd's proxy does not get.
    let common = |name: &str| {
        format!(
            "worker_processes {cores};\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
               fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n"
        )
    };
    std::fs::write(
        dir.join("backend.conf"),
        format!(
            "{}  server {{ listen 127.0.0.1:{BACKEND}; root {d}; }}\n}}\n",
            common("backend")
        ),
    )?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "{}  upstream machine {{ server 127.0.0.1:{BACKEND}; keepalive 256; }}\n\
               server {{\n    listen 127.0.0.1:{NGINX} ssl http2;\n    server_name {HOST};\n\
                 ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
                 ssl_protocols TLSv1.2 TLSv1.3;\n\
                 add_header Strict-Transport-Security max-age=63072000 always;\n\
                 location / {{\n      proxy_pass http://machine;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-For $remote_addr;\n\
                   proxy_set_header X-Forwarded-Proto https;\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
            common("nginx")
        ),
    )?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(
        dir.join("routes.json"),
        format!("{{\"{HOST}\": \"127.0.0.1:{BACKEND}\"}}"),
    )?;
    std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost {HOST}\n"))?;
    let nginx = |conf: &str| -> Result<Killed> {
        Ok(Killed(
            Command::new("nginx")
                .args(["-g", "daemon off;", "-c"])
                .arg(dir.join(conf))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start nginx (package nginx-light)")?,
        ))
    };
    let _backend = nginx("backend.conf")?;
    let _nginx = nginx("nginx.conf")?;
    let _ours = Killed(
        Command::new(boxd_tests::target_dir().join("release/boxd"))
            .args(["proxy", "serve", "--routes"])
            .arg(dir.join("routes.json"))
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .args(["--https", &format!("127.0.0.1:{OURS}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("proxy.log"))?)
            .spawn()
            .context("start boxd proxy serve")?,
    );
    for port in [BACKEND, OURS, NGINX] {
        boxd_tests::wait_port(port)?;
    }
    let rounds = 3;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(wrk(&dir, OURS, seconds)?);
        peer.push(wrk(&dir, NGINX, seconds)?);
    }
    let median = |v: &[(f64, f64)], i: usize| {
        let mut x: Vec<f64> = v.iter().map(|s| if i == 0 { s.0 } else { s.1 }).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (o_rps, p_rps) = (median(&ours, 0), median(&peer, 0));
    let (o_p99, p_p99) = (median(&ours, 1), median(&peer, 1));
    println!(
        "wrk -t2 -c64, HTTP/1.1 keep-alive over TLS to {HOST}, 1 KiB page from an nginx backend; {rounds} rounds of {seconds} s interleaved, medians:"
    );
    println!("  boxd rounds (rps, p99 ms): {ours:.1?}\n  nginx rounds (rps, p99 ms): {peer:.1?}");
    println!(
        "BENCH proxy-https-rps {o_rps:.0} rps peer={p_rps:.0} ratio={:.2}",
        o_rps / p_rps
    );
    println!(
        "BENCH proxy-p99-ms {o_p99:.2} ms peer={p_p99:.2} ratio={:.2}",
        p_p99 / o_p99
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One wrk run against `port` (name resolution through a private /etc/hosts):
/// requests per second and the p99 latency in ms.
fn wrk(dir: &Path, port: u16, seconds: f64) -> Result<(f64, f64)> {
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount --bind {hosts} /etc/hosts && exec wrk -t2 -c64 -d{secs}s --latency https://{HOST}:{port}/",
            hosts = dir.join("hosts").display(),
            secs = seconds.round() as u64
        ))
        .output()
        .context("run wrk (package wrk)")?;
    let t = String::from_utf8_lossy(&o.stdout);
    let rps = t
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| {
            format!(
                "wrk printed no rate:\n{t}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        })?;
    let p99 = t
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| {
            let v = v.trim();
            let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .with_context(|| format!("wrk printed no 99th percentile:\n{t}"))?;
    let errors = t
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    eprintln!(
        "  port {port}: {rps:.0} rps, p99 {p99:.2} ms{}",
        errors.map_or(String::new(), |e| format!(" ({})", e.trim()))
    );
    Ok((rps, p99))
}
