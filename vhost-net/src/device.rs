//! One frontend connection to a port: the vhost-user protocol side (rust-vmm's `vhost`
//! crate parses the messages; this answers them), the guest memory the frontend shares,
//! the vrings, and one worker thread per queue pair.
//!
//! Why not `vhost-user-backend`'s daemon: it ends the connection on any request it
//! considers out of order, and QEMU (7.2, Debian's) sends SET_VRING_ENABLE for the
//! first queue pair before SET_FEATURES when the virtio-net device is realized. The
//! spec says the request "should" come after negotiation; a backend that serves real
//! frontends tolerates it. Owning the connection loop also lets a port keep its
//! state across connections without per-connection daemon plumbing.

use crate::port::{MAX_QUEUE_SIZE, Port};
use crate::tap::HostPort;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const TOK_RX_KICK: u64 = 0;
const TOK_TX_KICK: u64 = 1;
const TOK_HOST: u64 = 2;
const TOK_RX_AGAIN: u64 = 3;
const TOK_TX_AGAIN: u64 = 4;
const TOK_STOP: u64 = 5;

/// Where a frontend virtual address range lands in guest physical memory.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

struct Worker {
    epoll: Arc<Epoll>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

pub(crate) struct Device<H: HostPort + 'static> {
    port: Port<H>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    vrings: Vec<VringRwLock>,
    /// The kick fd each ring has registered with its worker's epoll. It must be taken
    /// out before the ring lets go of the fd: the frontend keeps the same eventfd
    /// open, so closing our copy would not remove it from epoll.
    kicks: Vec<Option<RawFd>>,
    workers: Vec<Worker>,
    acked: u64,
    /// A lazy restore in progress (postcopy): our userfaultfd, the frontend serves it.
    uffd: Option<userfaultfd::Uffd>,
    /// Ranges of our mappings registered with it.
    registered: Vec<(u64, u64)>,
    /// A memory table mapped in postcopy mode, used once the frontend acks it.
    pending: Option<(GuestMemoryMmap, Vec<Mapping>)>,
}

fn io_err(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(io::Error::other(e.to_string()))
}

impl<H: HostPort + 'static> Device<H> {
    /// A fresh connection to `port`, its workers started (idle until rings start).
    pub(crate) fn new(port: Port<H>) -> io::Result<Self> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let pairs = port.config().queue_pairs;
        let vrings = (0..2 * pairs)
            .map(|_| VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16).map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        // Rings start enabled. The spec has them start disabled once protocol
        // features are negotiated, waiting for SET_VRING_ENABLE; but QEMU sends that
        // enable before SET_FEATURES, which the vhost crate drops as out of order, and
        // does not repeat it. An explicit disable is still honoured.
        for v in &vrings {
            v.set_enabled(true);
        }
        port.connected(mem.clone());
        let mut dev = Self {
            port,
            mem,
            mappings: Vec::new(),
            kicks: vec![None; vrings.len()],
            vrings,
            workers: Vec::new(),
            acked: 0,
            uffd: None,
            registered: Vec::new(),
            pending: None,
        };
        for p in 0..pairs {
            let w = dev.spawn_worker(p)?;
            dev.workers.push(w);
        }
        Ok(dev)
    }

    fn spawn_worker(&self, pair: usize) -> io::Result<Worker> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let (host, rx_again, tx_again) = self.port.pair_fds(pair);
        let add = |fd: RawFd, tok: u64, ev: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, tok))
        };
        add(host, TOK_HOST, EventSet::IN | EventSet::EDGE_TRIGGERED)?;
        add(rx_again, TOK_RX_AGAIN, EventSet::IN)?;
        add(tx_again, TOK_TX_AGAIN, EventSet::IN)?;
        add(stop.as_raw_fd(), TOK_STOP, EventSet::IN)?;
        let (port, ep) = (self.port.clone(), epoll.clone());
        let (rx, tx) = (
            self.vrings[2 * pair].clone(),
            self.vrings[2 * pair + 1].clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("net-{}-q{pair}", port.config().name))
            .spawn(move || work(&port, pair, &ep, &rx, &tx))?;
        Ok(Worker {
            epoll,
            stop,
            thread: Some(thread),
        })
    }

    fn vring(&self, index: u32) -> Result<&VringRwLock> {
        self.vrings.get(index as usize).ok_or_else(|| {
            tracing::warn!(port = %self.port.config().name, "queue {index} does not exist ({} queues)", self.vrings.len());
            Error::InvalidParam
        })
    }

    fn vmm_va_to_gpa(&self, va: u64) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa)
            .ok_or_else(|| {
                tracing::warn!(port = %self.port.config().name, "ring address {va:#x} is outside the frontend's memory table");
                Error::InvalidParam
            })
    }

    /// Attaches pair `pair`'s host queue while either of its rings is served.
    fn refresh_pair(&self, pair: usize) {
        let served = |i: usize| {
            self.vrings.get(i).is_some_and(|v| {
                let s = v.get_ref();
                s.get_queue().ready() && s.is_enabled()
            })
        };
        self.port
            .set_pair_attached(pair, served(2 * pair) || served(2 * pair + 1));
    }

    /// Takes ring `index`'s kick fd out of its worker's epoll and lets go of it.
    fn drop_kick(&mut self, index: usize) {
        if let Some(fd) = self.kicks[index].take() {
            let _ = self.workers[index / 2].epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::default(),
            );
        }
        self.vrings[index].set_kick(None);
    }

    /// Stops every ring (reset, or the connection ending).
    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.vrings[i].set_queue_ready(false);
            self.drop_kick(i);
            self.port.stop_queue(i);
        }
        for p in 0..self.workers.len() {
            self.refresh_pair(p);
        }
    }
}

