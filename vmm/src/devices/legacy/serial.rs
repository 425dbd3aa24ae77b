//! The 16550A serial port at COM1 (vm-superio's model), wired to an irqfd, writing the
//! guest console to a file that can be followed live (`tail -f`, `boxd vmm console`).

use crate::devices::bus::BusDevice;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Interrupt line of the serial port: an irqfd bound to its GSI.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes: a file (append), and a bounded in-memory tail that
/// status and error messages can quote.
pub struct Console {
    file: Option<File>,
    tail: Arc<Mutex<Vec<u8>>>,
}

/// How much console output the VMM keeps in memory for error messages.
pub const CONSOLE_TAIL_MAX: usize = 16 << 10;

impl Console {
    pub fn new(file: Option<File>) -> (Self, Arc<Mutex<Vec<u8>>>) {
        let tail = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                file,
                tail: tail.clone(),
            },
            tail,
        )
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &mut self.file {
            // A full disk must not stop the guest; the in-memory tail still has it.
            let _ = f.write_all(buf);
        }
        let mut tail = crate::devices::bus::lock(&self.tail);
        tail.extend_from_slice(buf);
        if tail.len() > CONSOLE_TAIL_MAX {
            let cut = tail.len() - CONSOLE_TAIL_MAX;
            tail.drain(..cut);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Serial(vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>);

impl Serial {
    pub fn new(irq: EventFd, console: Console) -> Self {
        Self(vm_superio::Serial::new(IrqTrigger(irq), console))
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(d), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *d = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.0.write(off, v)
        {
            tracing::warn!("serial port write failed: {e:?}");
        }
    }
}
