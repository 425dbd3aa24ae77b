//! virtio-blk (virtio 1.2, 5.2) over a [`Disk`].

use super::disk::{BLOCK_SIZE, Disk};
use crate::devices::virtio::worker::{AsRawFdExt, Handler, Registrar, Worker};
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, read_config_bytes,
};
use crate::memory::GuestMemory;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest data segment and segment count we tell the driver about; a request is
/// therefore at most SEG_MAX * SIZE_MAX bytes, which bounds the bounce buffer.
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = 128;
const REQUEST_BYTES_MAX: usize = SIZE_MAX as usize * SEG_MAX as usize;
const ID_BYTES: usize = 20;

/// Counters for status.
#[derive(Default, Debug)]
pub struct BlockStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

pub struct Block {
    disk: Arc<Mutex<Disk>>,
    config: Vec<u8>,
    features: u64,
    worker: Option<Worker<BlockWorker>>,
    pub stats: Arc<BlockStats>,
}

impl Block {
    pub fn new(disk: Disk) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH;
        if disk.read_only() {
            features |= F_RO;
        }
        // struct virtio_blk_config up to blk_size (24 bytes) is all we fill.
        let mut config = vec![0u8; 24];
        config[0..8].copy_from_slice(&(disk.size() / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        Self {
            disk: Arc::new(Mutex::new(disk)),
            config,
            features,
            worker: None,
            stats: Arc::default(),
        }
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        "block"
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let Some((_, queue, kick)) = a.queues.into_iter().next() else {
            return Err(ActivateError::Bad {
                device: "block",
                reason: "the driver enabled no queue".into(),
            });
        };
        let handler = BlockWorker {
            disk: self.disk.clone(),
            mem: a.mem,
            queue,
            kick,
            interrupt: a.interrupt,
            stats: self.stats.clone(),
            buf: Vec::new(),
        };
        self.worker = Some(
            Worker::spawn("virtio-blk".into(), handler).map_err(|source| ActivateError::Io {
                device: "block",
                source,
            })?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    /// Requests are served whole on the worker thread, so once it stops nothing is in
    /// flight; the flush then puts every completed write in the disk's files, which
    /// makes the disk and the memory saved next one consistent point.
    fn quiesce(&mut self) -> Result<Vec<(usize, QueueState)>, String> {
        let Some(worker) = self.worker.take() else {
            return Ok(Vec::new());
        };
        let handler = worker
            .stop()
            .ok_or("its worker thread had panicked; the queue position is unknown")?;
        crate::devices::bus::lock(&self.disk)
            .flush()
            .map_err(|e| format!("flushing the disk: {e}"))?;
        Ok(vec![(0, handler.queue.state())])
    }
}

struct BlockWorker {
    disk: Arc<Mutex<Disk>>,
    mem: GuestMemory,
    queue: Queue,
    kick: EventFd,
    interrupt: Arc<Interrupt>,
    stats: Arc<BlockStats>,
    /// Bounce buffer, reused across requests; never above REQUEST_BYTES_MAX.
    buf: Vec<u8>,
}

const KICK: u64 = 0;

impl Handler for BlockWorker {
    fn init(&mut self, reg: &Registrar) -> std::io::Result<()> {
        reg.add(self.kick.as_raw_fd_(), KICK, EventSet::IN)?;
        // Requests queued before activation (or a kick that raced it) are served now.
        self.process();
        Ok(())
    }

    fn handle(&mut self, _reg: &Registrar, token: u64, _events: EventSet) {
        if token == KICK {
            let _ = self.kick.read();
            self.process();
        }
    }
}

impl BlockWorker {
    fn process(&mut self) {
        let mem = self.mem.clone();
        let mut used_any = false;
        // Each round drains the available ring; bounded by the ring size per round and
        // by the driver re-enabling notifications when nothing is left.
        loop {
            if let Err(e) = self.queue.disable_notification(&mem) {
                tracing::error!("virtio-blk queue is broken: {e}");
                return;
            }
            for _ in 0..QUEUE_SIZE {
                let Some(chain) = self.queue.pop_descriptor_chain(&mem) else {
                    break;
                };
                let head = chain.head_index();
                let len = self.serve(&mem, chain);
                if let Err(e) = self.queue.add_used(&mem, head, len) {
                    tracing::error!("virtio-blk cannot return a buffer: {e}");
                    return;
                }
                used_any = true;
            }
            match self.queue.enable_notification(&mem) {
                Ok(true) => continue, // more arrived meanwhile
                Ok(false) => break,
                Err(e) => {
                    tracing::error!("virtio-blk queue is broken: {e}");
                    return;
                }
            }
        }
        if used_any && self.queue.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
    }

    /// Serves one request; returns how many bytes were written into the guest's buffers.
    fn serve(
        &mut self,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("virtio-blk: malformed descriptor chain dropped");
                return 0;
            }
        };
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() || writer.available_bytes() == 0 {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("virtio-blk: request without header or status byte");
            return 0;
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        // The last writable byte is the status; everything writable before it is data.
        let data_in = writer.available_bytes() - 1;
        let Ok(mut status_writer) = writer.split_at(data_in) else {
            return 0;
        };
        let offset = sector.checked_mul(SECTOR_SIZE);
        let (status, written) = match (kind, offset) {
            (T_IN, Some(offset)) => self.read(offset, data_in, &mut writer),
            (T_OUT, Some(offset)) => self.write(offset, &mut reader),
            (T_FLUSH, _) => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                match crate::devices::bus::lock(&self.disk).flush() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        tracing::error!("virtio-blk flush failed: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            (T_GET_ID, _) => {
                let mut id = crate::devices::bus::lock(&self.disk).id().into_bytes();
                id.resize(ID_BYTES, 0);
                let n = data_in.min(ID_BYTES);
                match writer.write_all(&id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            (T_IN | T_OUT, None) => (S_IOERR, 0),
            _ => (S_UNSUPP, 0),
        };
        if status != S_OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if status_writer.write_all(&[status]).is_err() {
            return written as u32;
        }
        (written + 1) as u32
    }

    fn read(
        &mut self,
        offset: u64,
        len: usize,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> (u8, usize) {
        if len > REQUEST_BYTES_MAX {
            return (S_IOERR, 0);
        }
        self.buf.resize(len, 0);
        let result = crate::devices::bus::lock(&self.disk).read_at(&mut self.buf, offset);
        match result.and_then(|()| writer.write_all(&self.buf)) {
            Ok(()) => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_read
                    .fetch_add(len as u64, Ordering::Relaxed);
                (S_OK, len)
            }
            Err(e) => {
                tracing::warn!(offset, len, "virtio-blk read failed: {e}");
                (S_IOERR, 0)
            }
        }
    }

    fn write(&mut self, offset: u64, reader: &mut virtio_queue::Reader<'_>) -> (u8, usize) {
        let len = reader.available_bytes();
        if len > REQUEST_BYTES_MAX {
            return (S_IOERR, 0);
        }
        self.buf.resize(len, 0);
        if reader.read_exact(&mut self.buf).is_err() {
            return (S_IOERR, 0);
        }
        match crate::devices::bus::lock(&self.disk).write_at(&self.buf, offset) {
            Ok(()) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(len as u64, Ordering::Relaxed);
                (S_OK, 0)
            }
            Err(e) => {
                tracing::warn!(offset, len, "virtio-blk write failed: {e}");
                (S_IOERR, 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! virtio-blk requests laid out in guest memory the way a driver lays them out
    //! (virtio-queue's split-queue test driver), served by the real worker and disk.
    use super::*;
    use crate::devices::virtio::block::disk::DiskSpec;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const HDR: u64 = 0x4_0000;
    const DATA: u64 = 0x5_0000;
    const STATUS: u64 = 0x7_0000;

    struct Rig {
        _dir: PathGuard,
        mem: GuestMemory,
        disk: Arc<Mutex<Disk>>,
    }

    struct PathGuard(std::path::PathBuf);
    impl Drop for PathGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rig(name: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("boxd-blk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = DiskSpec {
            base: None,
            frozen: vec![],
            top: dir.join("disk.img"),
            size: Some(1 << 20),
            read_only: false,
        };
        let disk = Arc::new(Mutex::new(Disk::open(&spec).unwrap()));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Rig {
            _dir: PathGuard(dir),
            mem,
            disk,
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Runs the worker over what the driver queued; returns (used len per request,
    /// whether the interrupt fired).
    fn serve(r: &Rig, q: &MockSplitQueue<GuestMemory>, requests: u16) -> (Vec<u32>, bool) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap(), false));
        let mut worker = BlockWorker {
            disk: r.disk.clone(),
            mem: r.mem.clone(),
            queue: q.create_queue().unwrap(),
            kick: EventFd::new(0).unwrap(),
            interrupt,
            stats: Arc::default(),
            buf: Vec::new(),
        };
        worker.process();
        let used: Vec<u32> = (0..requests)
            .map(|i| {
                r.mem
                    .read_obj::<u32>(q.used_addr().unchecked_add(4 + 8 * u64::from(i) + 4))
                    .unwrap()
            })
            .collect();
        let used_idx: u16 = r.mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, requests, "every request comes back, good or bad");
        (used, irq.read().is_ok())
    }

    #[test]
    fn writes_then_reads_through_the_queue() {
        let r = rig("rw");
        let q = MockSplitQueue::new(&r.mem, 16);
        header(&r.mem, HDR, T_OUT, 8);
        r.mem
            .write_slice(&[0x42; 4096], GuestAddress(DATA))
            .unwrap();
        header(&r.mem, HDR + 16, T_IN, 8);
        q.add_desc_chains(
            &[
                desc(HDR, 16, VRING_DESC_F_NEXT, 1),
                desc(DATA, 4096, VRING_DESC_F_NEXT, 2),
                desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                desc(HDR + 16, 16, VRING_DESC_F_NEXT, 4),
                desc(
                    DATA + 0x1000,
                    4096,
                    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                    5,
                ),
                desc(STATUS + 1, 1, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let (used, irq) = serve(&r, &q, 2);
        assert_eq!(used, vec![1, 4097]);
        assert!(irq, "the driver is interrupted");
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
            S_OK
        );
        let mut back = [0u8; 4096];
        r.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(back.iter().all(|b| *b == 0x42));
        let mut on_disk = [0u8; 4];
        r.disk
            .lock()
            .unwrap()
            .read_at(&mut on_disk, 8 * 512)
            .unwrap();
        assert_eq!(on_disk, [0x42; 4]);
    }

    #[test]
    fn flush_id_and_bad_requests_get_the_right_status() {
        let r = rig("status");
        let q = MockSplitQueue::new(&r.mem, 16);
        header(&r.mem, HDR, T_FLUSH, 0);
        header(&r.mem, HDR + 16, T_GET_ID, 0);
        header(&r.mem, HDR + 32, T_IN, 1 << 40); // far past the end of the disk
        header(&r.mem, HDR + 48, 77, 0); // no such request type
        q.add_desc_chains(
            &[
                desc(HDR, 16, VRING_DESC_F_NEXT, 1),
                desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                desc(HDR + 16, 16, VRING_DESC_F_NEXT, 3),
                desc(DATA, 20, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 4),
                desc(STATUS + 1, 1, VRING_DESC_F_WRITE, 0),
                desc(HDR + 32, 16, VRING_DESC_F_NEXT, 6),
                desc(
                    DATA + 0x1000,
                    512,
                    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                    7,
                ),
                desc(STATUS + 2, 1, VRING_DESC_F_WRITE, 0),
                desc(HDR + 48, 16, VRING_DESC_F_NEXT, 9),
                desc(STATUS + 3, 1, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let (used, _) = serve(&r, &q, 4);
        let status = |i| r.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(
            (status(0), status(1), status(2), status(3)),
            (S_OK, S_OK, S_IOERR, S_UNSUPP)
        );
        assert_eq!(used[1], 21);
        let mut id = [0u8; 8];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk.img");
    }

    #[test]
    fn malformed_chains_are_returned_without_touching_the_disk_and_service_goes_on() {
        let r = rig("malformed");
        let q = MockSplitQueue::new(&r.mem, 16);
        header(&r.mem, HDR, T_OUT, 0);
        header(&r.mem, HDR + 16, T_FLUSH, 0);
        q.add_desc_chains(
            &[
                // A write with no writable status byte.
                desc(HDR, 16, VRING_DESC_F_NEXT, 1),
                desc(DATA, 512, 0, 0),
                // Data pointing outside guest memory.
                desc(HDR, 16, VRING_DESC_F_NEXT, 3),
                desc(0xdead_0000_0000, 4096, VRING_DESC_F_NEXT, 4),
                desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                // A header that is too short.
                desc(HDR, 8, VRING_DESC_F_NEXT, 6),
                desc(STATUS + 1, 1, VRING_DESC_F_WRITE, 0),
                // And then a good request, which must still be served.
                desc(HDR + 16, 16, VRING_DESC_F_NEXT, 8),
                desc(STATUS + 2, 1, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let (used, _) = serve(&r, &q, 4);
        assert_eq!(used[0], 0);
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS + 2)).unwrap(),
            S_OK
        );
        assert_eq!(
            r.disk.lock().unwrap().top_blocks(),
            0,
            "nothing reached the disk"
        );
    }

    /// A stream of writes is cut by a snapshot while the worker serves it; a new device
    /// continues from the saved queue. Every request completes exactly once, with its
    /// data on disk, and none is served twice or lost.
    #[test]
    fn a_queue_cut_mid_transfer_by_a_snapshot_completes_in_the_restored_device() {
        use crate::devices::virtio::{Activation, Start, VirtioDevice};
        const N: u16 = 48;
        let r = rig("quiesce");
        let q = MockSplitQueue::new(&r.mem, 256);
        let mut chains = Vec::new();
        for i in 0..N {
            let i64_ = u64::from(i);
            header(&r.mem, HDR + 16 * i64_, T_OUT, 8 * i64_);
            r.mem
                .write_slice(
                    &[i as u8 + 1; 4096],
                    GuestAddress(DATA + 0x1000 * i64_ % 0x2_0000),
                )
                .unwrap();
            let d = 3 * i;
            chains.push(desc(HDR + 16 * i64_, 16, VRING_DESC_F_NEXT, d + 1));
            chains.push(desc(
                DATA + 0x1000 * i64_ % 0x2_0000,
                4096,
                VRING_DESC_F_NEXT,
                d + 2,
            ));
            chains.push(desc(STATUS + i64_, 1, VRING_DESC_F_WRITE, 0));
        }
        // Distinct data per request needs distinct buffers: 32 pages cycle, so check
        // against what each request's buffer held when it was queued.
        let expect: Vec<u8> = (0..N)
            .map(|i| {
                let at = DATA + 0x1000 * u64::from(i) % 0x2_0000;
                r.mem.read_obj::<u8>(GuestAddress(at)).unwrap()
            })
            .collect();
        // The first half is queued before the device starts (it serves it at once),
        // the second half after, without a notification: requests the driver made
        // that the device had not taken when the snapshot stopped it.
        let half = 3 * usize::from(N / 2);
        q.add_desc_chains(&chains[..half], 0).unwrap();
        let spec = DiskSpec {
            base: None,
            frozen: vec![],
            top: r._dir.0.join("quiesce.img"),
            size: Some(1 << 20),
            read_only: false,
        };
        let disk = || Block::new(Disk::open(&spec).unwrap());
        let activate = |dev: &mut Block, queue: Queue, start: Start| {
            // No notification: the worker serves what is queued when it starts, and
            // nothing more until kicked.
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            dev.activate(Activation {
                mem: r.mem.clone(),
                queues: vec![(0, queue, kick)],
                interrupt: Arc::new(Interrupt::new(
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    false,
                )),
                features: VIRTIO_F_VERSION_1,
                start,
            })
            .unwrap();
        };
        let mut first = disk();
        activate(&mut first, q.create_queue().unwrap(), Start::Fresh);
        q.add_desc_chains(&chains[half..], half as u16).unwrap();
        let saved = first.quiesce().unwrap();
        assert_eq!(saved.len(), 1);
        let state = saved[0].1;
        let used_idx =
            |mem: &GuestMemory| mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(
            used_idx(&r.mem),
            state.next_used,
            "everything popped was returned"
        );
        assert_eq!(state.next_avail, state.next_used, "no request is half done");
        assert_eq!(
            state.next_used,
            N / 2,
            "the first device served the first half only"
        );
        // The new device opens the disk as a restored VMM does, once the old is gone.
        drop(first);
        let mut second = disk();
        activate(&mut second, Queue::try_from(state).unwrap(), Start::Restore);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while used_idx(&r.mem) != N {
            assert!(
                std::time::Instant::now() < deadline,
                "the restored device stalled at {}",
                used_idx(&r.mem)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = second.quiesce().unwrap()[0].1;
        assert_eq!(
            (after.next_avail, after.next_used),
            (N, N),
            "served once each"
        );
        let d = second.disk.lock().unwrap();
        for i in 0..N {
            assert_eq!(
                r.mem
                    .read_obj::<u8>(GuestAddress(STATUS + u64::from(i)))
                    .unwrap(),
                S_OK
            );
            let mut b = [0u8; 1];
            d.read_at(&mut b, u64::from(i) * 8 * 512).unwrap();
            assert_eq!(
                b[0],
                expect[usize::from(i)],
                "request {i}'s data is on the disk"
            );
        }
    }
}
