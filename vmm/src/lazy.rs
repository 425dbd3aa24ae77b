//! Lazy restore of guest memory: the guest runs before its memory is back.
//!
//! The memfd starts empty and is registered with a userfaultfd (missing-page faults).
//! A fault thread loads what is touched, one checked block ([`snapshot::BLOCK`]) at a
//! time, and in between loads the rest in the background, so that a wake costs what
//! the guest touches first, not what it had. Only the blocks that hold data are
//! registered: elsewhere the kernel zero-fills a touched page by itself.
//!
//! The vhost-user network backend maps the same memfd and writes received frames into
//! it: a lazy fill that did not see the backend's accesses would let it read zeros or
//! write a frame into a page the fill then overwrites. So the backend registers its own
//! mapping with a userfaultfd of its own and hands it over (VHOST_USER_POSTCOPY_ADVISE,
//! QEMU's postcopy design); this thread resolves the backend's faults from the same
//! file. A page is placed in the shared memfd once (UFFDIO_COPY refuses a page that is
//! there: EEXIST), so a page the backend wrote a frame into is never overwritten, and
//! both mappings see it. When every block is loaded the backend is told
//! (VHOST_USER_POSTCOPY_END), the registrations go, and the thread ends.
//!
//! A block whose checksum does not match stops the VM (the guest never sees the bad
//! bytes): see docs/vmm.md, "Restoring memory".

use crate::snapshot::{self, BLOCK, MemoryInfo};
use crate::vstate::exit::{ExitReason, VmExit};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const PAGE: u64 = 4096;
/// A fault thread that ended with an error stops the VM; if the VM has not ended this
/// long after, the process does.
const FATAL_GRACE: Duration = Duration::from_secs(3);

/// A piece of guest memory in some process's address space: where it is mapped, and
/// where it is in the memfd.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub host: u64,
    pub offset: u64,
    pub len: u64,
}

fn to_host(spans: &[Span], offset: u64) -> Option<u64> {
    spans
        .iter()
        .find(|s| offset >= s.offset && offset - s.offset < s.len)
        .map(|s| s.host + offset - s.offset)
}

fn to_offset(spans: &[Span], host: u64) -> Option<u64> {
    spans
        .iter()
        .find(|s| host >= s.host && host - s.host < s.len)
        .map(|s| s.offset + host - s.host)
}

/// A vhost-user backend's userfaultfd and mapping, and how to tell it the restore is over.
pub struct Backend {
    pub uffd: File,
    pub spans: Vec<Span>,
    pub end: Box<dyn FnOnce() -> Result<(), String> + Send>,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Faults are served; backends may still join; no background loading yet.
    Open,
    /// Loading in the background too.
    Loading,
    /// Every block is in; backends are being told.
    Loaded,
    Done,
    Failed(String),
}

struct Shared {
    path: PathBuf,
    file: File,
    info: MemoryInfo,
    uffd: Uffd,
    spans: Vec<Span>,
    /// The ranges of our mapping registered with `uffd`: the blocks that hold data.
    registered: Vec<(u64, u64)>,
    /// The memfd itself, to give a backend's fault outside them a zero page.
    memfd: Arc<File>,
    phase: Mutex<Phase>,
    changed: Condvar,
    joining: Mutex<Vec<Backend>>,
    notify: EventFd,
    hurry: AtomicBool,
    stop: AtomicBool,
    /// Set when the VM lets go of its memory: the fatal watchdog then has nothing to do.
    released: Arc<AtomicBool>,
    faults: AtomicU64,
    loaded: AtomicU64,
    begun: Instant,
    done_ms: Mutex<Option<f64>>,
    exit: Arc<VmExit>,
}

/// Guest memory being restored lazily from a snapshot's memory file.
pub struct LazyMemory {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(
        "cannot restore memory lazily: userfaultfd: {0} (boxd needs root, or vm.unprivileged_userfaultfd=1; `--memory eager` restores without it)"
    )]
    Uffd(String),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("cannot start the memory fault thread: {0}")]
    Thread(std::io::Error),
}

