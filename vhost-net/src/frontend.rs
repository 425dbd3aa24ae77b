//! A small vhost-user virtio-net driver, for tests and benchmarks: it plays the VMM and
//! the guest at once, with its own memfd "guest memory" and split virtqueues, so the
//! backend can be driven without a VM (packets both ways, offloads, multiqueue,
//! reconnects, and deliberately malformed descriptor chains).
//!
//! It is a test driver, not a VMM: no interrupts besides the call eventfds it polls,
//! one 4 KiB buffer per receive descriptor (mergeable buffers carry larger frames) and
//! one transmit slot per descriptor, large enough for a 64 KiB TSO frame.

use crate::port::{F_EVENT_IDX, F_MRG_RXBUF, F_VERSION_1, QUEUE_SIZE};
use crate::tap::VNET_HDR_LEN;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Receive buffer per descriptor.
pub const RX_SLOT: u64 = 4096;
/// Transmit slot per descriptor: a whole TSO frame.
pub const TX_SLOT: u64 = 72 << 10;
const RING_META: u64 = 16 << 10;
const BUFFERS_AT: u64 = 1 << 20;
const PAIR_STRIDE: u64 = RX_SLOT * QUEUE_SIZE as u64 + TX_SLOT * QUEUE_SIZE as u64;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

pub type Result<T> = std::result::Result<T, FrontendError>;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user {what}: {source}")]
    Protocol {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("the backend offers {offered} queue pairs, {wanted} wanted")]
    Queues { offered: u64, wanted: usize },
    #[error("frame of {0} bytes does not fit a transmit slot")]
    TooBig(usize),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("guest memory: {0}")]
    Memory(String),
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    pub pairs: usize,
    /// Virtio features to accept from the backend's offer (VERSION_1 always).
    pub features: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pairs: 1,
            features: crate::port::FEATURES,
        }
    }
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    /// The driver's next avail index.
    avail_idx: u16,
    /// Used entries consumed so far.
    used_seen: u16,
    /// Descriptors not in flight (transmit rings).
    free: Vec<u16>,
    buffers: u64,
    slot: u64,
}

/// A connected test frontend.
pub struct Frontend {
    vu: VuFrontend,
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    pub acked: u64,
    pending_kick: Vec<bool>,
}

fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Protocol { what, source }
}

