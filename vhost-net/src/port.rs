//! One VM's port: the vhost-user virtio-net device behind one socket, moving frames
//! between the guest's virtqueues and a [`HostPort`].
//!
//! First version: one queue pair, frames copied through a bounce buffer. Offloads
//! (checksum, TSO both ways, mergeable rx buffers, event index) are negotiated, so the
//! guest and the host kernel exchange 64 KiB segments, not 1500-byte packets.

use crate::tap::{HostPort, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// The virtio-net features this backend implements (the frontend adds the ones it
/// serves itself, such as MAC and STATUS).
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

const RXQ: u16 = 0;
const TXQ: u16 = 1;
const QUEUE_SIZE: usize = 256;
/// Event token of the host port's fd (0..=2 are the queues and the exit event),
/// registered edge-triggered: it fires when frames arrive, and rx drains the port.
pub const HOST_PORT_EVENT: u64 = 3;
/// A direction that stopped at BATCH_MAX with work left reschedules itself here.
pub const RX_AGAIN_EVENT: u64 = 4;
pub const TX_AGAIN_EVENT: u64 = 5;
/// Largest frame either way: a 64 KiB GSO segment, its headers, the virtio-net header.
const FRAME_MAX: usize = 65_562 + VNET_HDR_LEN;
/// Frames handled per event before yielding, so one busy direction cannot starve
/// the other.
const BATCH_MAX: usize = 256;

#[derive(Default, Debug)]
pub struct PortStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_dropped_too_big: AtomicU64,
    pub tx_dropped_malformed: AtomicU64,
    pub tx_errors: AtomicU64,
}

pub struct Port<H: HostPort> {
    host: H,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    acked: u64,
    event_idx: bool,
    exit: (EventConsumer, EventNotifier),
    /// A frame read from the host port that did not fit the guest's buffers yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    rx_again: vmm_sys_util::eventfd::EventFd,
    tx_again: vmm_sys_util::eventfd::EventFd,
    pub stats: Arc<PortStats>,
}

impl<H: HostPort> Port<H> {
    pub fn new(host: H) -> io::Result<Self> {
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(Self {
            host,
            mem: None,
            acked: 0,
            event_idx: false,
            exit,
            pending: None,
            buf: vec![0; FRAME_MAX],
            rx_again: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
            tx_again: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
            stats: Arc::default(),
        })
    }

    /// Forgets the previous frontend: a new connection starts with fresh negotiation,
    /// memory and a fresh exit event (the old one was signalled when the old
    /// connection's worker threads were told to stop, and would stop the new ones too).
    pub fn new_connection(&mut self) -> io::Result<()> {
        self.exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        self.mem = None;
        self.acked = 0;
        self.event_idx = false;
        Ok(())
    }

    /// The fds the daemon's event loop must watch besides the queues, with their tokens
    /// and whether they are edge-triggered.
    pub fn listeners(&self) -> [(std::os::fd::RawFd, u64, EventSet); 3] {
        use std::os::fd::AsRawFd;
        [
            (
                self.host.fd(),
                HOST_PORT_EVENT,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.rx_again.as_raw_fd(), RX_AGAIN_EVENT, EventSet::IN),
            (self.tx_again.as_raw_fd(), TX_AGAIN_EVENT, EventSet::IN),
        ]
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked & F_MRG_RXBUF != 0
    }

