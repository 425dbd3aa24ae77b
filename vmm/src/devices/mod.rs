//! Everything the guest can touch: buses, legacy PC devices, virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;
