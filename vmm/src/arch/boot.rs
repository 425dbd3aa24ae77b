//! Loading what the vCPUs start in: a Linux bzImage with initramfs and command line (the
//! 64-bit boot protocol), or a raw blob of 64-bit code for the VMM's own tests and the
//! KVM speed probe.

use super::layout::*;
use crate::memory::ram_ranges;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use std::fs::File;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// What the boot vCPU runs first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum BootSource {
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// 64-bit code loaded at `HIMEM_START` and entered there in long mode, identity
    /// mapped; used by tests that assemble tiny guests and by the speed probe.
    Raw64 { code: Vec<u8> },
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "kernel image {path}: {source}; build the images with `cargo xtask images` or pass --kernel"
    )]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Linux bzImage the 64-bit boot protocol can start: {reason}")]
    KernelInvalid { path: PathBuf, reason: String },
    #[error("initramfs {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x}; give the VM more memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("test guest code of {len} bytes does not fit in guest memory")]
    RawTooLarge { len: usize },
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the boot vCPU starts and what `rsi` points at.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub rip: u64,
    pub boot_params: u64,
}

const XLF_KERNEL_64: u16 = 1 << 0;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

pub fn load<M: GuestMemory + GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    source: &BootSource,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    match source {
        BootSource::Raw64 { code } => {
            if HIMEM_START + code.len() as u64 > mem_size.min(MMIO_GAP_START) {
                return Err(BootError::RawTooLarge { len: code.len() });
            }
            mem.write_slice(code, GuestAddress(HIMEM_START))?;
            Ok(BootEntry {
                rip: HIMEM_START,
                boot_params: 0,
            })
        }
        BootSource::Linux {
            kernel,
            initrd,
            cmdline,
        } => load_linux(mem, mem_size, kernel, initrd.as_deref(), cmdline, rsdp),
    }
}

fn load_linux<M: GuestMemory + GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded =
        BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::KernelInvalid {
                path: kernel.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| BootError::KernelInvalid {
            path: kernel.to_path_buf(),
            reason: "no setup header".into(),
        })?;
    if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::KernelInvalid {
            path: kernel.to_path_buf(),
            reason: format!("boot protocol {:#x} without a 64-bit entry point", {
                hdr.version
            }),
        });
    }

    // Command line, NUL-terminated, within what the kernel says it accepts.
    let max = (hdr.cmdline_size as usize).clamp(255, CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;

    let low_end = mem_size.min(MMIO_GAP_START);
    if let Some(initrd) = initrd {
        let mut f = File::open(initrd).map_err(|source| BootError::InitrdOpen {
            path: initrd.to_path_buf(),
            source,
        })?;
        let size = f
            .metadata()
            .map_err(|source| BootError::InitrdOpen {
                path: initrd.to_path_buf(),
                source,
            })?
            .len();
        // Highest page-aligned spot below both the end of low RAM and the kernel's limit,
        // and above everything the kernel decompresses into.
        let limit = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
        let kernel_top = (loaded.kernel_load.0 + u64::from(hdr.init_size))
            .max(hdr.pref_address + u64::from(hdr.init_size))
            .max(loaded.kernel_end);
        let too_large = || BootError::InitrdTooLarge {
            path: initrd.to_path_buf(),
            size,
            limit,
        };
        let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
        if addr < kernel_top {
            return Err(too_large());
        }
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(BootError::Memory)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_size) {
        // The first range starts at 0; the kernel's part of it starts at 1 MiB.
        let (start, len) = if start.0 == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start.0, len)
        };
        e820.push((start, len, E820_RAM));
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;

    // The 64-bit entry point sits 0x200 past the protected-mode kernel's start.
    Ok(BootEntry {
        rip: loaded.kernel_load.0 + 0x200,
        boot_params: ZERO_PAGE_START,
    })
}
