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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the boot benchmark here (where Linux guests can boot).
pub fn boot(runs: usize) -> Result<()> {
    let images = Images::load()?;
    let base: PathBuf = std::env::temp_dir().join(format!("boxd-bench-{}", std::process::id()));
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    // Alternate the two so that drifts in the host's speed hit both alike.
    for i in 0..runs {
        for (name, list) in [("boxd", &mut ours), ("qemu", &mut theirs)] {
            let dir = base.join(format!("{name}-{i}"));
            std::fs::create_dir_all(&dir)?;
            let s = if name == "boxd" {
                boot_boxd(&images, &dir)?
            } else {
                boot_qemu(&images, &dir)?
            };
            println!(
                "run {}: {name:4} kernel entry {:8.1} ms, agent ready {:8.1} ms",
                i + 1,
                s.kernel_entry_ms,
                s.agent_ready_ms
            );
            list.push(s);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    let entry = (
        median(ours.iter().map(|s| s.kernel_entry_ms).collect()),
        median(theirs.iter().map(|s| s.kernel_entry_ms).collect()),
    );
    let ready = (
        median(ours.iter().map(|s| s.agent_ready_ms).collect()),
        median(theirs.iter().map(|s| s.agent_ready_ms).collect()),
    );
    println!("\nmedian of {runs} runs, same kernel, initramfs and disk, 2 vCPUs, 1 GiB:");
    println!(
        "  VMM start to kernel entry: boxd {:.1} ms, QEMU microvm {:.1} ms",
        entry.0, entry.1
    );
    let setups: Vec<f64> = ours.iter().filter_map(|s| s.setup_ms).collect();
    if !setups.is_empty() {
        println!(
            "  (boxd's own VMM setup to first vCPU entry, direct 64-bit boot: {:.1} ms)",
            median(setups)
        );
    }
    println!(
        "  VMM start to agent ready:  boxd {:.0} ms, QEMU microvm {:.0} ms",
        ready.0, ready.1
    );
    println!(
        "BENCH boot-kernel-entry {:.1} ms peer={:.1} ratio={:.2}",
        entry.0,
        entry.1,
        entry.1 / entry.0
    );
    println!(
        "BENCH boot-agent-ready {:.0} ms peer={:.0} ratio={:.2}",
        ready.0,
        ready.1,
        ready.1 / ready.0
    );
    Ok(())
}

/// `cargo xtask bench net`: the backend's figures from the release `boxd-netbench`
/// (tests/src/bin/netbench.rs), beside a peer's from the same run. Runs on this host:
/// it needs root and /dev/net/tun, not KVM (the guest runs on QEMU's software CPU).
pub fn net(seconds: f64, skip_guest: bool) -> Result<()> {
    crate::setup::setup()?;
    let boxd = crate::build_boxd()?;
    if !skip_guest {
        crate::images::build(&boxd)?;
    }
    build_bench("boxd-netbench")?;
    let mut cmd = Command::new(boxd_tests::target_dir().join("release/boxd-netbench"));
    cmd.args(["--seconds", &seconds.to_string()]);
    if skip_guest {
        cmd.arg("--skip-guest");
    }
    crate::util::run(&mut cmd)
}

/// `cargo xtask bench bpf`: the data path's figures from the release `boxd-bpfbench`
/// (tests/src/bin/bpfbench.rs). Runs on this host: it needs root and BPF, not KVM.
pub fn bpf(seconds: f64) -> Result<()> {
    crate::setup::setup()?;
    crate::build_boxd()?;
    build_bench("boxd-bpfbench")?;
    crate::util::run(
        Command::new(boxd_tests::target_dir().join("release/boxd-bpfbench"))
            .arg(seconds.to_string()),
    )
}

/// Builds one of the release benchmark binaries of the tests crate.
fn build_bench(bin: &str) -> Result<()> {
    let step = crate::util::Step::start(format!("cargo build --release -p boxd-tests --bin {bin}"));
    crate::util::run(Command::new(env!("CARGO")).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "boxd-tests",
        "--bin",
        bin,
    ]))?;
    step.done();
    Ok(())
}

