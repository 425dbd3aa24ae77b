//! Legacy PC devices: the serial console, the ACPI power port, boxd's debug port.

mod debug_port;
mod power;
mod serial;

pub use debug_port::{DebugPort, INITRAMFS_FAILED, Milestones};
pub use power::PowerPort;
pub use serial::{CONSOLE_TAIL_MAX, Console, Serial, SerialSnapshot};
