//! `cargo xtask bench boot`: boxd's VMM against QEMU booting the same kernel, initramfs
//! and disk, in the same run and on the same host (the emulated KVM host here).
//!
//! Both VMMs are measured the same way, from the moment the VMM process is spawned:
//! - kernel entry: the first byte the guest kernel writes to the serial console
//!   (`earlyprintk=ttyS0`). Debian's kernel is built without X86_VERBOSE_BOOTUP, so its
//!   decompressor is silent and this is the kernel's early console, right after
//!   decompression: the same guest work for both VMMs, so the difference between them
//!   is all VMM and firmware time. boxd's own time to its first vCPU entry (no firmware:
//!   it enters the kernel directly) is printed beside it.
//! - agent ready: the boxd agent's ready message arriving on host vsock port 52 (through
//!   boxd's vsock unix socket, or QEMU's vhost-vsock), read by this harness in both cases.

use anyhow::{Context, Result, bail};
use boxd_tests::bench::{self, Better};
use boxd_tests::testhost::Images;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 8250.nr_uarts=1 root=/dev/vda rw panic=1 quiet loglevel=4";
const READY_LIMIT: Duration = Duration::from_secs(240);

#[derive(Debug, Clone, Copy)]
struct Sample {
    kernel_entry_ms: f64,
    agent_ready_ms: f64,
    /// boxd only: VMM setup up to the first vCPU entry, as the VMM measured it.
    setup_ms: Option<f64>,
}

/// Reads a FIFO until EOF in a thread; reports when its first byte arrived.
fn watch_console(fifo: &Path, t0: Instant) -> mpsc::Receiver<f64> {
    let (tx, rx) = mpsc::channel();
    let fifo = fifo.to_path_buf();
    std::thread::spawn(move || {
        let Ok(mut f) = std::fs::File::open(&fifo) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut first = true;
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            if first {
                let _ = tx.send(t0.elapsed().as_secs_f64() * 1000.0);
                first = false;
            }
        }
    });
    rx
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A VMM process, stopped when dropped: SIGTERM (it cleans up its cgroup and
/// sockets), SIGKILL if it has not gone within 10 s.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn finish(
    console: mpsc::Receiver<f64>,
    ready: mpsc::Receiver<f64>,
    vmm: &mut Killed,
    what: &str,
) -> Result<Sample> {
    let agent_ready_ms = ready.recv_timeout(READY_LIMIT).with_context(|| {
        let status = vmm.0.try_wait().ok().flatten();
        format!("{what}: no agent ready message within {READY_LIMIT:?} (VMM status {status:?})")
    })?;
    let kernel_entry_ms = console
        .recv_timeout(Duration::from_secs(1))
        .context("no console output")?;
    Ok(Sample {
        kernel_entry_ms,
        agent_ready_ms,
        setup_ms: None,
    })
}

fn boot_boxd(images: &Images, dir: &Path) -> Result<Sample> {
    let boxd = boxd_tests::guest::boxd_binary()?;
    let fifo = dir.join("console.fifo");
    mkfifo(&fifo)?;
    // The harness, not the VMM, takes the agent's ready message (port 52).
    let listener = UnixListener::bind(dir.join("vsock.sock_52"))?;
    let t0 = Instant::now();
    let console = watch_console(&fifo, t0);
    let mut vmm = Killed(
        Command::new(&boxd)
            .args([
                "vmm",
                "run",
                "--name",
                "bench",
                "--cpus",
                "2",
                "--memory",
                "1G",
                "--skip-kvm-check",
            ])
            .args(["--ready-port", "0", "--cmdline", CMDLINE])
            .arg("--kernel")
            .arg(&images.kernel)
            .arg("--initrd")
            .arg(&images.initrd)
            .arg("--disk-base")
            .arg(&images.rootfs)
            .arg("--dir")
            .arg(dir)
            .arg("--console")
            .arg(&fifo)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log"))?)
            .spawn()?,
    );
    let (tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            let mut line = String::new();
            let _ = s.read_to_string(&mut line);
            let _ = tx.send(ms);
        }
    });
    let mut sample = finish(console, ready, &mut vmm, "boxd");
    if let Ok(s) = &mut sample {
        // The VMM's own account of its setup (process start to first vCPU entry).
        let status = boxd_vmm::control::Client::connect(&dir.join("control.sock"))
            .and_then(|mut c| c.call(&boxd_vmm::control::Request::Status {}));
        s.setup_ms = status
            .ok()
            .and_then(|r| r.status)
            .and_then(|v| v["setup_ms"].as_f64());
    }
    if sample.is_err() {
        eprintln!(
            "boxd vmm log:\n{}",
            std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
        );
    }
    sample
}

