//! One VM's port: the vhost-user virtio-net device behind one socket, moving frames
//! between the guest's virtqueues and a [`HostPort`], one worker thread per queue pair.
//!
//! A port outlives its frontends. While no frontend is attached (VMM paused, suspended,
//! restarting) or a receive queue has no buffers, the port's keeper thread moves
//! inbound frames from the host port into the bounded [`Hold`]; a receive queue
//! delivers held frames before anything newer, so they arrive in order. Guest frames
//! pass the identity [`filter`](crate::filter) before they reach the host.
//!
//! Offloads (checksum, TSO both ways, mergeable rx buffers, event index) are
//! negotiated, so the guest and the host kernel exchange 64 KiB segments, not
//! 1500-byte packets.

use crate::chain;
use crate::events::{Bus, Event};
use crate::filter::{self, Identity};
use crate::hold::{Hold, HoldLimits};
use crate::tap::{HostPort, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_MQ: u64 = 1 << 22;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// The virtio-net features this backend implements (the frontend adds the ones it
/// serves itself, such as MAC, STATUS and the control queue; MQ tells it the backend
/// has more than one queue pair).
pub const FEATURES: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF
    | F_EVENT_IDX
    | F_VERSION_1;

/// Most queue pairs a port serves (one worker thread each).
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Largest ring a frontend may set up (QEMU's virtqueue limit).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// The ring size boxd's own frontends use.
pub const QUEUE_SIZE: usize = 256;
/// Largest frame either way: a 64 KiB GSO segment, its headers, the virtio-net header.
pub const FRAME_MAX: usize = 65_562 + VNET_HDR_LEN;
/// Frames handled per event before yielding, so one busy direction cannot starve
/// the other.
const BATCH_MAX: usize = 256;
/// How often the keeper looks again when nothing woke it.
const KEEPER_TICK: Duration = Duration::from_millis(200);

/// A port's configuration: who the VM is and how much the port may hold for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortConfig {
    pub name: String,
    pub identity: Identity,
    pub queue_pairs: usize,
    pub hold: HoldLimits,
}

/// Live counters of one port.
#[derive(Default, Debug)]
struct Counters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_held: AtomicU64,
    rx_drop_hold_full: AtomicU64,
    rx_drop_too_big: AtomicU64,
    tx_drop_runt: AtomicU64,
    tx_drop_spoofed_mac: AtomicU64,
    tx_drop_spoofed_ip: AtomicU64,
    tx_drop_spoofed_arp: AtomicU64,
    tx_drop_ethertype: AtomicU64,
    tx_drop_malformed: AtomicU64,
    rx_drop_malformed: AtomicU64,
    tx_errors: AtomicU64,
    ring_errors: AtomicU64,
    connections: AtomicU64,
}

/// A snapshot of a port's counters (`boxd net stats`). Drops are by reason; `held_*`
/// is what waits right now, `rx_held` how many frames ever went through the hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortStats {
    pub name: String,
    pub attached: bool,
    pub connections: u64,
    pub queue_pairs: usize,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub held_frames: usize,
    pub held_bytes: usize,
    pub rx_held: u64,
    pub rx_drop_hold_full: u64,
    pub rx_drop_too_big: u64,
    pub rx_drop_malformed: u64,
    pub tx_drop_runt: u64,
    pub tx_drop_spoofed_mac: u64,
    pub tx_drop_spoofed_ip: u64,
    pub tx_drop_spoofed_arp: u64,
    pub tx_drop_ethertype: u64,
    pub tx_drop_malformed: u64,
    pub tx_errors: u64,
    pub ring_errors: u64,
}

/// Where a queue pair's receive side stands; the keeper reads the host port of any
/// pair that is not `FLOWING`.
const DETACHED: u8 = 0;
const FLOWING: u8 = 1;
const STALLED: u8 = 2;

struct Pair<H> {
    host: H,
    buf: Vec<u8>,
    tx: chain::TxFrame,
    iov: Vec<libc::iovec>,
}

// SAFETY: `iov` only holds pointers between filling it and the writev that consumes
// it, both under the pair's lock on one thread; the rest is Send.
unsafe impl<H: Send> Send for Pair<H> {}

struct PairEvents {
    rx_again: EventFd,
    tx_again: EventFd,
}