impl LazyMemory {
    /// Checks the memory file, registers `memory`'s mapping and starts serving faults.
    /// Nothing is loaded in the background until [`LazyMemory::seal`].
    pub fn new(
        memory: &crate::memory::Memory,
        path: &Path,
        info: &MemoryInfo,
        exit: Arc<VmExit>,
    ) -> Result<Self, LazyError> {
        let file = snapshot::open_memory(path, info, memory.size)?;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| LazyError::Uffd(e.to_string()))?;
        let spans: Vec<Span> = memory
            .guest
            .iter()
            .map(|r| Span {
                host: r.as_ptr() as u64,
                offset: r.file_offset().map(|f| f.start()).unwrap_or_default(),
                len: r.len(),
            })
            .collect();
        // Only the blocks that hold data fault to us: a page elsewhere is zero, and the
        // kernel gives a zero page on its own, without a trip through this process (a
        // booting or busy guest touches many fresh pages).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(block, _) in &info.blocks {
            let (start, end) = (block * BLOCK, ((block + 1) * BLOCK).min(memory.size));
            match runs.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => runs.push((start, end)),
            }
        }
        let mut registered = Vec::new();
        for (start, end) in runs {
            for span in &spans {
                let (a, b) = (start.max(span.offset), end.min(span.offset + span.len));
                if a < b {
                    let host = span.host + a - span.offset;
                    uffd.register(host as *mut libc::c_void, (b - a) as usize)
                        .map_err(|e| LazyError::Uffd(format!("register guest memory: {e}")))?;
                    registered.push((host, b - a));
                }
            }
        }
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            file,
            info: info.clone(),
            uffd,
            spans,
            registered,
            memfd: memory.file.clone(),
            phase: Mutex::new(Phase::Open),
            changed: Condvar::new(),
            joining: Mutex::new(Vec::new()),
            notify: EventFd::new(EFD_NONBLOCK).map_err(LazyError::Thread)?,
            hurry: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            released: Arc::new(AtomicBool::new(false)),
            faults: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            begun: Instant::now(),
            done_ms: Mutex::new(None),
            exit,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("memory-faults".into())
            .spawn(move || serve(&s))
            .map_err(LazyError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands a vhost-user backend's userfaultfd to the fault thread. Refused (the caller
    /// sets the backend up as usual) once sealed.
    pub fn add_backend(&self, backend: Backend) -> Result<(), Backend> {
        let phase = lock(&self.shared.phase);
        if *phase != Phase::Open {
            return Err(backend);
        }
        lock(&self.shared.joining).push(backend);
        drop(phase);
        let _ = self.shared.notify.write(1);
        Ok(())
    }

    /// No more backends join; the rest of memory loads in the background.
    pub fn seal(&self) {
        let mut phase = lock(&self.shared.phase);
        if *phase == Phase::Open {
            *phase = Phase::Loading;
        }
        drop(phase);
        let _ = self.shared.notify.write(1);
    }

    /// Loads everything now (a backend that cannot take a userfaultfd is about to map
    /// the memory): returns once every block is in, or the reason it cannot be.
    pub fn load_all(&self, timeout: Duration) -> Result<(), String> {
        self.shared.hurry.store(true, Ordering::Relaxed);
        let _ = self.shared.notify.write(1);
        self.wait_for(timeout, |p| matches!(p, Phase::Loaded | Phase::Done))
    }

    /// Waits until the restore is over (every block loaded, backends told).
    pub fn wait_done(&self, timeout: Duration) -> Result<(), String> {
        self.wait_for(timeout, |p| *p == Phase::Done)
    }

    /// Whether backends may still join (the VM is being built).
    pub fn is_open(&self) -> bool {
        *lock(&self.shared.phase) == Phase::Open
    }

    pub fn is_done(&self) -> bool {
        *lock(&self.shared.phase) == Phase::Done
    }

    fn wait_for(&self, timeout: Duration, ok: impl Fn(&Phase) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut phase = lock(&self.shared.phase);
        // Bounded by the deadline.
        loop {
            if ok(&phase) {
                return Ok(());
            }
            if let Phase::Failed(why) = &*phase {
                return Err(why.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "guest memory is still being restored ({} of {} MiB loaded after {:.1} s)",
                    self.shared.loaded.load(Ordering::Relaxed) >> 20,
                    self.shared.info.data_bytes() >> 20,
                    self.shared.begun.elapsed().as_secs_f64()
                ));
            }
            phase = self
                .shared
                .changed
                .wait_timeout(phase, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// What the restore has done so far (for `status`).
    pub fn report(&self) -> serde_json::Value {
        let s = &self.shared;
        let phase = lock(&s.phase).clone();
        serde_json::json!({
            "mode": "lazy",
            "phase": match &phase {
                Phase::Open | Phase::Loading => "loading",
                Phase::Loaded => "ending",
                Phase::Done => "done",
                Phase::Failed(_) => "failed",
            },
            "error": match phase { Phase::Failed(why) => Some(why), _ => None },
            "faults": s.faults.load(Ordering::Relaxed),
            "loaded_bytes": s.loaded.load(Ordering::Relaxed),
            "data_bytes": s.info.data_bytes(),
            "done_ms": *lock(&s.done_ms),
        })
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.released.store(true, Ordering::Relaxed);
        let _ = self.shared.notify.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_phase(s: &Shared, phase: Phase) {
    *lock(&s.phase) = phase;
    s.changed.notify_all();
}

const TOK_OWN: u64 = 0;
const TOK_NOTIFY: u64 = 1;
const TOK_BACKEND: u64 = 2;

/// The fault thread's own state.
struct Loader<'a> {
    s: &'a Shared,
    loaded: Vec<bool>,
    /// The next block to load in the background.
    next: usize,
    buf: Vec<u8>,
}

impl Loader<'_> {
    /// Index in `info.blocks` of the block holding `offset`, if it holds data.
    fn block_of(&self, offset: u64) -> Option<usize> {
        self.s
            .info
            .blocks
            .binary_search_by_key(&(offset / BLOCK), |b| b.0)
            .ok()
    }

    /// Loads block `at` (checked) into the memfd through our mapping.
    fn load(&mut self, at: usize) -> Result<(), String> {
        if self.loaded[at] {
            return Ok(());
        }
        let s = self.s;
        let base = s.info.blocks[at].0 * BLOCK;
        let pieces = snapshot::read_block(&s.file, &s.path, &s.info, at, &mut self.buf)
            .map_err(|e| e.to_string())?;
        for (off, n) in pieces {
            let src = &self.buf[(off - base) as usize..(off - base + n) as usize];
            place(s, off, src)?;
            s.loaded.fetch_add(n, Ordering::Relaxed);
        }
        self.loaded[at] = true;
        Ok(())
    }

    /// Makes the page at `offset` present: its block if it has data, else a zero page.
    fn resolve(&mut self, offset: u64) -> Result<(), String> {
        let page = offset & !(PAGE - 1);
        let Some(at) = self.block_of(page) else {
            // Outside the registered blocks (a backend's fault): the page is zero.
            // Allocating it in the memfd is what the kernel would do for us.
            // SAFETY: fallocate on the memfd we hold; mode 0 only allocates, keeping
            // any page that is there.
            let r =
                unsafe { libc::fallocate(self.s.memfd.as_raw_fd(), 0, page as i64, PAGE as i64) };
            if r != 0 {
                return Err(format!(
                    "allocate a zero page at {page:#x}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            return Ok(());
        };
        self.load(at)?;
        // A page with data is there now (EEXIST); one without gets zeros.
        let host = to_host(&self.s.spans, page).ok_or("fault outside guest memory")?;
        // SAFETY: `host` is a page of our registered guest mapping; the kernel fills it.
        match unsafe {
            self.s
                .uffd
                .zeropage(host as *mut libc::c_void, PAGE as usize, true)
        } {
            Ok(_) => Ok(()),
            Err(e) if exists(&e) => Ok(()),
            Err(e) => Err(format!("zero-fill a page at {page:#x}: {e}")),
        }
    }

    /// Serves every pending fault on `uffd`, whose mapping is `spans`.
    fn drain(&mut self, uffd: &Uffd, spans: &[Span]) -> Result<(), String> {
        // Bounded: the queue holds at most one fault per faulting thread.
        for _ in 0..4096 {
            let event = match uffd.read_event() {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("read a fault: {e}")),
            };
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let addr = addr as u64 & !(PAGE - 1);
            let offset = to_offset(spans, addr)
                .ok_or_else(|| format!("fault at {addr:#x}, outside guest memory"))?;
            self.s.faults.fetch_add(1, Ordering::Relaxed);
            self.resolve(offset)?;
            // The faulting thread waits on its own userfaultfd: wake it there.
            uffd.wake(addr as *mut libc::c_void, PAGE as usize)
                .map_err(|e| format!("wake a fault at {addr:#x}: {e}"))?;
        }
        Ok(())
    }
}

/// Whether a copy or zero-fill failed because the page is there already.
fn exists(e: &userfaultfd::Error) -> bool {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => {
            *n as i32 == libc::EEXIST
        }
        _ => false,
    }
}

/// Copies `src` into the memfd at `offset` through our mapping, page by page where
/// some pages are already there (placed on an earlier fault: kept as they are).
fn place(s: &Shared, offset: u64, src: &[u8]) -> Result<(), String> {
    let host = to_host(&s.spans, offset).ok_or("block outside guest memory")?;
    let copy = |at: u64, bytes: &[u8]| {
        // SAFETY: the destination is inside our registered guest mapping, the source a
        // live buffer of `bytes.len()` bytes.
        unsafe {
            s.uffd.copy(
                bytes.as_ptr().cast(),
                at as *mut libc::c_void,
                bytes.len(),
                true,
            )
        }
    };
    match copy(host, src) {
        Ok(n) if n == src.len() => return Ok(()),
        Ok(_) | Err(userfaultfd::Error::CopyFailed(_) | userfaultfd::Error::PartiallyCopied(_)) => {
        }
        Err(e) => return Err(format!("place memory at {offset:#x}: {e}")),
    }
    for (i, page) in src.chunks(PAGE as usize).enumerate() {
        let at = host + i as u64 * PAGE;
        // Bounded: EAGAIN (the mapping changing) is retried a few times.
        let mut tries = 0;
        loop {
            match copy(at, page) {
                Ok(_) => break,
                Err(e) if exists(&e) => break,
                Err(userfaultfd::Error::PartiallyCopied(_)) if tries < 8 => tries += 1,
                Err(e) => {
                    return Err(format!(
                        "place memory at {:#x}: {e}",
                        offset + i as u64 * PAGE
                    ));
                }
            }
        }
    }
    Ok(())
}

fn serve(s: &Shared) {
    if let Err(why) = serve_inner(s) {
        tracing::error!(snapshot = %s.path.display(), "lazy memory restore failed: {why}; the VM stops");
        set_phase(s, Phase::Failed(why.clone()));
        s.exit
            .request(ExitReason::Crashed(format!("restoring memory: {why}")));
        // A vCPU waiting on a page that will never come may keep the VM from stopping;
        // if it has not let go of its memory after the grace, the process ends.
        let released = s.released.clone();
        let _ = std::thread::Builder::new()
            .name("memory-fatal".into())
            .spawn(move || {
                let step = Duration::from_millis(100);
                let mut waited = Duration::ZERO;
                while waited < FATAL_GRACE {
                    if released.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(step);
                    waited += step;
                }
                if released.load(Ordering::Relaxed) {
                    return;
                }
                eprintln!(
                    "boxd vmm: restoring memory failed ({why}) and the VM did not stop; exiting"
                );
                std::process::exit(70);
            });
    }
}

fn serve_inner(s: &Shared) -> Result<(), String> {
    let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let add = |fd: i32, tok: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tok),
            )
            .map_err(|e| format!("epoll: {e}"))
    };
    add(s.uffd.as_raw_fd(), TOK_OWN)?;
    add(s.notify.as_raw_fd(), TOK_NOTIFY)?;
    let mut loader = Loader {
        s,
        loaded: vec![false; s.info.blocks.len()],
        next: 0,
        buf: vec![0u8; BLOCK as usize],
    };
    let mut backends: Vec<(Uffd, Vec<Span>)> = Vec::new();
    let mut ends: Vec<Box<dyn FnOnce() -> Result<(), String> + Send>> = Vec::new();
    let mut ender: Option<JoinHandle<Result<(), String>>> = None;
    let mut events = [EpollEvent::default(); 8];
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let phase = lock(&s.phase).clone();
        let background = matches!(phase, Phase::Loading) || s.hurry.load(Ordering::Relaxed);
        let more = loader.next < s.info.blocks.len();
        let timeout = if background && more { 0 } else { 200 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(format!("epoll: {e}")),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOK_OWN => loader.drain(&s.uffd, &s.spans)?,
                TOK_NOTIFY => {
                    let _ = s.notify.read();
                    for b in std::mem::take(&mut *lock(&s.joining)) {
                        // SAFETY: the backend handed us this userfaultfd; we own it now.
                        let uffd = unsafe { Uffd::from_raw_fd(b.uffd.into_raw_fd()) };
                        add(uffd.as_raw_fd(), TOK_BACKEND + backends.len() as u64)?;
                        backends.push((uffd, b.spans));
                        ends.push(b.end);
                    }
                }
                t => {
                    let (uffd, spans) = &backends[(t - TOK_BACKEND) as usize];
                    loader.drain(uffd, spans)?;
                }
            }
        }
        if n == 0 && background && more {
            loader.load(loader.next)?;
        }
        // Bounded: moves past blocks the faults already loaded.
        while loader.next < s.info.blocks.len() && loader.loaded[loader.next] {
            loader.next += 1;
        }
        if background && loader.next == s.info.blocks.len() && !matches!(phase, Phase::Loaded) {
            {
                tracing::info!(
                    loaded_mib = s.loaded.load(Ordering::Relaxed) >> 20,
                    faults = s.faults.load(Ordering::Relaxed),
                    ms = s.begun.elapsed().as_secs_f64() * 1000.0,
                    "guest memory loaded"
                );
                set_phase(s, Phase::Loaded);
                // Telling a backend waits for its answer, and the backend may fault
                // meanwhile: another thread tells them while this one goes on serving.
                let todo = std::mem::take(&mut ends);
                ender = Some(
                    std::thread::Builder::new()
                        .name("memory-end".into())
                        .spawn(move || todo.into_iter().try_for_each(|end| end()))
                        .map_err(|e| format!("thread: {e}"))?,
                );
            }
        }
        if ender.as_ref().is_some_and(|t| t.is_finished()) {
            let told = ender.take().expect("checked").join();
            match told {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("end the backend's postcopy: {e}")),
                Err(_) => return Err("the thread ending the backend's postcopy panicked".into()),
            }
            for &(host, len) in &s.registered {
                s.uffd
                    .unregister(host as *mut libc::c_void, len as usize)
                    .map_err(|e| format!("unregister guest memory: {e}"))?;
            }
            snapshot::drop_cache(&s.file);
            *lock(&s.done_ms) = Some(s.begun.elapsed().as_secs_f64() * 1000.0);
            set_phase(s, Phase::Done);
            return Ok(());
        }
    }
}
