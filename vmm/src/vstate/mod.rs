//! KVM state: the VM, its vCPU threads, and how the VM's end is reported.

pub mod exit;
pub mod persist;
pub mod vcpu;
pub mod vm;
