//! The guest physical address map (x86_64). One place for every fixed address.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_7000  boot_params (zero page)
//! 0x0000_0520  IDT                     0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4                    0x0000_a000  PDPT
//! 0x0000_b000  4 page directories (identity map of the first 4 GiB with 2 MiB pages)
//! 0x0002_0000  kernel command line     0x0009_fc00  EBDA start (reserved up to 1 MiB)
//! 0x000e_0000  ACPI tables (RSDP first), inside the reserved BIOS area
//! 0x0010_0000  kernel (bzImage protected-mode part)
//! ...          RAM up to 3 GiB, then the MMIO gap, then the rest of RAM from 4 GiB
//! 0xd000_0000  virtio-mmio devices, one 4 KiB window each
//! 0xfec0_0000  IOAPIC                  0xfee0_0000  local APIC
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Page directories identity-map this much with 2 MiB pages: all of the 32-bit space, so
/// boot code can reach RAM, the kernel and the MMIO devices alike.
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_MAX_SIZE: u64 = 0x20000;
pub const HIMEM_START: u64 = 0x10_0000;

/// RAM stops below here and resumes at 4 GiB; the gap holds devices.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// KVM needs three pages for the TSS below 4 GiB, outside RAM and MMIO.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Legacy interrupt lines: the serial port's is fixed by the PC; the ACPI Generic Event
/// Device (the power button) takes the next, virtio devices the ones after it (the
/// IOAPIC has 24 pins).
pub const SERIAL_IRQ: u32 = 4;
pub const GED_IRQ: u32 = 5;
pub const VIRTIO_IRQ_START: u32 = 6;
pub const IRQ_MAX: u32 = 23;

/// I/O ports.
pub const SERIAL_PORT: u16 = 0x3f8;
/// ACPI "power" port: writes of the FADT reset value reboot, the S5 sleep value powers off.
pub const ACPI_POWER_PORT: u16 = 0x600;
/// Status read-back for the hardware-reduced sleep control register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// boxd's debug port: guests write a byte to mark milestones (tests and boot timing).
pub const DEBUG_PORT: u16 = 0x0510;

/// Largest guest the address map supports: 1 TiB.
pub const MEMORY_MAX: u64 = 1 << 40;
