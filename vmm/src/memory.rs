//! Guest memory: one memfd, mapped shared, split around the MMIO gap.
//!
//! File-backed on purpose: the same file descriptor is handed to the vhost-user network
//! backend (which maps it too), and later pause-to-disk, restore and fork all work on
//! this one file (DESIGN.md, "Memory is file-backed").

use crate::arch::layout::{MEMORY_MAX, MMIO_GAP_END, MMIO_GAP_START};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is out of range: use 16 MiB to {max} MiB, in whole MiB", max = MEMORY_MAX >> 20)]
    Size { mib: u64 },
    #[error("memfd_create for guest memory failed: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {mib} MiB: {source}")]
    Truncate { mib: u64, source: std::io::Error },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The smallest guest that boots a kernel with room for its initramfs.
pub const MEMORY_MIN_MIB: u64 = 16;

/// Guest RAM ranges for `size` bytes: below the MMIO gap, then from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Guest memory and the file behind it.
pub struct Memory {
    pub guest: GuestMemory,
    pub file: Arc<File>,
    pub size: u64,
}

impl Memory {
    /// Creates `mib` MiB of guest RAM backed by a fresh memfd.
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        if !(MEMORY_MIN_MIB..=(MEMORY_MAX >> 20)).contains(&mib) {
            return Err(MemoryError::Size { mib });
        }
        let size = mib << 20;
        let name = c"boxd-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other
        // preconditions and we check its result.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { mib, source })?;
        let mut offset = 0u64;
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(addr, len)| {
                let range = (
                    addr,
                    len as usize,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                );
                offset += len;
                range
            })
            .collect();
        let guest = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|source| MemoryError::Map { mib, source })?;
        Ok(Self { guest, file, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn memory_is_backed_by_the_shared_file() {
        let mem = Memory::new(32).unwrap();
        mem.guest
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*mem.file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(mem.guest.num_regions(), 1);
    }

    #[test]
    fn absurd_sizes_are_refused_with_the_range() {
        let err = Memory::new(1).err().unwrap().to_string();
        assert!(err.contains("16 MiB"), "{err}");
        assert!(Memory::new(u64::MAX >> 20).is_err());
    }
}
