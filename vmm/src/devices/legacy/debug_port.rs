//! boxd's debug port: a guest writes one byte to mark a milestone. The VMM records when
//! each arrived (bounded), which boot timing and the tiny test guests read back.

use crate::devices::bus::BusDevice;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The value boxd's initramfs writes when it cannot boot the root file system.
pub const INITRAMFS_FAILED: u8 = 0xe1;

/// At most this many milestones are kept; later ones are counted, not stored.
pub const MILESTONES_MAX: usize = 1024;

#[derive(Default)]
pub struct Milestones {
    pub values: Vec<(u8, Instant)>,
    pub dropped: u64,
}

pub struct DebugPort {
    milestones: Arc<Mutex<Milestones>>,
}

impl DebugPort {
    pub fn new(milestones: Arc<Mutex<Milestones>>) -> Self {
        Self { milestones }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let mut m = crate::devices::bus::lock(&self.milestones);
        if m.values.len() < MILESTONES_MAX {
            m.values.push((value, Instant::now()));
        } else {
            m.dropped += 1;
        }
    }
}
