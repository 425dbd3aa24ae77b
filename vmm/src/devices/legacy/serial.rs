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

    /// The port as a snapshot saved it: its registers and the bytes the guest had not
    /// read yet.
    pub fn restored(irq: EventFd, console: Console, s: &SerialSnapshot) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        vm_superio::Serial::from_state(
            &state,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            console,
        )
        .map(Self)
        .map_err(|e| format!("the serial port's saved state is not valid: {e:?}"))
    }

    pub fn save(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// The 16550A's registers (vm-superio's `SerialState`, which has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_comes_back_with_its_registers() {
        let irq = || EventFd::new(0).unwrap();
        let mut a = Serial::new(irq(), Console::new(None).0);
        a.write(3, &[0x80]); // DLAB on
        a.write(0, &[0x0c]); // 9600 baud
        a.write(3, &[0x03]); // 8N1, DLAB off
        a.write(7, &[0x5a]); // scratch
        a.write(1, &[0x01]); // rx interrupt on
        let saved = a.save();
        let json = serde_json::to_string(&saved).unwrap();
        let mut b = Serial::restored(
            irq(),
            Console::new(None).0,
            &serde_json::from_str(&json).unwrap(),
        )
        .unwrap();
        assert_eq!(b.save(), saved);
        let mut d = [0u8];
        b.read(7, &mut d);
        assert_eq!(d[0], 0x5a);
        b.read(3, &mut d);
        assert_eq!(d[0], 0x03);
    }
}
