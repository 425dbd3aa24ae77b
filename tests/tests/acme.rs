//! ACME end to end against Pebble (Debian's `pebble`, Let's Encrypt's test CA, a real
//! RFC 8555 server that really validates): it resolves names with `-dnsserver` and
//! fetches HTTP-01 answers from the proxy's plain-HTTP port, so every step is the
//! production path. `curl` then checks the proxy's certificate against Pebble's root.
//! - `acme_dns01_wildcard`: Pebble resolves through the server's own DNS; the zone's
//!   wildcard through TXT records; served for every machine and the apex; the
//!   challenges are gone afterwards; a restarted server keeps its account and
//!   certificate (nothing ordered again).
//! - `acme_http01_per_machine`: a certificate per machine through the challenge path,
//!   and one for a custom domain (outside the zone, so Pebble resolves through
//!   pebble-challtestsrv, which answers 127.0.0.1 for any name); a CA that is down is
//!   retried with backoff while other names are issued; a private machine gets 403.
//! - `acme_to_machine`: a real guest's web server, reached with Pebble's certificate.

use anyhow::{Context, Result, ensure};
use boxd_tests::api::{Options, Server, ZONE};
use boxd_tests::{Killed, wait_port};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn curl(args: &[&str]) -> Result<Output> {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .context("run curl")
}

/// Pebble on `port` (management on port+1), resolving names through our DNS server
/// only, validating HTTP-01 against the proxy's plain-HTTP port.
struct Pebble {
    _child: Killed,
    port: u16,
    tls_root: PathBuf,
}

