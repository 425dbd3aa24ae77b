//! `boxd vmm`: run one VM in this process, or talk to a running one's control socket.

use crate::Exit;
use anyhow::{Context, bail};
use boxd_vmm::control::{Client, Request};
use boxd_vmm::{BootSource, CgroupLimits, DiskSpec, ExitReason, VmConfig, Vmm, VsockConfig};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest command line boxd boots with (DESIGN.md: stock kernel, our initramfs).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=1 root=/dev/vda rw panic=1 pci=off quiet loglevel=4";

#[derive(Subcommand)]
pub enum VmmCommand {
    /// Boot a VM and serve its control socket until it powers off.
    Run(Box<RunArgs>),
    /// Print a running VM's status (JSON).
    Status(Target),
    /// Stop the VM's vCPUs (RAM kept; resume continues where it was).
    Pause(Target),
    Resume(Target),
    /// Press the ACPI power button; stop hard after --timeout.
    Shutdown {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stop the VM now (like pulling the plug; the disk keeps what the guest flushed).
    Stop(Target),
    /// Run a command in the VM through its agent (stdin, stdout, stderr and the exit
    /// code pass through).
    Exec {
        /// The VM's vsock socket (`<dir>/vsock.sock` of `vmm run`).
        #[arg(long)]
        vsock: PathBuf,
        /// Allocate a terminal (for interactive programs).
        #[arg(short, long)]
        tty: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the last part of the serial console.
    Console {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 4096)]
        bytes: usize,
    },
    /// Write a snapshot of the running VM into a new directory: vCPU, VM and device
    /// state, and the guest memory's pages that hold data.
    Snapshot {
        #[command(flatten)]
        target: Target,
        /// The directory to create (it must not exist).
        #[arg(long)]
        to: PathBuf,
        /// What the VM does afterwards: resume (as before), pause, or stop (suspend).
        #[arg(long, default_value = "resume", value_parser = parse_after)]
        then: boxd_vmm::AfterSnapshot,
        #[arg(long)]
        json: bool,
    },
    /// Continue a VM from a snapshot in this process, and serve it until it ends.
    Restore(RestoreArgs),
    /// Measure whether this host's KVM runs guest kernels at hardware speed (a tiny
    /// ring-0 loop, tens of milliseconds); exits 0 either way.
    Probe {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory (`vmm snapshot --to`).
    #[arg(long)]
    snapshot: PathBuf,
    /// Serve the control socket here instead of where the snapshotted VM had it.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Write the console here instead of where the snapshotted VM did.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Take the snapshot out of its directory once loaded, before the guest runs (a
    /// wake from suspend: the disk moves on, so the same memory must never be
    /// restored over it again).
    #[arg(long)]
    consume: bool,
    /// How guest memory comes back: `lazy` (the guest runs at once; pages load when
    /// touched and in the background) or `eager` (all of it, every block checked,
    /// before the guest runs: a damaged memory file is refused and nothing changes).
    #[arg(long, default_value = "lazy", value_parser = parse_memory_restore)]
    memory: boxd_vmm::MemoryRestore,
    #[arg(long)]
    skip_kvm_check: bool,
}

fn parse_memory_restore(s: &str) -> Result<boxd_vmm::MemoryRestore, String> {
    match s {
        "lazy" => Ok(boxd_vmm::MemoryRestore::Lazy),
        "eager" => Ok(boxd_vmm::MemoryRestore::Eager),
        _ => Err(format!("{s:?}: use lazy or eager")),
    }
}

fn parse_after(s: &str) -> Result<boxd_vmm::AfterSnapshot, String> {
    match s {
        "resume" => Ok(boxd_vmm::AfterSnapshot::Resume),
        "pause" => Ok(boxd_vmm::AfterSnapshot::Pause),
        "stop" => Ok(boxd_vmm::AfterSnapshot::Stop),
        _ => Err(format!("{s:?}: use resume, pause or stop")),
    }
}

#[derive(Args)]
pub struct Target {
    /// The VM's control socket (`--control` or `<dir>/control.sock` of `vmm run`).
    #[arg(long)]
    control: PathBuf,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Names the VM (logs, cgroup).
    #[arg(long, default_value = "vm")]
    name: String,
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    /// Guest RAM, e.g. 512M, 8G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// bzImage to boot.
    #[arg(long, required_unless_present = "raw")]
    kernel: Option<PathBuf>,
    /// Instead of a kernel: flat 64-bit code, entered in long mode at 1 MiB with an
    /// identity map of the first 4 GiB (the VMM's own tests and benchmarks).
    #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
    raw: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Replaces the whole kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Appended to the kernel command line.
    #[arg(long)]
    append: Option<String>,
    /// A folder for the VM's files: control.sock, vsock.sock, console.log, disk.img
    /// (each overridable by its own flag).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The VM's writable disk layer (created sparse if missing).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Read-only base image under the disk (e.g. the Debian root file system).
    #[arg(long)]
    disk_base: Option<PathBuf>,
    /// Frozen layers between base and disk, bottom first (fork chains).
    #[arg(long = "disk-layer")]
    disk_layers: Vec<PathBuf>,
    /// Virtual disk size for a new disk, e.g. 100G.
    #[arg(long, value_parser = parse_size)]
    disk_size: Option<u64>,
    #[arg(long)]
    read_only: bool,
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// A network device served by the vhost-user backend on this socket
    /// (`boxd net add ...` or `boxd net port ...`).
    #[arg(long)]
    net: Option<PathBuf>,
    /// Queue pairs for the network device (the backend's port must have as many;
    /// default: one per vCPU).
    #[arg(long)]
    net_queues: Option<usize>,
    /// The guest's MAC address. Every VM sees the same link (DESIGN.md), so the
    /// default is the same for all.
    #[arg(long, default_value = "06:b0:c5:00:00:02", value_parser = parse_mac)]
    mac: [u8; 6],
    /// Host vsock port on which the VMM takes the agent's ready message (0: leave it to
    /// whoever listens on `<vsock>_<port>`).
    #[arg(long, default_value_t = boxd_agent::READY_PORT)]
    ready_port: u32,
    #[arg(long)]
    console: Option<PathBuf>,
    #[arg(long)]
    control: Option<PathBuf>,
    /// Run without a cgroup (no cpu/memory/pids limits).
    #[arg(long)]
    no_cgroup: bool,
    /// Boot even if this host's KVM measures as unable to run Linux guests.
    #[arg(long)]
    skip_kvm_check: bool,
    /// Guest reboots allowed within a minute before boxd gives up (reboot loops).
    #[arg(long, default_value_t = 10)]
    reboots_per_minute: u32,
}

pub fn main(command: VmmCommand) -> Exit {
    let (target, request) = match command {
        VmmCommand::Run(args) => return run(*args),
        VmmCommand::Exec {
            vsock,
            tty,
            command,
        } => return exec(&vsock, tty, command),
        VmmCommand::Status(t) => (t, Request::Status {}),
        VmmCommand::Pause(t) => (t, Request::Pause {}),
        VmmCommand::Resume(t) => (t, Request::Resume {}),
        VmmCommand::Shutdown { target, timeout } => (
            target,
            Request::Shutdown {
                timeout_ms: timeout.as_millis() as u64,
            },
        ),
        VmmCommand::Stop(t) => (t, Request::Stop {}),
        VmmCommand::Console { target, bytes } => (target, Request::Console { bytes }),
        VmmCommand::Snapshot {
            target,
            to,
            then,
            json,
        } => return snapshot(&target, to, then, json),
        VmmCommand::Restore(args) => return restore(args),
        VmmCommand::Probe { json } => return probe(json),
    };
    let reply = Client::connect(&target.control)?.call(&request)?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_default());
    }
    if let Some(s) = reply.status {
        println!("{}", serde_json::to_string_pretty(&s)?);
    }
    if let Some(c) = reply.console {
        print!("{c}");
    }
    Ok(0)
}

