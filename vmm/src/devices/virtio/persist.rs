//! Saving and restoring a virtio-mmio device: the transport's registers and queues, and
//! whatever the device itself keeps (its own `quiesce`/`save_state`/`restore_state`).
//!
//! Save quiesces the device first: its worker stops after the request it is serving,
//! so every buffer it popped has been returned to the driver and the queue positions
//! it reports are final. The transport merges those positions into its own copies of
//! the queues (the device works on copies; see `MmioTransport::activate`).

use super::Start;
use super::mmio::MmioTransport;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// A virtqueue's registers and positions (virtio-queue's `QueueState`, which has no
/// serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

impl QueueSnapshot {
    pub fn to_queue(&self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("queue of size {} is not valid: {e:?}", self.size))
    }
}

/// One virtio-mmio device in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransportState {
    /// The device's name and type: a snapshot is only restored onto the same device.
    pub device: String,
    pub device_type: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// What the device saved for itself.
    pub device_state: serde_json::Value,
}

impl MmioTransport {
    /// Stops the device (see [`VirtioDevice::quiesce`]) and returns its state. The VM's
    /// vCPUs must be paused. The device stays stopped until [`resume_after_save`] (the
    /// same VMM goes on) or the VMM ends (suspend).
    ///
    /// [`resume_after_save`]: Self::resume_after_save
    pub fn save(&mut self) -> Result<TransportState, String> {
        if self.activated && !self.quiesced {
            let live = self
                .device
                .quiesce()
                .map_err(|e| format!("virtio {}: cannot stop it: {e}", self.device.name()))?;
            for (i, state) in live {
                let q = self.queues.get_mut(i).ok_or_else(|| {
                    format!(
                        "virtio {}: reported queue {i}, which it does not have",
                        self.device.name()
                    )
                })?;
                q.set_next_avail(state.next_avail);
                q.set_next_used(state.next_used);
            }
            self.quiesced = true;
        }
        Ok(TransportState {
            device: self.device.name().to_string(),
            device_type: self.device.device_type(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.interrupt.raw_status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device_state: self.device.save_state(),
        })
    }

    /// The same VMM goes on after a save: the device serves its queues again from where
    /// it stopped.
    pub fn resume_after_save(&mut self) -> Result<(), String> {
        if !self.quiesced {
            return Ok(());
        }
        self.quiesced = false;
        self.start_device(Start::Resume)
            .inspect_err(|_| self.fail())
    }

    /// Puts a saved state into this (new, never activated) transport and starts the
    /// device on the saved queues. Refuses a state saved from another kind of device.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let name = self.device.name();
        if state.device != name || state.device_type != self.device.device_type() {
            return Err(format!(
                "the snapshot has a {} device (type {}) where this VM has {name} (type {})",
                state.device,
                state.device_type,
                self.device.device_type()
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio {name}: the snapshot has {} queues, this device has {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != ours.max_size() {
                return Err(format!(
                    "virtio {name} queue {i}: the snapshot's holds {} entries, this device's {}",
                    saved.max_size,
                    ours.max_size()
                ));
            }
            queues.push(
                saved
                    .to_queue()
                    .map_err(|e| format!("virtio {name} queue {i}: {e}"))?,
            );
        }
        if state.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "virtio {name}: the guest uses features {:#x} that this device does not offer ({:#x}); \
                 the backend behind it changed",
                state.driver_features,
                self.device.features()
            ));
        }
        self.device
            .restore_state(&state.device_state)
            .map_err(|e| format!("virtio {name}: {e}"))?;
        self.queues = queues;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set_raw_status(state.interrupt_status);
        if state.activated {
            self.start_device(Start::Restore)?;
            // An interrupt raised just before the save may not have been delivered;
            // one more costs the driver a look at its rings.
            self.interrupt.signal(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_snapshot_converts_back_to_the_same_queue() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        q.set_next_avail(7);
        q.set_next_used(5);
        q.set_event_idx(true);
        let snap = QueueSnapshot::from(q.state());
        let json = serde_json::to_string(&snap).unwrap();
        let back: QueueSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_queue().unwrap().state(), q.state());
        let bad = QueueSnapshot { size: 3, ..back };
        assert!(bad.to_queue().unwrap_err().contains("size 3"));
    }
}
