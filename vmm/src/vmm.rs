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
use crate::lazy::LazyMemory;
use crate::memory::{Memory, MemoryError};
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::vstate::exit::{ExitReason, VmExit};
use crate::vstate::persist::{self, MsrSet, PersistError, VcpuState, VmState};
use crate::vstate::vcpu::{RunControl, RunState, Vcpu, VcpuStats, install_kick_handler};
use crate::vstate::vm::{Vm, VmError};
use crate::{VCPUS_MAX, VmConfig};
use kvm_ioctls::IoEventAddress;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
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
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Lazy(#[from] crate::lazy::LazyError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("cannot restore snapshot {dir}: {why}")]
    Restore { dir: PathBuf, why: String },
    #[error("cannot snapshot the VM: {0}")]
    Save(String),
}

/// What the VM does once a snapshot is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    /// Go on as before (running, or paused if it was paused).
    #[default]
    Resume,
    /// Stay paused.
    Pause,
    /// The VMM exits (suspend to disk): the snapshot is all that is left of the VM.
    Stop,
}

/// What a snapshot cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    /// From the request to the snapshot being on disk.
    pub save_ms: f64,
    /// How long the vCPUs were stopped for it (until the save, when they stay stopped).
    pub paused_ms: f64,
    /// Guest memory written (pages that hold data).
    pub memory_bytes: u64,
    /// The guest's memory size.
    pub memory_size: u64,
    pub state_bytes: u64,
}

