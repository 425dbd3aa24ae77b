//! vCPU state for entering a 64-bit kernel directly: GDT, identity page tables, general
//! and segment registers, FPU and local APIC wiring.
//!
//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot protocol")
//! wants long mode with paging on, an identity map covering the kernel, boot_params and
//! command line, a flat 64-bit code segment, and `rsi` pointing at boot_params.

use super::layout::*;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("write the boot GDT/IDT/page tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused vCPU register state ({what}): {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// The boot GDT: null, 64-bit code, data, TSS (selectors 0x08, 0x10, 0x18).
const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Packs a descriptor: `flags` holds the access byte (low 8 bits) and the flags nibble
/// (bits 12..16) the way the manuals draw them.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Expands a descriptor into KVM's segment form.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity-mapping page tables into guest memory.
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;

    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories; each PD maps 1 GiB in 2 MiB
    // pages (present | writable | page size).
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    let directories = IDENTITY_MAP_SIZE >> 30;
    for d in 0..directories {
        let pd = PDE_START + d * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + d * 8))?;
        for i in 0..512u64 {
            let addr = (d << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Puts a vCPU in 64-bit long mode with the boot GDT and page tables.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    let code = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    let tss = segment(GDT[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))
}

/// General registers at the entry point: `rsi` carries boot_params per the protocol.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, boot_params: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot_params,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set fpu"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: Vec<u8> = state.regs[offset..offset + 4]
        .iter()
        .map(|b| *b as u8)
        .collect();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC's firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("get lapic"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic).map_err(kvm("set lapic"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn code_segment_is_64_bit_and_present() {
        let cs = segment(GDT[1], CODE_SELECTOR);
        assert_eq!((cs.l, cs.present, cs.s, cs.type_), (1, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(GDT[2], DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // Every 2 MiB page of the first 4 GiB maps to itself: four directories of 512.
        for gib in 0..4u64 {
            let pdpt: u64 = mem.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            assert_eq!(pdpt & 3, 3, "PDPTE {gib} present and writable");
            for i in 0..512u64 {
                let pde: u64 = mem.read_obj(GuestAddress((pdpt & !0xfff) + i * 8)).unwrap();
                let at = (gib << 30) | (i << 21);
                assert_eq!(pde, at | 0x83, "PDE for {at:#x}");
            }
        }
        // The MMIO device window at 0xd000_0000 lives in the fourth directory.
        let addr = VIRTIO_MMIO_START;
        let pdpt: u64 = mem
            .read_obj(GuestAddress(PDPTE_START + (addr >> 30) * 8))
            .unwrap();
        let pd = pdpt & !0xfff;
        let pde: u64 = mem
            .read_obj(GuestAddress(pd + ((addr >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde, addr | 0x83);
    }
}
