//! A copy-on-write disk made of layers: a read-only base image at the bottom, frozen
//! layers above it (forks share these), and one writable sparse file on top.
//!
//! Every layer spans the disk's whole virtual size (100 GB by default) but stores only
//! the 4 KiB blocks written into it: which blocks a layer holds is what the host file
//! system already knows (SEEK_DATA / SEEK_HOLE), so the layer files need no metadata of
//! their own and a crash cannot leave it inconsistent. A read takes each block from the
//! topmost layer that has it (zeros where none does); a write goes to the top layer,
//! copying a partially written block up first. Forking a disk is therefore O(1): freeze
//! the top layer and give each side a new empty one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Copy-on-write granularity; the guest sees this as its logical block size.
pub const BLOCK_SIZE: u64 = 4096;
/// Deepest chain of layers accepted; forks beyond it should be flattened first.
pub const LAYERS_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk layer {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk {path} is in use by another VMM; stop that VM first (only one VMM may write a disk)"
    )]
    InUse { path: PathBuf },
    #[error(
        "disk layer {path} is {actual} bytes but the disk is {expected} bytes; layers of one disk must have the same size"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("disk size {size} bytes is not a positive multiple of {BLOCK_SIZE}")]
    BadSize { size: u64 },
    #[error("base image {path} ({base} bytes) is larger than the disk ({size} bytes)")]
    BaseTooLarge { path: PathBuf, base: u64, size: u64 },
    #[error("disk has {0} layers; at most {LAYERS_MAX} are supported")]
    TooManyLayers(usize),
    #[error("reading which blocks {path} holds: {source}")]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Sets of block ranges `[start, end)`, kept merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extents(BTreeMap<u64, u64>);

impl Extents {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range that starts at or before `start` and touches it.
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        // Absorb every range starting inside [start, end].
        let inside: Vec<(u64, u64)> = self.0.range(start..=end).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    pub fn contains(&self, block: u64) -> bool {
        self.0
            .range(..=block)
            .next_back()
            .is_some_and(|(_, &e)| block < e)
    }

    /// Splits `[start, end)` into pieces covered by the set and pieces not covered,
    /// in order: `(start, end, covered)`.
    pub fn split(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        // A range beginning before `start` may still cover it.
        let first = self.0.range(..=start).next_back().map(|(s, e)| (*s, *e));
        let rest = self
            .0
            .range(start.saturating_add(1)..end)
            .map(|(s, e)| (*s, *e));
        for (s, e) in first.into_iter().chain(rest) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push((pos, s.min(end), false));
            }
            let covered_end = e.min(end);
            if covered_end > pos.max(s) {
                out.push((pos.max(s), covered_end, true));
            }
            pos = covered_end;
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end, false));
        }
        out
    }

    pub fn blocks(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

struct Layer {
    file: File,
    path: PathBuf,
    /// Blocks this layer holds (for the base: everything up to its size).
    held: Extents,
    /// Bytes of real data in this layer's file (the base may be shorter than the disk).
    len: u64,
}

pub struct Disk {
    layers: Vec<Layer>,
    size: u64,
    read_only: bool,
}

/// What the disk is built from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// Read-only base image (raw), possibly smaller than the disk.
    pub base: Option<PathBuf>,
    /// Frozen layers, bottom to top, each the disk's full size.
    pub frozen: Vec<PathBuf>,
    /// The writable top layer; created sparse at `size` if missing.
    pub top: PathBuf,
    /// Virtual size; for an existing top layer, its size wins when this is None.
    pub size: Option<u64>,
    pub read_only: bool,
}

fn open_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes a non-blocking flock; fails with InUse when another process holds it.
fn lock(file: &File, path: &Path, exclusive: bool) -> Result<(), DiskError> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a valid open file descriptor; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            DiskError::InUse {
                path: path.to_path_buf(),
            }
        } else {
            DiskError::Open {
                path: path.to_path_buf(),
                source: err,
            }
        });
    }
    Ok(())
}

