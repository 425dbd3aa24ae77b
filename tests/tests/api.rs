//! The SSH API end to end: a real `boxd server`, driven only with OpenSSH's `ssh` and
//! `scp`. `api_commands_and_bad_input` needs no guest (machines are created without
//! waiting for them to boot) and runs right here; `api_machines` boots real Linux
//! machines, so it runs where guests can (inside the emulated KVM host here), with the
//! client in its own network namespace reaching machines through the eBPF data path.

use anyhow::{Context, Result, ensure};
use boxd_tests::api::{Options, Server, stderr, stdout};
use boxd_tests::guest::{Place, place};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("boxd-api-{name}-{}", std::process::id()))
}

fn names(v: &Value) -> Vec<String> {
    v["machines"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn api_commands_and_bad_input() -> Result<()> {
    let dir = scratch("cmds");
    let s = Server::start(
        &dir,
        22220,
        &Options {
            machine_quota: 3,
            ..Default::default()
        },
        &["alice", "bob", "carol"],
    )?;

    // First connection registers the key (open policy); whoami says who.
    let me = s.json("alice", &["whoami"])?;
    assert_eq!(me["name"], "alice", "{me}");
    let id = me["id"].as_str().context("id")?.to_string();
    assert!(id.starts_with("SHA256:"), "{me}");
    assert_eq!(me["via"], id, "the registering key is the account id: {me}");
    assert_eq!(me["keys"], 1);
    let q = s.json("alice", &["quota"])?;
    assert_eq!(q["machines"]["used"], 0);
    assert_eq!(q["machines"]["limit"], 3);

    // A machine recorded without waiting for it to boot: every field, by name.
    let m = s.json(
        "alice",
        &[
            "new",
            "--name=web",
            "--no-wait",
            "--cpus",
            "1",
            "--memory",
            "512M",
        ],
    )?;
    assert_eq!(m["name"], "web");
    assert!(
        matches!(m["state"].as_str(), Some("creating" | "running")),
        "{m}"
    );
    assert_eq!(m["cpus"], 1);
    assert_eq!(m["memory_mib"], 512);
    assert_eq!(m["disk_gib"], 100);
    assert_eq!(m["ipv4"], "100.64.0.1");
    assert_eq!(m["ports"], serde_json::json!([]));
    assert_eq!(m["ready_ms"], Value::Null);
    assert_eq!(
        m["ssh"]["gateway"],
        format!("ssh -p {} web@127.0.0.1", s.port)
    );
    assert_eq!(m["ssh"]["direct"], "ssh root@100.64.0.1");
    let ls = s.json("alice", &["ls"])?;
    assert_eq!(names(&ls), ["web"]);
    let info = s.json("alice", &["info", "web"])?;
    assert_eq!(info["id"], m["id"]);
    // Text forms: an aligned table and key: value lines.
    let table = stdout(&s.ssh("alice", &["ls"])?);
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("STATE") && header.contains("IPV4"),
        "{table}"
    );
    assert!(
        lines.next().unwrap_or_default().starts_with("web "),
        "{table}"
    );

    // expose / unexpose.
    let e = s.json("alice", &["expose", "web", "8080"])?;
    assert_eq!(e["ports"], serde_json::json!([8080]));
    let e = s.json("alice", &["unexpose", "web", "8080"])?;
    assert_eq!(e["ports"], serde_json::json!([]));
    let (code, err, _) = s.json_err("alice", &["expose", "web", "0"])?;
    assert_eq!((code, err.as_str()), (1, "invalid"));

    // Keys: add one (then it logs in as the same account), remove it again.
    let carol_pub = std::fs::read_to_string(dir.join("carol.key.pub"))?;
    let added = s.json("alice", &["keys", "add", carol_pub.trim()])?;
    let fp = added["added"].as_str().context("fingerprint")?.to_string();
    let keys = s.json("alice", &["keys"])?;
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(2), "{keys}");
    let as_carol = s.json("carol", &["whoami"])?;
    assert_eq!(as_carol["name"], "alice", "{as_carol}");
    assert_eq!(as_carol["via"], fp);
    s.json("alice", &["keys", "rm", &fp])?;
    let (_, err, _) = s.json_err("alice", &["keys", "rm", &id])?;
    assert_eq!(err, "invalid", "the last key cannot go");
    let (_, err, _) = s.json_err("alice", &["keys", "add", "ssh-ed25519", "not-base64"])?;
    assert_eq!(err, "invalid");

    // Bad input: clear errors, exit codes, and nothing changes.
    let before = s.json("alice", &["ls"])?;
    for (args, want) in [
        (vec!["new", "--name=Bad_Name", "--no-wait"], "invalid"),
        (vec!["new", "--name=-dash", "--no-wait"], "invalid"),
        (
            vec!["new", "--name", &"a".repeat(64), "--no-wait"],
            "invalid",
        ),
        (
            vec!["new", "--name=big", "--cpus", "1000", "--no-wait"],
            "invalid",
        ),
        (
            vec!["new", "--name=big", "--memory", "9999999T", "--no-wait"],
            "invalid",
        ),
        (
            vec!["new", "--name=big", "--memory", "12parsecs", "--no-wait"],
            "invalid",
        ),
        (
            vec!["new", "--name=small", "--disk", "1G", "--no-wait"],
            "invalid",
        ),
        (
            vec!["new", "--name=img", "--image", "windows", "--no-wait"],
            "invalid",
        ),
        (vec!["new", "--name=web", "--no-wait"], "already_exists"),
        (vec!["frobnicate"], "usage"),
        (vec!["ls", "--bogus-flag"], "usage"),
        (vec!["info"], "usage"),
        (vec!["info", "nope"], "not_found"),
        (vec!["exec", "--json", "nope", "--", "true"], "not_found"),
        (vec!["rm", "nope"], "not_found"),
        (vec!["pause", "nope"], "not_found"),
        // Only a running machine can be paused (web has no VMM here: still creating).
        (vec!["pause", "web"], "invalid"),
        (vec!["suspend", "nope"], "not_found"),
        // Nor can a machine that is still creating be suspended.
        (vec!["suspend", "web"], "invalid"),
        (vec!["web", "web", "bogus"], "invalid"),
        (vec!["web", "nope", "private"], "not_found"),
        (vec!["domain", "add", "web", "x.boxd.test"], "invalid"),
        (vec!["domain", "add", "web", "bad_domain.org"], "invalid"),
        (vec!["domain", "add", "web", "localhost"], "invalid"),
        (vec!["domain", "rm", "web", "www.nowhere.org"], "not_found"),
        (
            vec!["domain", "add", "nope", "www.example.com"],
            "not_found",
        ),
    ] {
        let (code, err, msg) = s.json_err("alice", &args)?;
        assert_eq!(err, want, "{args:?}: {msg}");
        assert_eq!(code, if want == "usage" { 2 } else { 1 }, "{args:?}");
        assert!(!msg.is_empty(), "{args:?}");
    }
    // Web modes and domains: shown in info, a domain belongs to one machine.
    let m = s.json("alice", &["web", "web"])?;
    assert_eq!(
        (m["web"].as_str(), m["url"].as_str()),
        (Some("public"), Some("https://web.boxd.test")),
        "{m}"
    );
    let m = s.json("alice", &["web", "web", "passthrough"])?;
    assert_eq!(m["web"], "passthrough", "{m}");
    let m = s.json("alice", &["domain", "add", "web", "WWW.Example.COM."])?;
    assert_eq!(m["domains"], serde_json::json!(["www.example.com"]), "{m}");
    let m = s.json("alice", &["domain", "add", "web", "www.example.com"])?;
    assert_eq!(
        m["domains"].as_array().map(Vec::len),
        Some(1),
        "adding twice is one"
    );
    let (_, err, _) = s.json_err("bob", &["domain", "add", "web", "www.example.com"])?;
    assert_eq!(err, "not_found", "bob on alice's machine");
    let m = s.json("alice", &["info", "web"])?;
    assert_eq!(
        (m["web"].as_str(), m["domains"][0].as_str()),
        (Some("passthrough"), Some("www.example.com")),
        "{m}"
    );
    s.json("alice", &["web", "web", "public"])?;
    let o = s.ssh("alice", &["frobnicate"])?;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unrecognized subcommand"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        names(&s.json("alice", &["ls"])?),
        names(&before),
        "bad input changed nothing"
    );

    // A 1 MB command line: refused (by the SSH layer or ours), and the server still serves.
    // (as 16 arguments of 64 KiB: one argument may not exceed 128 KiB in execve)
    let part = "x".repeat(64 << 10);
    let mut huge = vec!["new", "--name"];
    huge.extend(std::iter::repeat_n(part.as_str(), 16));
    let o = s.ssh("alice", &huge)?;
    assert!(!o.status.success(), "a 1 MB command line was accepted");
    let o = s.ssh(
        "alice",
        &[&format!("new --name={} --json", "y".repeat(100 << 10))],
    )?;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("the limit is 64 KiB"), "{}", stdout(&o));
    assert_eq!(names(&s.json("alice", &["ls"])?), names(&before));

    // Another user's machine: invisible and untouchable, and named the same way as a
    // machine that does not exist.
    assert!(names(&s.json("bob", &["ls"])?).is_empty());
    for args in [
        vec!["info", "web"],
        vec!["rm", "web"],
        vec!["stop", "web"],
        vec!["expose", "web", "80"],
        vec!["exec", "--json", "web", "--", "true"],
        vec!["console", "web"],
    ] {
        let (_, err, _) = s.json_err("bob", &args)?;
        assert_eq!(err, "not_found", "bob {args:?}");
    }
    // Bob naming alice's machine as the SSH user gets the API, not her machine.
    let o = s.ssh_cmd("bob", "web", &["hostname"]).output()?;
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert_eq!(names(&s.json("alice", &["ls"])?), ["web"]);

    // 50 concurrent `new` from one user with 2 machines of quota left: exactly 2 made,
    // the rest refused by the quota, no half-made machine.
    let results: Vec<(i32, String)> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..50)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let o = s
                        .ssh(
                            "alice",
                            &["new", &format!("--name=c{i}"), "--no-wait", "--json"],
                        )
                        .expect("ssh");
                    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
                    (
                        o.status.code().unwrap_or(-1),
                        v["error"]["code"].as_str().unwrap_or("ok").to_string(),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let ok = results.iter().filter(|(c, _)| *c == 0).count();
    let quota = results
        .iter()
        .filter(|(_, e)| e == "quota_exceeded")
        .count();
    assert_eq!((ok, quota), (2, 48), "{results:?}");
    let ls = s.json("alice", &["ls"])?;
    assert_eq!(ls["machines"].as_array().map(Vec::len), Some(3), "{ls}");
    let q = s.json("alice", &["quota"])?;
    assert_eq!(q["machines"]["used"], 3);

    // A client that disconnects mid-command: the command completes or never happened.
    for m in names(&ls).iter().filter(|n| n.starts_with('c')) {
        s.json("alice", &["rm", m])?;
    }
    let mut c = s
        .ssh_cmd("alice", "alice", &["new", "--name=dropped"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let _ = c.kill();
    let _ = c.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let ls = names(&s.json("alice", &["ls"])?);
        if ls.contains(&"dropped".to_string()) || Instant::now() > deadline {
            break ls;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        after.contains(&"dropped".to_string()),
        "the acknowledged create was lost: {after:?}"
    );
    let d = s.json("alice", &["info", "dropped"])?;
    assert!(
        d["ipv4"]
            .as_str()
            .is_some_and(|a| a.starts_with("100.64.0.")),
        "{d}"
    );
    s.json("alice", &["rm", "dropped"])?;

    // Audit: every mutation, refusals included, under the account.
    let audit = s.json("alice", &["audit", "--limit", "200"])?;
    let entries = audit["entries"].as_array().context("entries")?;
    let ops: Vec<&str> = entries.iter().filter_map(|e| e["op"].as_str()).collect();
    for op in [
        "create_machine",
        "delete_machine",
        "expose",
        "unexpose",
        "add_key",
        "remove_key",
    ] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    assert!(
        entries.iter().all(|e| e["actor"] == format!("user:{id}")),
        "only alice's entries: {audit}"
    );
    assert!(entries.iter().any(|e| {
        e["result"]
            .as_str()
            .unwrap_or_default()
            .starts_with("quota_exceeded")
    }));
    // Bob's log holds his own refused attempts on alice's machine, nothing of hers.
    let bob = s.json("bob", &["audit"])?;
    let bob_entries = bob["entries"].as_array().context("entries")?;
    assert!(!bob_entries.is_empty());
    assert!(
        bob_entries
            .iter()
            .all(|e| e["actor"] != format!("user:{id}")
                && e["result"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("not_found"))),
        "{bob}"
    );

    // help: the command list, text and JSON.
    let h = stdout(&s.ssh("alice", &["help"])?);
    for verb in [
        "new", "ls", "exec", "console", "expose", "keys", "whoami", "audit",
    ] {
        assert!(h.contains(verb), "help lacks {verb}");
    }
    assert!(
        s.json("alice", &["help", "new"])?["help"]
            .as_str()
            .unwrap_or_default()
            .contains("--memory")
    );

    // A bare `ssh -p PORT host` with a terminal: a prompt running commands.
    let o = s.ssh_input("alice", "alice", &[], b"whoami\nbogus\nquota\nexit\n", true)?;
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("boxd> "), "{out}");
    assert!(out.contains(&format!("alice ({id})")), "{out}");
    assert!(out.contains("(exit 2)"), "{out}");
    assert!(out.contains("machines: "), "{out}");

    // Deleted machines leave nothing behind on the worker.
    s.json("alice", &["rm", "web"])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let left = loop {
        let left: Vec<_> = std::fs::read_dir(dir.join("data/machines"))?
            .flatten()
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(left.is_empty(), "machine files left after rm: {left:?}");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// An agent with a key the server has never seen opens many connections at once
/// (registration open): every one of them gets in, and they share the one account the
/// first of them made.
#[test]
fn a_new_key_opening_many_connections_at_once_registers_one_account() -> Result<()> {
    const CONNECTIONS: usize = 30;
    // Three fresh keys, one burst each: a race lost one time in three is still caught.
    const KEYS: [&str; 3] = ["agent0", "agent1", "agent2"];
    let dir = scratch("burst");
    let s = Server::start(&dir, 22290, &Options::default(), &KEYS)?;
    for key in KEYS {
        let outs: Vec<std::process::Output> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..CONNECTIONS)
                .map(|_| scope.spawn(|| s.ssh(key, &["whoami", "--json"])))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ssh thread"))
                .collect::<Result<_>>()
        })?;
        let mut ids = std::collections::BTreeSet::new();
        let mut failed = Vec::new();
        for o in &outs {
            if !o.status.success() {
                failed.push(format!("exit {:?}: {}", o.status.code(), stderr(o).trim()));
                continue;
            }
            let v: Value = serde_json::from_slice(&o.stdout)?;
            ids.insert(v["id"].as_str().unwrap_or_default().to_string());
        }
        ensure!(
            failed.is_empty(),
            "{key}: {} of {CONNECTIONS} first connections failed: {failed:?}",
            failed.len()
        );
        ensure!(ids.len() == 1, "{key}: more than one account: {ids:?}");
    }
    let made = s.log().matches("registered a new account").count();
    ensure!(
        made == KEYS.len(),
        "{made} accounts registered for {} keys:\n{}",
        KEYS.len(),
        s.log()
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn api_registration_policies() -> Result<()> {
    // Invite only: an unknown key may run `register INVITE` and nothing else.
    let dir = scratch("invite");
    let s = Server::start(
        &dir,
        22240,
        &Options {
            registration: "invite",
            ..Default::default()
        },
        &["carol", "dave"],
    )?;
    let o = s.ssh("carol", &["whoami"])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("register INVITE"), "{}", stderr(&o));
    let o = s.operator(&["invite", "--json"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout)?;
    let invite = v["invite"].as_str().context("invite")?;
    let o = s.ssh("carol", &["register", invite])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "registered: you are carol\n");
    assert_eq!(s.json("carol", &["whoami"])?["name"], "carol");
    for bad in [invite, "inv-0000", "x"] {
        let o = s.ssh("dave", &["register", bad])?;
        assert_eq!(o.status.code(), Some(1), "{bad}");
        assert!(stderr(&o).contains("invite"), "{}", stderr(&o));
    }
    drop(s);

    // Allow-list: a key not on it cannot log in; once allowed it registers.
    let dir2 = scratch("allow");
    let s = Server::start(
        &dir2,
        22250,
        &Options {
            registration: "allowlist",
            ..Default::default()
        },
        &["erin"],
    )?;
    let o = s.ssh("erin", &["whoami"])?;
    assert_eq!(
        o.status.code(),
        Some(255),
        "ssh itself refuses: {}",
        stderr(&o)
    );
    let fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(dir2.join("erin.key.pub"))
        .output()?;
    let fp = stdout(&fp);
    let fp = fp.split_whitespace().nth(1).context("fingerprint")?;
    let o = s.operator(&["allow", fp])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = s.operator(&["allow", "not-a-fingerprint"])?;
    assert!(!o.status.success());
    assert_eq!(s.json("erin", &["whoami"])?["id"], fp);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
    Ok(())
}

#[test]
fn api_machines() -> Result<()> {
    if let Place::RanInTestHost = place()? {
        return Ok(());
    }
    let dir = scratch("vm");
    let s = Server::start(
        &dir,
        22230,
        &Options {
            network: true,
            ..Default::default()
        },
        &["alice", "bob"],
    )?;
    let step = |what: &str, t: Instant| eprintln!("{what}: {:.1} s", t.elapsed().as_secs_f64());

    // new waits until the machine is reachable.
    let t = Instant::now();
    let m = s.json("alice", &["new", "--name=app"])?;
    step("new to ready", t);
    assert_eq!(m["state"], "running", "{m}");
    assert!(m["ready_ms"].as_u64().is_some_and(|ms| ms > 0), "{m}");
    let ip = m["ipv4"].as_str().context("ipv4")?.to_string();

    // exec: stdout, stderr and the exit code pass through; a shell runs the command line.
    let o = s.ssh(
        "alice",
        &[
            "exec",
            "app",
            "--",
            "echo out; echo err >&2; hostname; exit 7",
        ],
    )?;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\napp\n");
    assert_eq!(stderr(&o), "err\n");
    // stdin passes through too.
    let o = s.ssh_input(
        "alice",
        "alice",
        &["exec", "app", "--", "tr a-z A-Z"],
        b"piped\n",
        false,
    )?;
    assert_eq!(stdout(&o), "PIPED\n", "{}", stderr(&o));
    // With a terminal (ssh -tt): the command sees a TTY.
    let o = s.ssh_input(
        "alice",
        "alice",
        &["exec", "app", "--", "tty; test -t 0 && echo is-a-tty"],
        b"",
        true,
    )?;
    assert!(stdout(&o).contains("is-a-tty"), "{}", stdout(&o));

    // The gateway: `ssh app@host CMD` and an interactive shell.
    let o = s
        .ssh_cmd("alice", "app", &["cat /etc/hostname; id -un"])
        .output()?;
    assert_eq!(stdout(&o), "app\nroot\n", "{}", stderr(&o));
    let o = s.ssh_input("alice", "app", &[], b"echo gw-$((6*7))\nexit 3\n", true)?;
    assert!(stdout(&o).contains("gw-42"), "{}", stdout(&o));
    assert_eq!(o.status.code(), Some(3));
    // No terminal asked for (input from a pipe): the shell's output alone, without a
    // prompt or a terminal's escapes (bracketed paste, colours).
    let o = s.ssh_input("alice", "app", &[], b"echo gw-$((6*7))\nexit 3\n", false)?;
    assert_eq!(stdout(&o), "gw-42\n", "{:?}", stdout(&o));
    assert_eq!(o.status.code(), Some(3));
    let o = s.ssh_input(
        "alice",
        "alice",
        &["ssh", "app"],
        b"echo api-$((6*7))\nexit\n",
        true,
    )?;
    assert!(stdout(&o).contains("api-42"), "{}", stdout(&o));

    // cp: scp in and out through the gateway (SFTP underneath).
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("blob"), &blob)?;
    let o = s.scp(
        "alice",
        &dir.join("blob").display().to_string(),
        "app@127.0.0.1:/root/blob",
    )?;
    assert!(o.status.success(), "scp in: {}", stderr(&o));
    let o = s.ssh("alice", &["exec", "app", "--", "sha256sum /root/blob"])?;
    use sha2::Digest;
    let want = hex::encode(sha2::Sha256::digest(&blob));
    assert!(stdout(&o).starts_with(&want), "{} vs {want}", stdout(&o));
    let back = dir.join("back");
    let o = s.scp(
        "alice",
        "app@127.0.0.1:/root/blob",
        &back.display().to_string(),
    )?;
    assert!(o.status.success(), "scp out: {}", stderr(&o));
    assert_eq!(std::fs::read(&back)?, blob);

    // Straight to the machine's own sshd on its public address, from the client
    // namespace: the owner's key was installed, and the machine sees the client's address.
    let o = s.direct("alice", &ip, "hostname; echo $SSH_CONNECTION")?;
    assert!(o.status.success(), "direct ssh: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("app\n192.0.2.2 "), "{out}");
    // Bob's key is not installed there.
    let o = s.direct("bob", &ip, "true")?;
    assert!(!o.status.success(), "bob got into alice's machine directly");

    // https://app.<zone>: the proxy, with the internal CA, to a web server in the
    // machine (port 80, nothing exposed), a WebSocket included.
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/web");
    s.start_backend("alice", "app", "80 app")?;
    let ca = dir.join("ca.pem");
    s.fetch_ca(&ca)?;
    let host = format!("app.{}", boxd_tests::api::ZONE);
    let https = s.https_port();
    let body = stdout(&s.https_until_ok(&host, &ca, Duration::from_secs(30))?);
    assert_eq!(
        body, "hello from app\n|200|2",
        "HTTPS to the machine through the proxy"
    );
    let ws = std::process::Command::new("python3")
        .arg(web.join("wsclient.py"))
        .args([
            host.as_str(),
            &https.to_string(),
            ca.to_str().unwrap(),
            "ping",
        ])
        .output()?;
    assert_eq!(stdout(&ws), "echo: ping\n", "WebSocket: {}", stderr(&ws));

    // Paused: the vCPUs stop, the memory stays. The next HTTPS request wakes it and is
    // answered by the same kernel and the same web server process: nothing restarted.
    let guest = |cmd: &str| -> Result<String> {
        let o = s.ssh("alice", &["exec", "app", "--", cmd])?;
        ensure!(o.status.success(), "`{cmd}` in app: {}", stderr(&o));
        Ok(stdout(&o).trim().to_string())
    };
    let boot_id = || guest("cat /proc/sys/kernel/random/boot_id");
    // (The pattern must not match the shell running pgrep, whose command line holds it.)
    let backend_pids = || guest("pgrep -f '^python3 /root/backend[.]py' | sort");
    let (boot, backend) = (boot_id()?, backend_pids()?);
    ensure!(!backend.is_empty(), "no web backend runs in app");
    let vmm_state = || -> Result<String> {
        let sock = dir.join(format!("data/machines/{}/control.sock", m["id"]));
        let mut c = boxd_vmm::control::Client::connect(&sock)?;
        let st = c.call(&boxd_vmm::control::Request::Status {})?;
        Ok(st.status.context("VMM status")?["state"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let pause = || -> Result<()> {
        let m = s.json("alice", &["pause", "app"])?;
        ensure!(m["state"] == "paused", "pause answered {m}");
        ensure!(
            s.json("alice", &["info", "app"])?["state"] == "paused",
            "info after pause"
        );
        // The VMM itself has its vCPUs parked, not only the replicated state.
        ensure!(vmm_state()? == "paused", "the VMM is {}", vmm_state()?);
        Ok(())
    };
    pause()?;
    let t0 = Instant::now();
    let o = s.https_get(&host, &ca)?;
    let woke = t0.elapsed();
    assert_eq!(
        stdout(&o),
        "hello from app\n|200|2",
        "first request to a paused machine: {}",
        stderr(&o)
    );
    eprintln!("paused machine answered HTTPS after {woke:?} (wake included)");
    assert_eq!(s.json("alice", &["info", "app"])?["state"], "running");
    assert_eq!(vmm_state()?, "running");
    assert!(s.log().contains("waking for a request"), "{}", s.log());
    assert_eq!(
        boot_id()?,
        boot,
        "the kernel restarted across pause and wake"
    );
    assert_eq!(
        backend_pids()?,
        backend,
        "the web server restarted across pause and wake"
    );
    // exec wakes it too.
    pause()?;
    let o = s.ssh("alice", &["exec", "app", "--", "echo awake"])?;
    assert_eq!(stdout(&o), "awake\n", "{}", stderr(&o));
    assert_eq!(s.json("alice", &["info", "app"])?["state"], "running");
    // So does the first packet to its public IPv4: the data path's wake event.
    pause()?;
    let t0 = Instant::now();
    let o = s.direct("alice", &ip, "echo woken by a packet")?;
    assert_eq!(
        stdout(&o),
        "woken by a packet\n",
        "direct ssh to a paused machine: {}",
        stderr(&o)
    );
    eprintln!(
        "paused machine answered ssh to its IPv4 after {:?}",
        t0.elapsed()
    );
    assert!(s.log().contains("waking on traffic"), "{}", s.log());
    assert_eq!(s.json("alice", &["info", "app"])?["state"], "running");

    // Suspended: the memory goes to disk and the VMM ends; the next HTTPS request, exec
    // or packet restores it, with the same kernel, processes and files.
    guest("echo kept-in-ram > /dev/shm/mark")?;
    let machine_dir = dir.join(format!("data/machines/{}", m["id"]));
    let suspend = || -> Result<()> {
        let t0 = Instant::now();
        let m = s.json("alice", &["suspend", "app"])?;
        ensure!(m["state"] == "suspended", "suspend answered {m}");
        ensure!(m["snapshot_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{m}");
        eprintln!(
            "suspended app in {:?}: {} MiB on disk",
            t0.elapsed(),
            m["snapshot_bytes"].as_u64().unwrap_or(0) >> 20
        );
        let info = s.json("alice", &["info", "app"])?;
        ensure!(info["state"] == "suspended", "info after suspend: {info}");
        ensure!(info["state_since_ms"].as_u64().unwrap_or(0) > 0, "{info}");
        ensure!(
            !machine_dir.join("control.sock").exists(),
            "a suspended machine has no VMM"
        );
        ensure!(machine_dir.join("snapshot/state").is_file());
        // Twice is refused, and changes nothing; so is someone else's.
        let (_, err, msg) = s.json_err("alice", &["suspend", "app"])?;
        ensure!(
            err == "invalid" && msg.contains("suspended"),
            "{err}: {msg}"
        );
        let (_, err, _) = s.json_err("bob", &["suspend", "app"])?;
        ensure!(err == "not_found", "bob suspending alice's machine: {err}");
        ensure!(s.json("alice", &["info", "app"])?["state"] == "suspended");
        Ok(())
    };
    let awake_as_before = || -> Result<()> {
        assert_eq!(
            boot_id()?,
            boot,
            "the kernel restarted across suspend and wake"
        );
        assert_eq!(
            backend_pids()?,
            backend,
            "the web server restarted across suspend and wake"
        );
        assert_eq!(guest("cat /dev/shm/mark")?, "kept-in-ram");
        assert!(
            !machine_dir.join("snapshot").exists(),
            "the used snapshot is gone"
        );
        Ok(())
    };
    suspend()?;
    let t0 = Instant::now();
    let o = s.https_get(&host, &ca)?;
    eprintln!(
        "suspended machine answered HTTPS after {:?} (restore included)",
        t0.elapsed()
    );
    assert_eq!(
        stdout(&o),
        "hello from app\n|200|2",
        "the first request to a suspended machine is answered: {}",
        stderr(&o)
    );
    assert_eq!(s.json("alice", &["info", "app"])?["state"], "running");
    awake_as_before()?;
    suspend()?;
    let o = s.ssh("alice", &["exec", "app", "--", "echo awake"])?;
    assert_eq!(
        stdout(&o),
        "awake\n",
        "exec wakes a suspended machine: {}",
        stderr(&o)
    );
    awake_as_before()?;
    // An outside client's open connection survives a 30 s suspend: its next line is
    // answered (and wakes the machine).
    let mut session = boxd_tests::Killed(s.direct_session("alice", &ip)?);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        session.0.stdout.take().context("session stdout")?,
    ));
    let mut say = |cmd: &str| -> Result<String> {
        let stdin = session.0.stdin.as_mut().context("session stdin")?;
        std::io::Write::write_all(stdin, format!("{cmd}\n").as_bytes())?;
        std::io::Write::flush(stdin)?;
        Ok(lines.next().context("the session ended")??)
    };
    assert_eq!(say("echo before")?, "before");
    suspend()?;
    std::thread::sleep(Duration::from_secs(30));
    let t0 = Instant::now();
    assert_eq!(
        say("echo after")?,
        "after",
        "the open ssh session after a 30 s suspend"
    );
    eprintln!(
        "an open ssh session's next line was answered {:?} after a 30 s suspend",
        t0.elapsed()
    );
    drop(session);
    awake_as_before()?;
    suspend()?;
    let t0 = Instant::now();
    let o = s.direct("alice", &ip, "echo woken from disk by a packet")?;
    assert_eq!(
        stdout(&o),
        "woken from disk by a packet\n",
        "direct ssh to a suspended machine: {}",
        stderr(&o)
    );
    eprintln!(
        "suspended machine answered ssh to its IPv4 after {:?}",
        t0.elapsed()
    );
    awake_as_before()?;

    // Private: the proxy answers 403 to everyone; the owner reaches the machine through
    // an SSH tunnel (`ssh -L`), which the server forwards to the machine's port.
    let m = s.json("alice", &["web", "app", "private"])?;
    assert_eq!(m["web"], "private", "{m}");
    let t0 = Instant::now();
    while !stdout(&s.https_get(&host, &ca)?).contains("|403|") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "private machine still served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tunnel = |user: &str, local: u16| -> Result<boxd_tests::Killed> {
        Ok(boxd_tests::Killed(
            std::process::Command::new("ssh")
                .args(s.ssh_opts(user))
                .args(["-p", &s.port.to_string(), "-N", "-L"])
                .arg(format!("127.0.0.1:{local}:app:80"))
                .arg(format!("{user}@127.0.0.1"))
                .stdin(std::process::Stdio::null())
                .spawn()?,
        ))
    };
    let get = |port: u16| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
    };
    let _alice_tunnel = tunnel("alice", 18480)?;
    let t0 = Instant::now();
    let body = loop {
        let o = get(18480)?;
        if o.status.success() || t0.elapsed() > Duration::from_secs(20) {
            break stdout(&o);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(body, "hello from app\n", "through alice's ssh -L tunnel");
    // Bob's tunnel is up (his ssh connected and listens locally), but the server
    // refuses its channel: curl's connection is accepted, then closed with no reply
    // (exit 52 or 56), not refused (7, a tunnel that never came up).
    let mut bob_tunnel = tunnel("bob", 18481)?;
    let t0 = Instant::now();
    let o = loop {
        let o = get(18481)?;
        if o.status.code() != Some(7) || t0.elapsed() > Duration::from_secs(20) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        matches!(o.status.code(), Some(52 | 56)),
        "bob's tunnel into alice's machine: curl exit {:?}, {}{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    assert!(
        bob_tunnel.0.try_wait()?.is_none(),
        "bob's ssh -L ended instead of having its channel refused"
    );

    // Passthrough: the machine terminates TLS itself, with a certificate of its own
    // that the proxy never sees (chosen by the ClientHello's server name).
    let (cert, key) = (dir.join("app-own.pem"), dir.join("app-own.key"));
    let o = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    assert!(o.status.success(), "openssl: {}", stderr(&o));
    s.put_file("alice", "app", &cert, "/root/own.pem")?;
    s.put_file("alice", "app", &key, "/root/own.key")?;
    s.start_backend(
        "alice",
        "app",
        "443 app-tls 0.0.0.0 /root/own.pem /root/own.key",
    )?;
    let m = s.json("alice", &["web", "app", "passthrough"])?;
    assert_eq!(m["web"], "passthrough", "{m}");
    let body = stdout(&s.https_until_ok(&host, &cert, Duration::from_secs(30))?);
    assert!(
        body.starts_with("hello from app-tls\n|200|"),
        "HTTPS terminated by the machine itself: {body}"
    );
    // Asleep and passthrough: the ClientHello waits unread in the socket while the
    // machine wakes, then the stream is joined to it whole.
    pause()?;
    let body = stdout(&s.https_get(&host, &cert)?);
    assert!(
        body.starts_with("hello from app-tls\n|200|"),
        "passthrough to a paused machine: {body}"
    );
    s.json("alice", &["web", "app", "public"])?;

    // The in-VM CLI: no token; the host knows the machine by its vsock port.
    let o = s.ssh(
        "alice",
        &[
            "exec",
            "app",
            "--",
            "boxd whoami --json; boxd new --name=sibling --no-wait --json",
        ],
    )?;
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("\"via\": \"vm:app\""), "{text}");
    assert!(text.contains("\"name\": \"sibling\""), "{text}");
    assert_eq!(names(&s.json("alice", &["ls"])?), ["app", "sibling"]);
    let audit = s.json("alice", &["audit", "--limit", "5"])?;
    assert!(
        audit["entries"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["actor"].as_str().is_some_and(|a| a.ends_with("@vm:app")))),
        "{audit}"
    );
    let o = s.ssh("alice", &["exec", "app", "--", "boxd rm sibling"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    // From inside, the account's keys can be listed but not changed.
    let o = s.ssh("alice", &["exec", "app", "--", "boxd keys --json | grep -c fingerprint; boxd keys add --json ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ x"])?;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("1\n"), "{}", stdout(&o));
    assert!(stdout(&o).contains("\"forbidden\""), "{}", stdout(&o));
    assert_eq!(
        s.json("alice", &["keys"])?["keys"].as_array().map(Vec::len),
        Some(1)
    );
    // Another user's machines stay out of reach from inside too.
    s.json("bob", &["new", "--name=bobs", "--no-wait"])?;
    let o = s.ssh("alice", &["exec", "app", "--", "boxd info bobs"])?;
    assert_eq!(o.status.code(), Some(1));
    s.json("bob", &["rm", "bobs"])?;

    // A command keeps running when its client disconnects.
    let mut c = s
        .ssh_cmd(
            "alice",
            "alice",
            &["exec", "app", "--", "sleep 3; touch /root/finished"],
        )
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let _ = c.kill();
    let _ = c.wait();
    std::thread::sleep(Duration::from_secs(4));
    let o = s.ssh("alice", &["exec", "app", "--", "test -e /root/finished"])?;
    assert_eq!(o.status.code(), Some(0), "the command died with its client");

    // console, stop (the disk stays), start, restart.
    let c = s.json("alice", &["console", "app"])?;
    assert!(c["console"].as_str().is_some_and(|t| !t.is_empty()), "{c}");
    s.ssh(
        "alice",
        &["exec", "app", "--", "echo kept > /root/kept; sync"],
    )?;
    let boot = boot_id()?;
    let t = Instant::now();
    let st = s.json("alice", &["stop", "app"])?;
    step("stop", t);
    assert_eq!(st["state"], "stopped");
    // Powered off for real: its VMM is gone with its control socket.
    assert!(
        vmm_state().is_err(),
        "a stopped machine's VMM still answers"
    );
    let (_, err, _) = s.json_err("alice", &["exec", "--json", "app", "--", "true"])?;
    assert_eq!(err, "invalid");
    let (_, err, _) = s.json_err("alice", &["pause", "app"])?;
    assert_eq!(err, "invalid", "a stopped machine cannot be paused");
    let t = Instant::now();
    let st = s.json("alice", &["start", "app"])?;
    step("start", t);
    assert_eq!(st["state"], "running");
    let o = s.ssh("alice", &["exec", "app", "--", "cat /root/kept"])?;
    assert_eq!(stdout(&o), "kept\n");
    let after_start = boot_id()?;
    assert_ne!(after_start, boot, "start did not boot the machine again");
    let t = Instant::now();
    let st = s.json("alice", &["restart", "app"])?;
    step("restart", t);
    assert_eq!(st["state"], "running", "{st}");
    let o = s.ssh("alice", &["exec", "app", "--", "cat /root/kept"])?;
    assert_eq!(stdout(&o), "kept\n");
    assert_ne!(
        boot_id()?,
        after_start,
        "restart did not boot the machine again"
    );

    s.json("alice", &["rm", "app"])?;
    assert!(names(&s.json("alice", &["ls"])?).is_empty());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A node that dies (SIGKILL) while it suspends a machine comes back with either the
/// machine running or its complete snapshot, never a half-written one restored; either
/// way the machine goes on with its processes. Killed at several points of the suspend.
#[test]
fn a_server_killed_while_suspending_leaves_the_machine_whole() -> Result<()> {
    if let Place::RanInTestHost = place()? {
        return Ok(());
    }
    let dir = scratch("crash");
    let port = 22310;
    let mut s = Server::start(&dir, port, &Options::default(), &["alice"])?;
    let m = s.json("alice", &["new", "--name=c"])?;
    ensure!(m["state"] == "running", "{m}");
    let machine_dir = dir.join(format!("data/machines/{}", m["id"]));
    let guest = |s: &Server, cmd: &str| -> Result<String> {
        let o = s.ssh("alice", &["exec", "c", "--", cmd])?;
        ensure!(o.status.success(), "`{cmd}`: {}", stderr(&o));
        Ok(stdout(&o).trim().to_string())
    };
    guest(
        &s,
        "setsid -f sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.1; done' </dev/null >/dev/null 2>&1",
    )?;
    let boot = guest(&s, "cat /proc/sys/kernel/random/boot_id")?;
    let mut last: u64 = guest(&s, "sleep 0.5; cat /dev/shm/count")?.parse()?;
    for delay_ms in [0u64, 400, 1500, 3000] {
        let mut suspend = s
            .ssh_cmd("alice", "alice", &["suspend", "c"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(delay_ms));
        s.kill9()?;
        let _ = suspend.wait();
        s = Server::restart(&dir, port)?;
        // It settles: running (a VMM that answers), or suspended with a whole snapshot.
        let t = Instant::now();
        let settled = loop {
            let info = s.json("alice", &["info", "c"])?;
            let state = info["state"].as_str().unwrap_or_default().to_string();
            let vmm_up = boxd_vmm::control::Client::connect(&machine_dir.join("control.sock"))
                .and_then(|mut c| c.call(&boxd_vmm::control::Request::Status {}))
                .is_ok();
            let snapshot = machine_dir.join("snapshot/state").is_file();
            if (state == "running" && vmm_up) || (state == "suspended" && snapshot && !vmm_up) {
                break state;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(120),
                "killed {delay_ms} ms into a suspend: state {state}, VMM up {vmm_up}, snapshot {snapshot}\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "killed {delay_ms} ms into a suspend: came back {settled} after {:?}",
            t.elapsed()
        );
        // Either way the same kernel and process go on (exec wakes a suspended one).
        ensure!(
            guest(&s, "cat /proc/sys/kernel/random/boot_id")? == boot,
            "killed {delay_ms} ms in: the guest rebooted"
        );
        let now: u64 = guest(&s, "sleep 0.5; cat /dev/shm/count")?.parse()?;
        ensure!(
            now > last,
            "killed {delay_ms} ms in: the counter went from {last} to {now}"
        );
        last = now;
        ensure!(
            !boxd_vmm::snapshot::partial_dir(&machine_dir.join("snapshot")).exists()
                || machine_dir.join("control.sock").exists(),
            "a half-written snapshot was left with no VMM to finish it"
        );
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
