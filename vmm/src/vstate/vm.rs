//! The KVM VM: interrupt controllers, PIT, memory slots, irqfds and ioeventfds.

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::memory::GuestMemory;
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: {0}. This host needs KVM (VT-x/AMD-V, the kvm module, and root or the kvm group); without it, run boxd inside the emulated KVM host: `cargo xtask testhost -- boxd vmm ...`"
    )]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the stable version 12")]
    ApiVersion(i32),
    #[error("KVM cannot create a VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM setup step \"{step}\" failed: {source}")]
    Setup {
        step: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { step, source }
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    /// Opens KVM and creates a VM with an in-kernel IOAPIC/PIC/LAPIC and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(step("set TSS address"))?;
        fd.create_irq_chip().map_err(step("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(step("create PIT"))?;
        Ok(Self { kvm, fd })
    }

    /// Gives every RAM region of `mem` to KVM as a memory slot.
    pub fn map_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a mapped region has a host address at offset 0");
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the VMM keeps
            // alive for as long as the VM (and its vCPUs) exist.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(step("set memory slot"))?;
        }
        Ok(())
    }
}
