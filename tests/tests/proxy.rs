//! The HTTPS proxy end to end with real clients (`curl`, a stdlib-Python WebSocket
//! client) and a real backend (tests/fixtures/web/backend.py):
//! - `proxy_in_server`: `boxd server`'s proxy: the internal CA, redirects, HSTS, h2,
//!   error pages for names without a running machine, and bad clients.
//! - `proxy_forwards`: `boxd proxy serve` in front of the backend: HTTP/1.1 keep-alive,
//!   HTTP/2, forwarded headers (and spoofed ones dropped), bodies both ways, a
//!   server-sent event stream, a WebSocket echo, a backend that goes away.
//!   (Machines booted in the emulated host are reached the same way in api_machines.)

use anyhow::{Context, Result, ensure};
use boxd_tests::api::{Options, Server, ZONE};
use boxd_tests::guest::boxd_binary;
use boxd_tests::{Killed, wait_port};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/web")
}

fn curl(args: &[&str]) -> Result<Output> {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .context("run curl")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn proxy_in_server() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("boxd-proxy-srv-{}", std::process::id()));
    let s = Server::start(&dir, 22250, &Options::default(), &["alice"])?;
    let (https, http) = (s.https_port(), s.http_port());
    let ca = dir.join("ca.pem");

    // The internal CA, over plain HTTP, for clients to trust.
    let o = curl(&[
        "-f",
        "-o",
        ca.to_str().unwrap(),
        &format!("http://127.0.0.1:{http}/.well-known/boxd/ca.pem"),
    ])?;
    ensure!(
        o.status.success(),
        "CA download: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(std::fs::read_to_string(&ca)?.contains("BEGIN CERTIFICATE"));

    // Plain HTTP: a permanent redirect that keeps the path and query.
    let o = curl(&[
        "-i",
        "-H",
        &format!("Host: app.{ZONE}"),
        &format!("http://127.0.0.1:{http}/some/path?q=1"),
    ])?;
    let t = text(&o);
    ensure!(t.starts_with("HTTP/1.1 301"), "{t}");
    ensure!(
        t.contains(&format!("location: https://app.{ZONE}/some/path?q=1")),
        "{t}"
    );
    let o = curl(&[
        "-i",
        "-X",
        "POST",
        "-H",
        &format!("Host: app.{ZONE}"),
        &format!("http://127.0.0.1:{http}/form"),
    ])?;
    ensure!(
        text(&o).starts_with("HTTP/1.1 308"),
        "POST keeps its method: {}",
        text(&o)
    );

    // HTTPS with the internal CA: h2, HSTS, a clear 404 for a name without a machine.
    let resolve = |name: &str| format!("{name}.{ZONE}:{https}:127.0.0.1");
    let url = |name: &str| format!("https://{name}.{ZONE}:{https}/");
    let o = curl(&[
        "-i",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve("nope"),
        "-w",
        "\nversion=%{http_version}",
        &url("nope"),
    ])?;
    let t = text(&o);
    ensure!(
        o.status.success(),
        "TLS with the internal CA: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(t.starts_with("HTTP/2 404"), "{t}");
    ensure!(
        t.contains("strict-transport-security: max-age="),
        "HSTS: {t}"
    );
    ensure!(t.contains("There is no machine at nope."), "{t}");
    ensure!(t.contains("version=2"), "h2 negotiated: {t}");
    let o = curl(&[
        "-i",
        "--http1.1",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve("nope"),
        &url("nope"),
    ])?;
    ensure!(text(&o).starts_with("HTTP/1.1 404"), "{}", text(&o));

    // A machine that exists but is not up yet: 503 with Retry-After, not a hang.
    s.json("alice", &["new", "--name=app", "--no-wait"])?;
    let t0 = Instant::now();
    let t = loop {
        let o = curl(&[
            "-i",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve("app"),
            &url("app"),
        ])?;
        let t = text(&o);
        if t.starts_with("HTTP/2 503") || t0.elapsed() > Duration::from_secs(5) {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(t.starts_with("HTTP/2 503"), "{t}");
    ensure!(t.contains("retry-after: 5"), "{t}");
    // A connection may serve another name its certificate covers (browsers coalesce
    // HTTP/2 connections across the zone's names), but not a name outside it (421).
    let other = |host: &str| {
        curl(&[
            "-i",
            "--http1.1",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve("app"),
            "-H",
            &format!("Host: {host}"),
            &url("app"),
        ])
    };
    let t = text(&other(&format!("nope.{ZONE}"))?);
    ensure!(t.starts_with("HTTP/1.1 404"), "same certificate: {t}");
    let t = text(&other("example.com")?);
    ensure!(t.starts_with("HTTP/1.1 421"), "{t}");
    // No SNI: the zone's certificate (so a name mismatch for an address), our 404 page
    // when the client goes on anyway.
    let o = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("https://127.0.0.1:{https}/"),
    ])?;
    ensure!(
        !o.status.success(),
        "an address is not a name in the certificate"
    );
    let o = curl(&["-k", "-i", &format!("https://127.0.0.1:{https}/")])?;
    ensure!(text(&o).contains(" 404"), "{}", text(&o));

    // Bad clients: garbage instead of a ClientHello, an oversized header, a slowloris;
    // each gets a clear end, and everyone else is still served.
    let mut c = TcpStream::connect(("127.0.0.1", https))?;
    c.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5])?;
    c.write_all(&[0u8; 4096])?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut buf = [0u8; 512];
    match c.read(&mut buf) {
        // Closed, or reset: a clear end.
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => ensure!(
            buf[0] == 0x15,
            "garbage gets an alert or a close, not {:?}",
            &buf[..n]
        ),
        Err(e) => anyhow::bail!("garbage got no alert and no close within 15 s: {e}"),
    }
    let big = format!("X-Big: {}", "a".repeat(100 * 1024));
    let o = curl(&[
        "-i",
        "--http1.1",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve("nope"),
        "-H",
        &big,
        &url("nope"),
    ])?;
    let t = text(&o);
    // A 431, or the connection closed on it (curl 52/56); not curl's own timeout (28).
    ensure!(
        t.starts_with("HTTP/1.1 431") || (t.is_empty() && matches!(o.status.code(), Some(52 | 56))),
        "an oversized header is refused (curl exit {:?}): {t}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut slow = TcpStream::connect(("127.0.0.1", http))?;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app")?;
    slow.set_read_timeout(Some(Duration::from_secs(30)))?;
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = t0.elapsed();
    ensure!(
        waited < Duration::from_secs(20),
        "a client that never finishes its headers is cut off (after {waited:?})"
    );
    let o = curl(&[
        "-i",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve("nope"),
        &url("nope"),
    ])?;
    ensure!(
        text(&o).starts_with("HTTP/2 404"),
        "still serving: {}",
        text(&o)
    );

    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn proxy_forwards() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("boxd-proxy-fwd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (backend_port, https, http) = (23080u16, 23443u16, 23081u16);
    let host = "app.web.test";
    // A certificate for the name, from a CA of our own (openssl, as an operator would).
    let sh = |cmd: &str| -> Result<()> {
        let o = Command::new("sh")
            .args(["-c", cmd])
            .current_dir(&dir)
            .output()?;
        ensure!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null",
    )?;
    sh(&format!(
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={host} -keyout key.pem -out csr.pem 2>/dev/null && \
         printf 'subjectAltName=DNS:{host}\\n' > ext && \
         openssl x509 -req -in csr.pem -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out cert.pem 2>/dev/null"
    ))?;
    std::fs::write(
        dir.join("routes.json"),
        format!("{{\"{host}\": \"127.0.0.1:{backend_port}\"}}"),
    )?;
    let backend = Killed(
        Command::new("python3")
            .arg(fixtures().join("backend.py"))
            .args([&backend_port.to_string(), "app", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .context("start the Python backend")?,
    );
    let _proxy = Killed(
        Command::new(boxd_binary()?)
            .args(["proxy", "serve", "--routes"])
            .arg(dir.join("routes.json"))
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .args(["--https", &format!("127.0.0.1:{https}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("proxy.log"))?)
            .spawn()?,
    );
    wait_port(backend_port)?;
    wait_port(https)?;
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let resolve = format!("{host}:{https}:127.0.0.1");
    let url = |path: &str| format!("https://{host}:{https}{path}");

    // HTTP/2 and HTTP/1.1 with keep-alive (the second request reuses the connection).
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let o = curl(&[
            flag,
            "--cacert",
            ca,
            "--resolve",
            &resolve,
            "-w",
            "|%{http_version}|%{num_connects}\n",
            &url("/"),
            &url("/"),
        ])?;
        let t = text(&o);
        ensure!(
            t == format!("hello from app\n|{version}|1\nhello from app\n|{version}|0\n"),
            "{flag}: {t:?} {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Forwarded headers come from the connection; the client's own are dropped.
    let o = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "X-Forwarded-Proto: gopher",
        &url("/headers"),
    ])?;
    let h: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    ensure!(h["x-forwarded-for"] == "127.0.0.1", "{h}");
    ensure!(h["x-forwarded-proto"] == "https", "{h}");
    ensure!(h["x-forwarded-host"] == host, "{h}");
    ensure!(
        h["host"].as_str().is_some_and(|v| v.starts_with(host)),
        "{h}"
    );
    // A 1 MiB body there and back, over HTTP/2.
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("body"), &body)?;
    let o = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "--data-binary",
        &format!("@{}", dir.join("body").display()),
        &url("/echo"),
    ])?;
    ensure!(
        o.stdout == body,
        "the body came back changed ({} bytes)",
        o.stdout.len()
    );
    // Server-sent events arrive as they are sent, not at the end: the backend sends a
    // tick every 200 ms, and the client sees tick 0 well before tick 2.
    let mut sse = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "--max-time",
            "20",
            "--cacert",
            ca,
            "--resolve",
            resolve.as_str(),
        ])
        .arg(url("/sse"))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut ticks = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(
        sse.stdout.take().context("curl's stdout")?,
    )) {
        if line?.starts_with("data: tick") {
            ticks.push(Instant::now());
        }
    }
    sse.wait()?;
    ensure!(ticks.len() == 3, "{} ticks arrived, not 3", ticks.len());
    let spread = ticks[2] - ticks[0];
    ensure!(
        spread >= Duration::from_millis(300),
        "the ticks arrived together ({spread:?} apart): the proxy buffered the stream"
    );
    // A WebSocket echo through the proxy.
    let o = Command::new("python3")
        .arg(fixtures().join("wsclient.py"))
        .args([host, &https.to_string(), ca, "hi", "there"])
        .output()?;
    ensure!(
        text(&o) == "echo: hi\necho: there\n",
        "WebSocket: {:?} {}",
        text(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    // The backend goes away: a 502 page, at once.
    drop(backend);
    let t0 = Instant::now();
    let o = curl(&["-i", "--cacert", ca, "--resolve", &resolve, &url("/")])?;
    ensure!(text(&o).starts_with("HTTP/2 502"), "{}", text(&o));
    ensure!(
        t0.elapsed() < Duration::from_secs(6),
        "502 took {:?}",
        t0.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