/// How often a pending shutdown presses the power button again.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(2);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// The agent's ready message and when it arrived.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    serial: Arc<Mutex<Serial>>,
    /// The vCPUs' XSAVE area size, as this host's KVM reports it.
    xsave_size: usize,
    /// Restored from this snapshot, and how long the restore took.
    restored: Option<(PathBuf, Duration)>,
    /// Memory still loading from the snapshot (a lazy restore).
    lazy: Option<Arc<LazyMemory>>,
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
        Self::build(config, None)
    }

    /// Builds the VM a snapshot was taken of and continues it. `config` may move the
    /// machine's files (sockets, console); its size and devices must be the snapshot's.
    /// A snapshot that does not check out is refused and left as it is.
    ///
    /// With `consume`, the snapshot is taken out of `dir` once it is loaded and
    /// before the vCPUs run: from then on the disk moves on, and restoring the same
    /// memory again over it would corrupt the guest's file systems (suspend and wake
    /// use it this way; a golden image is restored without).
    ///
    /// `memory` says how guest memory comes back: lazily (the guest runs at once, pages
    /// load as they are touched and in the background) or all of it first.
    pub fn restore(
        dir: &Path,
        config: Option<VmConfig>,
        consume: bool,
        memory: MemoryRestore,
    ) -> Result<Self, VmmError> {
        let begun = Instant::now();
        let snap = snapshot::load(dir)?;
        let config = match config {
            None => snap.config.clone(),
            Some(c) => {
                same_machine(&snap.config, &c).map_err(|why| VmmError::Restore {
                    dir: dir.to_path_buf(),
                    why,
                })?;
                c
            }
        };
        let mut vmm = Self::build(config, Some((dir, &snap, consume, memory)))?;
        vmm.agent = snap.agent.clone();
        vmm.restored = Some((dir.to_path_buf(), begun.elapsed()));
        tracing::info!(
            snapshot = %dir.display(),
            restore_ms = begun.elapsed().as_secs_f64() * 1000.0,
            "VM restored"
        );
        Ok(vmm)
    }

    fn build(
        config: VmConfig,
        restore: Option<(&Path, &Snapshot, bool, MemoryRestore)>,
    ) -> Result<Self, VmmError> {
        let begun = Instant::now();
        let restore_err = |why: String| VmmError::Restore {
            dir: restore.map(|r| r.0.to_path_buf()).unwrap_or_default(),
            why,
        };
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
        let exit = Arc::new(VmExit::new().map_err(io("create the exit eventfd"))?);
        // Before any device (the vhost-user backend above all) is given the memory
        // table: see docs/vmm.md, "Restoring memory".
        let lazy = match restore {
            Some((dir, snap, _, MemoryRestore::Eager)) => {
                snapshot::restore_memory(&memory, &dir.join(snapshot::MEMORY_FILE), &snap.memory)?;
                None
            }
            Some((dir, snap, _, MemoryRestore::Lazy)) => Some(Arc::new(LazyMemory::new(
                &memory,
                &dir.join(snapshot::MEMORY_FILE),
                &snap.memory,
                exit.clone(),
            )?)),
            None => None,
        };
        vm.map_memory(&memory.guest)?;
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
        let serial = match restore {
            Some((_, snap, _, _)) => {
                Serial::restored(serial_irq, console, &snap.serial).map_err(restore_err)?
            }
            None => Serial::new(serial_irq, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())
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
                lazy.clone(),
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

        if let Some((_, snap, _, _)) = restore
            && snap.devices.len() != transports.len()
        {
            return Err(restore_err(format!(
                "the snapshot has {} virtio devices ({}), this machine {}",
                snap.devices.len(),
                snap.devices
                    .iter()
                    .map(|d| d.device.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                transports.len()
            )));
        }
        // A restored guest has its tables and kernel in the memory it came back with.
        let entry = if restore.is_none() {
            let rsdp = acpi::write(&memory.guest, config.vcpus, &windows, GED_IRQ)
                .map_err(VmmError::Acpi)?;
            regs::write_boot_tables(&memory.guest)?;
            Some(boot::load(&memory.guest, memory.size, &config.boot, rsdp)?)
        } else {
            None
        };

        let supported = cpuid::supported(&vm.kvm)?;
        let xsave_size = persist::xsave_size(&vm.fd);
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
            match (restore, &entry) {
                (Some((_, snap, _, _)), _) => {
                    snap.vcpus[usize::from(index)].restore(&fd, index, xsave_size)?
                }
                (None, Some(entry)) => {
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
                }
                (None, None) => unreachable!("a fresh VM has a boot entry"),
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
        if let Some((_, snap, _, _)) = restore {
            // After the vCPUs (their LAPICs), as KVM wants; before any device runs, so
            // an interrupt a device raises now is not overwritten by the saved irqchip.
            snap.vm.restore(&vm.fd)?;
            for v in &vcpus {
                // Tells a guest with kvmclock that it was stopped on purpose (no soft
                // lockup reports); a guest without kvmclock refuses, which is fine.
                let _ = v.fd.kvmclock_ctrl();
            }
            for (t, state) in transports.iter().zip(&snap.devices) {
                lock(t).restore(state).map_err(restore_err)?;
            }
        }
        let control = match &config.control {
            Some(p) => Some(
                control::Server::bind(p)
                    .map_err(io(format!("bind control socket {}", p.display())))?,
            ),
            None => None,
        };
        let vcpu_stats = vcpus.iter().map(|v| v.stats.clone()).collect();
        let consumed = match restore {
            Some((dir, _, true, _)) => Some(snapshot::consume(dir)?),
            _ => None,
        };
        if let Some(l) = &lazy {
            // Every device has its memory table: the rest loads in the background.
            l.seal();
        }
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
        if let Some(old) = consumed
            && let Err(e) = std::fs::remove_dir_all(&old)
        {
            tracing::warn!("cannot remove the used snapshot {}: {e}", old.display());
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
            serial,
            xsave_size,
            restored: None,
            lazy,
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
            Request::Snapshot { dir, then } => match self.snapshot(&dir, then) {
                Ok(report) => Response {
                    snapshot: serde_json::to_value(report).ok(),
                    ..Response::ok()
                },
                Err(e) => Response::error(e.to_string()),
            },
            Request::Console { bytes } => Response {
                console: Some(
                    self.console_tail(bytes.min(crate::devices::legacy::CONSOLE_TAIL_MAX)),
                ),
                ..Response::ok()
            },
        }
    }

    /// Writes a snapshot of the VM into `dir` (which must not exist), then goes on as
    /// `then` says. The vCPUs stop for the whole save; the devices stop after the
    /// requests they are serving. On failure nothing is left under `dir` and the VM
    /// goes on as before.
    pub fn snapshot(
        &mut self,
        dir: &Path,
        then: AfterSnapshot,
    ) -> Result<SnapshotReport, VmmError> {
        let begun = Instant::now();
        let was = self.run.state();
        if was == RunState::Stopping {
            return Err(VmmError::Save("the VM is stopping".into()));
        }
        if let Some(l) = &self.lazy {
            // Pages not loaded yet are holes in the memfd: a save now would lose them.
            l.wait_done(LAZY_SAVE_WAIT)
                .map_err(|e| VmmError::Save(format!("{e}; try again once it is")))?;
        }
        let partial = snapshot::begin(dir)?;
        let saved = self.run.pause().map_err(VmmError::Save).and_then(|()| {
            let paused = Instant::now();
            self.save_into(&partial).map(|r| (r, paused))
        });
        let (mut report, paused) = match saved.and_then(|r| {
            snapshot::commit(&partial, dir)?;
            Ok(r)
        }) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                self.resume_devices();
                if was == RunState::Running {
                    let _ = self.run.resume();
                }
                return Err(e);
            }
        };
        match then {
            AfterSnapshot::Resume | AfterSnapshot::Pause => {
                self.resume_devices();
                if then == AfterSnapshot::Resume && was == RunState::Running {
                    self.run.resume().map_err(VmmError::Save)?;
                }
            }
            AfterSnapshot::Stop => {
                self.off_requested = true;
                self.exit.request(ExitReason::Stopped);
            }
        }
        report.dir = dir.to_path_buf();
        report.save_ms = begun.elapsed().as_secs_f64() * 1000.0;
        report.paused_ms = paused.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            snapshot = %dir.display(),
            save_ms = report.save_ms,
            memory_mib = report.memory_bytes >> 20,
            ?then,
            "snapshot written"
        );
        Ok(report)
    }

    fn resume_devices(&self) {
        for t in &self.transports {
            let mut t = lock(t);
            if let Err(e) = t.resume_after_save() {
                tracing::error!(device = t.name(), "cannot resume after a snapshot: {e}");
            }
        }
    }

    /// Saves everything into `partial`; the vCPUs are parked.
    fn save_into(&self, partial: &Path) -> Result<SnapshotReport, VmmError> {
        // Devices first: stopping them may complete requests (guest memory, interrupts
        // into the irqchip), which the VM and vCPU state read next must include.
        let mut devices = Vec::with_capacity(self.transports.len());
        for t in &self.transports {
            devices.push(lock(t).save().map_err(VmmError::Save)?);
        }
        let vm = VmState::save(&self._vm.fd)?;
        let mut msrs = MsrSet::new(&self._vm.kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(self.config.vcpus));
        for index in 0..self.config.vcpus {
            let xsave = self.xsave_size;
            let (state, back) = self
                .run
                .on_vcpu(usize::from(index), move |fd| {
                    let state = VcpuState::save(fd, index, xsave, &mut msrs);
                    (state, msrs)
                })
                .map_err(VmmError::Save)?;
            msrs = back;
            vcpus.push(state?);
        }
        let serial = lock(&self.serial).save();
        let memory = snapshot::save_memory(&self.memory, &partial.join(snapshot::MEMORY_FILE))?;
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let snap = Snapshot {
            created_unix_ms,
            config: self.config.clone(),
            memory,
            vm,
            vcpus,
            serial,
            devices,
            agent: self.agent.clone(),
        };
        let body = serde_json::to_vec(&snap)
            .map_err(|e| VmmError::Save(format!("encoding the state: {e}")))?;
        snapshot::write_state(&partial.join(snapshot::STATE_FILE), &body)?;
        Ok(SnapshotReport {
            dir: partial.to_path_buf(),
            save_ms: 0.0,
            paused_ms: 0.0,
            memory_bytes: snap.memory.data_bytes(),
            memory_size: snap.memory.size,
            state_bytes: body.len() as u64,
        })
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
            "restored_from": self.restored.as_ref().map(|(d, t)| serde_json::json!({
                "snapshot": d, "restore_ms": t.as_secs_f64() * 1000.0,
                "memory": self.lazy.as_ref().map_or_else(
                    || serde_json::json!({"mode": "eager"}),
                    |l| l.report(),
                ),
            })),
        })
    }

    fn shutdown_vcpus(&mut self) {
        self.run.stop();
        for h in self.vcpus.drain(..) {
            let _ = h.join();
        }
    }
}

