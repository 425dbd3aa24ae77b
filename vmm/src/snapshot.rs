//! A VM snapshot on disk: a directory with two files.
//!
//! - `state`: a 32-byte header (magic `BOXDSNAP`, format version, body length, CRC32
//!   of the body), then the body: JSON of [`Snapshot`], what KVM holds for the VM and
//!   each vCPU, every device's state (saved by the device's own code, beside it), the
//!   machine's configuration, and a description of the memory file.
//! - `memory`: guest memory as a sparse file, byte for byte at the memfd's offsets.
//!   Only pages that hold data are written: pages the guest never touched are holes in
//!   the memfd and are skipped, touched pages that are all zero are skipped too. The
//!   state records the memory file's size, the extents written and their CRC32.
//!
//! A snapshot is written into `<dir>.partial` and renamed into place once every file is
//! on disk (fsync'd, then the parent directory): a VMM or node that dies while writing
//! leaves a `.partial` directory that restore never reads, never a half snapshot under
//! the real name.

use crate::memory::Memory;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bumped on any change to what the state holds or how memory is laid out; a snapshot
/// of another version is refused (with both versions named), never half-read.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"BOXDSNAP";
const HEADER_LEN: usize = 32;
/// The state body is a few hundred KiB even for many vCPUs; anything larger is not ours.
const STATE_MAX: u64 = 64 << 20;
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;
/// Memory is copied through a buffer of this size (fits in the CPU's cache).
const CHUNK: usize = 2 << 20;
/// The memory file's checksums cover blocks of this size (at memfd offsets), so that a
/// lazy restore can check what it loads one block at a time.
pub const BLOCK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("snapshot {path} is not usable: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "snapshot {path} has format version {found}; this boxd reads version {FORMAT_VERSION}. Restore it with the boxd that wrote it, or boot the machine fresh"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "snapshot target {path} already exists; remove it or choose another directory (a snapshot is never written over another)"
    )]
    Exists { path: PathBuf },
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn invalid(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// What the memory file holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryInfo {
    /// Guest RAM in bytes (the memfd's size and the memory file's length).
    pub size: u64,
    /// (offset, length) of each run of written pages, ascending.
    pub extents: Vec<(u64, u64)>,
    /// (block index, CRC32 of the written bytes in that [`BLOCK`]), for each block that
    /// holds data, ascending.
    pub blocks: Vec<(u64, u32)>,
}

impl MemoryInfo {
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    /// The written runs inside block `block`, as (offset, length), ascending.
    pub fn pieces(&self, block: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (lo, hi) = (block * BLOCK, (block + 1) * BLOCK);
        // Extents are sorted and disjoint: start at the first one that ends after `lo`.
        let first = self.extents.partition_point(|e| e.0 + e.1 <= lo);
        self.extents[first..]
            .iter()
            .take_while(move |e| e.0 < hi)
            .map(move |&(s, n)| {
                let (a, b) = (s.max(lo), (s + n).min(hi));
                (a, b - a)
            })
    }
}

/// Folds written runs into per-block checksums (runs arrive in ascending order).
#[derive(Default)]
struct BlockSums {
    done: Vec<(u64, u32)>,
    current: Option<(u64, crc32fast::Hasher)>,
}

impl BlockSums {
    fn add(&mut self, mut at: u64, mut bytes: &[u8]) {
        // Bounded: each round consumes the part of `bytes` inside one block.
        while !bytes.is_empty() {
            let block = at / BLOCK;
            let room = ((block + 1) * BLOCK - at) as usize;
            let (here, rest) = bytes.split_at(room.min(bytes.len()));
            match &mut self.current {
                Some((b, h)) if *b == block => h.update(here),
                _ => {
                    self.flush();
                    let mut h = crc32fast::Hasher::new();
                    h.update(here);
                    self.current = Some((block, h));
                }
            }
            at += here.len() as u64;
            bytes = rest;
        }
    }

    fn flush(&mut self) {
        if let Some((b, h)) = self.current.take() {
            self.done.push((b, h.finalize()));
        }
    }

    fn finish(mut self) -> Vec<(u64, u32)> {
        self.flush();
        self.done
    }
}