fn snapshot(target: &Target, to: PathBuf, then: boxd_vmm::AfterSnapshot, json: bool) -> Exit {
    // Relative to where the command runs, not to the VMM's working directory.
    let dir =
        std::path::absolute(&to).with_context(|| format!("snapshot directory {}", to.display()))?;
    let mut client = Client::connect(&target.control)?;
    client.set_timeout(SNAPSHOT_TIMEOUT)?;
    let reply = client.call(&Request::Snapshot { dir, then })?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_default());
    }
    let report = reply.snapshot.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let f = |k: &str| report.get(k).and_then(|v| v.as_f64()).unwrap_or_default();
        println!(
            "snapshot {}: {:.0} MiB of {:.0} MiB memory written in {:.1} ms (vCPUs stopped {:.1} ms)",
            to.display(),
            f("memory_bytes") / 1048576.0,
            f("memory_size") / 1048576.0,
            f("save_ms"),
            f("paused_ms"),
        );
    }
    Ok(0)
}

/// A snapshot writes the guest's memory; 64 GiB at disk speed fits in this.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

fn restore(args: RestoreArgs) -> Exit {
    if !args.skip_kvm_check {
        check_kvm()?;
    }
    let snap = boxd_vmm::snapshot::load(&args.snapshot)?;
    let mut config = snap.config;
    if let Some(c) = args.control {
        config.control = Some(c);
    }
    if let Some(c) = args.console {
        config.console = Some(c);
    }
    supervise(config, Some((args.snapshot, args.consume, args.memory)), 10)
}

