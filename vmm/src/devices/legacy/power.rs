//! The I/O port the FADT names as both reset register and sleep control register
//! (hardware-reduced ACPI): a write of the reset value reboots, S5 with SLP_EN powers off.

use crate::arch::acpi::{RESET_VALUE, S5_SLEEP_TYPE, SLEEP_ENABLE};
use crate::devices::bus::BusDevice;
use crate::vstate::exit::{ExitReason, VmExit};
use std::sync::Arc;

pub struct PowerPort {
    exit: Arc<VmExit>,
}

impl PowerPort {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PowerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), 0) = (data.first(), offset) else {
            return;
        };
        if value == RESET_VALUE {
            self.exit.request(ExitReason::Reboot);
        } else if value == (S5_SLEEP_TYPE << 2) | SLEEP_ENABLE {
            self.exit.request(ExitReason::PowerOff);
        } else {
            tracing::debug!(value, "ignored write to the ACPI power port");
        }
    }
}
