//! `cargo xtask bench control`: committed writes per second and commit latency of the
//! control plane with 1 and 3 voters on loopback, and of etcd (Debian's etcd-server)
//! with 1 and 3 members in the same run.
//!
//! Both run with their defaults for durability (an fsync'd log before a write is
//! acknowledged). Load: the same number of concurrent clients, each with one persistent
//! connection to the leader, each writing a small key/value as fast as answers come:
//! boxd through its admin socket (JSON lines), etcd through its HTTP/JSON API
//! (`/v3/kv/put`, served by etcd's gRPC gateway inside the etcd process).

use anyhow::{Context, Result, bail};
use boxd_control::admin::{AdminRequest, Client};
use boxd_control::types::{Command as Cmd, Request};
use boxd_tests::bench::{self, Better};
use boxd_tests::cluster::Cluster;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Figures {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Writes attempted, and those that failed (refused, or no answer).
    ops: u64,
    errors: u64,
}

/// Errors one client may meet before it gives up (a dead connection fails every call).
const CLIENT_ERRORS_MAX: u64 = 1000;

/// Runs `clients` threads of `op` for `seconds`; throughput and latency percentiles of
/// the writes that succeeded, and how many did not.
fn load<C: Send + 'static>(
    clients: usize,
    seconds: f64,
    connect: impl Fn(usize) -> Result<C>,
    op: fn(&mut C, usize, u64) -> Result<()>,
) -> Result<Figures> {
    let conns: Vec<C> = (0..clients).map(&connect).collect::<Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            std::thread::spawn(move || -> (Vec<u32>, u64) {
                let mut lat = Vec::new();
                let (mut n, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline && errors < CLIENT_ERRORS_MAX {
                    let t = Instant::now();
                    match op(&mut conn, c, n) {
                        Ok(()) => lat.push(t.elapsed().as_micros() as u32),
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("  client {c}: {e:#}");
                            }
                            errors += 1;
                        }
                    }
                    n += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in threads {
        let (lat, e) = t.join().expect("load thread");
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if all.is_empty() {
        bail!("no write succeeded ({errors} errors)");
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Ok(Figures {
        writes_per_s: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        ops: all.len() as u64 + errors,
        errors,
    })
}

/// Write load on one node's admin socket.
fn load_socket(sock: PathBuf, clients: usize, seconds: f64) -> Result<Figures> {
    load(
        clients,
        seconds,
        move |_| Ok(Client::connect(&sock, Duration::from_secs(10))?),
        |cl: &mut Client, c, n| {
            let req = Request {
                actor: "bench".into(),
                id: format!("b{c}-{n}"),
                at_ms: 0,
                cmd: Cmd::SetSetting {
                    key: format!("bench/{c}"),
                    value: format!("value-{n:08}"),
                },
            };
            let reply: boxd_control::types::Reply = cl.call(&AdminRequest::Write(req))?;
            reply.result.map(|_| ()).map_err(|e| anyhow::anyhow!("{e}"))
        },
    )
}

struct Etcd {
    children: Vec<Child>,
    dir: PathBuf,
    clients: Vec<u16>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Etcd {
    fn start(members: usize) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("boxd-etcd-{members}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let base = 23790 + 20 * members as u16;
        let peer = |i: usize| base + 10 + i as u16;
        let client = |i: usize| base + i as u16;
        let initial: Vec<String> = (0..members)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peer(i)))
            .collect();
        let mut children = Vec::new();
        for i in 0..members {
            let log = std::fs::File::create(dir.join(format!("e{i}.log")))?;
            children.push(
                Command::new("etcd")
                    .args(["--name", &format!("e{i}")])
                    .arg("--data-dir")
                    .arg(dir.join(format!("e{i}")))
                    .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", client(i))])
                    .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", client(i))])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", peer(i))])
                    .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", peer(i))])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new", "--log-level", "error"])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .context("starting etcd (Debian package etcd-server; `cargo xtask setup` installs it)")?,
            );
        }
        let e = Self {
            children,
            dir,
            clients: (0..members).map(client).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while e.leader().is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not elect a leader: {}", e.dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(e)
    }

    /// The client port of the member that leads.
    fn leader(&self) -> Result<u16> {
        for &port in &self.clients {
            let mut h = Http::connect(port)?;
            let v: serde_json::Value =
                serde_json::from_str(&h.post("/v3/maintenance/status", "{}")?)?;
            if v["header"]["member_id"] == v["leader"] && !v["leader"].is_null() {
                return Ok(port);
            }
        }
        bail!("no leader yet")
    }
}