impl<H: HostPort + 'static> Device<H> {
    /// Takes our mappings out of the userfaultfd. A thread blocked on a fault there
    /// (the frontend gone mid-restore) is woken and goes on.
    fn end_postcopy(&mut self) {
        if let Some(uffd) = self.uffd.take() {
            for (start, len) in self.registered.drain(..) {
                if let Err(e) = uffd.unregister(start as *mut libc::c_void, len as usize) {
                    tracing::warn!(port = %self.port.config().name, "unregister guest memory from the userfaultfd: {e}");
                }
            }
        }
    }

    fn publish(&mut self, mem: GuestMemoryMmap, mappings: Vec<Mapping>) -> Result<()> {
        // The rings and the port see the new memory at their next access.
        self.mem.lock().map_err(io_err)?.replace(mem);
        self.mappings = mappings;
        Ok(())
    }
}

impl<H: HostPort + 'static> Drop for Device<H> {
    fn drop(&mut self) {
        self.end_postcopy();
        for w in &self.workers {
            let _ = w.stop.write(1);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        for p in 0..self.workers.len() {
            self.port.set_pair_attached(p, false);
        }
        self.port.disconnected();
    }
}

/// A pair's worker: services the pair's two rings on kicks, host-port arrivals and
/// its own "come back" events, until told to stop.
fn work<H: HostPort + 'static>(
    port: &Port<H>,
    pair: usize,
    epoll: &Epoll,
    rx: &VringRwLock,
    tx: &VringRwLock,
) {
    let mut events = [EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(port = %port.config().name, pair, "epoll: {e}; worker stops");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOK_RX_KICK => {
                    let _ = rx.read_kick();
                    port.rx(pair, rx, false);
                }
                TOK_TX_KICK => {
                    let _ = tx.read_kick();
                    port.tx(pair, tx, false);
                }
                TOK_HOST => port.rx(pair, rx, false),
                TOK_RX_AGAIN => port.rx(pair, rx, true),
                TOK_TX_AGAIN => port.tx(pair, tx, true),
                TOK_STOP => return,
                _ => {}
            }
        }
    }
}

