//! Building a VM from its [`VmConfig`] and running it until it ends.

use crate::arch::acpi::{self, MmioDevice};
use crate::arch::boot::{self, BootError, BootSource};
use crate::arch::cpuid::{self, CpuidError};
use crate::arch::layout::*;
use crate::arch::regs::{self, RegsError};
use crate::cgroup::{Cgroup, CgroupError};
use crate::control::{self, Request, Response};
use crate::devices::bus::{Bus, BusDevice, lock};
use crate::devices::legacy::{Console, DebugPort, INITRAMFS_FAILED, Milestones, PowerPort, Serial};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockStats, Disk, DiskError};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::vsock::Vsock;
use crate::memory::{Memory, MemoryError};
use crate::vstate::exit::{ExitReason, VmExit};
use crate::vstate::vcpu::{RunControl, RunState, Vcpu, VcpuStats, install_kick_handler};
use crate::vstate::vm::{Vm, VmError};
use crate::{VCPUS_MAX, VmConfig};
use kvm_ioctls::IoEventAddress;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryBackend as _;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("KVM refused {what}: {source}")]
    KvmCall {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing ACPI tables into guest memory: {0}")]
    Acpi(vm_memory::GuestMemoryError),
}

/// How often a pending shutdown presses the power button again.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(2);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// The agent's ready message and when it arrived.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentReady {
    pub after_ms: f64,
    pub message: serde_json::Value,
}

/// A running VM.
pub struct Vmm {
    config: VmConfig,
    // Order matters for drop: devices and vCPUs go before the memory and the VM fd.
    vcpus: Vec<JoinHandle<()>>,
    run: Arc<RunControl>,
    exit: Arc<VmExit>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    milestones: Arc<Mutex<Milestones>>,
    console_tail: Arc<Mutex<Vec<u8>>>,
    vcpu_stats: Vec<Arc<VcpuStats>>,
    block_stats: Option<Arc<BlockStats>>,
    ged: EventFd,
    last_press: Option<Instant>,
    /// A shutdown or stop was asked for: a reboot now must not start the guest again.
    off_requested: bool,
    control: Option<control::Server>,
    ready_listener: Option<(UnixListener, PathBuf)>,
    agent: Option<AgentReady>,
    /// When the vCPUs were started.
    started: Instant,
    /// How long building the VM took, up to its vCPUs starting.
    setup: Duration,
    memory: Memory,
    _vm: Vm,
    _cgroup: Option<Cgroup>,
}

impl Vmm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Self, VmmError> {
        let begun = Instant::now();
        if config.vcpus == 0 || config.vcpus > VCPUS_MAX {
            return Err(VmmError::Config(format!(
                "{} vCPUs requested; use 1 to {VCPUS_MAX}",
                config.vcpus
            )));
        }
        if let BootSource::Linux { kernel, .. } = &config.boot
            && !kernel.exists()
        {
            return Err(VmmError::Config(format!(
                "kernel image {} does not exist; build the images with `cargo xtask images` or pass --kernel",
                kernel.display()
            )));
        }
        // Into the cgroup first, so every page the guest touches is charged to it.
        let cgroup = match &config.cgroup {
            Some(limits) => Some(Cgroup::enter(&config.name, limits)?),
            None => None,
        };
        install_kick_handler().map_err(io("install the vCPU kick signal handler"))?;
        let vm = Vm::new()?;
        let max_vcpus = vm.kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max_vcpus {
            return Err(VmmError::Config(format!(
                "{} vCPUs requested but this host's KVM allows {max_vcpus}",
                config.vcpus
            )));
        }
        let memory = Memory::new(config.memory_mib)?;
        vm.map_memory(&memory.guest)?;
        let exit = Arc::new(VmExit::new().map_err(io("create the exit eventfd"))?);
        let milestones = Arc::new(Mutex::new(Milestones::default()));

