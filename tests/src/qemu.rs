//! QEMU as a frontend nobody here wrote: a Debian guest (our kernel, initramfs and base
//! image) on QEMU's software CPU, networked through our vhost-user backend or, as the
//! peer, through QEMU's own TAP backend. The guest runs one command given on the kernel
//! command line (systemd.run) and powers off.

use crate::testhost::Images;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const GUEST_MAC: &str = "06:b0:c5:00:00:02";

/// How the guest's NIC reaches the host.
#[derive(Clone, Copy)]
pub enum GuestNet<'a> {
    /// Our backend's port socket, with this many queue pairs.
    VhostUser(&'a Path, usize),
    /// QEMU's built-in TAP backend on an existing TAP in a network namespace (QEMU
    /// runs inside the namespace to open it).
    TapIn { tap: &'a str, netns: &'a str },
}

pub struct Qemu {
    child: Child,
    pub console: PathBuf,
}

impl Qemu {
    /// Boots the base image with `cpus` vCPUs and runs `script` (a /bin/sh script)
    /// as the guest's only job; the guest powers off when it ends.
    pub fn start(dir: &Path, net: GuestNet, cpus: usize, script: &str) -> Result<Self> {
        let images = Images::load()?;
        std::fs::create_dir_all(dir)?;
        let console = dir.join("console.log");
        assert!(
            !script.contains('"') && !script.contains('%'),
            "the script goes on the kernel command line: no double quotes or %"
        );
        // tsc_early_khz: under TCG the kernel cannot measure the TSC (microvm has no
        // HPET, and calibrating against the PIT fails), and then stalled at boot with
        // its clock at 0.000000 in 4 of 5 tries here; told the frequency, 4 of 4 booted.
        let cmdline = format!(
            "console=ttyS0 8250.nr_uarts=1 root=/dev/vda rw panic=1 loglevel=7 tsc_early_khz=2000000 \
             systemd.run=\"/bin/sh -c '{script}'\" \
             systemd.run_success_action=poweroff systemd.run_failure_action=poweroff"
        );
        let mut cmd = match net {
            GuestNet::TapIn { netns, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, "qemu-system-x86_64"]);
                c
            }
            GuestNet::VhostUser(..) => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,memory-backend=mem",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            &cpus.to_string(),
            "-m",
            "1G",
            "-object",
            "memory-backend-memfd,id=mem,size=1G,share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&images.kernel)
        .arg("-initrd")
        .arg(&images.initrd)
        .arg("-append")
        .arg(cmdline)
        .arg("-drive")
        .arg(format!(
            "id=d0,if=none,format=raw,snapshot=on,file={}",
            images.rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"]);
        match net {
            GuestNet::VhostUser(socket, pairs) => {
                cmd.arg("-chardev")
                    .arg(format!("socket,id=c0,path={}", socket.display()))
                    .arg("-netdev")
                    .arg(format!("vhost-user,id=n0,chardev=c0,queues={pairs}"));
            }
            GuestNet::TapIn { tap, .. } => {
                cmd.arg("-netdev").arg(format!(
                    "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
                ));
            }
        }
        let mq = matches!(net, GuestNet::VhostUser(_, p) if p > 1);
        cmd.arg("-device")
            .arg(format!(
                "virtio-net-device,netdev=n0,mac={GUEST_MAC}{}",
                if mq { ",mq=on" } else { "" }
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log"))?);
        let child = cmd
            .spawn()
            .context("start qemu-system-x86_64 (cargo xtask setup installs it)")?;
        Ok(Self { child, console })
    }

    pub fn console_tail(&self, bytes: usize) -> String {
        let s = std::fs::read_to_string(&self.console).unwrap_or_default();
        s[s.len().saturating_sub(bytes)..].to_string()
    }

    /// Boots a guest as [`Self::start`] does and waits for it to power off; once more,
    /// loudly, if the first one stalls (see [`Stalled`]).
    pub fn run(
        dir: &Path,
        net: GuestNet,
        cpus: usize,
        script: &str,
        limit: Duration,
    ) -> Result<Self> {
        let mut vm = Self::start(dir, net, cpus, script)?;
        match vm.wait(limit) {
            Ok(_) => Ok(vm),
            Err(e) if e.downcast_ref::<Stalled>().is_some() => {
                eprintln!("WARNING: {e}\nstarting the guest once more");
                drop(vm);
                let mut vm = Self::start(&dir.join("again"), net, cpus, script)?;
                vm.wait(limit)?;
                Ok(vm)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits for the guest to power off.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        let mut progress = (0u64, Instant::now());
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            let len = std::fs::metadata(&self.console)
                .map(|m| m.len())
                .unwrap_or(0);
            if len != progress.0 {
                progress = (len, Instant::now());
            } else if progress.1.elapsed() > STALL_LIMIT {
                let _ = self.child.kill();
                return Err(anyhow::Error::new(Stalled(format!(
                    "the QEMU guest printed nothing for {STALL_LIMIT:?}; console:\n{}",
                    self.console_tail(1500)
                ))));
            }
            if Instant::now() > deadline {
                bail!(
                    "the QEMU guest did not finish within {limit:?}; console:\n{}",
                    self.console_tail(3000)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How long a guest may print nothing before it counts as stalled. The guest boots
/// with loglevel 7, so a booting kernel prints steadily.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// A guest on QEMU's software CPU that stopped making progress early in its boot: seen
/// rarely here (2 of ~30 boots, one vCPU spinning after "Probing EDD"), never with
/// the same command line again. It says nothing about the backend under test.
#[derive(Debug)]
pub struct Stalled(pub String);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stalled {}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
