//! vCPU threads: one per vCPU, each looping in KVM_RUN and dispatching port and MMIO
//! exits to the buses; paused, resumed and stopped through [`RunControl`].
//!
//! Kicking a vCPU out of KVM_RUN uses the usual trick (Firecracker, Cloud Hypervisor): a
//! real-time signal whose handler sets `immediate_exit` in the thread's own `kvm_run`, so
//! a kick that lands just before KVM_RUN is not lost.

use super::exit::{ExitReason, VmExit};
use crate::devices::bus::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler. Const-initialised, so
    /// reading it from a signal handler allocates nothing.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's kvm_run mapping,
        // which outlives the thread's run loop; a single byte store is signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Work for a parked vCPU's own thread (reading its state for a snapshot).
type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct Shared {
    target: RunState,
    /// vCPUs currently parked (not in KVM_RUN).
    parked: usize,
    /// One slot per vCPU: a job its thread runs while parked.
    jobs: Vec<Option<Job>>,
}

/// Pause/resume/stop for all vCPU threads of a VM.
pub struct RunControl {
    shared: Mutex<Shared>,
    cond: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    count: usize,
}

/// How long pause and stop wait for every vCPU to leave KVM_RUN.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

impl RunControl {
    pub fn new(count: usize) -> Self {
        Self {
            shared: Mutex::new(Shared {
                target: RunState::Running,
                parked: 0,
                jobs: (0..count).map(|_| None).collect(),
            }),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            count,
        }
    }

    pub fn state(&self) -> RunState {
        self.lock().target
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        crate::devices::bus::lock(&self.shared)
    }

    fn kick_all(&self) {
        for t in crate::devices::bus::lock(&self.threads).iter() {
            // SAFETY: a vCPU thread removes itself from `threads` (under this lock)
            // before it ends, so every `t` here is a live thread; the kick signal's
            // handler is installed.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are parked.
    pub fn pause(&self) -> Result<(), String> {
        {
            let mut s = self.lock();
            if s.target == RunState::Stopping {
                return Err("the VM is stopping".into());
            }
            s.target = RunState::Paused;
        }
        self.kick_all();
        let deadline = Instant::now() + PARK_TIMEOUT;
        let mut s = self.lock();
        while s.parked < self.count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "only {} of {} vCPUs paused within {PARK_TIMEOUT:?}",
                    s.parked, self.count
                ));
            }
            s = self
                .cond
                .wait_timeout(s, left)
                .expect("vCPU control lock poisoned")
                .0;
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), String> {
        let mut s = self.lock();
        if s.target == RunState::Stopping {
            return Err("the VM is stopping".into());
        }
        s.target = RunState::Running;
        self.cond.notify_all();
        Ok(())
    }

    /// Asks every vCPU thread to end; they do at their next exit or kick.
    pub fn stop(&self) {
        self.lock().target = RunState::Stopping;
        self.cond.notify_all();
        self.kick_all();
    }

    /// Runs `job` on vCPU `index`'s own thread while the VM is paused, and returns what
    /// it returned. KVM wants a vCPU's state read by the thread that runs it.
    pub fn on_vcpu<T: Send + 'static>(
        &self,
        index: usize,
        job: impl FnOnce(&mut VcpuFd) -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut s = self.lock();
            if s.target != RunState::Paused || s.parked < self.count {
                return Err("the VM must be paused first".into());
            }
            let Some(slot) = s.jobs.get_mut(index) else {
                return Err(format!("there is no vCPU {index}"));
            };
            *slot = Some(Box::new(move |fd: &mut VcpuFd| {
                let _ = tx.send(job(fd));
            }));
            self.cond.notify_all();
        }
        rx.recv_timeout(PARK_TIMEOUT)
            .map_err(|_| format!("vCPU {index} did not answer within {PARK_TIMEOUT:?}"))
    }

    fn running(&self) -> bool {
        self.lock().target == RunState::Running
    }

    /// Called by a vCPU thread that should not run: parks it (running any job posted
    /// for it meanwhile) until the VM resumes or stops; returns false when the thread
    /// should end.
    fn park(&self, index: usize, fd: &mut VcpuFd) -> bool {
        let mut s = self.lock();
        if s.target == RunState::Running {
            return true;
        }
        s.parked += 1;
        self.cond.notify_all();
        loop {
            if let Some(job) = s.jobs.get_mut(index).and_then(Option::take) {
                drop(s);
                job(fd);
                s = self.lock();
                continue;
            }
            if s.target != RunState::Paused {
                break;
            }
            s = self.cond.wait(s).expect("vCPU control lock poisoned");
        }
        s.parked -= 1;
        s.target == RunState::Running
    }
}

/// Counters a vCPU thread keeps (read by status).
#[derive(Default)]
pub struct VcpuStats {
    pub exits: AtomicU64,
    pub unhandled_io: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// An exit was served; the guest may go on.
    Exited,
    /// KVM_RUN returned early (a kick, immediate_exit).
    Interrupted,
    /// The VM ends (the reason is recorded in `exit`).
    End,
}

/// Rounds `settle` allows for a string I/O instruction's repeated exits.
const SETTLE_ROUNDS: usize = 64;

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<RunControl>,
    pub exit: Arc<VmExit>,
    pub stats: Arc<VcpuStats>,
}