    /// Guest transmit: every chain is one frame with its virtio-net header.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut used = false;
        let mut done = false;
        vring.disable_notification().map_err(io::Error::other)?;
        for _ in 0..BATCH_MAX {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                if vring.enable_notification().map_err(io::Error::other)? {
                    continue; // the driver added more meanwhile
                }
                done = true;
                break;
            };
            let head = chain.head_index();
            let len = match chain.clone().reader(&mem) {
                Ok(mut r)
                    if r.available_bytes() >= VNET_HDR_LEN && r.available_bytes() <= FRAME_MAX =>
                {
                    let n = r.available_bytes();
                    r.read_exact(&mut self.buf[..n]).map(|()| n).ok()
                }
                _ => None,
            };
            match len {
                Some(n) => match self.host.send(&self.buf[..n]) {
                    Ok(()) => {
                        self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .tx_bytes
                            .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
                None => {
                    self.stats
                        .tx_dropped_malformed
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            vring.add_used(head, 0).map_err(io::Error::other)?;
            used = true;
        }
        if !done {
            // Work left and notifications off: come back after the others had a turn.
            self.tx_again.write(1)?;
        }
        if used && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Guest receive: frames from the host port into the guest's rx buffers, spread
    /// over several buffers when mergeable rx buffers were negotiated.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut used = false;
        let mut done = false;
        for _ in 0..BATCH_MAX {
            let mut frame = match self.pending.take() {
                Some(f) => f,
                None => match self.host.recv(&mut self.buf) {
                    Ok(n) if n >= VNET_HDR_LEN => self.buf[..n].to_vec(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        done = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                },
            };
            // Collect enough buffers for the whole frame before writing any of it.
            let mut chains = Vec::new();
            let mut room = 0usize;
            let mut queue = vring.get_mut();
            while room < frame.len()
                && (chains.is_empty() || self.mrg_rxbuf())
                && chains.len() < QUEUE_SIZE
            {
                let Some(chain) = queue.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let cap = chain
                    .clone()
                    .writer(&mem)
                    .map(|w| w.available_bytes())
                    .unwrap_or(0);
                room += cap;
                chains.push((chain, cap));
            }
            if room < frame.len() {
                let exhausted =
                    chains.len() == QUEUE_SIZE || (!self.mrg_rxbuf() && !chains.is_empty());
                for _ in 0..chains.len() {
                    queue.get_queue_mut().go_to_previous_position();
                }
                drop(queue);
                if exhausted {
                    // It can never fit (no mergeable buffers and a small buffer).
                    self.stats
                        .rx_dropped_too_big
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Out of buffers: keep the frame and wait for the guest's next kick.
                self.pending = Some(frame);
                if vring.enable_notification().map_err(io::Error::other)? {
                    continue;
                }
                done = true;
                break;
            }
            drop(queue);
            // num_buffers (bytes 10..12 of the header) says how many buffers follow.
            frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
            let mut offset = 0;
            for (chain, cap) in chains {
                let head = chain.head_index();
                let n = cap.min(frame.len() - offset);
                let mut w = chain.writer(&mem).map_err(io::Error::other)?;
                w.write_all(&frame[offset..offset + n])?;
                offset += n;
                vring.add_used(head, n as u32).map_err(io::Error::other)?;
                if offset == frame.len() {
                    break;
                }
            }
            used = true;
            self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
            self.stats
                .rx_bytes
                .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        }
        if !done {
            // The port is edge-triggered: frames left unread would wait for the next
            // arrival, so come back for them after the others had a turn.
            self.rx_again.write(1)?;
        }
        if used && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl<H: HostPort + Sync + 'static> VhostUserBackendMut for Port<H> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features;
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
        if let Err(e) = self.host.set_offloads(tun) {
            tracing::warn!("cannot set the host port's offloads to {tun:#x}: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let (rx, tx) = (&vrings[RXQ as usize], &vrings[TXQ as usize]);
        match u64::from(device_event) {
            RX_AGAIN_EVENT => {
                let _ = self.rx_again.read();
                self.process_rx(rx)
            }
            TX_AGAIN_EVENT => {
                let _ = self.tx_again.read();
                self.process_tx(tx)
            }
            e if e == u64::from(RXQ) || e == HOST_PORT_EVENT => self.process_rx(rx),
            e if e == u64::from(TXQ) => self.process_tx(tx),
            _ => Ok(()),
        }
    }
}
