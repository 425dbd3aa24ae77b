//! boxd's virtual machine monitor: one process per VM (`boxd vmm`), built on rust-vmm's
//! kvm-ioctls and vm-memory.
//!
//! A stock distribution kernel boots straight into 64-bit mode with the project's
//! initramfs; it finds its devices through ACPI: virtio-mmio block (copy-on-write layered
//! disk), vsock (the agent channel) and, through vhost-user, the network. Guest memory
//! is a memfd so that pause, suspend, restore and fork can share one mechanism.
//!
//! The public surface is small: [`VmConfig`] says what to run, [`Vmm::start`] runs it,
//! [`Vmm::wait`] serves the control socket until the VM ends, and [`probe`] tells
//! whether this host's KVM can run a Linux guest at all.

pub mod arch;
mod cgroup;
pub mod control;
pub mod devices;
pub mod lazy;
pub mod memory;
pub mod probe;
pub mod snapshot;
mod vmm;
pub mod vstate;

pub use arch::boot::BootSource;
pub use cgroup::{CgroupError, CgroupLimits};
pub use devices::virtio::block::DiskSpec;
pub use vmm::{AfterSnapshot, MemoryRestore, SnapshotReport, Vmm, VmmError};
pub use vstate::exit::ExitReason;

use std::path::PathBuf;

/// 100 GB, the default virtual disk size (DESIGN.md).
pub const DEFAULT_DISK_SIZE: u64 = 100_000_000_000 / 4096 * 4096;

/// Most vCPUs one VM may have: APIC ids are one byte and 255 means "all".
pub const VCPUS_MAX: u8 = 254;

/// Everything a VM is made of.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Names the VM in logs and its cgroup.
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: BootSource,
    pub disk: Option<DiskSpec>,
    pub vsock: Option<VsockConfig>,
    pub net: Option<NetConfig>,
    /// Serial console output goes here (appended), besides an in-memory tail.
    pub console: Option<PathBuf>,
    /// JSON control socket (status, pause, resume, shutdown, stop).
    pub control: Option<PathBuf>,
    /// Put the VMM in its own cgroup with these limits.
    pub cgroup: Option<CgroupLimits>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// Host side unix socket (see `devices::virtio::vsock`).
    pub uds: PathBuf,
    /// A guest connection to this host port delivers the agent's one-line ready message.
    pub ready_port: Option<u32>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The vhost-user backend's socket for this VM's port.
    pub vhost_user: PathBuf,
    pub mac: [u8; 6],
    /// Queue pairs to offer the guest (as many as the backend serves, at most this).
    pub queue_pairs: usize,
}

impl VmConfig {
    /// A minimal VM running raw 64-bit code: what the VMM's tests and the KVM speed
    /// probe use.
    pub fn raw(code: Vec<u8>) -> Self {
        Self {
            name: format!("raw-{}", std::process::id()),
            vcpus: 1,
            memory_mib: 32,
            boot: BootSource::Raw64 { code },
            disk: None,
            vsock: None,
            net: None,
            console: None,
            control: None,
            cgroup: None,
        }
    }
}