/// How long a snapshot waits for a lazy restore still loading memory.
const LAZY_SAVE_WAIT: Duration = Duration::from_secs(120);

/// How a restore brings guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryRestore {
    /// The guest runs at once; pages load when touched and in the background
    /// (userfaultfd, with the vhost-user backend's faults served too).
    #[default]
    Lazy,
    /// All of it, every block checked, before the guest runs: a damaged file is
    /// refused and nothing is changed.
    Eager,
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

/// Whether `new` is the machine `old` describes, with perhaps its files elsewhere.
fn same_machine(old: &VmConfig, new: &VmConfig) -> Result<(), String> {
    if old.vcpus != new.vcpus {
        return Err(format!(
            "it is of a machine with {} vCPUs, not {}",
            old.vcpus, new.vcpus
        ));
    }
    if old.memory_mib != new.memory_mib {
        return Err(format!(
            "it is of a machine with {} MiB of memory, not {} MiB",
            old.memory_mib, new.memory_mib
        ));
    }
    let devices = |c: &VmConfig| [c.disk.is_some(), c.vsock.is_some(), c.net.is_some()];
    if devices(old) != devices(new) {
        let list = |c: &VmConfig| {
            let d = devices(c);
            let names: Vec<&str> = ["disk", "vsock", "net"]
                .into_iter()
                .zip(d)
                .filter_map(|(n, on)| on.then_some(n))
                .collect();
            if names.is_empty() {
                "no devices".to_string()
            } else {
                names.join(", ")
            }
        };
        return Err(format!(
            "it is of a machine with {}, not {}",
            list(old),
            list(new)
        ));
    }
    if let (Some(a), Some(b)) = (&old.net, &new.net)
        && a.mac != b.mac
    {
        return Err("its network card has another MAC address".into());
    }
    Ok(())
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