/// The blocks a sparse file holds, from SEEK_DATA/SEEK_HOLE.
fn scan(file: &File, path: &Path, size: u64) -> Result<Extents, DiskError> {
    let fd = file.as_raw_fd();
    let mut held = Extents::default();
    let mut pos: i64 = 0;
    // Each round finds one data run; a file has at most size/BLOCK_SIZE of them.
    for _ in 0..=(size / BLOCK_SIZE) {
        // SAFETY: lseek on a valid fd; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(DiskError::Scan {
                path: path.to_path_buf(),
                source: err,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(DiskError::Scan {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        held.insert(data as u64 / BLOCK_SIZE, (hole as u64).div_ceil(BLOCK_SIZE));
        pos = hole;
        if pos as u64 >= size {
            break;
        }
    }
    Ok(held)
}

impl Disk {
    pub fn open(spec: &DiskSpec) -> Result<Self, DiskError> {
        let depth = spec.frozen.len() + 1 + usize::from(spec.base.is_some());
        if depth > LAYERS_MAX {
            return Err(DiskError::TooManyLayers(depth));
        }
        // An existing top layer decides the size; a new one is created last, once
        // everything below it checked out, so a refused disk leaves no file behind.
        let existing_top = match std::fs::metadata(&spec.top) {
            Ok(m) if m.len() > 0 => Some(m.len()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(DiskError::Open {
                    path: spec.top.clone(),
                    source,
                });
            }
        };
        let size = match (existing_top, spec.size) {
            (Some(actual), Some(expected)) if actual != expected => {
                return Err(DiskError::SizeMismatch {
                    path: spec.top.clone(),
                    actual,
                    expected,
                });
            }
            (Some(actual), _) => actual,
            (None, Some(size)) => size,
            (None, None) => crate::DEFAULT_DISK_SIZE,
        };
        if size == 0 || size % BLOCK_SIZE != 0 {
            return Err(DiskError::BadSize { size });
        }

        let mut layers = Vec::new();
        if let Some(base) = &spec.base {
            let file = File::open(base).map_err(open_err(base))?;
            lock(&file, base, false)?;
            let len = file.metadata().map_err(open_err(base))?.len();
            if len > size {
                return Err(DiskError::BaseTooLarge {
                    path: base.clone(),
                    base: len,
                    size,
                });
            }
            let mut held = Extents::default();
            held.insert(0, len.div_ceil(BLOCK_SIZE));
            layers.push(Layer {
                file,
                path: base.clone(),
                held,
                len,
            });
        }
        for path in &spec.frozen {
            let file = File::open(path).map_err(open_err(path))?;
            lock(&file, path, false)?;
            let len = file.metadata().map_err(open_err(path))?.len();
            if len != size {
                return Err(DiskError::SizeMismatch {
                    path: path.clone(),
                    actual: len,
                    expected: size,
                });
            }
            let held = scan(&file, path, size)?;
            layers.push(Layer {
                file,
                path: path.clone(),
                held,
                len,
            });
        }

        let create = existing_top.is_none() && !spec.read_only;
        let top = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .create(create)
            .truncate(false)
            .open(&spec.top)
            .map_err(open_err(&spec.top))?;
        let ready = lock(&top, &spec.top, !spec.read_only).and_then(|()| {
            if create {
                top.set_len(size).map_err(open_err(&spec.top))?;
            }
            Ok(())
        });
        if let Err(e) = ready {
            if create && !matches!(e, DiskError::InUse { .. }) {
                let _ = std::fs::remove_file(&spec.top);
            }
            return Err(e);
        }
        let held = scan(&top, &spec.top, size)?;
        layers.push(Layer {
            file: top,
            path: spec.top.clone(),
            held,
            len: size,
        });
        Ok(Self {
            layers,
            size,
            read_only: spec.read_only,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Blocks held by the writable top layer (what this VM has written).
    pub fn top_blocks(&self) -> u64 {
        self.layers.last().map_or(0, |l| l.held.blocks())
    }

    fn check_range(&self, offset: u64, len: usize) -> std::io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "access at {offset}+{len} past the end of a {}-byte disk",
                    self.size
                ),
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset`, each block from the topmost layer holding it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let start = offset / BLOCK_SIZE;
        let end = (offset + buf.len() as u64).div_ceil(BLOCK_SIZE);
        self.read_layers(buf, offset, start, end, self.layers.len())
    }

    /// Fills the part of `buf` (which starts at disk byte `offset`) that lies in blocks
    /// `[start, end)`, looking only at layers below `depth`.
    fn read_layers(
        &self,
        buf: &mut [u8],
        offset: u64,
        start: u64,
        end: u64,
        depth: usize,
    ) -> std::io::Result<()> {
        let buf_end = offset + buf.len() as u64;
        let bytes = |s: u64, e: u64| ((s * BLOCK_SIZE).max(offset), (e * BLOCK_SIZE).min(buf_end));
        let Some(layer_index) = depth.checked_sub(1) else {
            let (from, to) = bytes(start, end);
            buf[(from - offset) as usize..(to - offset) as usize].fill(0);
            return Ok(());
        };
        let layer = &self.layers[layer_index];
        for (s, e, covered) in layer.held.split(start, end) {
            if covered {
                let (from, to) = bytes(s, e);
                let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
                // A base image may end mid-block; what lies past its end reads as zeros.
                let avail = layer.len.saturating_sub(from).min(piece.len() as u64) as usize;
                layer.file.read_exact_at(&mut piece[..avail], from)?;
                piece[avail..].fill(0);
            } else {
                self.read_layers(buf, offset, s, e, layer_index)?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the top layer, copying partial blocks up first.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        self.check_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let top = self.layers.len() - 1;
        // Partial blocks at either edge not yet in the top layer: copy up, then patch.
        for block in [first, last] {
            let block_start = block * BLOCK_SIZE;
            let whole = offset <= block_start && end >= block_start + BLOCK_SIZE;
            if whole || self.layers[top].held.contains(block) {
                continue;
            }
            let mut full = vec![0u8; BLOCK_SIZE as usize];
            self.read_layers(&mut full, block_start, block, block + 1, top)?;
            let from = offset.max(block_start);
            let to = end.min(block_start + BLOCK_SIZE);
            full[(from - block_start) as usize..(to - block_start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            self.layers[top].file.write_all_at(&full, block_start)?;
            self.layers[top].held.insert(block, block + 1);
        }
        self.layers[top].file.write_all_at(data, offset)?;
        self.layers[top].held.insert(first, last + 1);
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> std::io::Result<()> {
        match self.layers.last() {
            Some(top) if !self.read_only => top.file.sync_data(),
            _ => Ok(()),
        }
    }

    /// A stable identifier for the guest (virtio-blk GET_ID): the top layer's name.
    pub fn id(&self) -> String {
        self.layers
            .last()
            .and_then(|l| l.path.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("boxd-disk-{name}-{}", std::process::id()));
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
    fn extents_merge_and_split() {
        let mut x = Extents::default();
        x.insert(10, 20);
        x.insert(30, 40);
        x.insert(20, 25); // touches the first
        assert_eq!(
            x.0.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            vec![(10, 25), (30, 40)]
        );
        x.insert(5, 35); // swallows both
        assert_eq!(
            x.0.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            vec![(5, 40)]
        );
        assert!(x.contains(5) && x.contains(39) && !x.contains(40) && !x.contains(4));
        let mut y = Extents::default();
        y.insert(10, 20);
        y.insert(30, 40);
        assert_eq!(
            y.split(0, 50),
            vec![
                (0, 10, false),
                (10, 20, true),
                (20, 30, false),
                (30, 40, true),
                (40, 50, false)
            ]
        );
        assert_eq!(
            y.split(15, 35),
            vec![(15, 20, true), (20, 30, false), (30, 35, true)]
        );
        assert_eq!(y.split(22, 28), vec![(22, 28, false)]);
        assert_eq!(y.blocks(), 20);
    }

    fn spec(dir: &Path, base: Option<PathBuf>, frozen: Vec<PathBuf>, top: &str) -> DiskSpec {
        DiskSpec {
            base,
            frozen,
            top: dir.join(top),
            size: Some(1 << 20),
            read_only: false,
        }
    }

    #[test]
    fn reads_fall_through_layers_and_writes_copy_up() {
        let d = Dir::new("layers");
        let base = d.0.join("base.img");
        std::fs::write(&base, vec![0xbb; 10_000]).unwrap(); // ends mid-block
        let mut disk = Disk::open(&spec(&d.0, Some(base.clone()), vec![], "top")).unwrap();
        let mut buf = vec![0u8; 12_288];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..10_000].iter().all(|b| *b == 0xbb));
        assert!(
            buf[10_000..].iter().all(|b| *b == 0),
            "past the base's end reads zeros"
        );

        // A 100-byte write in the middle of block 1 copies the rest of the block up.
        disk.write_at(&[0x11; 100], 5000).unwrap();
        assert_eq!(disk.top_blocks(), 1);
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[4096..5000].iter().all(|b| *b == 0xbb));
        assert!(buf[5000..5100].iter().all(|b| *b == 0x11));
        assert!(buf[5100..8192].iter().all(|b| *b == 0xbb));
        // The base is untouched.
        assert!(std::fs::read(&base).unwrap().iter().all(|b| *b == 0xbb));
        drop(disk);

        // Reopening finds the written block from the sparse file alone.
        let disk = Disk::open(&spec(&d.0, Some(base.clone()), vec![], "top")).unwrap();
        assert_eq!(disk.top_blocks(), 1);
        let mut b = [0u8; 4];
        disk.read_at(&mut b, 5098).unwrap();
        assert_eq!(b, [0x11, 0x11, 0xbb, 0xbb]);
        drop(disk);

        // Fork: the old top becomes a frozen layer under a new, empty top.
        let frozen = d.0.join("top");
        let mut child = Disk::open(&spec(&d.0, Some(base), vec![frozen], "child")).unwrap();
        assert_eq!(child.top_blocks(), 0);
        child.write_at(&[0x22; 4096], 4096).unwrap();
        let mut b = [0u8; 2];
        child.read_at(&mut b, 5099).unwrap();
        assert_eq!(b, [0x22, 0x22]);
    }

    #[test]
    fn a_second_writer_is_refused_and_bounds_are_checked() {
        let d = Dir::new("lock");
        let mut disk = Disk::open(&spec(&d.0, None, vec![], "top")).unwrap();
        let err = Disk::open(&spec(&d.0, None, vec![], "top")).err().unwrap();
        assert!(matches!(err, DiskError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use by another VMM"));
        let mut buf = [0u8; 8];
        assert!(disk.read_at(&mut buf, (1 << 20) - 4).is_err());
        assert!(disk.write_at(&buf, u64::MAX - 2).is_err());
        disk.read_at(&mut buf, (1 << 20) - 8).unwrap();
        assert_eq!(buf, [0; 8]);
    }

    #[test]
    fn sizes_must_agree() {
        let d = Dir::new("size");
        let base = d.0.join("base.img");
        std::fs::write(&base, vec![0; 2 << 20]).unwrap();
        let err = Disk::open(&spec(&d.0, Some(base), vec![], "top"))
            .err()
            .unwrap();
        assert!(matches!(err, DiskError::BaseTooLarge { .. }), "{err}");
        let mut s = spec(&d.0, None, vec![], "odd");
        s.size = Some(1000);
        assert!(matches!(Disk::open(&s), Err(DiskError::BadSize { .. })));
        assert!(
            !d.0.join("odd").exists(),
            "a refused disk leaves no file behind"
        );
    }
}
