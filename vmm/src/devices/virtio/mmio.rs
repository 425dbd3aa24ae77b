//! The virtio-mmio register file (virtio 1.2, 4.2.2), version 2 ("modern") only.

use super::{Activation, INT_CONFIG, Interrupt, Start, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4458_4f42; // "BOXD"

pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

#[cfg(test)]
const STATUS_ACKNOWLEDGE: u32 = 1;
#[cfg(test)]
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;

pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    pub(super) queue_sel: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    pub(super) config_generation: u32,
    pub(super) activated: bool,
    /// Stopped for a snapshot (see `persist.rs`): the device serves nothing until it
    /// is resumed, and `queues` hold the positions it stopped at.
    pub(super) quiesced: bool,
}

impl MmioTransport {
    /// `kicks[i]` is the eventfd KVM signals on a notify of queue `i` (the builder
    /// registers them as ioeventfds on this device's QueueNotify register).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
        kicks: Vec<EventFd>,
    ) -> Self {
        let sizes = device.queue_max_sizes().to_vec();
        assert_eq!(sizes.len(), kicks.len(), "one notify eventfd per queue");
        let interrupt = Arc::new(Interrupt::new(irqfd, device.interrupts_bypass_transport()));
        Self {
            queues: sizes
                .iter()
                .map(|s| Queue::new(*s).expect("queue sizes are powers of two"))
                .collect(),
            device,
            mem,
            interrupt,
            kicks,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            quiesced: false,
        }
    }

    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue layout may only change before the driver starts the device.
    fn queue_configurable(&self) -> bool {
        self.status & STATUS_DRIVER_OK == 0 && self.status & STATUS_FEATURES_OK != 0
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.quiesced = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new = value & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver its features were refused.
                tracing::warn!(
                    device = self.name(),
                    offered = format_args!("{offered:#x}"),
                    asked = format_args!("{:#x}", self.driver_features),
                    "driver asked for features the device does not offer"
                );
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if new & STATUS_DRIVER_OK != 0
            && !self.activated
            && let Err(e) = self.start_device(Start::Fresh)
        {
            tracing::error!("activating virtio device: {e}");
            self.fail();
        }
    }

    /// Hands the device its ready queues (copies: ours keep answering register reads).
    pub(super) fn start_device(&mut self, start: Start) -> Result<(), String> {
        let name = self.device.name();
        let mut queues = Vec::new();
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "virtio {name}: the driver set up an invalid queue {i}"
                ));
            }
            q.set_event_idx(event_idx);
            let kick = self.kicks[i]
                .try_clone()
                .map_err(|e| format!("virtio {name}: cannot clone a notify eventfd: {e}"))?;
            let copy = Queue::try_from(q.state()).expect("a valid queue's state converts back");
            queues.push((i, copy, kick));
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
            start,
        };
        self.device
            .activate(activation)
            .map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    /// Marks the device broken and tells the driver, which resets it.
    pub(super) fn fail(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.signal(INT_CONFIG);
    }
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configurable = self.queue_configurable();
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & STATUS_FEATURES_OK == 0 && self.driver_features_sel < 2 {
                    set_half(&mut self.driver_features, self.driver_features_sel == 1, v);
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if configurable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => {
                // Normally KVM's ioeventfd catches this write first; when it does not
                // (no ioeventfd support), forward it the same way.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 if configurable => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x84 if configurable => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x90 if configurable => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 if configurable => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 if configurable => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 if configurable => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!(
                device = self.name(),
                offset,
                value = v,
                "ignored virtio-mmio write"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, TYPE_BLOCK};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy(Arc<Mutex<Option<usize>>>);
    impl VirtioDevice for Dummy {
        fn name(&self) -> &'static str {
            "dummy"
        }
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            *self.0.lock().unwrap() = Some(a.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            *self.0.lock().unwrap() = None;
        }
        fn quiesce(&mut self) -> Result<Vec<(usize, virtio_queue::QueueState)>, String> {
            Ok(Vec::new())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Option<usize>>>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seen = Arc::new(Mutex::new(None));
        let t = MmioTransport::new(
            Box::new(Dummy(seen.clone())),
            mem,
            EventFd::new(0).unwrap(),
            vec![EventFd::new(0).unwrap()],
        );
        (t, seen)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn driver_handshake_activates_the_device_with_its_ready_queues() {
        let (mut t, seen) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), TYPE_BLOCK);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1); // VERSION_1 in the high word
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x34), 16);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0x1000);
        w(&mut t, 0x90, 0x2000);
        w(&mut t, 0xa0, 0x3000);
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(*seen.lock().unwrap(), Some(1));
        // Queue layout is frozen once running.
        w(&mut t, 0x80, 0x5000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        // Reset stops the device.
        w(&mut t, 0x70, 0);
        assert_eq!(*seen.lock().unwrap(), None);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn features_the_device_does_not_offer_are_refused() {
        let (mut t, _) = transport();
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0x2); // bit 1 is not offered
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn config_space_reads_through_and_past_the_end_as_zero() {
        let (mut t, _) = transport();
        let mut d = [0u8; 4];
        t.read(0x102, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
    }
}