/// `cargo xtask bench control`: committed writes per second and commit latency, 1 and 3
/// voters on loopback, against etcd in the same run (tests/src/bin/controlbench.rs).
pub fn control(seconds: f64) -> Result<()> {
    crate::setup::setup()?;
    crate::build_boxd()?;
    build_bench("boxd-controlbench")?;
    crate::util::run(
        Command::new(boxd_tests::target_dir().join("release/boxd-controlbench"))
            .arg(seconds.to_string()),
    )
}

/// The p-th percentile (0-100) of `v`, nearest rank.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Milliseconds `f` took, failing unless its command succeeded.
fn timed(f: impl FnOnce() -> Result<std::process::Output>) -> Result<f64> {
    let t = Instant::now();
    let o = f()?;
    anyhow::ensure!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// OpenSSH's own sshd on `port`, accepting `key` for root: the floor of an SSH
/// round trip (handshake, auth, one exec of `true`) on this machine.
fn openssh_floor(dir: &Path, port: u16, key: &Path) -> Result<std::process::Child> {
    let host_key = dir.join("sshd_host_key");
    crate::util::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key),
    )?;
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
        which("sshd").or_else(|_| Ok::<_, anyhow::Error>(PathBuf::from("/usr/sbin/sshd")))?;
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start OpenSSH's sshd (package openssh-server)")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(child)
}

fn which(name: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()?;
    anyhow::ensure!(out.status.success(), "{name} is not installed");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `cargo xtask bench api`, first part: `ssh host ls --json` against OpenSSH's sshd
/// running `true`, same client, same machine, same run, interleaved. It needs no guest,
/// so it runs right here, natively (inside the emulated KVM host every process start
/// costs milliseconds of software CPU, which says nothing about either server).
pub fn api_ls() -> Result<()> {
    use boxd_tests::api::{Options, Server};
    let dir = std::env::temp_dir().join(format!("boxd-bench-api-ls-{}", std::process::id()));
    let s = Server::start(&dir, 22260, &Options::default(), &["bench"])?;
    let key = dir.join("bench.key");
    let mut sshd = openssh_floor(&dir, 22299, &key)?;
    let floor_cmd = || {
        let mut c = Command::new("ssh");
        c.args(s.ssh_opts("bench"))
            .args(["-p", "22299", "root@127.0.0.1", "true"])
            .stdin(Stdio::null());
        c
    };
    // Registration and first-connection costs out of the way.
    s.json("bench", &["ls"])?;
    timed(|| Ok(floor_cmd().output()?))?;
    let samples = 200;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        ours.push(timed(|| s.ssh("bench", &["ls", "--json"]))?);
        peer.push(timed(|| Ok(floor_cmd().output()?))?);
    }
    let _ = sshd.kill();
    let _ = sshd.wait();
    let (o50, p50) = (percentile(&mut ours, 50.0), percentile(&mut peer, 50.0));
    let (o99, p99) = (percentile(&mut ours, 99.0), percentile(&mut peer, 99.0));
    println!(
        "`ssh -p PORT host ls --json` (a linearizable read of the replicated state) vs OpenSSH's sshd running `true`, {samples} each, interleaved:"
    );
    println!(
        "BENCH api-ls-p50-ms {o50:.1} ms peer={p50:.1} ratio={:.2}",
        p50 / o50
    );
    println!(
        "BENCH api-ls-p99-ms {o99:.1} ms peer={p99:.1} ratio={:.2}",
        p99 / o99
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `cargo xtask bench api`, second part (where guests boot): `new` until a real
/// `ssh root@<its address>` from the client namespace works.
pub fn api_new(runs: usize) -> Result<()> {
    use boxd_tests::api::{Options, Server};
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
    let med = median(ready);
    let place = if std::env::var_os("BOXD_IN_TESTHOST").is_some() {
        "cold boot of Debian inside the emulated KVM host (software CPU)"
    } else {
        "cold boot of Debian"
    };
    println!("BENCH api-new-to-ssh-ready-ms {med:.0} ms (median of {runs}; {place})");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