/// What the current frontend connection negotiated.
#[derive(Default)]
struct Conn {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    acked: u64,
}

struct Shared<H> {
    cfg: PortConfig,
    pairs: Vec<Mutex<Pair<H>>>,
    events: Vec<PairEvents>,
    rx_state: Vec<AtomicU8>,
    host_fds: Vec<RawFd>,
    hold: Mutex<Hold>,
    counters: Counters,
    conn: RwLock<Conn>,
    keeper_wake: EventFd,
    closing: AtomicBool,
    bus: Arc<Bus>,
    /// A "waiting" event went out for the current absence.
    announced: AtomicBool,
}

/// A VM's port; cheap to clone (all clones are the same port).
pub struct Port<H: HostPort> {
    shared: Arc<Shared<H>>,
}

impl<H: HostPort> Clone for Port<H> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-frame leaves nothing half-done that matters more than
    // keeping the port up: frames are whole or not sent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A ring the backend may touch: started (kick received, not stopped) and enabled.
fn serviceable(vring: &VringRwLock) -> bool {
    let s = vring.get_ref();
    s.get_queue().ready() && s.is_enabled()
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl<H: HostPort + 'static> Port<H> {
    /// A port over `hosts`, one host-port queue per queue pair, with its keeper thread
    /// started (it ends when the port is [closed](Self::close)).
    pub fn new(cfg: PortConfig, hosts: Vec<H>, bus: Arc<Bus>) -> io::Result<Self> {
        assert_eq!(
            cfg.queue_pairs,
            hosts.len(),
            "one host queue per queue pair"
        );
        let host_fds = hosts.iter().map(|h| h.fd()).collect();
        let events = (0..hosts.len())
            .map(|_| {
                Ok(PairEvents {
                    rx_again: EventFd::new(libc::EFD_NONBLOCK)?,
                    tx_again: EventFd::new(libc::EFD_NONBLOCK)?,
                })
            })
            .collect::<io::Result<_>>()?;
        let shared = Arc::new(Shared {
            hold: Mutex::new(Hold::new(cfg.hold)),
            rx_state: (0..hosts.len()).map(|_| AtomicU8::new(DETACHED)).collect(),
            pairs: hosts
                .into_iter()
                .map(|host| {
                    Mutex::new(Pair {
                        host,
                        buf: vec![0; FRAME_MAX],
                        tx: chain::TxFrame::default(),
                        iov: Vec::with_capacity(64),
                    })
                })
                .collect(),
            events,
            host_fds,
            counters: Counters::default(),
            conn: RwLock::default(),
            keeper_wake: EventFd::new(libc::EFD_NONBLOCK)?,
            closing: AtomicBool::new(false),
            bus,
            announced: AtomicBool::new(false),
            cfg,
        });
        // Until a frontend serves them, only pair 0 takes inbound frames.
        for pair in shared.pairs.iter().skip(1) {
            let _ = lock(pair).host.set_attached(false);
        }
        let keeper = shared.clone();
        std::thread::Builder::new()
            .name(format!("net-keep-{}", keeper.cfg.name))
            .spawn(move || keeper.keep())?;
        Ok(Self { shared })
    }

    pub fn config(&self) -> &PortConfig {
        &self.shared.cfg
    }

    /// Stops the keeper; the host port closes when the last clone is dropped.
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.shared.keeper_wake.write(1);
    }

    /// A frontend connected: its guest memory (filled in by SET_MEM_TABLE) is what the
    /// rings are read from until it goes.
    pub(crate) fn connected(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        *self.shared.conn.write().unwrap_or_else(|e| e.into_inner()) = Conn {
            mem: Some(mem),
            acked: 0,
        };
        self.shared.announced.store(false, Ordering::Release);
        bump(&self.shared.counters.connections);
    }

    /// The frontend went away: every receive queue is detached, so the keeper holds
    /// what arrives until the next one.
    pub(crate) fn disconnected(&self) {
        for (i, s) in self.shared.rx_state.iter().enumerate() {
            let _guard = lock(&self.shared.pairs[i]);
            s.store(DETACHED, Ordering::Release);
        }
        self.shared
            .conn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .mem = None;
        let _ = self.shared.keeper_wake.write(1);
    }

    /// The virtio features this port offers (MQ with more than one queue pair).
    pub(crate) fn features(&self) -> u64 {
        let mq = if self.shared.cfg.queue_pairs > 1 {
            F_MQ
        } else {
            0
        };
        FEATURES | mq | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The frontend's feature choice: remembered for the rings, and the host port's
    /// offloads narrowed to what the guest accepts.
    pub(crate) fn set_acked(&self, features: u64) {
        self.shared
            .conn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .acked = features;
        let mut tun = 0;
        if features & F_GUEST_CSUM != 0 {
            tun |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                tun |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                tun |= TUN_F_TSO6;
            }
            if features & F_GUEST_ECN != 0 {
                tun |= TUN_F_TSO_ECN;
            }
        }
        for pair in &self.shared.pairs {
            if let Err(e) = lock(pair).host.set_offloads(tun) {
                tracing::warn!(port = %self.shared.cfg.name, "cannot set the host port's offloads to {tun:#x}: {e}");
            }
        }
    }

    /// GET_VRING_BASE on `queue`: the frontend is stopping it (pause, snapshot,
    /// reset). A stopped receive queue's frames wait in the hold.
    pub(crate) fn stop_queue(&self, queue: usize) {
        let pair = queue / 2;
        let Some(p) = self.shared.pairs.get(pair) else {
            return;
        };
        // Wait out a worker mid-batch (either direction): once this returns, every
        // chain it took is completed, so the ring position handed back is exact.
        let _guard = lock(p);
        if queue.is_multiple_of(2) {
            self.shared.rx_state[pair].store(DETACHED, Ordering::Release);
            let _ = self.shared.keeper_wake.write(1);
        }
    }

    /// Whether the host side steers inbound flows to pair `i` (when a frontend serves
    /// its rings). Pair 0 always stays: with no frontend at all, inbound frames arrive
    /// there and the keeper holds them.
    pub(crate) fn set_pair_attached(&self, i: usize, attached: bool) {
        if i == 0 || i >= self.shared.pairs.len() {
            return;
        }
        let mut pair = lock(&self.shared.pairs[i]);
        if !attached {
            // Detaching a TAP queue purges what waits in it: hold that first.
            self.shared.drain_to_hold(&mut pair);
        }
        if let Err(e) = pair.host.set_attached(attached) {
            tracing::warn!(port = %self.shared.cfg.name, pair = i, "TUNSETQUEUE: {e}");
        }
    }

    /// Pair `i`'s host port fd (edge-triggered readable when frames arrive) and its
    /// "come back" events (rx, tx), for the pair's worker to watch.
    pub(crate) fn pair_fds(&self, i: usize) -> (RawFd, RawFd, RawFd) {
        let ev = &self.shared.events[i];
        (
            self.shared.host_fds[i],
            ev.rx_again.as_raw_fd(),
            ev.tx_again.as_raw_fd(),
        )
    }

    /// Asks pair `i`'s worker to look at both rings (a ring just started or was
    /// enabled: buffers may be waiting without a kick).
    pub(crate) fn nudge(&self, i: usize) {
        if let Some(ev) = self.shared.events.get(i) {
            let _ = ev.rx_again.write(1);
            let _ = ev.tx_again.write(1);
        }
    }

    /// Pair `i`'s receive side: held frames, then the host port's, into `vring`.
    pub(crate) fn rx(&self, i: usize, vring: &VringRwLock, again: bool) {
        if again {
            let _ = self.shared.events[i].rx_again.read();
        }
        self.shared.process_rx(i, vring);
    }

    /// Pair `i`'s transmit side: guest frames from `vring` to the host port.
    pub(crate) fn tx(&self, i: usize, vring: &VringRwLock, again: bool) {
        if again {
            let _ = self.shared.events[i].tx_again.read();
        }
        self.shared.process_tx(i, vring);
    }

    pub fn stats(&self) -> PortStats {
        let s = &self.shared;
        let c = &s.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let hold = lock(&s.hold);
        PortStats {
            name: s.cfg.name.clone(),
            attached: s
                .rx_state
                .iter()
                .any(|r| r.load(Ordering::Acquire) != DETACHED),
            connections: get(&c.connections),
            queue_pairs: s.cfg.queue_pairs,
            rx_packets: get(&c.rx_packets),
            rx_bytes: get(&c.rx_bytes),
            tx_packets: get(&c.tx_packets),
            tx_bytes: get(&c.tx_bytes),
            held_frames: hold.len(),
            held_bytes: hold.bytes(),
            rx_held: get(&c.rx_held),
            rx_drop_hold_full: get(&c.rx_drop_hold_full),
            rx_drop_too_big: get(&c.rx_drop_too_big),
            rx_drop_malformed: get(&c.rx_drop_malformed),
            tx_drop_runt: get(&c.tx_drop_runt),
            tx_drop_spoofed_mac: get(&c.tx_drop_spoofed_mac),
            tx_drop_spoofed_ip: get(&c.tx_drop_spoofed_ip),
            tx_drop_spoofed_arp: get(&c.tx_drop_spoofed_arp),
            tx_drop_ethertype: get(&c.tx_drop_ethertype),
            tx_drop_malformed: get(&c.tx_drop_malformed),
            tx_errors: get(&c.tx_errors),
            ring_errors: get(&c.ring_errors),
        }
    }
}

