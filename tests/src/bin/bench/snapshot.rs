//! `cargo xtask bench snapshot`: what suspend and wake cost, through the shipped
//! process (`boxd vmm run`, `boxd vmm snapshot`'s control request, `boxd vmm restore`).
//!
//! Natively, on this host's /dev/kvm, with a tiny guest that touches 256 MiB (so the
//! figures are the VMM's own work at this machine's speed, whatever the guest):
//! - `snapshot-save-native-ms`: the snapshot request to the snapshot on disk (1 GiB);
//! - `snapshot-restore-native-ms-1g` / `-8g`: `boxd vmm restore` spawned to its
//!   control socket answering with the vCPUs running, 256 MiB touched in each, from a
//!   snapshot whose pages are not in the page cache (as after a real suspend); the
//!   VMM's own restore time (request to vCPUs running, inside the process) is printed
//!   beside it. Memory comes back lazily (the default): `snapshot-restore-loaded-native-ms-*`
//!   is spawn to every page back, and `snapshot-restore-eager-native-ms-*` the same
//!   restore with `--memory eager` (all memory loaded before the vCPUs run), in
//!   interleaved rounds;
//! - `resume-from-pause-us`: the control socket's resume, request to reply (the vCPUs
//!   are running when it answers);
//! - `suspend-disk-mib`: disk blocks the snapshot takes for 256 MiB touched;
//! - `suspended-host-ram-mib`: what a suspended machine holds in host memory: no VMM
//!   process, and the snapshot's pages still in the page cache (mincore).
//!
//! No peer runs these natively (QEMU's migration needs a guest it can boot here); the
//! lines carry no ratio.

use anyhow::{Context, Result, bail, ensure};
use boxd_tests::bench;
use boxd_vmm::control::{Client, Request};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOUCH_MIB: u64 = 256;
const PLACEHOLDER: [u8; 4] = 0x7fff_0001u32.to_le_bytes();
const LIMIT: Duration = Duration::from_secs(120);

/// A VMM process, killed when dropped.
struct Vmm(Child);
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn touch_guest(dir: &Path) -> Result<PathBuf> {
    let src = boxd_testkit::root().join("tests/guests/touch.s");
    let mut code = boxd_testkit::assemble(&src, dir)?;
    let at = code
        .windows(4)
        .position(|w| w == PLACEHOLDER)
        .context("touch.s lost its page-count placeholder")?;
    let pages = u32::try_from(TOUCH_MIB << 8).expect("fits");
    code[at..at + 4].copy_from_slice(&pages.to_le_bytes());
    let bin = dir.join("touch-patched.bin");
    std::fs::write(&bin, code)?;
    Ok(bin)
}

fn status(sock: &Path) -> Result<serde_json::Value> {
    Client::connect(sock)?
        .call(&Request::Status {})?
        .status
        .context("status without status")
}

/// Polls until `f` says yes (bounded).
fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > LIMIT {
            bail!("{what}: not within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn wait_exit(vmm: &mut Vmm, what: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Some(st) = vmm.0.try_wait()? {
            ensure!(st.success(), "{what}: the VMM exited with {st}");
            return Ok(());
        }
        if t.elapsed() > LIMIT {
            bail!("{what}: the VMM did not exit within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Resident pages of a file, in bytes (mincore over a read-only mapping).
fn cached_bytes(path: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped below; the
    // result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    ensure!(p != libc::MAP_FAILED, "map {}", path.display());
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the mapping made above.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
    ensure!(
        r == 0,
        "mincore {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(vec.iter().filter(|b| **b & 1 != 0).count() as u64 * 4096)
}

struct Round {
    save_ms: f64,
    restore_ms: f64,
    restore_inside_ms: f64,
    /// Spawn to every page of the snapshot back in memory (the lazy restore's
    /// background loading done; for an eager restore the same as `restore_ms`).
    loaded_ms: f64,
    resume_us: Vec<f64>,
    disk_bytes: u64,
    cached_bytes: u64,
}

fn round(
    boxd: &Path,
    guest: &Path,
    dir: &Path,
    memory: &str,
    mode: &str,
    resumes: usize,
) -> Result<Round> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let sock = dir.join("control.sock");
    let log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("vmm.log"))
    };
    let mut vmm = Vmm(Command::new(boxd)
        .args([
            "vmm",
            "run",
            "--name",
            "snapbench",
            "--cpus",
            "1",
            "--memory",
            memory,
        ])
        .args(["--no-cgroup", "--skip-kvm-check", "--raw"])
        .arg(guest)
        .arg("--control")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log()?)
        .spawn()?);
    until("the guest touches its memory", || {
        status(&sock).is_ok_and(|s| {
            s["milestones"]
                .as_array()
                .is_some_and(|m| m.iter().any(|v| v["value"] == 1))
        })
    })?;
    let snap = dir.join("snap");
    let t = Instant::now();
    let mut c = Client::connect(&sock)?;
    c.set_timeout(LIMIT)?;
    let r = c.call(&Request::Snapshot {
        dir: snap.clone(),
        then: boxd_vmm::AfterSnapshot::Stop,
    })?;
    let save_ms = t.elapsed().as_secs_f64() * 1000.0;
    ensure!(r.ok, "snapshot: {:?}", r.error);
    wait_exit(&mut vmm, "snapshot then stop")?;
    drop(vmm);
    let written = r
        .snapshot
        .as_ref()
        .and_then(|s| s["memory_bytes"].as_u64())
        .unwrap_or(0);
    ensure!(
        written >= TOUCH_MIB << 20,
        "the snapshot wrote {written} bytes of memory; the guest touched {TOUCH_MIB} MiB"
    );
    use std::os::unix::fs::MetadataExt;
    let disk_bytes = ["state", "memory"]
        .iter()
        .map(|f| std::fs::metadata(snap.join(f)).map(|m| m.blocks() * 512))
        .sum::<std::io::Result<u64>>()?;
    let cached = cached_bytes(&snap.join("memory"))? + cached_bytes(&snap.join("state"))?;

    let t = Instant::now();
    let mut vmm = Vmm(Command::new(boxd)
        .args([
            "vmm",
            "restore",
            "--consume",
            "--skip-kvm-check",
            "--memory",
            mode,
            "--snapshot",
        ])
        .arg(&snap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log()?)
        .spawn()?);
    let mut st = serde_json::Value::Null;
    until("the restored VMM answers", || match status(&sock) {
        Ok(s) => {
            st = s;
            true
        }
        Err(_) => false,
    })?;
    let restore_ms = t.elapsed().as_secs_f64() * 1000.0;
    ensure!(st["state"] == "running", "restored VMM: {st}");
    let restore_inside_ms = st["restored_from"]["restore_ms"]
        .as_f64()
        .context("restore_ms")?;
    until("the restored memory is all loaded", || {
        status(&sock).is_ok_and(|s| {
            let m = &s["restored_from"]["memory"];
            m["mode"] == "eager" || m["phase"] == "done"
        })
    })?;
    let loaded_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut resume_us = Vec::with_capacity(resumes);
    let mut c = Client::connect(&sock)?;
    for _ in 0..resumes {
        ensure!(c.call(&Request::Pause {})?.ok, "pause");
        let t = Instant::now();
        let r = c.call(&Request::Resume {})?;
        resume_us.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(r.ok, "resume: {:?}", r.error);
    }
    ensure!(c.call(&Request::Stop {})?.ok);
    wait_exit(&mut vmm, "stop")?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(Round {
        save_ms,
        restore_ms,
        restore_inside_ms,
        loaded_ms,
        resume_us,
        disk_bytes,
        cached_bytes: cached,
    })
}