/// True when a driver that moved its index from `old` to `new` must notify a side
/// waiting for `event` (virtio's vring_need_event).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Frontend {
    pub fn connect(socket: &Path, opts: Options) -> Result<Self> {
        let queues = 2 * opts.pairs;
        let mut vu = VuFrontend::connect(socket, queues as u64).map_err(proto("connect"))?;
        vu.set_owner().map_err(proto("SET_OWNER"))?;
        let offered = vu.get_features().map_err(proto("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let p = vu
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            protocol = p & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ);
            vu.set_protocol_features(protocol)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        }
        if opts.pairs > 1 {
            let n = if protocol.contains(VhostUserProtocolFeatures::MQ) {
                vu.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?
            } else {
                2
            };
            if n < queues as u64 {
                return Err(FrontendError::Queues {
                    offered: n / 2,
                    wanted: opts.pairs,
                });
            }
        }
        let acked = (offered & (opts.features | F_VERSION_1))
            | (offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        vu.set_features(acked).map_err(proto("SET_FEATURES"))?;

        let size = BUFFERS_AT + PAIR_STRIDE * opts.pairs as u64;
        let mem = memfd_memory(size as usize)?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<_, _>>()
            .map_err(proto("describe memory"))?;
        vu.set_mem_table(&regions).map_err(proto("SET_MEM_TABLE"))?;

        let mut rings = Vec::with_capacity(queues);
        for q in 0..queues {
            let meta = q as u64 * RING_META;
            let pair_base = BUFFERS_AT + PAIR_STRIDE * (q / 2) as u64;
            let (buffers, slot) = if q % 2 == 0 {
                (pair_base, RX_SLOT)
            } else {
                (pair_base + RX_SLOT * QUEUE_SIZE as u64, TX_SLOT)
            };
            let ring = Ring {
                desc: meta,
                avail: meta + 4096,
                used: meta + 8192,
                kick: EventFd::new(libc::EFD_NONBLOCK)?,
                call: EventFd::new(libc::EFD_NONBLOCK)?,
                avail_idx: 0,
                used_seen: 0,
                free: (0..QUEUE_SIZE as u16).rev().collect(),
                buffers,
                slot,
            };
            let host = |gpa: u64| -> Result<u64> {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| FrontendError::Memory(e.to_string()))
            };
            let cfg = VringConfigData {
                queue_max_size: QUEUE_SIZE as u16,
                queue_size: QUEUE_SIZE as u16,
                flags: 0,
                desc_table_addr: host(ring.desc)?,
                used_ring_addr: host(ring.used)?,
                avail_ring_addr: host(ring.avail)?,
                log_addr: None,
            };
            vu.set_vring_num(q, QUEUE_SIZE as u16)
                .map_err(proto("SET_VRING_NUM"))?;
            vu.set_vring_addr(q, &cfg)
                .map_err(proto("SET_VRING_ADDR"))?;
            vu.set_vring_base(q, 0).map_err(proto("SET_VRING_BASE"))?;
            vu.set_vring_call(q, &ring.call)
                .map_err(proto("SET_VRING_CALL"))?;
            vu.set_vring_kick(q, &ring.kick)
                .map_err(proto("SET_VRING_KICK"))?;
            rings.push(ring);
        }
        if !protocol.is_empty() {
            for q in 0..queues {
                vu.set_vring_enable(q, true)
                    .map_err(proto("SET_VRING_ENABLE"))?;
            }
        }
        let mut fe = Self {
            vu,
            mem,
            rings,
            acked,
            pending_kick: vec![false; queues],
        };
        for p in 0..opts.pairs {
            fe.fill_rx(p)?;
        }
        Ok(fe)
    }

    pub fn pairs(&self) -> usize {
        self.rings.len() / 2
    }

    fn event_idx(&self) -> bool {
        self.acked & F_EVENT_IDX != 0
    }

    pub fn mergeable(&self) -> bool {
        self.acked & F_MRG_RXBUF != 0
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn w16(&self, addr: u64, v: u16) {
        self.mem
            .store(v, GuestAddress(addr), Ordering::Release)
            .expect("ring inside test memory");
    }

    fn r16(&self, addr: u64) -> u16 {
        self.mem
            .load(GuestAddress(addr), Ordering::Acquire)
            .expect("ring inside test memory")
    }

    /// Writes descriptor `id` of ring `q` as is (tests write malformed ones).
    pub fn write_desc(&self, q: usize, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.rings[q].desc + 16 * u64::from(id);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(at))
            .expect("descriptor inside test memory");
    }

    /// Makes chain `head` of ring `q` available (kicked on [`Self::flush`]).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let r = &self.rings[q];
        let slot = u64::from(r.avail_idx % QUEUE_SIZE as u16);
        self.w16(r.avail + 4 + 2 * slot, head);
        let new = r.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.w16(r.avail + 2, new);
        self.rings[q].avail_idx = new;
        self.pending_kick[q] = true;
    }

    /// Kicks ring `q` if the backend asked to be told (event index or flags).
    pub fn flush(&mut self, q: usize) -> Result<()> {
        if !std::mem::take(&mut self.pending_kick[q]) {
            return Ok(());
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let r = &self.rings[q];
        let kick = if self.event_idx() {
            // The backend's avail_event sits after the used ring's entries; we cannot
            // know the old index it saw, so kick whenever it waits at or past the
            // index we started from.
            let event = self.r16(r.used + 4 + 8 * QUEUE_SIZE as u64);
            need_event(
                event,
                r.avail_idx,
                r.avail_idx.wrapping_sub(QUEUE_SIZE as u16),
            )
        } else {
            self.r16(r.used) & VRING_USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.rings[q].kick.write(1)?;
        }
        Ok(())
    }

    /// Kicks ring `q` unconditionally.
    pub fn kick(&mut self, q: usize) -> Result<()> {
        self.pending_kick[q] = false;
        self.rings[q].kick.write(1)?;
        Ok(())
    }

    /// Used entries of ring `q` not consumed yet: (descriptor id, length).
    fn take_used(&mut self, q: usize, max: usize) -> Vec<(u16, u32)> {
        let r = &self.rings[q];
        let used_idx = self.r16(r.used + 2);
        let mut out = Vec::new();
        let mut seen = r.used_seen;
        while seen != used_idx && out.len() < max {
            let at = r.used + 4 + 8 * u64::from(seen % QUEUE_SIZE as u16);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used entry");
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used entry");
            out.push((id as u16, len));
            seen = seen.wrapping_add(1);
        }
        self.rings[q].used_seen = seen;
        if self.event_idx() {
            // used_event: signal us when the next entry lands.
            let r = &self.rings[q];
            self.w16(r.avail + 4 + 2 * QUEUE_SIZE as u64, seen);
        }
        out
    }

    /// How many used entries ring `q` has not consumed.
    pub fn used_pending(&self, q: usize) -> u16 {
        let r = &self.rings[q];
        self.r16(r.used + 2).wrapping_sub(r.used_seen)
    }

    fn fill_rx(&mut self, pair: usize) -> Result<()> {
        let q = 2 * pair;
        for id in 0..QUEUE_SIZE as u16 {
            self.post_rx(q, id);
        }
        self.rings[q].free.clear();
        self.kick(q)
    }

    fn post_rx(&mut self, q: usize, id: u16) {
        let r = &self.rings[q];
        let addr = r.buffers + u64::from(id) * r.slot;
        let slot = r.slot as u32;
        self.write_desc(q, id, addr, slot, VRING_DESC_F_WRITE, 0);
        self.push_avail(q, id);
    }

    /// Reclaims completed transmit descriptors of `pair`; returns how many.
    pub fn reclaim_tx(&mut self, pair: usize) -> usize {
        let q = 2 * pair + 1;
        let done = self.take_used(q, QUEUE_SIZE);
        let n = done.len();
        for (id, _) in done {
            self.rings[q].free.push(id);
        }
        n
    }

    /// Queues one frame (virtio-net header first) on `pair`'s transmit ring without
    /// kicking; false when the ring is full.
    pub fn queue_tx(&mut self, pair: usize, frame: &[u8]) -> Result<bool> {
        self.queue_tx_parts(pair, &[frame])
    }

    /// Like [`Self::queue_tx`], the frame given in parts, copied once into its slot.
    pub fn queue_tx_parts(&mut self, pair: usize, parts: &[&[u8]]) -> Result<bool> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len as u64 > TX_SLOT {
            return Err(FrontendError::TooBig(len));
        }
        let q = 2 * pair + 1;
        if self.rings[q].free.is_empty() {
            self.reclaim_tx(pair);
        }
        let Some(id) = self.rings[q].free.pop() else {
            return Ok(false);
        };
        let addr = self.rings[q].buffers + u64::from(id) * TX_SLOT;
        let mut at = addr;
        for p in parts {
            self.mem
                .write_slice(p, GuestAddress(at))
                .map_err(|e| FrontendError::Memory(e.to_string()))?;
            at += p.len() as u64;
        }
        self.write_desc(q, id, addr, len as u32, 0, 0);
        self.push_avail(q, id);
        Ok(true)
    }

    /// Sends one frame on `pair`, waiting (bounded) for room.
    pub fn send(&mut self, pair: usize, frame: &[u8]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.queue_tx(pair, frame)? {
            if Instant::now() > deadline {
                return Err(
                    io::Error::new(io::ErrorKind::TimedOut, "transmit ring stayed full").into(),
                );
            }
            self.flush(2 * pair + 1)?;
            std::thread::yield_now();
        }
        self.flush(2 * pair + 1)
    }

    /// Takes a transmit descriptor for a hand-made chain; the caller writes it with
    /// [`Self::write_desc`] and makes it available with [`Self::push_avail`].
    pub fn take_tx_desc(&mut self, pair: usize) -> Option<u16> {
        let q = 2 * pair + 1;
        if self.rings[q].free.is_empty() {
            self.reclaim_tx(pair);
        }
        self.rings[q].free.pop()
    }

    /// Guest address of transmit slot `id` of `pair`.
    pub fn tx_slot(&self, pair: usize, id: u16) -> u64 {
        self.rings[2 * pair + 1].buffers + u64::from(id) * TX_SLOT
    }

    /// One received frame of `pair` (virtio-net header first), if one is waiting; its
    /// buffers go back to the ring.
    pub fn try_recv(&mut self, pair: usize) -> Result<Option<Vec<u8>>> {
        let q = 2 * pair;
        if self.used_pending(q) == 0 {
            return Ok(None);
        }
        let (id, len) = self.take_used(q, 1)[0];
        let r = &self.rings[q];
        let mut frame = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut frame, GuestAddress(r.buffers + u64::from(id) * r.slot))
            .map_err(|e| FrontendError::Memory(e.to_string()))?;
        let mut ids = vec![id];
        if self.mergeable() && frame.len() >= VNET_HDR_LEN {
            let buffers = u16::from_le_bytes([frame[10], frame[11]]).max(1);
            for _ in 1..buffers {
                // The rest of a merged frame is already in the used ring (the backend
                // publishes a frame's buffers together), but wait a moment if not.
                let deadline = Instant::now() + Duration::from_secs(1);
                while self.used_pending(q) == 0 && Instant::now() < deadline {
                    std::hint::spin_loop();
                }
                let Some(&(id, len)) = self.take_used(q, 1).first() else {
                    break;
                };
                let r = &self.rings[q];
                let mut part = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut part, GuestAddress(r.buffers + u64::from(id) * r.slot))
                    .map_err(|e| FrontendError::Memory(e.to_string()))?;
                frame.extend_from_slice(&part);
                ids.push(id);
            }
        }
        for id in ids {
            self.post_rx(q, id);
        }
        self.flush(q)?;
        Ok(Some(frame))
    }

    /// Waits up to `timeout` for a frame on `pair`.
    pub fn recv(&mut self, pair: usize, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.try_recv(pair)? {
                return Ok(Some(f));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut p = libc::pollfd {
                fd: self.rings[2 * pair].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 10) as i32) };
            let _ = self.rings[2 * pair].call.read();
        }
    }

    /// Stops every ring (GET_VRING_BASE), as a VMM does before a snapshot; returns the
    /// rings' positions.
    pub fn stop(&mut self) -> Result<Vec<u32>> {
        (0..self.rings.len())
            .map(|q| self.vu.get_vring_base(q).map_err(proto("GET_VRING_BASE")))
            .collect()
    }
}

fn memfd_memory(size: usize) -> Result<GuestMemoryMmap> {
    // SAFETY: a valid NUL-terminated name; memfd_create has no other preconditions.
    let fd = unsafe { libc::memfd_create(c"boxd-test-frontend".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(size as u64)?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::from_arc(file, 0)),
    )])
    .map_err(|e| FrontendError::Memory(e.to_string()))
}
