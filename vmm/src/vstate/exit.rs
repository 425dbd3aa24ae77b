//! How a running VM ends: any thread (a vCPU, a device, the control socket) can request
//! an exit; the first reason wins and wakes the VMM's main loop through an eventfd.

use std::sync::Mutex;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or triple fault).
    Reboot,
    /// Stopped from outside: control socket `stop`/`shutdown`, or a signal.
    Stopped,
    /// Something the VM cannot continue after; the text says what.
    Crashed(String),
}

pub struct VmExit {
    pub evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` unless another came first, and wakes the main loop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = crate::devices::bus::lock(&self.reason);
        if r.is_none() {
            tracing::info!(?reason, "VM exit requested");
            *r = Some(reason);
        }
        drop(r);
        // A full eventfd counter still wakes the reader; nothing to handle.
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.reason).clone()
    }
}
