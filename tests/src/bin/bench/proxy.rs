//! `cargo xtask bench proxy`: HTTPS requests per second and p99 latency through `boxd
//! server`'s proxy (the shipped process: routes and the zone's certificate come from
//! the replicated state) to a machine's web server, against nginx as a TLS-terminating
//! reverse proxy to the same web server. Same client (wrk: HTTP/1.1 keep-alive over TLS,
//! SNI and Host = the machine's name), same key type (ECDSA P-256), same run,
//! interleaved rounds.
//!
//! The machine: `new` through the SSH API makes it; its web server is an nginx in a
//! network namespace behind the machine's host port (`bx<id>`, the device the proxy
//! reaches a machine through, at the machine side's address 10.0.0.2). A Linux guest
//! cannot boot at hardware speed on a host without VT-x/AMD-V, and the figure is the
//! proxy's, so both proxies get this same backend. The machine is started through the
//! API (its state is what routes the name); its VMM's own start is left to fail there.
//!
//! Non-2xx answers, socket errors and timeouts are counted; a run over the error budget
//! prints no figure.

use anyhow::{Context, Result, bail};
use boxd_tests::Killed;
use boxd_tests::api::{Options, Server, ZONE};
use boxd_tests::bench::{self, Better};
use boxd_tests::net::Netns;
use std::path::Path;
use std::process::{Command, Stdio};

const SSH_PORT: u16 = 22320;
const NGINX: u16 = 24444;
/// The machine's name (its host name is `<name>.<zone>`).
const MACHINE: &str = "bench";
/// wrk threads: one per core of this machine would starve the proxies; two is what
/// the figures were always measured with.
const WRK_THREADS: u32 = 2;
const PAGE_BYTES: usize = 1024;

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

/// One wrk round.
struct Round {
    rps: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

pub fn proxy(rounds: usize, seconds: u64, connections: u32) -> Result<()> {
    bench::check_rounds(rounds)?;
    if seconds == 0 || connections == 0 {
        bail!("--seconds and --connections must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("boxd-bench-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tmp"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let host = format!("{MACHINE}.{ZONE}");

    let opts = Options {
        memory: "256M",
        ..Default::default()
    };
    let s = Server::start(&dir.join("server"), SSH_PORT, &opts, &["bench"])?;
    let m = s.json("bench", &["new", "--name", MACHINE, "--no-wait"])?;
    let id = m["id"].as_u64().context("new --json: no id")?;
    s.json("bench", &["stop", MACHINE])?;
    // `start` records the machine running (what routes its name) and then waits for
    // its VMM, which cannot boot Linux here: that wait's failure is expected.
    let _ = s.ssh("bench", &["start", MACHINE]);
    let info = s.json("bench", &["info", MACHINE])?;
    if info["state"] != "running" {
        bail!(
            "the bench machine is {} after start, not running",
            info["state"]
        );
    }

    // The machine's web server, behind its host port.
    let port = host_port(id);
    let ns = Netns::new(&format!("bxpb{}", std::process::id() % 100_000))?;
    let _ = Command::new("ip").args(["link", "del", &port]).output();
    sh(
        &dir,
        &format!(
            "ip link add {port} type veth peer name eth0 netns {ns} && \
             ip addr add 10.0.0.1/30 dev {port} && ip link set {port} up && \
             ip -n {ns} addr add 10.0.0.2/30 dev eth0 && ip -n {ns} link set eth0 up",
            ns = ns.name
        ),
    )?;
    let _link = LinkGuard(port.clone());
    std::fs::write(dir.join("index.html"), "x".repeat(PAGE_BYTES))?;
    let d = dir.display();
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
            "{}  server {{ listen 10.0.0.2:80; root {d}; }}\n}}\n",
            common("backend")
        ),
    )?;
    sh(
        &dir,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
             -subj /CN={host} -addext subjectAltName=DNS:{host} -keyout key.pem -out cert.pem 2>/dev/null"
        ),
    )?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "{}  upstream machine {{ server 10.0.0.2:80; keepalive 256; }}\n\
               server {{\n    listen 127.0.0.1:{NGINX} ssl http2;\n    server_name {host};\n\
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
    std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost {host}\n"))?;
    let nginx = |conf: &str, netns: Option<&str>| -> Result<Killed> {
        let mut cmd = match netns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n, "nginx"]);
                c
            }
            None => Command::new("nginx"),
        };
        Ok(Killed(
            cmd.args(["-g", "daemon off;", "-c"])
                .arg(dir.join(conf))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start nginx (package nginx-light)")?,
        ))
    };
    let _backend = nginx("backend.conf", Some(&ns.name))?;
    let _nginx = nginx("nginx.conf", None)?;
    boxd_tests::wait_port(NGINX)?;
    // Both proxies answer the machine's page before anything is measured.
    for (port, who) in [(s.https_port(), "boxd server"), (NGINX, "nginx")] {
        let r = wrk(&dir, &host, port, 1, 1)
            .with_context(|| format!("a first request through {who}"))?;
        if r.requests == 0 || r.errors > 0 {
            bail!(
                "{who} did not answer the machine's page ({} requests, {} errors); server log:\n{}",
                r.requests,
                r.errors,
                s.log()
            );
        }
    }

    let (mut o, mut p) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        for (port, who) in [(s.https_port(), "boxd"), (NGINX, "nginx")] {
            let r = wrk(&dir, &host, port, seconds, connections)?;
            eprintln!(
                "  round {} {who}: {:.0} rps, p99 {:.2} ms, {} errors in {} requests",
                i + 1,
                r.rps,
                r.p99_ms,
                r.errors,
                r.requests
            );
            if who == "boxd" { &mut o } else { &mut p }.push(r);
        }
    }
    println!(
        "wrk -t{WRK_THREADS} -c{connections}, HTTP/1.1 keep-alive over TLS to {host}, {PAGE_BYTES} B page from the machine's web server:"
    );
    let sum = |v: &[Round]| {
        (
            v.iter().map(|r| r.requests).sum::<u64>(),
            v.iter().map(|r| r.errors).sum::<u64>(),
        )
    };
    let (req, err) = sum(&o);
    bench::check_errors("boxd server proxy", req, err)?;
    let (req, err) = sum(&p);
    bench::check_errors("nginx", req, err)?;
    let rps = |v: &[Round]| v.iter().map(|r| r.rps).collect::<Vec<_>>();
    let p99 = |v: &[Round]| v.iter().map(|r| r.p99_ms).collect::<Vec<_>>();
    bench::compare(
        "proxy-https-rps",
        "rps",
        &rps(&o),
        &rps(&p),
        "nginx",
        Better::Higher,
    );
    bench::compare(
        "proxy-p99-ms",
        "ms",
        &p99(&o),
        &p99(&p),
        "nginx",
        Better::Lower,
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    bench::settings(
        "proxy",
        &[
            ("rounds", rounds.to_string()),
            ("seconds", seconds.to_string()),
            ("connections", connections.to_string()),
            ("wrk_threads", WRK_THREADS.to_string()),
            ("page_bytes", PAGE_BYTES.to_string()),
            ("nginx_workers", cores.to_string()),
            ("protocol", "http/1.1+tls".into()),
        ],
    );
    Ok(())
}

