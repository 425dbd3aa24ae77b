//! virtio-vsock (virtio 1.2, 5.10): the device and its worker moving packets between
//! the guest's queues and the [`Muxer`].

use super::muxer::{LISTENER_TOKEN, Muxer, PAYLOAD_MAX};
use super::packet::{HEADER_LEN, Header};
use crate::devices::virtio::worker::{AsRawFdExt, Handler, Registrar, Worker};
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, Start, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice, read_config_bytes,
};
use crate::memory::GuestMemory;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// struct virtio_vsock_event's id for "every connection is gone, re-read the CID".
const EVENT_TRANSPORT_RESET: u32 = 0;

/// The guest CID every boxd VM gets: each VM has its own vsock device, so they never
/// meet, and a fixed CID keeps forks and restores identical.
pub const GUEST_CID: u64 = 3;

pub struct Vsock {
    uds: PathBuf,
    /// The muxer lives across driver resets (host clients keep their sockets).
    muxer: Arc<Mutex<Option<Muxer>>>,
    config: [u8; 8],
    worker: Option<Worker<VsockWorker>>,
}

impl Vsock {
    /// Binds the host socket now, so that a bad path fails at VM creation.
    pub fn new(uds: &Path) -> std::io::Result<Self> {
        let muxer = Muxer::bind(uds, GUEST_CID)?;
        Ok(Self {
            uds: uds.to_path_buf(),
            muxer: Arc::new(Mutex::new(Some(muxer))),
            config: GUEST_CID.to_le_bytes(),
            worker: None,
        })
    }