/// Ranges of the memfd that hold pages (SEEK_DATA/SEEK_HOLE: tmpfs reports untouched
/// pages as holes).
fn data_ranges(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = size as i64;
    // Bounded: each round moves `pos` forward by at least one page.
    while pos < end {
        // SAFETY: lseek on an fd we own; results are checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = hole.min(end);
        if hole <= data {
            break;
        }
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(out)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits correctly.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Writes the pages of `memory` that hold data into a new sparse file at `path`.
///
/// Both copies (this one and [`restore_memory`]) go through a buffer with pread and
/// pwrite rather than through a mapping of the memfd: the kernel copies whole runs of
/// pages, where a mapping takes a page fault per page.
pub fn save_memory(memory: &Memory, path: &Path) -> Result<MemoryInfo, SnapshotError> {
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path, "create the memory file"))?;
    out.set_len(memory.size)
        .map_err(io(path, "size the memory file"))?;
    let ranges =
        data_ranges(&memory.file, memory.size).map_err(io(path, "find guest memory's pages"))?;
    let mut sums = BlockSums::default();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for (start, len) in ranges {
        let end = start + len;
        let mut off = start;
        // Bounded: each round moves `off` forward by a chunk.
        while off < end {
            let n = (CHUNK as u64).min(end - off) as usize;
            let chunk = &mut buf[..n];
            memory
                .file
                .read_exact_at(chunk, off)
                .map_err(io(path, "read guest memory"))?;
            // Runs of pages that are not all zeros go out as they are found.
            let mut page = 0;
            while page < n {
                let data_at = page;
                while page < n && !is_zero(&chunk[page..(page + PAGE).min(n)]) {
                    page += PAGE;
                }
                if page > data_at {
                    let run = &chunk[data_at..page.min(n)];
                    let at = off + data_at as u64;
                    out.write_all_at(run, at)
                        .map_err(io(path, "write the memory file"))?;
                    sums.add(at, run);
                    match extents.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += run.len() as u64,
                        _ => extents.push((at, run.len() as u64)),
                    }
                }
                while page < n && is_zero(&chunk[page..(page + PAGE).min(n)]) {
                    page += PAGE;
                }
            }
            off += n as u64;
        }
    }
    out.sync_all().map_err(io(path, "flush the memory file"))?;
    drop_cache(&out);
    Ok(MemoryInfo {
        size: memory.size,
        extents,
        blocks: sums.finish(),
    })
}

/// Tells the kernel the file's pages need not stay in the page cache (a suspended
/// machine should hold no host RAM, page cache included).
pub(crate) fn drop_cache(file: &File) {
    // SAFETY: advisory call on an fd we own.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Opens the memory file `path` described by `info` for a machine of `size` bytes and
/// checks what can be checked without reading it: the sizes, the file's length (a
/// truncated copy), the extents and their block checksums. The contents are checked
/// block by block as they are loaded ([`read_block`]).
pub fn open_memory(path: &Path, info: &MemoryInfo, size: u64) -> Result<File, SnapshotError> {
    if info.size != size {
        return Err(invalid(
            path,
            format!(
                "it holds {} MiB of memory; the machine has {} MiB",
                info.size >> 20,
                size >> 20
            ),
        ));
    }
    let file = File::open(path).map_err(io(path, "open the memory file"))?;
    let len = file
        .metadata()
        .map_err(io(path, "read the memory file's size"))?
        .len();
    if len != info.size {
        return Err(invalid(
            path,
            format!(
                "the memory file is {len} bytes; the snapshot wrote {} (truncated?)",
                info.size
            ),
        ));
    }
    let mut last_end = 0;
    for &(start, n) in &info.extents {
        if start < last_end
            || n == 0
            || !start.is_multiple_of(PAGE as u64)
            || start.checked_add(n).is_none_or(|e| e > info.size)
        {
            return Err(invalid(
                path,
                format!("memory extent {start:#x}+{n:#x} is out of order or out of range"),
            ));
        }
        last_end = start + n;
    }
    let mut want = info
        .extents
        .iter()
        .flat_map(|&(s, n)| (s / BLOCK)..(s + n).div_ceil(BLOCK));
    let mut last = None;
    for &(block, _) in &info.blocks {
        // Each block with data once, ascending, and no checksum without data.
        let next = loop {
            match want.next() {
                Some(b) if Some(b) == last => continue,
                other => break other,
            }
        };
        if next != Some(block) {
            return Err(invalid(
                path,
                format!("the checksums do not match the extents at block {block}"),
            ));
        }
        last = next;
    }
    if want.any(|b| Some(b) != last) {
        return Err(invalid(path, "a block with data has no checksum"));
    }
    Ok(file)
}

/// Reads the written runs of block `block` (index `at` in `info.blocks`) into `buf` at
/// their offsets within the block and checks the block's checksum. Returns the runs.
pub fn read_block(
    file: &File,
    path: &Path,
    info: &MemoryInfo,
    at: usize,
    buf: &mut [u8],
) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let (block, want) = info.blocks[at];
    let base = block * BLOCK;
    let pieces: Vec<_> = info.pieces(block).collect();
    let mut crc = crc32fast::Hasher::new();
    for &(off, n) in &pieces {
        let dst = &mut buf[(off - base) as usize..(off - base + n) as usize];
        file.read_exact_at(dst, off)
            .map_err(io(path, "read the memory file"))?;
        crc.update(dst);
    }
    let found = crc.finalize();
    if found != want {
        return Err(invalid(
            path,
            format!(
                "the memory file's checksum at {base:#x} (1 MiB block {block}) is {found:#010x}, the snapshot recorded {want:#010x}: the file was changed or damaged"
            ),
        ));
    }
    Ok(pieces)
}

