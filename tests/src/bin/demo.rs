//! `boxd-demo` (`cargo xtask demo`): a single boxd node (`boxd server`) and a demo
//! machine, driven only with OpenSSH's `ssh` and `scp`, each step timed. Where this
//! host's KVM cannot run guest kernels, the demo runs itself inside the emulated KVM
//! host.

use anyhow::{Context, Result, ensure};
use boxd_tests::api::{Options, Server, stderr, stdout};
use std::process::Output;
use std::time::Instant;

fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("==> {what}");
    let t = Instant::now();
    let r = f()?;
    println!("    ({:.2} s)", t.elapsed().as_secs_f64());
    Ok(r)
}

fn show(o: &Output) -> Result<()> {
    for line in stdout(o).lines() {
        println!("    | {line}");
    }
    ensure!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        stderr(o).trim()
    );
    Ok(())
}

fn main() -> Result<()> {
    let inside = std::env::args().any(|a| a == "--inside");
    if !inside && !boxd_tests::guest::guests_boot_here()? {
        let argv = vec![
            std::env::current_exe()?.display().to_string(),
            "--inside".into(),
        ];
        boxd_tests::guest::run_in_testhost(argv, std::time::Duration::from_secs(30 * 60))?;
        return Ok(());
    }
    run()
}

/// Runs the demo here (where Linux guests can boot).
fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("boxd-demo-{}", std::process::id()));
    let port = 2222;
    let s = step(
        "start a single boxd node: boxd server (control plane, worker, network, SSH API on :2222)",
        || {
            Server::start(
                &dir,
                port,
                &Options {
                    network: true,
                    memory: "1G",
                    cpus: 2,
                    ..Default::default()
                },
                &["you"],
            )
        },
    )?;
    let ssh = |args: &str| format!("ssh -p {port} you@127.0.0.1 {args}");
    let m = step(&ssh("new --name=my-app --json"), || {
        let v = s.json("you", &["new", "--name=my-app"])?;
        println!(
            "    | my-app: {} {}, ready in {} ms",
            v["ipv4"].as_str().unwrap_or_default(),
            v["state"].as_str().unwrap_or_default(),
            v["ready_ms"]
        );
        Ok(v)
    })?;
    let ip = m["ipv4"].as_str().context("the machine has no address")?;
    step(&ssh("ls"), || show(&s.ssh("you", &["ls"])?))?;
    step(
        &ssh("exec my-app -- 'uname -a; . /etc/os-release; echo $PRETTY_NAME'"),
        || {
            show(&s.ssh(
                "you",
                &[
                    "exec",
                    "my-app",
                    "--",
                    "uname -a; . /etc/os-release; echo $PRETTY_NAME",
                ],
            )?)
        },
    )?;
    step(
        &format!("ssh -p {port} my-app@127.0.0.1 (the gateway: a shell in the machine)"),
        || {
            show(&s.ssh_input(
                "you",
                "my-app",
                &[],
                b"echo \"hello from $(hostname), $(nproc) vCPUs\"; exit\n",
                // Input from a pipe, no terminal: just the shell's output.
                false,
            )?)
        },
    )?;
    step(
        &format!("ssh root@{ip} (straight to the machine's sshd through the eBPF data path)"),
        || {
            show(&s.direct(
                "you",
                ip,
                "echo \"$(hostname) sees you as ${SSH_CONNECTION%% *}\"",
            )?)
        },
    )?;
    step(
        &format!("scp -P {port} hello.txt my-app@127.0.0.1:/root/"),
        || {
            std::fs::write(dir.join("hello.txt"), "hello from the host\n")?;
            show(&s.scp(
                "you",
                &dir.join("hello.txt").display().to_string(),
                "my-app@127.0.0.1:/root/hello.txt",
            )?)?;
            show(&s.ssh("you", &["exec", "my-app", "--", "cat /root/hello.txt"])?)
        },
    )?;
    step(
        &ssh("exec my-app -- 'boxd whoami' (the in-VM CLI, no token)"),
        || show(&s.ssh("you", &["exec", "my-app", "--", "boxd whoami"])?),
    )?;
    let host = format!("my-app.{}", boxd_tests::api::ZONE);
    let ca = dir.join("ca.pem");
    step(
        &format!(
            "https://{host} (a web server in the machine, through the proxy, trusting the internal CA)"
        ),
        || {
            show(&s.ssh(
                "you",
                &[
                    "exec",
                    "my-app",
                    "--",
                    "mkdir -p /srv && echo \"hello over HTTPS from $(hostname)\" > /srv/index.html && setsid nohup python3 -m http.server 80 -d /srv >/dev/null 2>&1 &",
                ],
            )?)?;
            s.fetch_ca(&ca)?;
            // The web server needs a moment to listen.
            show(&s.https_until_ok(&host, &ca, std::time::Duration::from_secs(30))?)
        },
    )?;
    step(
        &format!(
            "{} then https://{host} (the request wakes it)",
            ssh("pause my-app")
        ),
        || {
            show(&s.ssh("you", &["pause", "my-app"])?)?;
            show(&s.https_get(&host, &ca)?)
        },
    )?;
    step(&ssh("rm my-app"), || {
        show(&s.ssh("you", &["rm", "my-app"])?)
    })?;
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "demo done: a boxd node made a machine over SSH; it ran commands, took a shell, a direct SSH login and a file, served HTTPS at its name, slept and woke on a request, and went away"
    );
    Ok(())
}