    pub fn uds(&self) -> &Path {
        &self.uds
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &'static str {
        "vsock"
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut rx = None;
        let mut tx = None;
        let mut ev = None;
        for (i, q, kick) in a.queues {
            match i {
                RXQ => rx = Some((q, kick)),
                TXQ => tx = Some((q, kick)),
                EVQ => ev = Some((q, kick)),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::Bad {
                device: "vsock",
                reason: "rx and tx queues must be enabled".into(),
            });
        };
        let muxer = crate::devices::bus::lock(&self.muxer)
            .take()
            .ok_or(ActivateError::Bad {
                device: "vsock",
                reason: "activated twice without a reset".into(),
            })?;
        let handler = VsockWorker {
            mem: a.mem,
            rx: rx.0,
            rx_kick: rx.1,
            tx: tx.0,
            tx_kick: tx.1,
            ev,
            reset_pending: a.start == Start::Restore,
            interrupt: a.interrupt,
            muxer: Some(muxer),
            home: self.muxer.clone(),
            payload: Vec::with_capacity(PAYLOAD_MAX),
        };
        self.worker = Some(
            Worker::spawn("virtio-vsock".into(), handler).map_err(|source| ActivateError::Io {
                device: "vsock",
                source,
            })?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker hands the muxer back (see VsockWorker's Drop).
        self.worker = None;
    }

    /// The worker moves whole packets between the rings and the muxer, so once it
    /// stops no buffer is half used. The muxer (host sockets and what they have not
    /// read yet) comes back to the device: a resume in this VMM goes on with it.
    fn quiesce(&mut self) -> Result<Vec<(usize, QueueState)>, String> {
        let Some(worker) = self.worker.take() else {
            return Ok(Vec::new());
        };
        let handler = worker
            .stop()
            .ok_or("its worker thread had panicked; the queue positions are unknown")?;
        let mut queues = vec![(RXQ, handler.rx.state()), (TXQ, handler.tx.state())];
        if let Some((q, _)) = &handler.ev {
            queues.push((EVQ, q.state()));
        }
        Ok(queues)
    }
}

struct VsockWorker {
    mem: GuestMemory,
    rx: Queue,
    rx_kick: EventFd,
    tx: Queue,
    tx_kick: EventFd,
    ev: Option<(Queue, EventFd)>,
    /// Restored in a new VMM: the guest's connections have no host end any more; the
    /// first thing the worker does is tell the driver (a transport reset event), which
    /// closes them, so the agent reconnects instead of waiting on a dead stream.
    reset_pending: bool,
    interrupt: Arc<Interrupt>,
    muxer: Option<Muxer>,
    home: Arc<Mutex<Option<Muxer>>>,
    payload: Vec<u8>,
}

impl Drop for VsockWorker {
    fn drop(&mut self) {
        *crate::devices::bus::lock(&self.home) = self.muxer.take();
    }
}

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const EV_KICK: u64 = 2;

impl Handler for VsockWorker {
    fn init(&mut self, reg: &Registrar) -> std::io::Result<()> {
        reg.add(self.rx_kick.as_raw_fd_(), RX_KICK, EventSet::IN)?;
        reg.add(self.tx_kick.as_raw_fd_(), TX_KICK, EventSet::IN)?;
        if let Some((_, k)) = &self.ev {
            reg.add(k.as_raw_fd_(), EV_KICK, EventSet::IN)?;
        }
        let fd = self
            .muxer
            .as_ref()
            .expect("set at activation")
            .listener_fd();
        reg.add(fd, LISTENER_TOKEN, EventSet::IN)?;
        if self.reset_pending {
            self.send_transport_reset();
        }
        self.process_tx(reg);
        self.process_rx(reg);
        Ok(())
    }

    fn handle(&mut self, reg: &Registrar, token: u64, events: EventSet) {
        match token {
            RX_KICK => {
                // New rx buffers: process_rx below fills them.
                let _ = self.rx_kick.read();
            }
            TX_KICK => {
                let _ = self.tx_kick.read();
                self.process_tx(reg);
            }
            EV_KICK => {
                // The driver gave an event buffer back: a reset that found none waits
                // for it.
                if let Some((_, k)) = &self.ev {
                    let _ = k.read();
                }
                if self.reset_pending {
                    self.send_transport_reset();
                }
            }
            LISTENER_TOKEN => self.muxer().accept(reg),
            t => self.muxer().event(reg, t, events),
        }
        self.process_rx(reg);
    }
}

impl VsockWorker {
    /// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the event queue (virtio 1.2,
    /// 5.10.6.7); stays pending while the driver has no event buffer posted.
    fn send_transport_reset(&mut self) {
        let Some((q, _)) = self.ev.as_mut() else {
            tracing::warn!(
                "vsock: the driver has no event queue; it cannot be told of the restore"
            );
            self.reset_pending = false;
            return;
        };
        let mem = &self.mem;
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= 4 => {
                w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
            }
            _ => false,
        };
        if !written {
            tracing::warn!("vsock: the driver's event buffer is too small for an event");
        }
        if q.add_used(mem, head, if written { 4 } else { 0 }).is_ok() {
            self.interrupt.signal_used();
        }
        self.reset_pending = !written;
    }

    fn muxer(&mut self) -> &mut Muxer {
        self.muxer
            .as_mut()
            .expect("the worker owns the muxer while it runs")
    }

    /// Guest-to-host packets.
    fn process_tx(&mut self, reg: &Registrar) {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            if self.tx.disable_notification(&mem).is_err() {
                return;
            }
            for _ in 0..QUEUE_SIZE {
                let Some(chain) = self.tx.pop_descriptor_chain(&mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Some(hdr) = read_packet(&mem, chain, &mut self.payload) {
                    let payload = std::mem::take(&mut self.payload);
                    self.muxer().on_guest_packet(reg, &hdr, &payload);
                    self.payload = payload;
                }
                if self.tx.add_used(&mem, head, 0).is_err() {
                    return;
                }
                used = true;
            }
            match self.tx.enable_notification(&mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used && self.tx.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }

    /// Host-to-guest packets, as long as the guest has rx buffers.
    fn process_rx(&mut self, reg: &Registrar) {
        let mem = self.mem.clone();
        let mut used = false;
        // A few rounds at most: each ends when the ring is empty and the driver has not
        // added buffers since notifications were re-armed.
        for _ in 0..4 {
            let mut ring_empty = false;
            for _ in 0..QUEUE_SIZE {
                if !self.muxer().has_rx() {
                    break;
                }
                let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                    ring_empty = true;
                    break;
                };
                let head = chain.head_index();
                let Ok(mut writer) = chain.writer(&mem) else {
                    let _ = self.rx.add_used(&mem, head, 0);
                    continue;
                };
                let room = writer
                    .available_bytes()
                    .saturating_sub(HEADER_LEN)
                    .min(PAYLOAD_MAX);
                let mut payload = std::mem::take(&mut self.payload);
                let packet = self.muxer().next_rx(reg, room, &mut payload);
                let len = match packet {
                    Some(hdr) if writer.available_bytes() >= HEADER_LEN => {
                        let ok = writer
                            .write_all(&hdr.to_bytes())
                            .and_then(|()| writer.write_all(&payload));
                        if ok.is_ok() {
                            (HEADER_LEN + payload.len()) as u32
                        } else {
                            0
                        }
                    }
                    Some(_) => {
                        tracing::warn!("vsock: guest rx buffer smaller than a packet header");
                        0
                    }
                    None => {
                        // Nothing to send after all: give the buffer back unused.
                        self.rx.go_to_previous_position();
                        self.payload = payload;
                        break;
                    }
                };
                self.payload = payload;
                if self.rx.add_used(&mem, head, len).is_err() {
                    return;
                }
                used = true;
            }
            // Out of buffers with packets waiting: ask the driver to kick us when it
            // adds some, and go again if it already did.
            if !(ring_empty
                && self.muxer().has_rx()
                && self.rx.enable_notification(&mem).unwrap_or(false))
            {
                break;
            }
        }
        if used && self.rx.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }
}

/// Reads a header and its payload (at most PAYLOAD_MAX) from a tx chain.
fn read_packet(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    payload: &mut Vec<u8>,
) -> Option<Header> {
    let mut reader = chain.reader(mem).ok()?;
    let mut raw = [0u8; HEADER_LEN];
    reader.read_exact(&mut raw).ok()?;
    let hdr = Header::parse(&raw);
    let len = hdr.len as usize;
    if len > PAYLOAD_MAX || len > reader.available_bytes() {
        tracing::warn!(len, "vsock: dropped a guest packet with a bad length");
        return None;
    }
    payload.resize(len, 0);
    reader.read_exact(payload).ok()?;
    Some(hdr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    /// Activates a vsock device on three mock queues with one 8-byte event buffer
    /// posted; returns the memory, the event queue and the device.
    fn start(
        name: &str,
        start: Start,
    ) -> (GuestMemory, MockSplitQueue<'static, GuestMemory>, Vsock) {
        let mem: &'static GuestMemory = Box::leak(Box::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x2_0000), 16);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x3_0000), 16);
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x8_0000))
            .unwrap();
        ev.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x8_0000,
                8,
                VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .unwrap();
        let uds =
            std::env::temp_dir().join(format!("boxd-vsock-{name}-{}.sock", std::process::id()));
        let mut dev = Vsock::new(&uds).unwrap();
        let kick = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                (RXQ, rx.create_queue().unwrap(), kick()),
                (TXQ, tx.create_queue().unwrap(), kick()),
                (EVQ, ev.create_queue().unwrap(), kick()),
            ],
            interrupt: Arc::new(Interrupt::new(kick(), false)),
            features: VIRTIO_F_VERSION_1,
            start,
        })
        .unwrap();
        (mem.clone(), ev, dev)
    }

    #[test]
    fn a_restored_device_tells_the_driver_its_connections_are_gone() {
        let (mem, ev, mut dev) = start("restore", Start::Restore);
        let used: u16 = mem.read_obj(ev.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used, 1, "the event buffer came back");
        let len: u32 = mem.read_obj(ev.used_addr().unchecked_add(4 + 4)).unwrap();
        assert_eq!(len, 4);
        let id: u32 = mem.read_obj(GuestAddress(0x8_0000)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        let queues = dev.quiesce().unwrap();
        let evq = queues.iter().find(|(i, _)| *i == EVQ).unwrap().1;
        assert_eq!((evq.next_avail, evq.next_used), (1, 1));
    }

    #[test]
    fn a_fresh_or_resumed_device_sends_no_reset() {
        for (name, s) in [("fresh", Start::Fresh), ("resume", Start::Resume)] {
            let (mem, ev, _dev) = start(name, s);
            let used: u16 = mem.read_obj(ev.used_addr().unchecked_add(2)).unwrap();
            assert_eq!(used, 0, "{name}: the event buffer stays with the device");
        }
    }
}
