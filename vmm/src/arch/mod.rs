//! x86_64 specifics: the address map, boot protocol, CPU state and ACPI tables.

pub mod acpi;
pub mod aml;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
