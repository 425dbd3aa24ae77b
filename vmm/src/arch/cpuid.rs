//! CPUID and boot MSRs for each vCPU.
//!
//! Start from what KVM supports on this host, then describe the topology boxd gives the
//! guest (N cores of one thread on one socket, APIC id = vCPU index) and say that the CPU
//! is virtual (the hypervisor bit), so the guest kernel picks paravirtual clocks and
//! skips work that only makes sense on bare metal.

use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM would not report its supported CPUID: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("KVM refused the CPUID for vCPU {vcpu}: {source}")]
    Set { vcpu: u8, source: kvm_ioctls::Error },
    #[error("KVM refused the boot MSRs for vCPU {vcpu}: {source}")]
    Msrs { vcpu: u8, source: kvm_ioctls::Error },
    #[error("KVM set only {set} of {wanted} boot MSRs for vCPU {vcpu}")]
    MsrsPartial { vcpu: u8, set: usize, wanted: usize },
    #[error("building the MSR list: {0}")]
    Fam(#[from] vmm_sys_util::fam::Error),
}

/// CPUID as KVM supports it on this host; computed once per VM.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits of APIC id needed to number `count` cores.
fn core_bits(count: u8) -> u32 {
    (u32::from(count).max(1))
        .next_power_of_two()
        .trailing_zeros()
}

/// Adapts the supported CPUID to vCPU `index` of `count`.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    for entry in cpuid.as_mut_slice().iter_mut() {
        patch(entry, apic_id, count32, count);
    }
    cpuid
}

fn patch(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, count_u8: u8) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX: APIC id (31:24), logical processors per package (23:16), CLFLUSH
            // line size in qwords (15:8).
            entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // Cores per package minus one in EAX 31:26; caches are private to a core
            // except the last level, shared by all.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        LEAF_PMU => {
            // No virtual PMU: counters cost exits and leak host timing.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    // SMT level: one thread per core.
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (1 << 8) | entry.index;
                }
                1 => {
                    // Core level: all vCPUs on one package.
                    entry.eax = core_bits(count_u8);
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        LEAF_AMD_SIZES => {
            // ECX 15:12 APIC id bits for cores, 7:0 cores minus one.
            entry.ecx = (core_bits(count_u8) << 12) | (count - 1);
        }
        LEAF_AMD_TOPOLOGY => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

pub fn set(vcpu: &VcpuFd, cpuid: &CpuId, index: u8) -> Result<(), CpuidError> {
    vcpu.set_cpuid2(cpuid).map_err(|source| CpuidError::Set {
        vcpu: index,
        source,
    })
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values a freshly reset PC hands to a kernel.
pub fn set_boot_msrs(vcpu: &VcpuFd, index: u8) -> Result<(), CpuidError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries)?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| CpuidError::Msrs {
        vcpu: index,
        source,
    })?;
    if set != entries.len() {
        return Err(CpuidError::MsrsPartial {
            vcpu: index,
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_bits_cover_the_core_count() {
        assert_eq!(core_bits(1), 0);
        assert_eq!(core_bits(2), 1);
        assert_eq!(core_bits(3), 2);
        assert_eq!(core_bits(8), 3);
        assert_eq!(core_bits(9), 4);
    }

    #[test]
    fn leaf_one_names_the_vcpu_and_the_hypervisor() {
        let mut e = kvm_cpuid_entry2 {
            function: LEAF_FEATURES,
            ebx: 0xffff_ffff,
            ..Default::default()
        };
        patch(&mut e, 3, 4, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }
}
