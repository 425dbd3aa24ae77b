//! The emulated KVM host: QEMU with a software CPU that emulates AMD SVM, so that Debian's
//! `kvm_amd` gives a `/dev/kvm` that runs guest kernels at a few ns per instruction on
//! machines whose own KVM cannot (see ENVIRONMENT.md).
//!
//! The test host boots Debian's cloud kernel with the project's initramfs and mounts
//! *this machine's* root file system read-only over virtiofs, so every binary, image and
//! tool built or installed here is there at the same path, with no image to build. A
//! per-run scratch folder is shared read-write at the same path too: the command's
//! stdout, stderr and exit code come back through it, streamed live.

use crate::Killed as Reaped;
use anyhow::{Context, Result, bail};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Paths of the guest images, as `cargo xtask images` records them.
#[derive(Debug, Clone)]
pub struct Images {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub modules: PathBuf,
    pub kernel_release: String,
}

impl Images {
    /// Reads `target/images/manifest.json`; says how to build it when it is missing.
    pub fn load() -> Result<Self> {
        let path = crate::target_dir().join("images/manifest.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no guest images at {}; build them with `cargo xtask images`",
                path.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid JSON; rerun `cargo xtask images`",
                path.display()
            )
        })?;
        let field = |name: &str| -> Result<PathBuf> {
            let p = PathBuf::from(v[name].as_str().with_context(|| {
                format!(
                    "{} lacks \"{name}\"; rerun `cargo xtask images`",
                    path.display()
                )
            })?);
            if !p.exists() {
                bail!(
                    "{} (from {}) is missing; rerun `cargo xtask images`",
                    p.display(),
                    path.display()
                );
            }
            Ok(p)
        };
        Ok(Self {
            kernel: field("kernel")?,
            initrd: field("initrd")?,
            rootfs: field("rootfs")?,
            modules: field("modules")?,
            kernel_release: v["kernel_release"].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// How to start a test host.
#[derive(Debug, Clone)]
pub struct TestHost {
    pub cpus: u32,
    pub memory_mib: u64,
    /// (port on this machine's loopback, port inside the test host), TCP.
    pub forwards: Vec<(u16, u16)>,
    /// Environment for the command, on top of a clean minimal one.
    pub env: Vec<(String, String)>,
    /// Whole-run limit, boot included; the test host is killed past it.
    pub timeout: Duration,
    /// Where the command runs inside (default: the current directory).
    pub cwd: Option<PathBuf>,
    /// Put before each line of the command's output as it is streamed to ours (the
    /// [`Outcome`] keeps it as written).
    pub output_prefix: String,
    /// Give the command a ledger of its own (`BOXD_TEST_LEDGER`, in the scratch folder:
    /// this machine's file system is read-only inside) and return its entries.
    pub inner_ledger: bool,
}

impl Default for TestHost {
    fn default() -> Self {
        Self {
            // One more than the guests in tests use (2 vCPUs): a test host whose every
            // CPU sits inside a nested guest can wedge (docs/testing.md).
            cpus: 3,
            memory_mib: 6144,
            forwards: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(30 * 60),
            cwd: None,
            output_prefix: String::new(),
            inner_ledger: false,
        }
    }
}

/// What a command run inside the test host did.
#[derive(Debug)]
pub struct Outcome {
    pub exit_code: i32,
    /// Seconds from starting QEMU until the command started inside.
    pub boot_s: f64,
    /// The test host's serial console (kernel and init messages).
    pub console: String,
    /// What the command wrote (also streamed live), the first OUTPUT_KEPT bytes.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// What the command recorded in its ledger (with [`TestHost::inner_ledger`]).
    pub ledger: Vec<crate::ledger::Entry>,
}

/// How much of a command's output an [`Outcome`] keeps (all of it is streamed).
pub const OUTPUT_KEPT: usize = 1 << 20;

impl TestHost {
    /// Runs `argv` inside a fresh test host. Its stdout and stderr are streamed to ours
    /// as they are written; returns once the test host has powered off.
    pub fn run(&self, argv: &[String]) -> Result<Outcome> {
        if argv.is_empty() {
            bail!("no command given to run in the test host");
        }
        let images = Images::load()?;
        let qemu = which("qemu-system-x86_64")
            .context("qemu-system-x86_64 is not installed; run `cargo xtask setup`")?;
        let virtiofsd = Path::new("/usr/lib/qemu/virtiofsd");
        if !virtiofsd.exists() {
            bail!(
                "{} is missing; run `cargo xtask setup` (package qemu-system-x86)",
                virtiofsd.display()
            );
        }
        // One emulated host at a time: each wants every core of the machine, and two
        // starve each other (tests run in parallel threads and processes).
        let _exclusive = HostLock::take()?;
        let scratch = Scratch::new()?;
        let dir = scratch.path.clone();
        let cwd = match &self.cwd {
            Some(cwd) => cwd.clone(),
            None => std::env::current_dir()?,
        };
        std::fs::write(
            dir.join("init.sh"),
            self.init_script(&images, &dir, &cwd, argv),
        )?;
        set_mode(&dir.join("init.sh"), 0o755)?;

        let started = Instant::now();
        let mut daemons = Vec::new();
        for (tag, source, cache) in [
            ("root", Path::new("/"), "always"),
            ("scratch", dir.as_path(), "none"),
        ] {
            let socket = dir.join(format!("{tag}.sock"));
            let child = Command::new(virtiofsd)
                .arg(format!("--socket-path={}", socket.display()))
                .arg("-o")
                .arg(format!(
                    "source={},cache={cache},sandbox=chroot",
                    source.display()
                ))
                // No thread pool: the pool's threads call sched_getaffinity (glib),
                // which QEMU 7.2 virtiofsd's seccomp filter kills the daemon for; the
                // test host then hung on a dead file system (the "wedges" of old).
                .arg("--thread-pool-size=0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(
                    dir.join(format!("virtiofsd-{tag}.log")),
                )?)
                .spawn()
                .context("start virtiofsd")?;
            daemons.push(Reaped(child));
            wait_for_path(&socket, Duration::from_secs(10))
                .with_context(|| format!("virtiofsd did not create {}", socket.display()))?;
        }

        let mem = self.memory_mib;
        let mut netdev = "user,id=n0,net=10.0.2.0/24".to_string();
        for (host, guest) in &self.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let console = dir.join("console.log");
        // BOXD_TESTHOST_LOGLEVEL=7 shows the test host's kernel messages in full.
        let loglevel = std::env::var("BOXD_TESTHOST_LOGLEVEL").unwrap_or_else(|_| "4".into());
        let extra = std::env::var("BOXD_TESTHOST_CMDLINE").unwrap_or_default();
        let append = format!(
            "console=ttyS0 loglevel={loglevel} panic=-1 mitigations=off softlockup_all_cpu_backtrace=1 {extra} boxd.testhost={}",
            dir.display()
        );
        let mut qemu_cmd = Command::new(qemu);
        qemu_cmd
            .args(["-accel", "tcg,thread=multi,tb-size=1024", "-cpu", "max"])
            .args(["-smp", &self.cpus.to_string(), "-m", &format!("{mem}M")])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", &format!("file:{}", console.display())])
            // ttyS1: a heartbeat that needs no virtiofs, to tell a stalled file system
            // from a stalled kernel when the test host wedges.
            .args([
                "-serial",
                &format!("file:{}", dir.join("beat.log").display()),
            ])
            .args([
                "-monitor",
                &format!("unix:{},server,nowait", dir.join("monitor.sock").display()),
            ])
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initrd)
            .args(["-append", &append])
            .args([
                "-chardev",
                &format!("socket,id=fs0,path={}", dir.join("root.sock").display()),
            ])
            .args(["-device", "vhost-user-fs-pci,chardev=fs0,tag=hostroot"])
            .args([
                "-chardev",
                &format!("socket,id=fs1,path={}", dir.join("scratch.sock").display()),
            ])
            .args(["-device", "vhost-user-fs-pci,chardev=fs1,tag=scratch"])
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log"))?);
        let mut qemu = Reaped(qemu_cmd.spawn().context("start qemu-system-x86_64")?);

        let mut out = Tail::new(dir.join("stdout"), &self.output_prefix);
        let mut err = Tail::new(dir.join("stderr"), &self.output_prefix);
        let deadline = started + self.timeout;
        let mut boot_s = None;
        let mut heartbeat = (String::new(), Instant::now());
        let status = loop {
            if boot_s.is_none() && dir.join("started").exists() {
                boot_s = Some(started.elapsed().as_secs_f64());
            }
            // A file-system daemon that dies leaves the test host waiting on it forever
            // (QEMU 7.2's virtiofsd was killed by its own seccomp filter when its thread
            // pool grew; it runs without one now): say so at once.
            for (d, tag) in daemons.iter_mut().zip(["root", "scratch"]) {
                // (A clean exit is its answer to QEMU going away at power-off.)
                if let Ok(Some(st)) = d.0.try_wait()
                    && !st.success()
                {
                    let _ = qemu.0.kill();
                    return Err(anyhow::Error::new(Wedged(format!(
                        "the {tag} file system's virtiofsd exited ({st}; if the kernel log shows an audit record with sig=31, its seccomp filter killed it); {}",
                        last_lines(
                            &std::fs::read_to_string(dir.join(format!("virtiofsd-{tag}.log")))
                                .unwrap_or_default(),
                            3
                        )
                    ))));
                }
            }
            // The init script rewrites `heartbeat` every few seconds (and a line on a
            // second serial port, which needs no file system). When it stops, the
            // emulated host is stuck and waiting longer is pointless.
            let beat = std::fs::read_to_string(dir.join("heartbeat")).unwrap_or_default();
            if beat != heartbeat.0 {
                heartbeat = (beat, Instant::now());
            } else if heartbeat.1.elapsed() > HEARTBEAT_LIMIT {
                let cpus = wedge_diagnosis(&dir, qemu.0.id());
                let _ = qemu.0.kill();
                let console = std::fs::read_to_string(&console).unwrap_or_default();
                let beats = std::fs::read_to_string(dir.join("beat.log")).unwrap_or_default();
                return Err(anyhow::Error::new(Wedged(format!(
                    "no heartbeat for {HEARTBEAT_LIMIT:?}; last serial beat (uptime) {:?}; {cpus}\nconsole ends with:\n{}",
                    last_lines(&beats, 1).trim(),
                    last_lines(&console, 20)
                ))));
            }
            out.pump(&mut std::io::stdout())?;
            err.pump(&mut std::io::stderr())?;
            if let Some(status) = qemu.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = qemu.0.kill();
                let console = std::fs::read_to_string(&console).unwrap_or_default();
                bail!(
                    "the test host did not finish within {:?}; its console ends with:\n{}",
                    self.timeout,
                    last_lines(&console, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        out.pump(&mut std::io::stdout())?;
        err.pump(&mut std::io::stderr())?;
        drop(daemons);
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        let exit = std::fs::read_to_string(dir.join("exit")).ok();
        let Some(exit) = exit else {
            let qemu_log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            // The emulated host's own kernel died under it (nested SVM under TCG: seen
            // as recursive page faults ending in "Kernel panic"): like a wedge, it says
            // nothing about the code under test.
            if console_text.contains("Kernel panic") {
                return Err(anyhow::Error::new(Wedged(format!(
                    "the test host's kernel panicked; its console ends with:\n{}",
                    last_lines(&console_text, 20)
                ))));
            }
            bail!(
                "the test host stopped ({status}) before the command finished.\nQEMU: {}\nconsole:\n{}",
                qemu_log.trim(),
                last_lines(&console_text, 40)
            );
        };
        Ok(Outcome {
            exit_code: exit
                .trim()
                .parse()
                .with_context(|| format!("bad exit code file: {exit:?}"))?,
            boot_s: boot_s.unwrap_or(0.0),
            console: console_text,
            stdout: out.kept,
            stderr: err.kept,
            ledger: crate::ledger::read(&dir.join("ledger")),
        })
    }

    /// PID 1 inside the test host: prepare a usable system, run the command, power off.
    fn init_script(&self, images: &Images, dir: &Path, cwd: &Path, argv: &[String]) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut env = String::new();
        if self.inner_ledger {
            env.push_str(&format!(
                "export {}={}\n",
                crate::ledger::ENV,
                q(&dir.join("ledger").display().to_string())
            ));
        }
        for (k, v) in &self.env {
            env.push_str(&format!("export {k}={}\n", q(v)));
        }
        let command: Vec<String> = argv.iter().map(|a| q(a)).collect();
        format!(
            r#"#!/bin/sh
# Generated by boxd's test-host launcher; runs as PID 1 in the emulated KVM host.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 BOXD_IN_TESTHOST=1 BOXD_TESTHOST_MODULES={modules} BOXD_TESTHOST_SCRATCH={dir}
mount -t tmpfs -o mode=755 tmpfs /run
# A fresh writable /tmp, but a checkout that lives under the host's /tmp (and the
# scratch share mounted inside it) must stay visible at its own path.
mkdir -p /run/boxd/hosttmp && mount --rbind /tmp /run/boxd/hosttmp
mount -t tmpfs -o mode=1777 tmpfs /tmp
for keep in {dir} {cwd}; do
    case "$keep" in
        /tmp/?*) top=${{keep#/tmp/}}; top=${{top%%/*}}
                 if [ ! -d "/tmp/$top" ]; then mkdir -p "/tmp/$top" && mount --rbind "/run/boxd/hosttmp/$top" "/tmp/$top"; fi ;;
    esac
done
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
echo "boxd-testhost: running {shown}" >/dev/console
touch {dir}/started
( while :; do cat /proc/uptime >/dev/ttyS1; cat /proc/uptime >{dir}/heartbeat.tmp && mv {dir}/heartbeat.tmp {dir}/heartbeat; sleep 3; done ) &
{env}cd {cwd} && {command} >{dir}/stdout 2>{dir}/stderr </dev/null
echo $? >{dir}/exit.tmp && mv {dir}/exit.tmp {dir}/exit
sync
echo o >/proc/sysrq-trigger
sleep 10
"#,
            modules = q(&images.modules.display().to_string()),
            shown = argv.join(" ").replace(['"', '`', '$'], "_"),
            dir = q(&dir.display().to_string()),
            cwd = q(&cwd.display().to_string()),
            command = command.join(" "),
        )
    }
}

/// Asks the wedged test host's QEMU monitor where its vCPUs are, twice, 2 s apart
/// (kept in the scratch folder as wedge-cpus.txt), and sums it up in one line.
fn wedge_diagnosis(dir: &Path, qemu_pid: u32) -> String {
    use std::io::{Read, Write};
    // One monitor session: the commands, then whatever comes back within a few seconds.
    let session = |cmds: &[String]| -> String {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(dir.join("monitor.sock")) else {
            return "monitor: no connection".into();
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        let mut drain = |s: &mut std::os::unix::net::UnixStream, out: &mut Vec<u8>| {
            for _ in 0..20 {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 && out.len() < 4 << 20 => out.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
        };
        drain(&mut s, &mut out);
        for cmd in cmds {
            let _ = s.write_all(format!("{cmd}\n").as_bytes());
            drain(&mut s, &mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let cpu_ticks = || -> u64 {
        std::fs::read_to_string(format!("/proc/{qemu_pid}/stat"))
            .ok()
            .and_then(|s| {
                let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    };
    let mut cmds = vec!["info cpus".to_string(), "info registers -a".to_string()];
    for cpu in 0..4 {
        cmds.push(format!("info lapic {cpu}"));
    }
    let mut dumps = Vec::new();
    let t0 = cpu_ticks();
    for _ in 0..2 {
        dumps.push(session(&cmds));
        std::thread::sleep(Duration::from_secs(2));
    }
    let busy = cpu_ticks().saturating_sub(t0);
    let _ = std::fs::write(dir.join("wedge-cpus.txt"), dumps.join("\n=====\n"));
    // The scratch folder goes with the retry: the evidence is kept beside it, under
    // target/testhost/wedges/, for whoever looks into wedges next.
    if let (Some(base), Some(run)) = (dir.parent(), dir.file_name()) {
        let keep = base.join("wedges").join(run);
        if std::fs::create_dir_all(&keep).is_ok() {
            for f in ["wedge-cpus.txt", "console.log", "qemu.log"] {
                let _ = std::fs::copy(dir.join(f), keep.join(f));
            }
            eprintln!("wedge evidence kept in {}", keep.display());
        }
    }
    let rips = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| {
                l.find("RIP=").map(|i| {
                    l[i + 4..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
            })
            .collect()
    };
    let halted = |t: &str| t.lines().filter(|l| l.contains("HLT=1")).count();
    format!(
        "vCPU RIPs {:?} then {:?}, halted {} then {}, QEMU used {busy} ticks of CPU in those seconds (wedge-cpus.txt has the vCPUs and local APICs)",
        rips(&dumps[0]),
        rips(&dumps[1]),
        halted(&dumps[0]),
        halted(&dumps[1])
    )
}

/// A test host that stopped making progress (see [`TestHost::run`]).
#[derive(Debug)]
pub struct Wedged(pub String);

impl std::fmt::Display for Wedged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the emulated KVM host stopped responding: {}", self.0)
    }
}

impl std::error::Error for Wedged {}

/// How long the test host may go without a heartbeat before it counts as wedged
/// (boot included: the first beat comes within seconds of the command starting).
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(90);

/// An exclusive lock on target/testhost/.lock for the life of one test host.
struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    fn take() -> Result<Self> {
        let base = crate::target_dir().join("testhost");
        std::fs::create_dir_all(&base)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(base.join(".lock"))?;
        // SAFETY: flock on a descriptor we own; it blocks until the other host is done.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {}: {}",
                base.join(".lock").display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { _file: file })
    }
}

/// A per-run folder under target/testhost/, removed afterwards unless BOXD_KEEP_TESTHOST
/// is set (then its console and QEMU logs stay for a post-mortem).
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        let base = crate::target_dir().join("testhost");
        std::fs::create_dir_all(&base)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)?
            .subsec_nanos();
        let path = base.join(format!("run-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("BOXD_KEEP_TESTHOST").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("test host scratch kept at {}", self.path.display());
        }
    }
}

/// Follows a file that another machine appends to, copying new bytes out.
struct Tail {
    path: PathBuf,
    offset: u64,
    kept: Vec<u8>,
    prefix: Vec<u8>,
    at_line_start: bool,
}

impl Tail {
    fn new(path: PathBuf, prefix: &str) -> Self {
        Self {
            path,
            offset: 0,
            kept: Vec::new(),
            prefix: prefix.as_bytes().to_vec(),
            at_line_start: true,
        }
    }

    fn pump(&mut self, to: &mut dyn Write) -> Result<()> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        // Bounded per call so a chatty command cannot starve the timeout check.
        file.take(4 << 20).read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        let room = OUTPUT_KEPT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&buf[..buf.len().min(room)]);
        if self.prefix.is_empty() {
            to.write_all(&buf)?;
        } else {
            let mut shown = Vec::with_capacity(buf.len() + 64);
            for &b in &buf {
                if self.at_line_start {
                    shown.extend_from_slice(&self.prefix);
                }
                shown.push(b);
                self.at_line_start = b == b'\n';
            }
            to.write_all(&shown)?;
        }
        to.flush()?;
        Ok(())
    }
}

fn wait_for_path(path: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