/// Fills a fresh guest memory from the memory file `path` described by `info`, all of
/// it, checking every block before the first byte is written.
pub fn restore_memory(
    memory: &Memory,
    path: &Path,
    info: &MemoryInfo,
) -> Result<(), SnapshotError> {
    let file = open_memory(path, info, memory.size)?;
    let mut buf = vec![0u8; BLOCK as usize];
    for at in 0..info.blocks.len() {
        read_block(&file, path, info, at, &mut buf)?;
    }
    for at in 0..info.blocks.len() {
        let base = info.blocks[at].0 * BLOCK;
        for (off, n) in read_block(&file, path, info, at, &mut buf)? {
            let src = &buf[(off - base) as usize..(off - base + n) as usize];
            memory
                .file
                .write_all_at(src, off)
                .map_err(io(path, "fill guest memory"))?;
        }
    }
    drop_cache(&file);
    Ok(())
}

/// Writes `body` as the state file, with header and checksum.
pub fn write_state(path: &Path, body: &[u8]) -> Result<(), SnapshotError> {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path, "create the state file"))?;
    f.write_all(&header)
        .and_then(|()| f.write_all(body))
        .map_err(io(path, "write the state file"))?;
    f.sync_all().map_err(io(path, "flush the state file"))
}

/// Reads and checks the state file; returns its body.
pub fn read_state(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let mut f = File::open(path).map_err(io(path, "open the state file"))?;
    let len = f
        .metadata()
        .map_err(io(path, "read the state file's size"))?
        .len();
    if len < HEADER_LEN as u64 {
        return Err(invalid(
            path,
            format!("the state file is {len} bytes, shorter than its header"),
        ));
    }
    if len > STATE_MAX {
        return Err(invalid(
            path,
            format!("the state file is {len} bytes; a boxd state is under {STATE_MAX}"),
        ));
    }
    let mut all = Vec::with_capacity(len as usize);
    f.read_to_end(&mut all)
        .map_err(io(path, "read the state file"))?;
    let (header, body) = all.split_at(HEADER_LEN);
    if &header[0..8] != MAGIC {
        return Err(invalid(
            path,
            "the state file is not a boxd snapshot (bad magic)",
        ));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let want = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if want != body.len() as u64 {
        return Err(invalid(
            path,
            format!(
                "the state file holds {} bytes of state; its header says {want} (truncated?)",
                body.len()
            ),
        ));
    }
    let crc = u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"));
    let found = crc32fast::hash(body);
    if crc != found {
        return Err(invalid(
            path,
            format!(
                "the state's checksum is {found:#010x}, its header says {crc:#010x}: the file was changed or damaged"
            ),
        ));
    }
    Ok(body.to_vec())
}

/// The state file's body.
#[derive(Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken (Unix time, ms).
    pub created_unix_ms: u64,
    /// The machine it was taken of; a restore builds the same machine.
    pub config: crate::VmConfig,
    pub memory: MemoryInfo,
    pub vm: crate::vstate::persist::VmState,
    pub vcpus: Vec<crate::vstate::persist::VcpuState>,
    pub serial: crate::devices::legacy::SerialSnapshot,
    /// The virtio devices, in their MMIO order.
    pub devices: Vec<crate::devices::virtio::persist::TransportState>,
    /// What the guest's agent said when it was ready.
    pub agent: Option<crate::vmm::AgentReady>,
}