impl<H: HostPort + 'static> VhostUserBackendReqHandlerMut for Device<H> {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.stop_all();
        self.acked = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset_owner()
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.port.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & crate::port::F_VERSION_1 == 0 {
            // QEMU sends an interim SET_FEATURES without it before the guest has
            // negotiated. A legacy guest would use a 10-byte header; its frames would
            // then fail the identity filter (misread MACs), not pass wrongly.
            tracing::debug!(port = %self.port.config().name, "SET_FEATURES without VERSION_1");
        }
        let unknown = features & !self.port.features();
        if unknown != 0 {
            tracing::warn!(port = %self.port.config().name, "SET_FEATURES with bits {unknown:#x} this port never offered");
            return Err(Error::InvalidParam);
        }
        self.acked = features;
        self.port.set_acked(features);
        let event_idx = features & crate::port::F_EVENT_IDX != 0;
        let protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
            // Without protocol features, rings are enabled as soon as they start
            // (and may not be disabled by a SET_VRING_ENABLE that cannot come).
            if !protocol {
                v.set_enabled(true);
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        let postcopy = postcopy_listening == Some(true);
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(Error::InvalidParam)?;
            if postcopy {
                let uffd = self
                    .uffd
                    .as_ref()
                    .ok_or(Error::InvalidOperation("postcopy not advised"))?;
                let (start, len) = (r.as_ptr() as u64, region.memory_size);
                uffd.register(start as *mut libc::c_void, len as usize)
                    .map_err(io_err)?;
                self.registered.push((start, len));
            }
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
            regions.push(r);
        }
        let bases: Vec<u64> = regions.iter().map(|r| r.as_ptr() as u64).collect();
        let mem = GuestMemoryMmap::from_regions(regions).map_err(io_err)?;
        if postcopy {
            // Used once the frontend says it serves our faults (its ack).
            self.pending = Some((mem, mappings));
            return Ok(Some(bases));
        }
        self.publish(mem, mappings)?;
        Ok(None)
    }

    fn postcopy_advice(&mut self) -> Result<File> {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // Frames are read and written by syscalls too (the TAP), not only by us.
            .user_mode_only(false)
            .create()
            .map_err(|e| {
                tracing::warn!(port = %self.port.config().name, "userfaultfd for a lazy restore: {e}");
                io_err(e)
            })?;
        // SAFETY: dup of a valid fd we own; the result is checked and owned by the File.
        let dup = unsafe { libc::dup(uffd.as_raw_fd()) };
        if dup < 0 {
            return Err(Error::ReqHandlerError(io::Error::last_os_error()));
        }
        self.uffd = Some(uffd);
        // SAFETY: `dup` is a new fd nobody else owns.
        Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) })
    }

    fn postcopy_listen(&mut self) -> Result<()> {
        if self.uffd.is_none() {
            return Err(Error::InvalidOperation("postcopy not advised"));
        }
        Ok(())
    }

    fn postcopy_end(&mut self) -> Result<()> {
        self.end_postcopy();
        self.postcopy_ack_mem_regions()
    }

    fn postcopy_ack_mem_regions(&mut self) -> Result<()> {
        if let Some((mem, mappings)) = self.pending.take() {
            self.publish(mem, mappings)?;
        }
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            tracing::warn!(port = %self.port.config().name, "SET_VRING_NUM {index}: size {num} is not a power of two up to {MAX_QUEUE_SIZE}");
            return Err(Error::InvalidParam);
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let (d, a, u) = (
            self.vmm_va_to_gpa(descriptor)?,
            self.vmm_va_to_gpa(available)?,
            self.vmm_va_to_gpa(used)?,
        );
        self.vring(index)?.set_queue_info(d, a, u).map_err(|e| {
            tracing::warn!(port = %self.port.config().name, "SET_VRING_ADDR {index}: {e}");
            Error::InvalidParam
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let v = self.vring(index)?;
        // Split rings: everything popped was completed before the ring stopped (the
        // port never leaves a chain in flight), so used catches up with avail.
        v.set_queue_next_avail(base as u16);
        v.set_queue_next_used(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let v = self.vring(index)?.clone();
        v.set_queue_ready(false);
        self.port.stop_queue(index as usize);
        let next = v.queue_next_avail();
        self.drop_kick(index as usize);
        v.set_call(None);
        self.refresh_pair(index as usize / 2);
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let Some(file) = fd else {
            return Err(Error::InvalidOperation(
                "polling mode (no kick fd) is not supported",
            ));
        };
        let raw = file.as_raw_fd();
        let v = self.vring(u32::from(index))?.clone();
        self.drop_kick(usize::from(index));
        v.set_kick(Some(file));
        let pair = usize::from(index) / 2;
        let tok = if index.is_multiple_of(2) {
            TOK_RX_KICK
        } else {
            TOK_TX_KICK
        };
        let epoll = &self.workers[pair].epoll;
        let ev = EpollEvent::new(EventSet::IN, tok);
        if let Err(e) = epoll.ctl(ControlOperation::Add, raw, ev) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(Error::ReqHandlerError(e));
            }
            epoll
                .ctl(ControlOperation::Modify, raw, ev)
                .map_err(Error::ReqHandlerError)?;
        }
        self.kicks[usize::from(index)] = Some(raw);
        // The ring starts with its kick fd (vhost-user: "start ring upon receiving a
        // kick"), and buffers may already wait in it.
        v.set_queue_ready(true);
        self.refresh_pair(pair);
        self.port.nudge(pair);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        // PAGEFAULT: a lazy restore hands our faults to the frontend (postcopy).
        Ok(VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::PAGEFAULT)
    }

    fn set_protocol_features(&mut self, _features: u64) -> Result<()> {
        // The vhost crate keeps what was acked (REPLY_ACK is all it changes).
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.vring(index)?.set_enabled(enable);
        if enable {
            self.port.nudge(index as usize / 2);
        } else {
            self.port.stop_queue(index as usize);
        }
        self.refresh_pair(index as usize / 2);
        Ok(())
    }

    fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> Result<Vec<u8>> {
        Err(Error::InvalidOperation(
            "the frontend serves the virtio-net config space",
        ))
    }

    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> Result<()> {
        Err(Error::InvalidOperation(
            "the frontend serves the virtio-net config space",
        ))
    }

    fn set_gpu_socket(&mut self, _: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        Err(Error::InvalidOperation(
            "no inflight tracking: the port completes every chain it takes before the next message",
        ))
    }

    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> Result<()> {
        Err(Error::InvalidOperation("no inflight tracking"))
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(Error::InvalidOperation("memory slots are not supported"))
    }

    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> Result<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(Error::InvalidOperation("memory slots are not supported"))
    }

    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(Error::InvalidOperation("memory slots are not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation(
            "device state lives in the port, not the connection",
        ))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation(
            "device state lives in the port, not the connection",
        ))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> Result<()> {
        Err(Error::InvalidOperation(
            "dirty logging (live migration) is not supported yet",
        ))
    }
}