/// A keep-alive HTTP/1.1 client, just enough for etcd's JSON API.
struct Http {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Http {
    fn connect(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn post(&mut self, path: &str, body: &str) -> Result<String> {
        write!(
            self.w,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("etcd answered {line:?}");
        }
        let (mut len, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.r.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16)?;
                let mut chunk = vec![0; n + 2];
                self.r.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else {
            out.resize(len, 0);
            self.r.read_exact(&mut out)?;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn etcd_load(port: u16, clients: usize, seconds: f64) -> Result<Figures> {
    load(
        clients,
        seconds,
        move |_| Http::connect(port),
        |h: &mut Http, c, n| {
            let body = format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64(&format!("bench/{c}")),
                b64(&format!("value-{n:08}"))
            );
            h.post("/v3/kv/put", &body).map(|_| ())
        },
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    bench::check_args(&args, &["--seconds", "--clients", "--rounds"], &[])?;
    let seconds: f64 = bench::arg(&args, "--seconds", 3.0)?;
    let clients: usize = bench::arg(&args, "--clients", 32)?;
    let rounds: usize = bench::arg(&args, "--rounds", bench::ROUNDS_MIN)?;
    bench::check_rounds(rounds)?;
    if let Ok(sock) = std::env::var("BOXD_BENCH_SOCKET") {
        // Load on a running node only (for profiling it).
        let f = load_socket(sock.into(), clients, seconds)?;
        println!(
            "{:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            f.writes_per_s, f.p50_ms, f.p99_ms, f.errors
        );
        return Ok(());
    }
    let boxd = boxd_tests::guest::boxd_binary()?;
    println!(
        "control plane (boxd control run) vs etcd: {clients} clients, {seconds} s rounds, loopback, fsync'd logs:"
    );
    for voters in [1usize, 3] {
        let cluster = Cluster::loopback(
            &boxd,
            &format!("bench{voters}"),
            voters,
            7500 + 20 * voters as u16,
        )?;
        let sock = cluster.socket(cluster.leader(Duration::from_secs(10))?);
        let e = Etcd::start(voters)?;
        let port = e.leader()?;
        let (mut o, mut p) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            o.push(load_socket(sock.clone(), clients, seconds)?);
            p.push(etcd_load(port, clients, seconds)?);
            eprintln!(
                "  {voters} voter(s) round {}: boxd {:.0} writes/s p99 {:.2} ms | etcd {:.0} writes/s p99 {:.2} ms",
                i + 1,
                o[i].writes_per_s,
                o[i].p99_ms,
                p[i].writes_per_s,
                p[i].p99_ms
            );
        }
        let sum = |v: &[Figures]| -> (u64, u64) {
            (
                v.iter().map(|f| f.ops).sum(),
                v.iter().map(|f| f.errors).sum(),
            )
        };
        let (ops, errors) = sum(&o);
        bench::check_errors(&format!("boxd, {voters} voter(s)"), ops, errors)?;
        let (ops, errors) = sum(&p);
        bench::check_errors(&format!("etcd, {voters} member(s)"), ops, errors)?;
        let get = |v: &[Figures], f: fn(&Figures) -> f64| v.iter().map(f).collect::<Vec<_>>();
        let tag = format!("raft{voters}");
        bench::compare(
            &format!("{tag}-writes-per-s"),
            "writes/s",
            &get(&o, |f| f.writes_per_s),
            &get(&p, |f| f.writes_per_s),
            "etcd",
            Better::Higher,
        );
        bench::compare(
            &format!("{tag}-p50-ms"),
            "ms",
            &get(&o, |f| f.p50_ms),
            &get(&p, |f| f.p50_ms),
            "etcd",
            Better::Lower,
        );
        bench::compare(
            &format!("{tag}-p99-ms"),
            "ms",
            &get(&o, |f| f.p99_ms),
            &get(&p, |f| f.p99_ms),
            "etcd",
            Better::Lower,
        );
    }
    bench::settings(
        "control",
        &[
            ("rounds", rounds.to_string()),
            ("seconds", seconds.to_string()),
            ("clients", clients.to_string()),
            ("voters", "1,3".into()),
            ("value_bytes", "14".into()),
            ("transport", "loopback".into()),
        ],
    );
    Ok(())
}