/// The certificate Pebble's own HTTPS is served with (what `[acme] ca_root` trusts).
fn pebble_tls(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (cert, key) = (dir.join("pebble-tls.pem"), dir.join("pebble-tls.key"));
    if cert.exists() {
        return Ok((cert, key));
    }
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext"])
        .arg("subjectAltName=DNS:localhost,IP:127.0.0.1")
        // A self-signed end-entity certificate: webpki refuses a CA as a server's.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("run openssl")?;
    ensure!(
        o.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok((cert, key))
}

fn directory(port: u16) -> String {
    format!("https://127.0.0.1:{port}/dir")
}

impl Pebble {
    /// Pebble resolving names through the DNS server on `dns_port` (loopback).
    fn start(dir: &Path, port: u16, dns_port: u16, http_port: u16) -> Result<Self> {
        let (cert, key) = pebble_tls(dir)?;
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{}", port + 1),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": port + 2,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let cfg = dir.join("pebble.json");
        std::fs::write(&cfg, config.to_string())?;
        let log = std::fs::File::create(dir.join("pebble.log"))?;
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&cfg)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start pebble (Debian package pebble; cargo xtask setup)")?;
        let p = Self {
            _child: Killed(child),
            port,
            tls_root: cert,
        };
        wait_port(port)?;
        wait_port(port + 1)?;
        Ok(p)
    }

    /// The root Pebble issues under (made fresh at each start).
    fn issuing_root(&self, to: &Path) -> Result<()> {
        let o = curl(&[
            "-f",
            "--cacert",
            self.tls_root.to_str().unwrap(),
            "-o",
            to.to_str().unwrap(),
            &format!("https://127.0.0.1:{}/roots/0", self.port + 1),
        ])?;
        ensure!(
            o.status.success(),
            "Pebble's root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    }
}

fn acme_config(directory: &str, tls_root: &Path, challenge: &str) -> String {
    format!(
        "[acme]\ndirectory = \"{directory}\"\nca_root = \"{}\"\ncontact = [\"mailto:ops@{ZONE}\"]\nchallenge = \"{challenge}\"\n",
        tls_root.display()
    )
}

/// Whether the server's log says `name` was issued.
fn issued(s: &Server, name: &str) -> bool {
    s.log().lines().any(|l| {
        l.contains("ACME certificate issued")
            && (l.contains(&format!("name={name} ")) || l.contains(&format!("name=\"{name}\"")))
    })
}

fn wait_issued(s: &Server, name: &str, within: Duration) -> Result<()> {
    let t0 = Instant::now();
    while !issued(s, name) {
        ensure!(
            t0.elapsed() < within,
            "no ACME certificate for {name} within {within:?}:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `curl https://HOST` through the proxy, trusting only `root`: (HTTP status, verbose).
fn fetch(s: &Server, host: &str, root: &Path) -> Result<(String, String)> {
    let o = curl(&[
        "-v",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &format!("{host}:{}:127.0.0.1", s.https_port()),
        &format!("https://{host}:{}/", s.https_port()),
    ])?;
    Ok((
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

/// What these tests drive, when something of it is missing.
fn missing() -> Option<String> {
    boxd_tests::missing_tools(&["pebble", "openssl", "curl", "dig"])
}

#[test]
fn acme_dns01_wildcard() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let dir = std::env::temp_dir().join(format!("boxd-acme-dns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = 22260;
    // The server's DNS and HTTP ports follow from its SSH port (see boxd_tests::api).
    let pebble = Pebble::start(&dir.join("pebble"), 24000, port + 6000, port + 8000)?;
    let opts = Options {
        public: "127.0.0.1",
        extra: acme_config(&directory(pebble.port), &pebble.tls_root, "dns-01"),
        ..Default::default()
    };
    let s = Server::start(&dir.join("server"), port, &opts, &["alice"])?;
    s.json("alice", &["new", "--name", "app", "--no-wait"])?;
    wait_issued(&s, &format!("*.{ZONE}"), Duration::from_secs(60))?;

    let root = dir.join("pebble-root.pem");
    pebble.issuing_root(&root)?;
    // The machine (starting: 503) and the apex (no machine there: 404), both over a
    // connection verified with Pebble's root.
    for (host, want) in [(format!("app.{ZONE}"), "503"), (ZONE.to_string(), "404")] {
        let (code, verbose) = fetch(&s, &host, &root)?;
        ensure!(
            code == want,
            "{host} with Pebble's root: HTTP {code:?}\n{verbose}"
        );
        ensure!(
            verbose.contains("Pebble Intermediate"),
            "{host}: not Pebble's certificate:\n{verbose}"
        );
    }
    // A name with no machine still verifies (the wildcard) and gets the 404 page.
    let (code, _) = fetch(&s, &format!("nothing.{ZONE}"), &root)?;
    ensure!(code == "404", "nothing.{ZONE}: HTTP {code:?}");

    // The challenge answers are withdrawn once used.
    let txt = s.dig(&["+short", "TXT", &format!("_acme-challenge.{ZONE}")])?;
    ensure!(txt.trim().is_empty(), "stale challenge TXT: {txt}");
    ensure!(
        s.log().matches("ACME account created").count() == 1,
        "{}",
        s.log()
    );

    // A restarted server finds its account and certificate in the replicated state:
    // nothing is ordered again.
    drop(s);
    let s = Server::restart(&dir.join("server"), port)?;
    // The restarted leader's first pass sees the wildcard it holds as not due.
    let t0 = Instant::now();
    while !s
        .log()
        .lines()
        .any(|l| l.contains("ACME certificates checked") && l.contains("due=0"))
    {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "the restarted server never checked its certificates:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = s.log();
    ensure!(
        !log.contains("ACME certificate issued") && !log.contains("ACME account created"),
        "ordered again after a restart:\n{log}"
    );
    let (code, verbose) = fetch(&s, &format!("app.{ZONE}"), &root)?;
    ensure!(code == "503", "after restart: HTTP {code:?}\n{verbose}");
    Ok(())
}

/// pebble-challtestsrv as a resolver that answers 127.0.0.1 for every name: how the
/// HTTP-01 test's custom domain (outside our zone) reaches the proxy.
fn any_name_resolver(port: u16) -> Result<Killed> {
    let child = Command::new("pebble-challtestsrv")
        .args(["-dns01", &format!("127.0.0.1:{port}")])
        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
        .args(["-management", &format!("127.0.0.1:{}", port + 1)])
        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start pebble-challtestsrv (Debian package pebble)")?;
    let k = Killed(child);
    wait_port(port + 1)?;
    Ok(k)
}

#[test]
fn acme_http01_per_machine() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let dir = std::env::temp_dir().join(format!("boxd-acme-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = 22270;
    let pebble_dir = dir.join("pebble");
    // The CA is down at first: its directory address answers nothing.
    let directory_port = 24010;
    let (tls_root, _) = pebble_tls(&pebble_dir)?;
    let opts = Options {
        public: "127.0.0.1",
        extra: acme_config(&directory(directory_port), &tls_root, "http-01"),
        ..Default::default()
    };
    let s = Server::start(&dir.join("server"), port, &opts, &["alice"])?;
    s.json("alice", &["new", "--name", "early", "--no-wait"])?;
    let t0 = Instant::now();
    while !s.log().contains("ACME certificate not issued") {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "no failure reported:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(s.log().contains("retry_in_s=60"), "{}", s.log());

    // Now the CA is up (same address): a new machine is issued at once; the one that
    // failed waits out its backoff, then is issued too.
    let _resolver = any_name_resolver(24020)?;
    let pebble = Pebble::start(&pebble_dir, directory_port, 24020, port + 8000)?;
    s.json("alice", &["new", "--name", "web", "--no-wait"])?;
    // A domain of the owner's own: served like web's name, with its own certificate.
    let m = s.json("alice", &["domain", "add", "web", "www.example.org"])?;
    assert_eq!(m["domains"][0], "www.example.org", "{m}");
    wait_issued(&s, &format!("web.{ZONE}"), Duration::from_secs(30))?;
    ensure!(
        !issued(&s, &format!("early.{ZONE}")),
        "early was retried before its backoff"
    );
    let root = dir.join("pebble-root.pem");
    pebble.issuing_root(&root)?;
    let (code, verbose) = fetch(&s, &format!("web.{ZONE}"), &root)?;
    ensure!(code == "503", "web with Pebble's root: {code:?}\n{verbose}");
    ensure!(verbose.contains("Pebble Intermediate"), "{verbose}");
    wait_issued(&s, "www.example.org", Duration::from_secs(30))?;
    let (code, verbose) = fetch(&s, "www.example.org", &root)?;
    ensure!(code == "503", "custom domain: {code:?}\n{verbose}");
    ensure!(verbose.contains("Pebble Intermediate"), "{verbose}");
    // Private machines get no certificate and no proxy: 403 (through a verified TLS
    // connection, as web's certificate covers the name).
    let m = s.json("alice", &["web", "web", "private"])?;
    assert_eq!(m["web"], "private", "{m}");
    let t0 = Instant::now();
    loop {
        let (code, _) = fetch(&s, &format!("web.{ZONE}"), &root)?;
        if code == "403" {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "private: HTTP {code}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Names without their own certificate keep the internal CA's wildcard, which
    // Pebble's root does not vouch for.
    let (code, _) = fetch(&s, &format!("nothing.{ZONE}"), &root)?;
    ensure!(
        code == "000",
        "the internal certificate verified with Pebble's root"
    );

    wait_issued(&s, &format!("early.{ZONE}"), Duration::from_secs(90))?;
    let (code, verbose) = fetch(&s, &format!("early.{ZONE}"), &root)?;
    ensure!(code == "503", "early: {code:?}\n{verbose}");
    Ok(())
}

/// The whole path with a real machine: Pebble issues `app.<zone>` over HTTP-01 through
/// the proxy, and `curl`, trusting only Pebble's root, reaches the web server inside
/// the machine (a real Debian guest; in the emulated KVM host where KVM is not real).
#[test]
fn acme_to_machine() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    if let boxd_tests::guest::Place::RanInTestHost = boxd_tests::guest::place()? {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("boxd-acme-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = 22280;
    let _resolver = any_name_resolver(24030)?;
    let pebble = Pebble::start(&dir.join("pebble"), 24040, 24030, port + 8000)?;
    let opts = Options {
        network: true,
        public: "127.0.0.1",
        extra: acme_config(&directory(pebble.port), &pebble.tls_root, "http-01"),
        ..Default::default()
    };
    let s = Server::start(&dir.join("server"), port, &opts, &["alice"])?;
    s.json("alice", &["new", "--name=app"])?;
    s.start_backend("alice", "app", "80 app")?;
    wait_issued(&s, &format!("app.{ZONE}"), Duration::from_secs(120))?;
    let root = dir.join("pebble-root.pem");
    pebble.issuing_root(&root)?;
    let o = s.https_until_ok(&format!("app.{ZONE}"), &root, Duration::from_secs(30))?;
    let body = boxd_tests::api::stdout(&o);
    ensure!(
        body == "hello from app\n|200|2",
        "HTTPS with Pebble's certificate to the machine: {body}{}",
        boxd_tests::api::stderr(&o)
    );
    eprintln!("a Pebble-issued certificate served https://app.{ZONE} from the machine");
    Ok(())
}
