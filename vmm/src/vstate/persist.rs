//! Saving and restoring what KVM holds for a VM and its vCPUs (the KVM half of a
//! snapshot; devices save their own state beside them, memory is `snapshot.rs`).
//!
//! The order follows what KVM needs, as Firecracker's does. Save: MP state first (it
//! may make KVM settle pending events), registers, FPU/XSAVE, XCRs, debug registers,
//! LAPIC, MSRs, CPUID, and the vCPU events last. Restore: CPUID, MP state, registers,
//! special registers, XSAVE, XCRs, debug registers, LAPIC, MSRs (the TSC before the
//! TSC deadline, which is relative to it), the vCPU events.

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs,
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The most MSRs one vCPU's state may carry (KVM reports a few hundred at most).
const MSRS_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("KVM refused to {what} (vCPU {vcpu}): {source}")]
    Vcpu {
        what: &'static str,
        vcpu: u8,
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to {what} for the VM: {source}")]
    Vm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM took {set} of {wanted} MSRs; it refused MSR {index:#x}")]
    MsrRefused {
        vcpu: u8,
        set: usize,
        wanted: usize,
        index: u32,
    },
    #[error("vCPU {vcpu}: {what}")]
    Invalid { vcpu: u8, what: String },
}

fn vcpu_err(what: &'static str, vcpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Vcpu { what, vcpu, source }
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Vm { what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area: the legacy 4 KiB region, then what KVM_CAP_XSAVE2 adds (AMX).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// Which MSRs a vCPU's state carries: every MSR KVM reports (KVM_GET_MSR_INDEX_LIST,
/// which includes KVM's paravirtual ones) that the vCPU can read. The first vCPU saved
/// finds out which ones read back; the others must read the same.
pub struct MsrSet {
    list: Vec<u32>,
    checked: bool,
}

impl MsrSet {
    pub fn new(kvm: &Kvm) -> Result<Self, PersistError> {
        let mut list = kvm
            .get_msr_index_list()
            .map_err(|source| PersistError::Vm {
                what: "list the MSRs it saves",
                source,
            })?
            .as_slice()
            .to_vec();
        list.truncate(MSRS_MAX);
        Ok(Self {
            list,
            checked: false,
        })
    }

    fn read(&mut self, fd: &VcpuFd, vcpu: u8) -> Result<Vec<kvm_msr_entry>, PersistError> {
        // KVM stops at the first MSR it cannot read: drop that one and read the rest
        // again (bounded: each round removes one).
        for _ in 0..=MSRS_MAX {
            let entries: Vec<kvm_msr_entry> = self
                .list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| PersistError::Invalid {
                vcpu,
                what: format!("{} MSRs do not fit KVM's list: {e:?}", entries.len()),
            })?;
            let n = fd
                .get_msrs(&mut msrs)
                .map_err(vcpu_err("read its MSRs", vcpu))?;
            if n == self.list.len() {
                self.checked = true;
                return Ok(msrs.as_slice().to_vec());
            }
            if self.checked {
                return Err(PersistError::Invalid {
                    vcpu,
                    what: format!("MSR {:#x} reads on vCPU 0 but not here", self.list[n]),
                });
            }
            self.list.remove(n);
        }
        unreachable!("each round removes an MSR, so the loop ends within MSRS_MAX rounds")
    }
}

/// The XSAVE area's size in bytes, as KVM reports it (4096 without KVM_CAP_XSAVE2).
pub fn xsave_size(vm: &VmFd) -> usize {
    (vm.check_extension_int(Cap::Xsave2).max(0) as usize).max(std::mem::size_of::<kvm_xsave>())
}

fn xsave_extra(size: usize) -> usize {
    (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4)
}

impl VcpuState {
    /// Reads the vCPU's state. The vCPU must be out of KVM_RUN, with any pending I/O
    /// completed (see `Vcpu::settle`).
    pub fn save(
        fd: &VcpuFd,
        vcpu: u8,
        xsave_size: usize,
        msrs: &mut MsrSet,
    ) -> Result<Self, PersistError> {
        let mp_state = fd
            .get_mp_state()
            .map_err(vcpu_err("read its MP state", vcpu))?;
        let regs = fd
            .get_regs()
            .map_err(vcpu_err("read its registers", vcpu))?;
        let sregs = fd
            .get_sregs()
            .map_err(vcpu_err("read its special registers", vcpu))?;
        let xsave = if xsave_size > std::mem::size_of::<kvm_xsave>() {
            let mut x = kvm_bindings::Xsave::new(xsave_extra(xsave_size)).map_err(|e| {
                PersistError::Invalid {
                    vcpu,
                    what: format!("cannot size an XSAVE area of {xsave_size} bytes: {e:?}"),
                }
            })?;
            // SAFETY: `x` was allocated with the size KVM_CAP_XSAVE2 reported.
            unsafe { fd.get_xsave2(&mut x) }.map_err(vcpu_err("read its XSAVE area", vcpu))?;
            let mut v = x.as_fam_struct_ref().xsave.region.to_vec();
            v.extend_from_slice(x.as_slice());
            v
        } else {
            fd.get_xsave()
                .map_err(vcpu_err("read its XSAVE area", vcpu))?
                .region
                .to_vec()
        };
        let xcrs = fd.get_xcrs().map_err(vcpu_err("read its XCRs", vcpu))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(vcpu_err("read its debug registers", vcpu))?;
        let lapic = fd
            .get_lapic()
            .map_err(vcpu_err("read its local APIC", vcpu))?;
        let msrs = msrs.read(fd, vcpu)?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(vcpu_err("read its CPUID", vcpu))?
            .as_slice()
            .to_vec();
        let tsc_khz = fd.get_tsc_khz().ok();
        let events = fd
            .get_vcpu_events()
            .map_err(vcpu_err("read its pending events", vcpu))?;
        Ok(Self {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Writes the state into a new vCPU (created, not yet run).
    pub fn restore(&self, fd: &VcpuFd, vcpu: u8, xsave_size: usize) -> Result<(), PersistError> {
        let cpuid =
            kvm_bindings::CpuId::from_entries(&self.cpuid).map_err(|e| PersistError::Invalid {
                vcpu,
                what: format!("{} CPUID entries: {e:?}", self.cpuid.len()),
            })?;
        fd.set_cpuid2(&cpuid)
            .map_err(vcpu_err("set its CPUID", vcpu))?;
        if let Some(khz) = self.tsc_khz
            && fd.get_tsc_khz().ok() != Some(khz)
        {
            fd.set_tsc_khz(khz)
                .map_err(vcpu_err("run its TSC at the saved frequency", vcpu))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(vcpu_err("set its MP state", vcpu))?;
        fd.set_regs(&self.regs)
            .map_err(vcpu_err("set its registers", vcpu))?;
        fd.set_sregs(&self.sregs)
            .map_err(vcpu_err("set its special registers", vcpu))?;
        let legacy = std::mem::size_of::<kvm_xsave>() / 4;
        if self.xsave.len() < legacy || self.xsave.len() * 4 > xsave_size.max(legacy * 4) + 3 {
            return Err(PersistError::Invalid {
                vcpu,
                what: format!(
                    "the XSAVE area is {} bytes; this host's KVM uses {xsave_size}",
                    self.xsave.len() * 4
                ),
            });
        }
        if self.xsave.len() > legacy {
            let mut x = kvm_bindings::Xsave::new(self.xsave.len() - legacy).map_err(|e| {
                PersistError::Invalid {
                    vcpu,
                    what: format!("cannot size the XSAVE area: {e:?}"),
                }
            })?;
            // SAFETY: only the POD region and the FAM of the wrapper are written, each
            // within the length the wrapper was allocated with.
            unsafe {
                x.as_mut_fam_struct()
                    .xsave
                    .region
                    .copy_from_slice(&self.xsave[..legacy]);
            }
            x.as_mut_slice().copy_from_slice(&self.xsave[legacy..]);
            // SAFETY: `x` holds a whole XSAVE area of the size KVM reported.
            unsafe { fd.set_xsave2(&x) }.map_err(vcpu_err("set its XSAVE area", vcpu))?;
        } else {
            let mut x = kvm_xsave::default();
            x.region.copy_from_slice(&self.xsave[..legacy]);
            // SAFETY: a legacy 4 KiB area, which is all KVM reads without XSAVE2.
            unsafe { fd.set_xsave(&x) }.map_err(vcpu_err("set its XSAVE area", vcpu))?;
        }
        fd.set_xcrs(&self.xcrs)
            .map_err(vcpu_err("set its XCRs", vcpu))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(vcpu_err("set its debug registers", vcpu))?;
        fd.set_lapic(&self.lapic)
            .map_err(vcpu_err("set its local APIC", vcpu))?;
        let msrs = restore_order(&self.msrs);
        let list = Msrs::from_entries(&msrs).map_err(|e| PersistError::Invalid {
            vcpu,
            what: format!("{} MSRs: {e:?}", msrs.len()),
        })?;
        let set = fd.set_msrs(&list).map_err(vcpu_err("set its MSRs", vcpu))?;
        if set != msrs.len() {
            return Err(PersistError::MsrRefused {
                vcpu,
                set,
                wanted: msrs.len(),
                index: msrs[set].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(vcpu_err("set its pending events", vcpu))?;
        Ok(())
    }
}

/// The MSRs in the order they must be written: the TSC first, the TSC deadline last
/// (it is an absolute TSC value; written before the TSC it would fire at once or never).
fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let rank = |e: &kvm_msr_entry| match e.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut v = msrs.to_vec();
    v.sort_by_key(rank);
    v
}

/// What KVM holds for the VM itself: the interrupt controllers, the PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// The host's real time when `clock` was read (Unix ns).
    pub clock_read_unix_ns: u64,
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, PersistError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(vm_err("read an interrupt controller"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<Self, PersistError> {
        Ok(Self {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(vm_err("read the PIT"))?,
            clock: fd.get_clock().map_err(vm_err("read kvmclock"))?,
            clock_read_unix_ns: unix_ns(),
        })
    }

    /// Restores into a new VM (irqchip and PIT created). kvmclock continues from where
    /// it was plus the real time that passed since it was read, so that the
    /// guest's clocks show real time after a long suspend instead of resuming an hour
    /// late, and never go backwards. When the host's KVM reported the host's real time
    /// with the clock (KVM_CLOCK_REALTIME, hosts on the TSC clocksource) it does the
    /// sum itself; otherwise we add the difference of the host's real time.
    pub fn restore(&self, fd: &VmFd) -> Result<(), PersistError> {
        fd.set_pit2(&self.pit).map_err(vm_err("set the PIT"))?;
        let clock = if self.clock.flags & KVM_CLOCK_REALTIME != 0 {
            kvm_clock_data {
                clock: self.clock.clock,
                flags: KVM_CLOCK_REALTIME,
                realtime: self.clock.realtime,
                ..Default::default()
            }
        } else {
            kvm_clock_data {
                clock: self
                    .clock
                    .clock
                    .saturating_add(unix_ns().saturating_sub(self.clock_read_unix_ns)),
                ..Default::default()
            }
        };
        fd.set_clock(&clock).map_err(vm_err("set kvmclock"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip)
                .map_err(vm_err("set an interrupt controller"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_is_written_first_and_its_deadline_last() {
        let e = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let order: Vec<u32> = restore_order(&[
            e(MSR_IA32_TSC_DEADLINE),
            e(0x174),
            e(MSR_IA32_TSC),
            e(0xc000_0080),
        ])
        .iter()
        .map(|e| e.index)
        .collect();
        assert_eq!(
            order,
            vec![MSR_IA32_TSC, 0x174, 0xc000_0080, MSR_IA32_TSC_DEADLINE]
        );
    }
}
