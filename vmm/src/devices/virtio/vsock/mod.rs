//! virtio-vsock: the host<->guest channel the boxd agent speaks over.

mod device;
mod muxer;
pub mod packet;

pub use device::{GUEST_CID, Vsock};
