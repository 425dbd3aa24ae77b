//! A real Linux guest suspended to disk by `boxd vmm` (a snapshot, then the VMM exits)
//! and continued by a new VMM from that snapshot: its processes, its tmpfs, its disk
//! and its clock go on. Runs inside the emulated KVM host where this host lacks
//! hardware virtualization.

use anyhow::{Context, Result, ensure};
use boxd_tests::guest::{Machine, Place, Spec, place};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BOOT_LIMIT: Duration = Duration::from_secs(300);
const RESTORE_LIMIT: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("boxd-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sh(vm: &Machine, script: &str) -> Result<String> {
    let out = vm
        .agent()
        .exec(&["sh", "-c", script], None, 1 << 16)
        .with_context(|| {
            format!(
                "`{script}` through the agent; the VMM's status: {:?}\nconsole ends with:\n{}",
                vm.status().ok(),
                vm.console_tail(4000)
            )
        })?;
    ensure!(
        out.status.code == 0,
        "{script}: exit {}: {}",
        out.status.code,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How far the guest's wall clock is from the host's, in seconds.
fn clock_skew(vm: &Machine) -> Result<f64> {
    let before = host_now();
    let guest: f64 = sh(vm, "date +%s.%N")?.parse().context("guest date")?;
    let after = host_now();
    Ok(guest - (before + after) / 2.0)
}

#[test]
fn a_suspended_linux_guest_keeps_its_processes_files_and_clock() -> Result<()> {
    if let Place::RanInTestHost = place()? {
        return Ok(());
    }
    let dir = scratch("suspend");
    let spec = Spec::default();
    let mut vm = Machine::start("snap", &dir, &spec)?;
    vm.wait_ready(BOOT_LIMIT)?;

    // A process that counts, a file only memory holds, one on the disk, one written
    // an instant before the snapshot without a sync.
    sh(
        &vm,
        "setsid -f sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.1; done' \
         </dev/null >/dev/null 2>&1; sleep 1; cat /dev/shm/count",
    )?;
    let pid = sh(&vm, "pgrep -f 'echo .i > /dev/shm/count' | head -1")?;
    ensure!(!pid.is_empty(), "the counter runs");
    sh(
        &vm,
        "head -c 1000000 /dev/urandom > /dev/shm/keep; sha256sum /dev/shm/keep > /root/keep.sum; sync",
    )?;
    let sum = sh(&vm, "cat /root/keep.sum")?;
    sh(&vm, "echo late > /root/late")?;
    let count_before: u64 = sh(&vm, "cat /dev/shm/count")?.parse()?;
    let uptime_before: f64 = sh(&vm, "cut -d' ' -f1 /proc/uptime")?.parse()?;
    println!("clock skew before the suspend: {:+.3} s", clock_skew(&vm)?);

    let snap = dir.join("suspended");
    let report = vm.suspend(&snap)?;
    println!(
        "SNAPSHOT linux-1g save {:.0} ms, {} MiB of memory written",
        report["save_ms"].as_f64().unwrap_or(f64::NAN),
        report["memory_bytes"].as_u64().unwrap_or(0) >> 20
    );
    ensure!(
        !dir.join("control.sock").exists(),
        "the suspended machine has no VMM"
    );
    let written = report["memory_bytes"].as_u64().unwrap_or(0);
    ensure!(
        written > 1 << 20 && written < 1 << 30,
        "memory written: {written} bytes"
    );
    drop(vm);
    // Suspended for a while: the clock must show it afterwards.
    std::thread::sleep(Duration::from_secs(10));

    vm = Machine::restore("snap", &dir, &snap)?;
    let ready = vm.wait_ready(RESTORE_LIMIT)?;
    println!(
        "SNAPSHOT linux-1g restore-to-agent {:.0} ms",
        ready.as_secs_f64() * 1000.0
    );
    let status = vm.status()?;
    println!(
        "SNAPSHOT linux-1g restore inside the VMM {:.0} ms",
        status["restored_from"]["restore_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
    ensure!(
        status["restored_from"]["snapshot"] == snap.display().to_string(),
        "{status}"
    );

    ensure!(
        sh(&vm, &format!("cat /proc/{pid}/cmdline | tr '\\0' ' '"))?.contains("/dev/shm/count"),
        "the counter is the same process"
    );
    std::thread::sleep(Duration::from_secs(1));
    let count_after: u64 = sh(&vm, "cat /dev/shm/count")?.parse()?;
    ensure!(
        count_after > count_before,
        "the counter went on: {count_before} -> {count_after}"
    );
    ensure!(
        sh(&vm, "sha256sum /dev/shm/keep")? == sum,
        "tmpfs contents survive"
    );
    ensure!(
        sh(&vm, "cat /root/late")? == "late",
        "the unsynced write survives"
    );
    let uptime_after: f64 = sh(&vm, "cut -d' ' -f1 /proc/uptime")?.parse()?;
    ensure!(
        uptime_after > uptime_before,
        "monotonic time went on: {uptime_before} -> {uptime_after}"
    );
    let skew = clock_skew(&vm)?;
    println!("clock skew after a 10 s suspend: {skew:+.3} s");
    ensure!(
        skew.abs() < 1.0,
        "the guest's wall clock is {skew:+.3} s off after the restore"
    );

    // 50 pauses and 9 more suspends in a row: every cycle as safe as the first, the
    // counter going on and the files intact each time.
    let mut last = count_after;
    for i in 0..50 {
        let mut c = vm.control()?;
        ensure!(
            c.call(&boxd_vmm::control::Request::Pause {})?.ok,
            "pause {i}"
        );
        ensure!(
            c.call(&boxd_vmm::control::Request::Resume {})?.ok,
            "resume {i}"
        );
    }
    for cycle in 2..=10 {
        let snap = dir.join(format!("cycle-{cycle}"));
        vm.suspend(&snap)?;
        drop(vm);
        vm = Machine::restore("snap", &dir, &snap)?;
        vm.wait_ready(RESTORE_LIMIT)
            .with_context(|| format!("suspend cycle {cycle}"))?;
        ensure!(!snap.exists(), "cycle {cycle}: the used snapshot is gone");
        let now: u64 = sh(&vm, "sleep 0.5; cat /dev/shm/count")?.parse()?;
        ensure!(
            now > last,
            "cycle {cycle}: the counter went on ({last} -> {now})"
        );
        last = now;
        ensure!(
            sh(&vm, "sha256sum /dev/shm/keep")? == sum,
            "cycle {cycle}: tmpfs"
        );
        ensure!(sh(&vm, "cat /root/late")? == "late", "cycle {cycle}: disk");
    }
    println!("10 suspend/resume and 50 pause/resume cycles: process, tmpfs and disk intact");
    let reply = vm.control()?.call(&boxd_vmm::control::Request::Stop {})?;
    ensure!(reply.ok);
    vm.wait_exit(Duration::from_secs(30))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