        // Legacy devices on the port bus.
        let mut pio = Bus::default();
        let serial_irq = irqfd(&vm, SERIAL_IRQ)?;
        let console_file = match &config.console {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io(format!("open console file {}", p.display())))?,
            ),
            None => None,
        };
        let (console, console_tail) = Console::new(console_file);
        let busy = |e| VmmError::Config(format!("device layout: {e}"));
        pio.insert(
            u64::from(SERIAL_PORT),
            8,
            Arc::new(Mutex::new(Serial::new(serial_irq, console))),
        )
        .map_err(busy)?;
        pio.insert(
            u64::from(ACPI_POWER_PORT),
            2,
            Arc::new(Mutex::new(PowerPort::new(exit.clone()))),
        )
        .map_err(busy)?;
        pio.insert(
            u64::from(DEBUG_PORT),
            1,
            Arc::new(Mutex::new(DebugPort::new(milestones.clone()))),
        )
        .map_err(busy)?;
        let ged = irqfd(&vm, GED_IRQ)?;

        // virtio devices on the MMIO bus, each with its window, interrupt and notifiers.
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        let mut block_stats = None;
        if let Some(spec) = &config.disk {
            let block = Block::new(Disk::open(spec)?);
            block_stats = Some(block.stats.clone());
            devices.push(Box::new(block));
        }
        let mut ready_listener = None;
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(&vsock.uds)
                .map_err(io(format!("bind the vsock socket {}", vsock.uds.display())))?;
            if let Some(port) = vsock.ready_port {
                let path = PathBuf::from(format!("{}_{port}", vsock.uds.display()));
                let _ = std::fs::remove_file(&path);
                let l =
                    UnixListener::bind(&path).map_err(io(format!("bind {}", path.display())))?;
                l.set_nonblocking(true)
                    .map_err(io("set the ready socket non-blocking"))?;
                ready_listener = Some((l, path));
            }
            devices.push(Box::new(device));
        }
        if let Some(net) = &config.net {
            devices.push(Box::new(crate::devices::virtio::net::Net::new(
                &net.vhost_user,
                net.mac,
                &memory.guest,
                net.queue_pairs,
            )?));
        }
        if devices.len() as u32 > IRQ_MAX - VIRTIO_IRQ_START + 1 {
            return Err(VmmError::Config(
                "more virtio devices than interrupt lines".into(),
            ));
        }
        let mut mmio = Bus::default();
        let mut windows = Vec::new();
        let mut transports = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_START + i as u32;
            let mut kicks = Vec::new();
            for q in 0..device.queue_max_sizes().len() {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(io("create a queue eventfd"))?;
                vm.fd
                    .register_ioevent(
                        &evt,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        q as u32,
                    )
                    .map_err(|source| VmmError::KvmCall {
                        what: "a queue notify ioeventfd",
                        source,
                    })?;
                kicks.push(evt);
            }
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                device,
                memory.guest.clone(),
                irqfd(&vm, irq)?,
                kicks,
            )));
            mmio.insert(
                base,
                VIRTIO_MMIO_SIZE,
                transport.clone() as Arc<Mutex<dyn BusDevice>>,
            )
            .map_err(busy)?;
            transports.push(transport);
            windows.push(MmioDevice {
                base,
                size: VIRTIO_MMIO_SIZE,
                irq,
            });
        }

        let rsdp =
            acpi::write(&memory.guest, config.vcpus, &windows, GED_IRQ).map_err(VmmError::Acpi)?;
        regs::write_boot_tables(&memory.guest)?;
        let entry = boot::load(&memory.guest, memory.size, &config.boot, rsdp)?;

        let supported = cpuid::supported(&vm.kvm)?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let run = Arc::new(RunControl::new(usize::from(config.vcpus)));
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let fd = vm
                .fd
                .create_vcpu(u64::from(index))
                .map_err(|source| VmmError::KvmCall {
                    what: "a vCPU",
                    source,
                })?;
            cpuid::set(
                &fd,
                &cpuid::for_vcpu(&supported, index, config.vcpus),
                index,
            )?;
            cpuid::set_boot_msrs(&fd, index)?;
            regs::setup_lapic(&fd)?;
            if index == 0 {
                // The others wait for the boot vCPU's INIT/SIPI, as on a PC.
                regs::setup_sregs(&fd)?;
                regs::setup_regs(&fd, entry.rip, entry.boot_params)?;
                regs::setup_fpu(&fd)?;
            }
            vcpus.push(Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                control: run.clone(),
                exit: exit.clone(),
                stats: Arc::new(VcpuStats::default()),
            });
        }
        let control = match &config.control {
            Some(p) => Some(
                control::Server::bind(p)
                    .map_err(io(format!("bind control socket {}", p.display())))?,
            ),
            None => None,
        };
        let vcpu_stats = vcpus.iter().map(|v| v.stats.clone()).collect();
        let started = Instant::now();
        let setup = started - begun;
        let mut handles = Vec::new();
        for vcpu in vcpus {
            match vcpu.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    run.stop();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(VmmError::Io {
                        what: "start a vCPU thread".into(),
                        source: e,
                    });
                }
            }
        }
        tracing::info!(
            name = config.name,
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            regions = memory.guest.num_regions(),
            "VM started"
        );
        Ok(Self {
            config,
            vcpus: handles,
            run,
            exit,
            transports,
            milestones,
            console_tail,
            vcpu_stats,
            block_stats,
            ged,
            last_press: None,
            off_requested: false,
            control,
            ready_listener,
            agent: None,
            started,
            setup,
            memory,
            _vm: vm,
            _cgroup: cgroup,
        })
    }

    /// Time between the guest's first and second debug-port milestones.
    pub fn milestone_span(&self) -> Option<Duration> {
        let m = lock(&self.milestones);
        let (first, second) = (m.values.first()?, m.values.get(1)?);
        Some(second.1.saturating_duration_since(first.1))
    }

    /// The last `bytes` of console output.
    pub fn console_tail(&self, bytes: usize) -> String {
        let tail = lock(&self.console_tail);
        String::from_utf8_lossy(&tail[tail.len().saturating_sub(bytes)..]).into_owned()
    }

    /// A handle that ends the VM from another thread (signals, supervisors).
    pub fn exit_handle(&self) -> Arc<VmExit> {
        self.exit.clone()
    }

    pub fn agent(&self) -> Option<&AgentReady> {
        self.agent.as_ref()
    }

    /// Serves the control socket and the agent's ready port until the VM ends.
    pub fn wait(&mut self) -> ExitReason {
        self.wait_timeout(Duration::MAX)
            .unwrap_or(ExitReason::Stopped)
    }

    /// Like [`wait`](Self::wait), giving up (and stopping the VM) after `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitReason> {
        let reason = match self.serve(limit) {
            Ok(r) => r,
            Err(e) => Some(ExitReason::Crashed(format!(
                "the VMM's event loop failed: {e}"
            ))),
        };
        self.shutdown_vcpus();
        // A poweroff by the initramfs after it failed is a failed boot, and says why.
        let failed_boot = lock(&self.milestones)
            .values
            .iter()
            .any(|(v, _)| *v == INITRAMFS_FAILED);
        if failed_boot && reason == Some(ExitReason::PowerOff) {
            let tail = self.console_tail(4096);
            let why = tail
                .lines()
                .rev()
                .find_map(|l| l.split_once("boxd-init: ").map(|(_, why)| why.trim()))
                .unwrap_or("see the console");
            return Some(ExitReason::Crashed(format!(
                "the guest could not boot its root file system: {why}"
            )));
        }
        reason
    }

    fn serve(&mut self, limit: Duration) -> std::io::Result<Option<ExitReason>> {
        const EXIT: u64 = 0;
        const CONTROL: u64 = 1;
        const READY: u64 = 2;
        const CLIENT: u64 = 1 << 32; // + fd
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.exit.evt.as_raw_fd(), EXIT)?;
        if let Some(c) = &self.control {
            add(c.listener_fd(), CONTROL)?;
        }
        if let Some((l, _)) = &self.ready_listener {
            add(l.as_raw_fd(), READY)?;
        }
        let deadline = Instant::now().checked_add(limit);
        let mut shutdown_deadline: Option<Instant> = None;
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            if let Some(reason) = self.exit.reason() {
                return Ok(Some(reason));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if shutdown_deadline.is_some_and(|d| now >= d) {
                tracing::warn!("the guest did not power off in time; stopping it");
                self.exit.request(ExitReason::Stopped);
                continue;
            }
            // A press that comes before the guest listens for the button (early boot,
            // logind not up yet) is lost, so keep pressing, as a person would.
            let mut next_press = None;
            if let Some(d) = shutdown_deadline {
                let press_at = self.last_press.map_or(now, |t| t + POWER_BUTTON_REPEAT);
                if now >= press_at {
                    self.press_power_button();
                }
                next_press = Some((press_at.max(now) + POWER_BUTTON_REPEAT).min(d));
            }
            let wake = [deadline, shutdown_deadline, next_press]
                .into_iter()
                .flatten()
                .min();
            let timeout_ms = wake.map_or(-1, |w| {
                w.saturating_duration_since(now).as_millis().min(60_000) as i32
            });
            let n = match epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    EXIT => {
                        let _ = self.exit.evt.read();
                    }
                    CONTROL => {
                        let fds = self
                            .control
                            .as_mut()
                            .map(|c| c.accept())
                            .unwrap_or_default();
                        for fd in fds {
                            add(fd, CLIENT + fd as u64)?;
                        }
                    }
                    READY => self.accept_ready(),
                    t if t >= CLIENT => {
                        let fd = (t - CLIENT) as RawFd;
                        let Some(server) = self.control.as_mut() else {
                            continue;
                        };
                        let Some(requests) = server.read(fd) else {
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            continue;
                        };
                        for request in requests {
                            let response = match request {
                                Ok(r) => self.handle(r, &mut shutdown_deadline),
                                Err(e) => Response::error(e),
                            };
                            if let Some(server) = self.control.as_mut() {
                                server.reply(fd, &response);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The agent connected to the ready port: read its one JSON line (bounded).
    fn accept_ready(&mut self) {
        let Some((listener, _)) = &self.ready_listener else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let after_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = Vec::new();
        let _ = (&mut stream as &mut UnixStream)
            .take(16 << 10)
            .read_to_end(&mut line);
        let text = String::from_utf8_lossy(&line);
        let message = serde_json::from_str(text.trim())
            .unwrap_or(serde_json::Value::String(text.trim().into()));
        tracing::info!(after_ms, %message, "agent ready");
        self.agent = Some(AgentReady { after_ms, message });
    }

    fn handle(&mut self, request: Request, shutdown_deadline: &mut Option<Instant>) -> Response {
        match request {
            Request::Status {} => Response {
                status: Some(self.status()),
                ..Response::ok()
            },
            Request::Pause {} => match self.run.pause() {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(e),
            },
            Request::Resume {} => match self.run.resume() {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(e),
            },
            Request::Stop {} => {
                self.off_requested = true;
                self.exit.request(ExitReason::Stopped);
                Response::ok()
            }
            Request::Shutdown { timeout_ms } => {
                if self.run.state() == RunState::Paused {
                    let _ = self.run.resume();
                }
                // The main loop presses the ACPI power button (now, and again until the
                // guest powers off); a stop follows at the deadline.
                self.last_press = None;
                self.off_requested = true;
                *shutdown_deadline = Some(Instant::now() + Duration::from_millis(timeout_ms));
                Response::ok()
            }
            Request::Console { bytes } => Response {
                console: Some(
                    self.console_tail(bytes.min(crate::devices::legacy::CONSOLE_TAIL_MAX)),
                ),
                ..Response::ok()
            },
        }
    }

    /// Whether a shutdown or stop was asked for (through the control socket) before
    /// the VM exited: a reboot then means "off" (a guest that reboots, or triple-faults,
    /// on its way down must not come back up with nobody left waiting to stop it).
    pub fn off_requested(&self) -> bool {
        self.off_requested
    }

    fn press_power_button(&mut self) {
        self.last_press = Some(Instant::now());
        if let Err(e) = self.ged.write(1) {
            tracing::error!("cannot press the power button: {e}");
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let exits: u64 = self
            .vcpu_stats
            .iter()
            .map(|s| s.exits.load(Ordering::Relaxed))
            .sum();
        let unhandled: u64 = self
            .vcpu_stats
            .iter()
            .map(|s| s.unhandled_io.load(Ordering::Relaxed))
            .sum();
        let milestones: Vec<_> = lock(&self.milestones)
            .values
            .iter()
            .map(|(v, at)| serde_json::json!({"value": v, "after_ms": at.saturating_duration_since(self.started).as_secs_f64() * 1000.0}))
            .collect();
        let disk = self.block_stats.as_ref().map(|s| {
            serde_json::json!({
                "reads": s.reads.load(Ordering::Relaxed),
                "writes": s.writes.load(Ordering::Relaxed),
                "flushes": s.flushes.load(Ordering::Relaxed),
                "errors": s.errors.load(Ordering::Relaxed),
                "bytes_read": s.bytes_read.load(Ordering::Relaxed),
                "bytes_written": s.bytes_written.load(Ordering::Relaxed),
            })
        });
        serde_json::json!({
            "name": self.config.name,
            "state": self.run.state(),
            "pid": std::process::id(),
            "vcpus": self.config.vcpus,
            "memory_mib": self.config.memory_mib,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "setup_ms": self.setup.as_secs_f64() * 1000.0,
            "vcpu_exits": exits,
            "unhandled_io": unhandled,
            "devices": self.transports.iter().map(|t| lock(t).name()).collect::<Vec<_>>(),
            "milestones": milestones,
            "agent": self.agent,
            "disk": disk,
            "memory_file_bytes": self.memory.size,
        })
    }

    fn shutdown_vcpus(&mut self) {
        self.run.stop();
        for h in self.vcpus.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown_vcpus();
        // With the vCPU threads gone, these are the last references to the devices:
        // their workers stop here, before guest memory is unmapped.
        self.transports.clear();
        if let Some((_, path)) = self.ready_listener.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An eventfd that injects `gsi` when written.
fn irqfd(vm: &Vm, gsi: u32) -> Result<EventFd, VmmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(io("create an irqfd"))?;
    vm.fd
        .register_irqfd(&evt, gsi)
        .map_err(|source| VmmError::KvmCall {
            what: "an irqfd",
            source,
        })?;
    Ok(evt)
}