fn check_kvm() -> anyhow::Result<()> {
    let speed = boxd_vmm::probe::kvm_speed().map_err(|e| anyhow::anyhow!("KVM check: {e}"))?;
    if !speed.hardware_speed {
        bail!("{}", boxd_vmm::probe::refusal(&speed));
    }
    Ok(())
}

fn probe(json: bool) -> Exit {
    let speed = boxd_vmm::probe::kvm_speed().map_err(|e| anyhow::anyhow!("KVM probe: {e}"))?;
    if json {
        println!("{}", serde_json::to_string(&speed)?);
    } else if speed.hardware_speed {
        println!(
            "KVM runs guest kernel code at hardware speed ({:.1} ns per instruction)",
            speed.ns_per_instruction
        );
    } else {
        println!("{}", boxd_vmm::probe::refusal(&speed));
    }
    Ok(0)
}

fn exec(vsock: &std::path::Path, tty: bool, argv: Vec<String>) -> Exit {
    use boxd_agent::proto::{Kind, Pty, Request as AgentRequest};
    use std::io::Write;
    let agent = boxd_agent::Agent::new(vsock);
    let pty = tty.then(|| Pty {
        rows: 24,
        cols: 80,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
    });
    let req = AgentRequest::Exec {
        argv,
        env: vec![],
        cwd: None,
        user: None,
        pty,
        kill_on_disconnect: true,
    };
    let stdin: Box<dyn std::io::Read + Send> = Box::new(std::io::stdin());
    let status = agent.exec_stream(&req, Some(stdin), &mut |kind, data| {
        let _ = if kind == Kind::Stderr {
            std::io::stderr().write_all(data)
        } else {
            std::io::stdout()
                .write_all(data)
                .and_then(|()| std::io::stdout().flush())
        };
    })?;
    Ok(status.code)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address like 06:b0:c5:00:00:02");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s} is a multicast address; a NIC needs a unicast one"
        ));
    }
    Ok(mac)
}

/// Parses sizes like `512M`, `8G`, `100GB` (K/M/G/T and KiB..TiB are powers of 1024;
/// KB..TB powers of 1000); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 8G"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?}; use K, M, G or T"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s or 500ms"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        u => return Err(format!("unknown duration unit {u:?}; use ms, s, m, h or d")),
    })
}

fn config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    if !args.memory.is_multiple_of(1 << 20) {
        bail!(
            "--memory must be a whole number of MiB, got {} bytes",
            args.memory
        );
    }
    let in_dir = |flag: &Option<PathBuf>, name: &str| -> Option<PathBuf> {
        flag.clone()
            .or_else(|| args.dir.as_ref().map(|d| d.join(name)))
    };
    if let Some(d) = &args.dir {
        std::fs::create_dir_all(d).with_context(|| format!("create --dir {}", d.display()))?;
    }
    let mut cmdline = args.cmdline.clone();
    if let Some(extra) = &args.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let disk = in_dir(&args.disk, "disk.img").map(|top| DiskSpec {
        base: args.disk_base.clone(),
        frozen: args.disk_layers.clone(),
        top,
        size: args.disk_size.map(|s| s / 4096 * 4096),
        read_only: args.read_only,
    });
    let limits = (!args.no_cgroup).then(|| CgroupLimits {
        cpus: u32::from(args.cpus),
        // The guest's RAM plus room for the VMM itself (page tables, device buffers).
        memory_bytes: args.memory + args.memory / 50 + (128 << 20),
        pids: 64 + 4 * u32::from(args.cpus),
    });
    Ok(VmConfig {
        name: args.name.clone(),
        vcpus: args.cpus,
        memory_mib: args.memory >> 20,
        boot: match (&args.raw, &args.kernel) {
            (Some(raw), _) => BootSource::Raw64 {
                code: std::fs::read(raw).with_context(|| format!("--raw {}", raw.display()))?,
            },
            (None, Some(kernel)) => BootSource::Linux {
                kernel: kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline,
            },
            (None, None) => bail!("give --kernel (or --raw)"),
        },
        disk,
        vsock: in_dir(&args.vsock, "vsock.sock").map(|uds| VsockConfig {
            uds,
            ready_port: (args.ready_port != 0).then_some(args.ready_port),
        }),
        net: args.net.clone().map(|vhost_user| boxd_vmm::NetConfig {
            vhost_user,
            mac: args.mac,
            queue_pairs: args.net_queues.unwrap_or(usize::from(args.cpus)),
        }),
        console: in_dir(&args.console, "console.log"),
        control: in_dir(&args.control, "control.sock"),
        cgroup: limits,
    })
}

