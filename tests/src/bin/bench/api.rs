//! `cargo xtask bench api`: the SSH API as a user meets it.
//!
//! - `ssh host ls --json` (a linearizable read of the replicated state, through
//!   `boxd server`'s SSH API) against OpenSSH's own sshd running `true`: the same
//!   client, machine and run, interleaved. It needs no guest, so it runs right here,
//!   natively (inside the emulated KVM host every process start costs milliseconds of
//!   software CPU, which says nothing about either server).
//! - `new` until a real `ssh root@<its address>` works (where guests boot). There is
//!   no peer for this one in the run, so its BENCH line carries no ratio.

use anyhow::{Context, Result};
use boxd_tests::api::{Options, Server};
use boxd_tests::bench::{self, Better};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Calls per side in one round of the `ls` comparison.
const LS_CALLS_PER_ROUND: usize = 40;

/// Milliseconds a command took, or None when it failed (the failure is printed once).
fn timed(cmd: &mut Command) -> Option<f64> {
    let t = Instant::now();
    match cmd.output() {
        Ok(o) if o.status.success() => Some(t.elapsed().as_secs_f64() * 1e3),
        Ok(o) => {
            eprintln!(
                "  error: exit {:?}: {}",
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("  error: {e}");
            None
        }
    }
}

/// OpenSSH's own sshd on `port`, accepting `key` for root: the floor of an SSH
/// round trip (handshake, auth, one exec of `true`) on this machine.
fn openssh_floor(dir: &Path, port: u16, key: &Path) -> Result<boxd_tests::Killed> {
    let host_key = dir.join("sshd_host_key");
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .output()
        .context("run ssh-keygen")?;
    anyhow::ensure!(o.status.success(), "ssh-keygen: {o:?}");
    std::fs::create_dir_all("/run/sshd")?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n\
             PidFile none\nStrictModes no\n",
            host_key.display(),
            key.with_extension("key.pub").display()
        ),
    )?;
    let sshd =
        boxd_tests::testhost::which("sshd").unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start OpenSSH's sshd (package openssh-server)")?;
    boxd_tests::wait_port(port)?;
    Ok(boxd_tests::Killed(child))
}

/// The `ls` comparison: `rounds` rounds, each LS_CALLS_PER_ROUND calls per side,
/// alternating call by call; p50 and p99 per round, medians and spreads over rounds.
pub fn api_ls(rounds: usize) -> Result<()> {
    bench::check_rounds(rounds)?;
    let dir = std::env::temp_dir().join(format!("boxd-bench-api-ls-{}", std::process::id()));
    let s = Server::start(&dir, 22260, &Options::default(), &["bench"])?;
    let key = dir.join("bench.key");
    let _sshd = openssh_floor(&dir, 22299, &key)?;
    let floor_cmd = || {
        let mut c = Command::new("ssh");
        c.args(s.ssh_opts("bench"))
            .args(["-p", "22299", "root@127.0.0.1", "true"])
            .stdin(Stdio::null());
        c
    };
    let ours_cmd = || {
        let mut c = Command::new("ssh");
        c.args(s.ssh_opts("bench"))
            .args(["-p", &s.port.to_string(), "127.0.0.1", "ls", "--json"])
            .stdin(Stdio::null());
        c
    };
    // Registration and first-connection costs out of the way.
    s.json("bench", &["ls"])?;
    let _ = timed(&mut floor_cmd());
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    let (mut calls, mut errors) = (0u64, 0u64);
    for _ in 0..rounds {
        let (mut o, mut p) = (Vec::new(), Vec::new());
        for _ in 0..LS_CALLS_PER_ROUND {
            for (cmd, into) in [(ours_cmd(), &mut o), (floor_cmd(), &mut p)] {
                calls += 1;
                match timed(&mut { cmd }) {
                    Some(ms) => into.push(ms),
                    None => errors += 1,
                }
            }
        }
        anyhow::ensure!(
            !o.is_empty() && !p.is_empty(),
            "a round without one successful call"
        );
        ours.push((bench::percentile(&o, 50.0), bench::percentile(&o, 99.0)));
        peer.push((bench::percentile(&p, 50.0), bench::percentile(&p, 99.0)));
    }
    bench::check_errors("ssh calls", calls, errors)?;
    println!(
        "`ssh -p PORT host ls --json` (a linearizable read of the replicated state) vs OpenSSH's sshd running `true`:"
    );
    let p50 = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let p99 = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
    bench::compare(
        "api-ls-p50-ms",
        "ms",
        &p50(&ours),
        &p50(&peer),
        "sshd",
        Better::Lower,
    );
    bench::compare(
        "api-ls-p99-ms",
        "ms",
        &p99(&ours),
        &p99(&peer),
        "sshd",
        Better::Lower,
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    bench::settings(
        "api-ls",
        &[
            ("rounds", rounds.to_string()),
            ("calls_per_round_per_side", LS_CALLS_PER_ROUND.to_string()),
            ("client", "openssh".into()),
            ("key", "ed25519".into()),
        ],
    );
    Ok(())
}

/// `new` until a real `ssh root@<its address>` from the client namespace works, `runs`
/// times (where guests boot).
pub fn api_new(runs: usize) -> Result<()> {
    bench::check_rounds(runs)?;
    let dir = std::env::temp_dir().join(format!("boxd-bench-api-new-{}", std::process::id()));
    let s = Server::start(
        &dir,
        2222,
        &Options {
            network: true,
            ..Default::default()
        },
        &["bench"],
    )?;
    s.json("bench", &["ls"])?;
    let mut ready = Vec::new();
    for i in 0..runs {
        let name = format!("bench{i}");
        let t = Instant::now();
        let v = s.json("bench", &["new", &format!("--name={name}")])?;
        let ip = v["ipv4"].as_str().context("ipv4")?.to_string();
        // SSH-ready means a real login to the machine's own sshd works.
        let o = s.direct("bench", &ip, "true")?;
        anyhow::ensure!(
            o.status.success(),
            "ssh root@{ip}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ms = t.elapsed().as_secs_f64() * 1e3;
        println!("  new {name} -> ssh root@{ip} ok: {ms:.0} ms");
        ready.push(ms);
        s.json("bench", &["rm", &name])?;
    }
    let place = if std::env::var_os("BOXD_IN_TESTHOST").is_some() {
        "cold boot of Debian inside the emulated KVM host (software CPU)"
    } else {
        "cold boot of Debian"
    };
    bench::alone("api-new-to-ssh-ready-ms", "ms", &ready, place);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    bench::settings(
        "api-new",
        &[
            ("runs", runs.to_string()),
            ("cpus", "1".into()),
            ("memory", "1G".into()),
            (
                "place",
                if std::env::var_os("BOXD_IN_TESTHOST").is_some() {
                    "emulated-kvm-host".into()
                } else {
                    "here".into()
                },
            ),
        ],
    );
    Ok(())
}