pub fn snapshot(rounds: usize) -> Result<()> {
    bench::check_rounds(rounds)?;
    ensure!(
        std::fs::metadata("/dev/kvm").is_ok(),
        "/dev/kvm is not available: the native snapshot figures need it"
    );
    let boxd = boxd_tests::guest::boxd_binary()?;
    let work = std::env::temp_dir().join(format!("boxd-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let guest = touch_guest(&work)?;
    // Per size: lazy rounds (the default) and eager rounds, interleaved.
    let mut by_size: Vec<(&str, Vec<Round>, Vec<Round>)> = Vec::new();
    for memory in ["1G", "8G"] {
        let (mut lazy, mut eager) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            for (mode, into) in [("lazy", &mut lazy), ("eager", &mut eager)] {
                let r = round(
                    &boxd,
                    &guest,
                    &work.join(format!("vm-{memory}")),
                    memory,
                    mode,
                    20,
                )?;
                eprintln!(
                    "  {memory} {mode} round {}: save {:.1} ms, restore {:.1} ms (inside the VMM {:.1} ms), all memory back {:.1} ms, resume p50 {:.0} us",
                    i + 1,
                    r.save_ms,
                    r.restore_ms,
                    r.restore_inside_ms,
                    r.loaded_ms,
                    bench::median(&r.resume_us)
                );
                into.push(r);
            }
        }
        by_size.push((memory, lazy, eager));
    }
    let _ = std::fs::remove_dir_all(&work);
    let one = &by_size[0].1;
    let f = |v: &[Round], g: fn(&Round) -> f64| v.iter().map(g).collect::<Vec<f64>>();
    bench::alone(
        "snapshot-save-native-ms",
        "ms",
        &f(one, |r| r.save_ms),
        "1 GiB guest, 256 MiB touched, request to snapshot on disk",
    );
    for (memory, v, eager) in &by_size {
        let size = memory.to_lowercase();
        bench::alone(
            &format!("snapshot-restore-native-ms-{size}"),
            "ms",
            &f(v, |r| r.restore_ms),
            &format!(
                "{memory} guest, 256 MiB touched, process spawn to vCPUs running (lazy memory)"
            ),
        );
        println!(
            "  (inside the VMM, request to vCPUs running: {} ms)",
            bench::describe(&f(v, |r| r.restore_inside_ms))
        );
        bench::alone(
            &format!("snapshot-restore-loaded-native-ms-{size}"),
            "ms",
            &f(v, |r| r.loaded_ms),
            &format!("{memory} guest, lazy: spawn to all 256 MiB back in memory"),
        );
        bench::alone(
            &format!("snapshot-restore-eager-native-ms-{size}"),
            "ms",
            &f(eager, |r| r.restore_ms),
            &format!(
                "{memory} guest, --memory eager: spawn to vCPUs running, all memory loaded first"
            ),
        );
    }
    let resumes: Vec<f64> = one
        .iter()
        .flat_map(|r| r.resume_us.iter().copied())
        .collect();
    bench::alone(
        "resume-from-pause-us",
        "us",
        &resumes,
        "control request to reply, vCPUs running",
    );
    bench::alone(
        "suspend-disk-mib",
        "MiB",
        &f(one, |r| r.disk_bytes as f64 / 1048576.0),
        "disk blocks of the snapshot, 256 MiB touched",
    );
    bench::alone(
        "suspended-host-ram-mib",
        "MiB",
        &f(one, |r| r.cached_bytes as f64 / 1048576.0),
        "no VMM process; the snapshot's pages in the page cache",
    );
    bench::settings(
        "snapshot",
        &[
            ("rounds", rounds.to_string()),
            ("touched_mib", TOUCH_MIB.to_string()),
            ("vcpus", "1".into()),
            ("sizes", "1G,8G".into()),
            ("resumes_per_round", "20".into()),
        ],
    );
    Ok(())
}