impl Vcpu {
    /// Starts this vCPU's thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        // Registered before the first running() check: a stop or pause that comes earlier is
        // seen there, one that comes later kicks this thread.
        // SAFETY: pthread_self has no preconditions.
        crate::devices::bus::lock(&self.control.threads).push(unsafe { libc::pthread_self() });
        loop {
            if !self.control.running() {
                // KVM finishes the I/O of the last exit (an IN's value into RAX, the
                // instruction skipped) only on the next KVM_RUN: run once with
                // immediate_exit so that a snapshot reads a consistent vCPU and a
                // restored guest does not repeat a port or MMIO access.
                if !self.settle() {
                    break;
                }
                if !self.control.park(usize::from(self.index), &mut self.fd) {
                    break;
                }
                continue;
            }
            if self.step() == Step::End {
                break;
            }
        }
        // From here on no kick may reach this thread: leave the list kick_all walks
        // (under its lock, so no signal is in flight) and forget kvm_run, which is
        // unmapped when the VcpuFd drops at the end of this function.
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        crate::devices::bus::lock(&self.control.threads).retain(|t| *t != me);
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        // Count this thread as parked for good so pause() never waits on it.
        let mut s = self.control.lock();
        s.parked += 1;
        self.control.cond.notify_all();
    }

    /// One KVM_RUN and the exit it ended with.
    fn step(&mut self) -> Step {
        let exit = self.fd.run();
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    self.stats.unhandled_io.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.pio.write(u64::from(port), data) {
                    self.stats.unhandled_io.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    self.stats.unhandled_io.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    self.stats.unhandled_io.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel irqchip; ours has one, so a HLT exit
                // means the guest stopped for good.
                self.exit.request(ExitReason::PowerOff);
                return Step::End;
            }
            Ok(VcpuExit::Shutdown) => {
                // Triple fault: what a PC does next is reset.
                tracing::warn!(vcpu = self.index, state = %self.describe(), "triple fault; resetting the VM");
                self.exit.request(ExitReason::Reboot);
                return Step::End;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let reason = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                    _ => ExitReason::PowerOff,
                };
                self.exit.request(reason);
                return Step::End;
            }
            Ok(VcpuExit::InternalError) => {
                let detail = self.internal_error();
                self.exit.request(ExitReason::Crashed(detail));
                return Step::End;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                self.exit.request(ExitReason::Crashed(format!(
                    "KVM could not enter vCPU {} (hardware reason {reason:#x}, cpu {cpu})",
                    self.index
                )));
                return Step::End;
            }
            Ok(other) => {
                self.exit.request(ExitReason::Crashed(format!(
                    "vCPU {} stopped on an exit boxd does not handle: {other:?}",
                    self.index
                )));
                return Step::End;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Step::Interrupted;
            }
            Err(e) => {
                self.exit.request(ExitReason::Crashed(format!(
                    "KVM_RUN on vCPU {} failed: {e}",
                    self.index
                )));
                return Step::End;
            }
        }
        Step::Exited
    }

    /// Completes what the last exit left for KVM to finish, without running guest
    /// code: KVM_RUN with immediate_exit returns EINTR once that is done. A string I/O
    /// instruction may exit again first; those exits are served like any other
    /// (bounded). Returns false when the VM ended meanwhile.
    fn settle(&mut self) -> bool {
        for _ in 0..SETTLE_ROUNDS {
            self.fd.set_kvm_immediate_exit(1);
            let step = self.step();
            self.fd.set_kvm_immediate_exit(0);
            match step {
                Step::Interrupted => return true,
                Step::End => return false,
                Step::Exited => {}
            }
        }
        tracing::warn!(
            vcpu = self.index,
            "pending I/O did not settle in {SETTLE_ROUNDS} rounds"
        );
        true
    }

    /// The registers that say where a vCPU was (for crash reports).
    fn describe(&self) -> String {
        let r = self.fd.get_regs().unwrap_or_default();
        let s = self.fd.get_sregs().unwrap_or_default();
        let e = self.fd.get_vcpu_events().ok();
        format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x} exception={:?}",
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.idt.base,
            s.idt.limit,
            e.map(|e| (
                e.exception.injected,
                e.exception.nr,
                e.exception.has_error_code,
                e.exception.error_code
            ))
        )
    }

    /// Describes a KVM internal error, including the instruction KVM could not emulate
    /// (the usual way it shows on hosts whose KVM emulates ring 0, see ENVIRONMENT.md).
    fn internal_error(&mut self) -> String {
        // SAFETY: reading the `internal` member of the union is valid right after an
        // exit whose reason is KVM_EXIT_INTERNAL_ERROR.
        let (suberror, ndata, data) = unsafe {
            let run = self.fd.get_kvm_run();
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
        let n = (ndata as usize).min(data.len());
        format!(
            "KVM internal error on vCPU {} at rip {rip:#x}: suberror {suberror} ({}), data {:x?}",
            self.index,
            match suberror {
                1 => "instruction emulation failed",
                2 => "simultaneous exception",
                3 => "delivery event",
                _ => "other",
            },
            &data[..n]
        )
    }
}