/// Turns SIGTERM/SIGINT into a stop of whatever VM is current.
fn handle_signals(
    current: Arc<Mutex<Option<Arc<boxd_vmm::vstate::exit::VmExit>>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    crate::signals::on_termination(move |sig| {
        eprintln!("boxd vmm: signal {sig}, stopping the VM");
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(exit) = current.lock().ok().and_then(|c| c.clone()) {
            exit.request(ExitReason::Stopped);
        }
    })
}

fn run(args: RunArgs) -> Exit {
    let config = config(&args)?;
    if !args.skip_kvm_check {
        check_kvm()?;
    }
    supervise(config, None, args.reboots_per_minute)
}

/// Runs the VM (restored from `snapshot` first, when given) until it ends; a guest
/// reboot boots it again, fresh.
fn supervise(
    config: VmConfig,
    mut snapshot: Option<(PathBuf, bool, boxd_vmm::MemoryRestore)>,
    reboots_per_minute: u32,
) -> Exit {
    let current = Arc::new(Mutex::new(None));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    handle_signals(current.clone(), stopping.clone())?;
    let mut reboots: Vec<Instant> = Vec::new();
    loop {
        let started = Instant::now();
        let mut vmm = match snapshot.take() {
            Some((dir, consume, memory)) => {
                Vmm::restore(&dir, Some(config.clone()), consume, memory)?
            }
            None => Vmm::start(config.clone())?,
        };
        *current.lock().expect("not poisoned") = Some(vmm.exit_handle());
        eprintln!(
            "boxd vmm: {} running ({} vCPUs, {} MiB)",
            config.name, config.vcpus, config.memory_mib
        );
        let reason = vmm.wait();
        *current.lock().expect("not poisoned") = None;
        let secs = started.elapsed().as_secs_f64();
        match reason {
            ExitReason::PowerOff => {
                eprintln!("boxd vmm: {} powered off after {secs:.1}s", config.name);
                return Ok(0);
            }
            ExitReason::Stopped => {
                eprintln!("boxd vmm: {} stopped after {secs:.1}s", config.name);
                return Ok(0);
            }
            ExitReason::Crashed(why) => {
                bail!(
                    "{} crashed after {secs:.1}s: {why}\nlast console output:\n{}",
                    config.name,
                    vmm.console_tail(2048)
                );
            }
            ExitReason::Reboot => {
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(0);
                }
                if vmm.off_requested() {
                    eprintln!(
                        "boxd vmm: {} rebooted while shutting down; stopped after {secs:.1}s",
                        config.name
                    );
                    return Ok(0);
                }
                reboots.retain(|t| t.elapsed() < Duration::from_secs(60));
                reboots.push(Instant::now());
                if reboots.len() as u32 > reboots_per_minute {
                    bail!(
                        "{} rebooted {} times within a minute; giving up (last console output:\n{})",
                        config.name,
                        reboots.len(),
                        vmm.console_tail(2048)
                    );
                }
                eprintln!("boxd vmm: {} rebooting", config.name);
            }
        }
        // The old VM (and its disk lock) is dropped before the next one starts.
        drop(vmm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("100GB").unwrap(), 100_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").unwrap_err().contains("unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    }
}
