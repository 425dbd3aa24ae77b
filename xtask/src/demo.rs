//! `cargo xtask demo`: a demo machine booted under boxd's own VMM, driven through its
//! agent, with each step timed.

use anyhow::{Context, Result};
use boxd_tests::guest::{Machine, Spec};
use std::time::{Duration, Instant};

fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("==> {what}");
    let t = Instant::now();
    let r = f()?;
    println!("    ({:.2} s)", t.elapsed().as_secs_f64());
    Ok(r)
}

/// Runs the demo here (where Linux guests can boot).
pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("boxd-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = Spec::default();
    let mut vm = step(
        "boot a Debian 12 machine under boxd vmm (2 vCPUs, 1 GiB RAM, 100 GB copy-on-write disk)",
        || {
            let mut vm = Machine::start("demo", &dir, &spec)?;
            let ready = vm.wait_ready(Duration::from_secs(300))?;
            println!(
                "    agent ready {:.1} s after boxd vmm started",
                ready.as_secs_f64()
            );
            Ok(vm)
        },
    )?;
    let agent = vm.agent();
    for cmd in [
        vec!["uname", "-a"],
        vec!["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"],
        vec!["sh", "-c", "nproc; free -m | head -2; df -h / | tail -1"],
    ] {
        step(&format!("exec in the machine: {}", cmd.join(" ")), || {
            let out = agent.exec(&cmd, None, 64 << 10)?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("    | {line}");
            }
            anyhow::ensure!(out.status.code == 0, "exit {}", out.status.code);
            Ok(())
        })?;
    }
    step(
        "write /root/hello.txt through the agent and read it back",
        || {
            agent.write_file("/root/hello.txt", b"hello from the host\n", 0o644)?;
            let back = agent.read_file("/root/hello.txt", 1 << 20)?;
            println!("    | {}", String::from_utf8_lossy(&back).trim());
            Ok(())
        },
    )?;
    step("shut the machine down (ACPI power button)", || {
        let r = vm.control()?.call(&boxd_vmm::control::Request::Shutdown {
            timeout_ms: 120_000,
        })?;
        anyhow::ensure!(r.ok, "shutdown refused: {:?}", r.error);
        let code = vm.wait_exit(Duration::from_secs(150))?;
        anyhow::ensure!(code == 0, "boxd vmm exited {code}:\n{}", vm.log());
        Ok(())
    })
    .context("demo shutdown")?;
    let _ = std::fs::remove_dir_all(&dir);
    println!("demo done: the machine booted, ran commands, kept a file and powered off cleanly");
    Ok(())
}