/// Reads and checks a snapshot's state (the memory file is checked as it is restored).
pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
    if !dir.is_dir() {
        let partial = partial_dir(dir);
        let why = if partial.is_dir() {
            format!(
                "it was never finished ({} is what a save that did not complete left)",
                partial.display()
            )
        } else {
            "there is no such snapshot directory".to_string()
        };
        return Err(invalid(dir, why));
    }
    let path = dir.join(STATE_FILE);
    let body = read_state(&path)?;
    let snap: Snapshot = serde_json::from_slice(&body).map_err(|e| {
        invalid(
            &path,
            format!("the state does not read as a version {FORMAT_VERSION} snapshot: {e}"),
        )
    })?;
    if snap.vcpus.len() != usize::from(snap.config.vcpus) {
        return Err(invalid(
            &path,
            format!(
                "it holds {} vCPUs for a machine of {}",
                snap.vcpus.len(),
                snap.config.vcpus
            ),
        ));
    }
    if snap.memory.size != snap.config.memory_mib << 20 {
        return Err(invalid(
            &path,
            format!(
                "its memory is {} bytes for a machine of {} MiB",
                snap.memory.size, snap.config.memory_mib
            ),
        ));
    }
    Ok(snap)
}

/// Takes a loaded snapshot out of `dir`, durably: renamed to `<dir>.consumed`, which
/// restore never reads (the caller removes it). Returns the new name.
pub fn consume(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let mut s = dir.as_os_str().to_owned();
    s.push(".consumed");
    let to = PathBuf::from(s);
    if to.exists() {
        std::fs::remove_dir_all(&to).map_err(io(&to, "remove a used snapshot"))?;
    }
    std::fs::rename(dir, &to).map_err(io(dir, "take the used snapshot out of the way"))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(to)
}

/// Where a snapshot is written before it is complete.
pub fn partial_dir(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Prepares `<dir>.partial` (a leftover from a crash is removed: it never was a
/// snapshot). Refuses when `dir` exists.
pub fn begin(dir: &Path) -> Result<PathBuf, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists {
            path: dir.to_path_buf(),
        });
    }
    let partial = partial_dir(dir);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial, "remove an unfinished snapshot"))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial, "create the snapshot directory"))?;
    Ok(partial)
}

