//! virtio-blk over a copy-on-write layered disk.

mod device;
pub mod disk;

pub use device::{Block, BlockStats};
pub use disk::{Disk, DiskError, DiskSpec};
