//! virtio devices behind the virtio-mmio transport (virtio 1.2, section 4.2).
//!
//! A device says what it is (type, queues, features, config space) and gets its queues
//! when the driver sets DRIVER_OK; from then on its own worker thread serves them, woken
//! by the queue-notify ioeventfds KVM signals, and raises the device's irqfd when it
//! has used buffers. The transport is the only code that sees the register file.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod vsock;
pub mod worker;

use crate::memory::GuestMemory;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// The interrupt a device raises: a status word the driver reads and acks through the
/// transport, and the irqfd that injects the device's GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// vhost-user devices signal the irqfd directly, bypassing `status`; for them the
    /// transport reports "used buffer" always set so the driver checks its queues.
    always_used: bool,
}

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

impl Interrupt {
    pub fn new(irqfd: EventFd, always_used: bool) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            always_used,
        }
    }

    /// Tells the driver a queue has used buffers.
    pub fn signal_used(&self) {
        self.signal(INT_USED_RING);
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!("cannot inject a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        let s = self.status.load(Ordering::SeqCst);
        if self.always_used {
            s | INT_USED_RING
        } else {
            s
        }
    }

    /// The raw status word (without the vhost-user "always used" bit), for a snapshot.
    pub fn raw_status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn set_raw_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemory,
    /// The queues the driver enabled, in queue-index order, each with the ioeventfd
    /// KVM signals when the driver notifies it.
    pub queues: Vec<(usize, Queue, EventFd)>,
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub features: u64,
    /// Whether the queues start fresh or continue from a snapshot.
    pub start: Start,
}

/// How an activation relates to what ran before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The driver set DRIVER_OK: the queues start at zero.
    Fresh,
    /// The same VMM goes on after a snapshot: the queues continue where `quiesce`
    /// stopped them and the device's peers are still there.
    Resume,
    /// A new VMM continues a snapshot: the queues continue, but what the device's
    /// peers knew (the host ends of vsock connections) is gone and the device says so.
    Restore,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("virtio {device}: {reason}")]
    Bad {
        device: &'static str,
        reason: String,
    },
    #[error("virtio {device}: cannot start its worker: {source}")]
    Io {
        device: &'static str,
        source: std::io::Error,
    },
}

pub trait VirtioDevice: Send {
    /// For logs and errors: "block", "vsock", "net".
    fn name(&self) -> &'static str;
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues; a new activation may come.
    fn reset(&mut self);
    /// Stops serving the queues for a snapshot, after the requests in flight are done
    /// (their buffers returned to the driver, disk writes flushed). Returns each active
    /// queue's index and position; `activate` with queues at those positions goes on.
    fn quiesce(&mut self) -> Result<Vec<(usize, QueueState)>, String>;
    /// What the device keeps beyond its queues and config, for a snapshot.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes back what `save_state` returned, before the restored activation.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// True when the device's interrupts bypass the transport (vhost-user).
    fn interrupts_bypass_transport(&self) -> bool {
        false
    }
}

/// Copies `data.len()` bytes of a little-endian config blob at `offset`, reading zeros
/// past its end (the spec lets drivers read any width within config space).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}