fn boot_qemu(images: &Images, dir: &Path) -> Result<Sample> {
    let fifo = dir.join("console.fifo");
    mkfifo(&fifo)?;
    let listener = boxd_agent::vsock::Listener::bind(boxd_agent::READY_PORT)
        .context("listen on vsock port 52 (is vhost_vsock loaded?)")?;
    let t0 = Instant::now();
    let console = watch_console(&fifo, t0);
    // QEMU's fastest x86 machine: microvm (no PCI, virtio-mmio described by ACPI, qboot).
    let mut vmm = Killed(
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,x-option-roms=off,rtc=off,pit=off,pic=off",
                "-enable-kvm",
                "-cpu",
                "host",
            ])
            .args([
                "-smp",
                "2",
                "-m",
                "1G",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", fifo.display()))
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initrd)
            .args(["-append", CMDLINE])
            .arg("-drive")
            .arg(format!(
                "id=d0,if=none,format=raw,snapshot=on,file={}",
                images.rootfs.display()
            ))
            .args([
                "-device",
                "virtio-blk-device,drive=d0",
                "-device",
                "vhost-vsock-device,guest-cid=3",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log"))?)
            .spawn()
            .context("start qemu-system-x86_64")?,
    );
    let (tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(mut s) = listener.accept() {
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            let mut line = String::new();
            let _ = s.read_to_string(&mut line);
            let _ = tx.send(ms);
        }
    });
    let sample = finish(console, ready, &mut vmm, "qemu");
    if sample.is_err() {
        eprintln!(
            "qemu log:\n{}",
            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
        );
    }
    sample
}

/// Runs the boot benchmark here (where Linux guests can boot): `rounds` boots of each
/// VMM, alternated. A boot that fails ends the run: with a handful of boots, one error
/// is already far over the error budget.
pub fn boot(rounds: usize) -> Result<()> {
    bench::check_rounds(rounds)?;
    let images = Images::load()?;
    let base: PathBuf = std::env::temp_dir().join(format!("boxd-bench-{}", std::process::id()));
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    // Alternate the two so that drifts in the host's speed hit both alike.
    for i in 0..rounds {
        for (name, list) in [("boxd", &mut ours), ("qemu", &mut theirs)] {
            let dir = base.join(format!("{name}-{i}"));
            std::fs::create_dir_all(&dir)?;
            let s = if name == "boxd" {
                boot_boxd(&images, &dir)?
            } else {
                boot_qemu(&images, &dir)?
            };
            println!(
                "round {}: {name:4} kernel entry {:8.1} ms, agent ready {:8.1} ms",
                i + 1,
                s.kernel_entry_ms,
                s.agent_ready_ms
            );
            list.push(s);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    let series = |v: &[Sample], f: fn(&Sample) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    println!("\nsame kernel, initramfs and disk, 2 vCPUs, 1 GiB; QEMU is microvm (qboot):");
    bench::compare(
        "boot-kernel-entry",
        "ms",
        &series(&ours, |s| s.kernel_entry_ms),
        &series(&theirs, |s| s.kernel_entry_ms),
        "qemu",
        Better::Lower,
    );
    let setups: Vec<f64> = ours.iter().filter_map(|s| s.setup_ms).collect();
    if !setups.is_empty() {
        println!(
            "  (boxd's own VMM setup to first vCPU entry, direct 64-bit boot: {})",
            bench::describe(&setups)
        );
    }
    bench::compare(
        "boot-agent-ready",
        "ms",
        &series(&ours, |s| s.agent_ready_ms),
        &series(&theirs, |s| s.agent_ready_ms),
        "qemu",
        Better::Lower,
    );
    let place = if std::env::var_os("BOXD_IN_TESTHOST").is_some() {
        "emulated-kvm-host"
    } else {
        "here"
    };
    bench::settings(
        "boot",
        &[
            ("rounds", rounds.to_string()),
            ("cpus", "2".into()),
            ("memory", "1G".into()),
            ("place", place.into()),
            ("cmdline", format!("{CMDLINE:?}")),
        ],
    );
    Ok(())
}