/// The machine's host port name (userspace/boxd/src/reconcile.rs).
fn host_port(id: u64) -> String {
    format!("bx{id}")
}

/// Deletes the veth standing in for the machine's host port.
struct LinkGuard(String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// One wrk run against `port` (name resolution through a private /etc/hosts).
fn wrk(dir: &Path, host: &str, port: u16, seconds: u64, connections: u32) -> Result<Round> {
    let threads = WRK_THREADS.min(connections);
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount --bind {hosts} /etc/hosts && exec wrk -t{threads} -c{connections} -d{seconds}s --timeout 5s --latency https://{host}:{port}/",
            hosts = dir.join("hosts").display(),
        ))
        .output()
        .context("run wrk (package wrk)")?;
    let t = String::from_utf8_lossy(&o.stdout);
    parse_wrk(&t).with_context(|| {
        format!(
            "wrk printed no figures:\n{t}{}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn parse_wrk(t: &str) -> Option<Round> {
    let rps = t
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    let p99_ms = t
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
        })?;
    // "  123456 requests in 10.00s, 150.00MB read"
    let requests = t.lines().find_map(|l| {
        let (n, rest) = l.trim().split_once(' ')?;
        rest.starts_with("requests in").then(|| n.parse().ok())?
    })?;
    // "  Socket errors: connect 0, read 3, write 0, timeout 2" and
    // "  Non-2xx or 3xx responses: 7"
    let mut errors = 0u64;
    if let Some(se) = t
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
    {
        for part in se.split(',') {
            errors += part
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    if let Some(n) = t
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
    {
        errors += n.trim().parse::<u64>().unwrap_or(0);
    }
    Some(Round {
        rps,
        p99_ms,
        requests,
        errors,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_output_is_read_with_its_errors() {
        let t = "Running 10s test @ https://bench.boxd.test:29320/\n  2 threads and 64 connections\n\
                 \x20 Latency Distribution\n     50%    1.20ms\n     99%    4.50ms\n\
                 \x20 351234 requests in 10.00s, 400.00MB read\n\
                 \x20 Socket errors: connect 0, read 3, write 0, timeout 2\n\
                 \x20 Non-2xx or 3xx responses: 7\nRequests/sec:  35123.40\nTransfer/sec:     40.00MB\n";
        let r = super::parse_wrk(t).unwrap();
        assert_eq!((r.requests, r.errors), (351234, 12));
        assert_eq!(r.p99_ms, 4.5);
        assert_eq!(r.rps, 35123.4);
    }
}
