//! virtio-vsock (virtio 1.2, 5.10): the device and its worker moving packets between
//! the guest's queues and the [`Muxer`].

use super::muxer::{LISTENER_TOKEN, Muxer, PAYLOAD_MAX};
use super::packet::{HEADER_LEN, Header};
use crate::devices::virtio::worker::{AsRawFdExt, Handler, Registrar, Worker};
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, read_config_bytes,
};
use crate::memory::GuestMemory;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

/// The guest CID every boxd VM gets: each VM has its own vsock device, so they never
/// meet, and a fixed CID keeps forks and restores identical.
pub const GUEST_CID: u64 = 3;

pub struct Vsock {
    uds: PathBuf,
    /// The muxer lives across driver resets (host clients keep their sockets).
    muxer: Arc<Mutex<Option<Muxer>>>,
    config: [u8; 8],
    worker: Option<Worker>,
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
                EVQ => ev = Some(kick),
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
            ev_kick: ev,
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
}

struct VsockWorker {
    mem: GuestMemory,
    rx: Queue,
    rx_kick: EventFd,
    tx: Queue,
    tx_kick: EventFd,
    ev_kick: Option<EventFd>,
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
        if let Some(k) = &self.ev_kick {
            reg.add(k.as_raw_fd_(), EV_KICK, EventSet::IN)?;
        }
        let fd = self
            .muxer
            .as_ref()
            .expect("set at activation")
            .listener_fd();
        reg.add(fd, LISTENER_TOKEN, EventSet::IN)?;
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
                // The event queue only carries transport resets, which we never send.
                if let Some(k) = &self.ev_kick {
                    let _ = k.read();
                }
            }
            LISTENER_TOKEN => self.muxer().accept(reg),
            t => self.muxer().event(reg, t, events),
        }
        self.process_rx(reg);
    }
}

impl VsockWorker {
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