impl<H: HostPort> Shared<H> {
    fn mem(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .mem
            .clone()
    }

    fn acked(&self) -> u64 {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).acked
    }

    /// The keeper: while a receive queue cannot take frames, reads its host port into
    /// the hold (dropping and counting past the bound), and nudges a flowing queue to
    /// deliver what is held.
    fn keep(&self) {
        let mut fds = Vec::with_capacity(self.pairs.len() + 1);
        while !self.closing.load(Ordering::Acquire) {
            fds.clear();
            fds.push(libc::pollfd {
                fd: self.keeper_wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for (i, fd) in self.host_fds.iter().enumerate() {
                if self.rx_state[i].load(Ordering::Acquire) != FLOWING {
                    fds.push(libc::pollfd {
                        fd: *fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    KEEPER_TICK.as_millis() as i32,
                )
            };
            if n <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                let _ = self.keeper_wake.read();
            }
            for p in &fds[1..] {
                if p.revents == 0 {
                    continue;
                }
                let Some(i) = self.host_fds.iter().position(|fd| *fd == p.fd) else {
                    continue;
                };
                self.hold_from(i);
            }
            if !lock(&self.hold).is_empty() {
                for (i, s) in self.rx_state.iter().enumerate() {
                    if s.load(Ordering::Acquire) == FLOWING {
                        let _ = self.events[i].rx_again.write(1);
                    }
                }
            }
        }
    }

    /// Reads what waits on pair `i`'s host port into the hold.
    fn hold_from(&self, i: usize) {
        let mut pair = lock(&self.pairs[i]);
        if self.rx_state[i].load(Ordering::Acquire) == FLOWING {
            return;
        }
        let held = self.drain_to_hold(&mut pair);
        drop(pair);
        // Frames wait and no frontend is attached at all: the VM is away (paused,
        // suspended, restarting). Say so once, for whoever wakes VMs.
        let absent = self
            .rx_state
            .iter()
            .all(|s| s.load(Ordering::Acquire) == DETACHED);
        if held && absent && !self.announced.swap(true, Ordering::AcqRel) {
            tracing::info!(port = %self.cfg.name, "frames are waiting for an absent VM");
            self.bus.publish(&Event::waiting(&self.cfg.name));
        }
    }

    /// Reads what waits on a pair's host port (at most a batch) into the hold; true
    /// when something was held.
    fn drain_to_hold(&self, pair: &mut Pair<H>) -> bool {
        let Pair { host, buf, .. } = pair;
        let mut held = false;
        for _ in 0..BATCH_MAX {
            match host.recv(buf) {
                Ok(n) if n >= VNET_HDR_LEN => {
                    if lock(&self.hold).push(buf[..n].to_vec()) {
                        bump(&self.counters.rx_held);
                        held = true;
                    } else {
                        bump(&self.counters.rx_drop_hold_full);
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        held
    }

    fn ring_error(&self, what: &str, e: impl std::fmt::Display) {
        if self.counters.ring_errors.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(port = %self.cfg.name, "{what}: {e} (the guest's ring is broken; counted from now on)");
        }
    }

    /// Guest transmit on pair `i`: every chain is one frame with its virtio-net header,
    /// checked against the port's identity before it reaches the host.
    fn process_tx(&self, i: usize, vring: &VringRwLock) {
        let Some(mem) = self.mem() else { return };
        let mem = mem.memory();
        let c = &self.counters;
        let mut pair = lock(&self.pairs[i]);
        // Checked under the pair lock: a ring stopped meanwhile (stop_queue takes the
        // same lock) is not touched again.
        if !serviceable(vring) {
            return;
        }
        let Pair { host, tx, iov, .. } = &mut *pair;
        let mut used = false;
        let mut done = false;
        if let Err(e) = vring.disable_notification() {
            return self.ring_error("tx: disable notification", e);
        }
        for _ in 0..BATCH_MAX {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                match vring.enable_notification() {
                    // The driver added more meanwhile, or its avail index is out of
                    // range (then popping fails for good: stop, the ring is broken).
                    Ok(true) => {
                        if vring.get_mut().get_queue_mut().iter(mem.clone()).is_err() {
                            self.ring_error("tx: avail ring", "index out of range");
                            done = true;
                            break;
                        }
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => self.ring_error("tx: enable notification", e),
                }
                done = true;
                break;
            };
            let head = chain.head_index();
            let verdict = chain::map_tx(chain, tx, FRAME_MAX)
                .map_err(|_| None)
                .and_then(|n| {
                    filter::check(&tx.head[..tx.head_len], &self.cfg.identity)
                        .map(|()| n)
                        .map_err(Some)
                });
            match verdict {
                Ok(n) => {
                    // The checked head from our copy, the rest from guest memory.
                    iov.clear();
                    iov.push(libc::iovec {
                        iov_base: tx.head.as_mut_ptr().cast(),
                        iov_len: tx.head_len,
                    });
                    iov.extend_from_slice(&tx.iov);
                    // SAFETY: the head is our buffer; the rest points into guest memory
                    // kept mapped by `mem`, held across this call.
                    match unsafe { host.send_iov(iov, n) } {
                        Ok(()) => {
                            bump(&c.tx_packets);
                            c.tx_bytes
                                .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                        }
                        Err(_) => bump(&c.tx_errors),
                    }
                }
                Err(None) => bump(&c.tx_drop_malformed),
                Err(Some(filter::Drop::Runt)) => bump(&c.tx_drop_runt),
                Err(Some(filter::Drop::SpoofedMac)) => bump(&c.tx_drop_spoofed_mac),
                Err(Some(filter::Drop::SpoofedIp)) => bump(&c.tx_drop_spoofed_ip),
                Err(Some(filter::Drop::SpoofedArp)) => bump(&c.tx_drop_spoofed_arp),
                Err(Some(filter::Drop::Ethertype)) => bump(&c.tx_drop_ethertype),
            }
            if let Err(e) = vring.add_used(head, 0) {
                return self.ring_error("tx: used ring", e);
            }
            used = true;
        }
        if !done {
            // Work left and notifications off: come back after the others had a turn.
            let _ = self.events[i].tx_again.write(1);
        }
        if used && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }

    /// Guest receive on pair `i`: held frames first, then the host port's, into the
    /// guest's rx buffers, spread over several buffers when mergeable rx buffers were
    /// negotiated. A frame that does not fit yet goes to the hold, and the pair stalls
    /// until the guest adds buffers.
    fn process_rx(&self, i: usize, vring: &VringRwLock) {
        let Some(mem) = self.mem() else { return };
        let mem = mem.memory();
        let mrg = self.acked() & F_MRG_RXBUF != 0;
        let c = &self.counters;
        let mut pair = lock(&self.pairs[i]);
        // Checked under the pair lock: stop_queue takes it too, so a queue stopped
        // meanwhile stays detached (and its frames go to the hold).
        if !serviceable(vring) {
            return; // stopped (GET_VRING_BASE), disabled or not set up yet
        }
        if self.rx_state[i].swap(FLOWING, Ordering::AcqRel) != FLOWING {
            // The VM is back: a later absence is announced again.
            self.announced.store(false, Ordering::Release);
        }
        let Pair { host, buf, .. } = &mut *pair;
        let mut used = false;
        let mut done = false;
        for _ in 0..BATCH_MAX {
            let mut held = lock(&self.hold).pop();
            let from_hold = held.is_some();
            // A frame straight from the host port stays in the pair's buffer; it is
            // copied out only if it has to wait in the hold.
            let frame: &mut [u8] = match held.as_mut() {
                Some(f) => f,
                None => match host.recv(buf) {
                    Ok(n) if n >= VNET_HDR_LEN => &mut buf[..n],
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        done = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(port = %self.cfg.name, "host port read: {e}");
                        done = true;
                        break;
                    }
                },
            };
            // Collect enough buffers for the whole frame before writing any of it. A
            // malformed buffer is set aside: it goes back to the guest (used, empty)
            // just before the frame's buffers, so nothing is rewound past it.
            let mut chains = Vec::new();
            let mut bad = Vec::new();
            let mut room = 0usize;
            let mut state = vring.get_mut();
            let ring_size = usize::from(state.get_queue().size());
            while room < frame.len()
                && (chains.is_empty() || mrg)
                && chains.len() + bad.len() < ring_size
            {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                match chain::rx_room(chain.clone()) {
                    Ok(cap) => {
                        room += cap;
                        chains.push((chain, cap));
                    }
                    Err(_) => bad.push(chain.head_index()),
                }
            }
            if room < frame.len() && chains.is_empty() && !bad.is_empty() {
                // Only malformed buffers so far: nothing good to rewind past, so they
                // go back now (else a guest posting only bad buffers keeps us busy),
                // and the frame tries again first thing.
                let mut ring_ok = true;
                for head in bad.drain(..) {
                    bump(&c.rx_drop_malformed);
                    if let Err(e) = state.add_used(head, 0) {
                        self.ring_error("rx: used ring", e);
                        ring_ok = false;
                        break;
                    }
                }
                drop(state);
                used = true;
                lock(&self.hold).unpop(frame.to_vec());
                if !ring_ok {
                    done = true;
                    break;
                }
                continue;
            }
            let mut broken = false;
            if room < frame.len() {
                let exhausted =
                    chains.len() + bad.len() == ring_size || (!mrg && !chains.is_empty());
                for _ in 0..chains.len() + bad.len() {
                    state.get_queue_mut().go_to_previous_position();
                }
                if !exhausted && state.get_queue_mut().iter(mem.clone()).is_err() {
                    broken = true;
                    self.ring_error("rx: avail ring", "index out of range");
                }
                drop(state);
                if exhausted {
                    // It can never fit (no mergeable buffers and a small buffer).
                    bump(&c.rx_drop_too_big);
                    continue;
                }
                // Out of buffers: the frame waits in the hold, in its place.
                let mut hold = lock(&self.hold);
                if from_hold {
                    hold.unpop(frame.to_vec());
                } else if hold.push(frame.to_vec()) {
                    bump(&c.rx_held);
                } else {
                    bump(&c.rx_drop_hold_full);
                }
                drop(hold);
                if broken {
                    done = true;
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) => continue, // the guest added buffers meanwhile
                    Ok(false) => {}
                    Err(e) => self.ring_error("rx: enable notification", e),
                }
                self.rx_state[i].store(STALLED, Ordering::Release);
                let _ = self.keeper_wake.write(1);
                done = true;
                break;
            }
            let mut ring_ok = true;
            for head in bad {
                bump(&c.rx_drop_malformed);
                if let Err(e) = state.add_used(head, 0) {
                    self.ring_error("rx: used ring", e);
                    ring_ok = false;
                    break;
                }
                used = true;
            }
            drop(state);
            if !ring_ok {
                done = true;
                break;
            }
            // num_buffers (bytes 10..12 of the header) says how many buffers follow.
            let buffers = chains.len() as u16;
            frame[10..12].copy_from_slice(&buffers.to_le_bytes());
            let mut offset = 0;
            for (chain, cap) in chains {
                let head = chain.head_index();
                let n = cap.min(frame.len() - offset);
                let written = chain::write_rx(chain, &frame[offset..offset + n]).unwrap_or(0);
                offset += n;
                if let Err(e) = vring.add_used(head, written as u32) {
                    self.ring_error("rx: used ring", e);
                    break;
                }
                if offset == frame.len() {
                    break;
                }
            }
            used = true;
            bump(&c.rx_packets);
            c.rx_bytes
                .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        }
        if !done {
            // The host port is edge-triggered: frames left unread would wait for the
            // next arrival, so come back for them after the others had a turn.
            let _ = self.events[i].rx_again.write(1);
        }
        if used && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }
}