/// Publishes a complete `<dir>.partial` as `dir`, durably.
pub fn commit(partial: &Path, dir: &Path) -> Result<(), SnapshotError> {
    sync_dir(partial)?;
    std::fs::rename(partial, dir).map_err(io(dir, "move the finished snapshot into place"))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "flush the directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("boxd-snap-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_pages_with_data_are_written_and_they_come_back() {
        let d = Dir::new("mem");
        let mem = Memory::new(64).unwrap();
        mem.guest
            .write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        mem.guest
            .write_slice(&[7u8; 3 * PAGE], GuestAddress(0x10_0000))
            .unwrap();
        // Touched but zero: not written.
        mem.guest
            .write_slice(&[0u8; PAGE], GuestAddress(0x20_0000))
            .unwrap();
        let path = d.0.join(MEMORY_FILE);
        let info = save_memory(&mem, &path).unwrap();
        assert_eq!(
            info.extents,
            vec![(0x1000, PAGE as u64), (0x10_0000, 3 * PAGE as u64)]
        );
        assert_eq!(info.data_bytes(), 4 * PAGE as u64);
        // One checksum per 1 MiB block with data: blocks 0 and 1.
        assert_eq!(
            info.blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        // The file is sparse: its blocks are about what was written.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(
            blocks * 512 <= 8 * PAGE as u64,
            "{blocks} blocks for 4 pages"
        );

        let back = Memory::new(64).unwrap();
        restore_memory(&back, &path, &info).unwrap();
        assert_eq!(
            back.guest.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
        let mut buf = [0u8; 3 * PAGE];
        back.guest
            .read_slice(&mut buf, GuestAddress(0x10_0000))
            .unwrap();
        assert!(buf.iter().all(|b| *b == 7));
    }

    #[test]
    fn damaged_truncated_or_resized_memory_is_refused() {
        let d = Dir::new("bad");
        let mem = Memory::new(32).unwrap();
        mem.guest
            .write_obj(0xabcd_u16, GuestAddress(0x5000))
            .unwrap();
        let path = d.0.join(MEMORY_FILE);
        let info = save_memory(&mem, &path).unwrap();
        // Another size.
        let e = restore_memory(&Memory::new(64).unwrap(), &path, &info)
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 MiB") && e.contains("64 MiB"), "{e}");
        // A changed byte.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 0x5001).unwrap();
        let e = restore_memory(&Memory::new(32).unwrap(), &path, &info)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checksum") && e.contains(&path.display().to_string()),
            "{e}"
        );
        // Truncated.
        f.set_len(0x4000).unwrap();
        let e = restore_memory(&Memory::new(32).unwrap(), &path, &info)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn runs_are_cut_at_block_edges_and_each_block_is_summed_once() {
        let info = MemoryInfo {
            size: 8 * BLOCK,
            extents: vec![
                (BLOCK - 2 * PAGE as u64, 3 * PAGE as u64),
                (3 * BLOCK, 2 * BLOCK),
            ],
            blocks: Vec::new(),
        };
        assert_eq!(
            info.pieces(0).collect::<Vec<_>>(),
            vec![(BLOCK - 2 * PAGE as u64, 2 * PAGE as u64)]
        );
        assert_eq!(
            info.pieces(1).collect::<Vec<_>>(),
            vec![(BLOCK, PAGE as u64)]
        );
        assert_eq!(info.pieces(2).count(), 0);
        assert_eq!(info.pieces(4).collect::<Vec<_>>(), vec![(4 * BLOCK, BLOCK)]);
        let mut sums = BlockSums::default();
        sums.add(BLOCK - 8, &[1u8; 16]);
        sums.add(3 * BLOCK, &[2u8; 8]);
        let got: Vec<u64> = sums.finish().iter().map(|b| b.0).collect();
        assert_eq!(got, vec![0, 1, 3]);
    }

    #[test]
    fn the_state_file_is_checked_for_magic_version_length_and_checksum() {
        let d = Dir::new("state");
        let path = d.0.join(STATE_FILE);
        write_state(&path, b"{\"x\":1}").unwrap();
        assert_eq!(read_state(&path).unwrap(), b"{\"x\":1}");
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[8] = 99;
        std::fs::write(&path, &bad).unwrap();
        let e = read_state(&path).unwrap_err().to_string();
        assert!(
            e.contains("version 99") && e.contains("reads version 2"),
            "{e}"
        );
        let mut bad = good.clone();
        bad[HEADER_LEN + 2] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(
            read_state(&path)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(
            read_state(&path)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        std::fs::write(&path, b"hello").unwrap();
        assert!(
            read_state(&path)
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
    }

    #[test]
    fn a_snapshot_is_never_written_over_another_and_leftovers_are_cleared() {
        let d = Dir::new("commit");
        let target = d.0.join("snap");
        let p = begin(&target).unwrap();
        std::fs::write(p.join("x"), b"1").unwrap();
        // A crash here leaves the .partial; the next attempt starts clean.
        let p = begin(&target).unwrap();
        assert!(!p.join("x").exists());
        commit(&p, &target).unwrap();
        assert!(target.exists() && !p.exists());
        assert!(matches!(begin(&target), Err(SnapshotError::Exists { .. })));
    }
}
