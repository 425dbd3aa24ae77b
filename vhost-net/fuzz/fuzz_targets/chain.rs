//! Guest-controlled bytes through the backend's parsers: a descriptor table, an avail
//! ring and the buffers they point at, all from the fuzzer, walked the way a port walks
//! them (transmit: copy out and filter; receive: measure and write in). Nothing may
//! panic, loop without bound or touch memory outside the guest's.

#![no_main]

use boxd_vhost_net::chain;
use boxd_vhost_net::filter::{self, Identity};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const SIZE: u16 = 16;
const MEM: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // Layout: descriptors at 0, avail ring at 0x1000, used ring at 0x2000, and the
    // fuzzer's bytes everywhere from 0 (so descriptors point into fuzzed data too).
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    let avail_idx = u16::from_le_bytes([data[0], data[1]]) % (2 * SIZE);
    mem.write_obj(0u16, GuestAddress(0x1000)).unwrap();
    mem.write_obj(avail_idx, GuestAddress(0x1002)).unwrap();
    for i in 0..SIZE {
        let head = u16::from(data[(2 + usize::from(i)) % data.len()]) % (SIZE + 2);
        mem.write_obj(head, GuestAddress(0x1004 + 2 * u64::from(i)))
            .unwrap();
    }
    let mut q = Queue::new(SIZE).unwrap();
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    let rx = data[2] & 1 == 1;
    let id = Identity {
        mac: [6, 0xb0, 0xc5, 0, 0, 2],
        ip: [10, 0, 0, 2],
    };
    let mut buf = vec![0u8; boxd_vhost_net::FRAME_MAX];
    let mut tx = chain::TxFrame::default();
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    for _ in 0..2 * SIZE {
        let Some(c) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        if rx {
            if let Ok(room) = chain::rx_room(c.clone()) {
                let frame = vec![0x5a; room.min(9000)];
                // The fuzzer's buffers may overlap the descriptor table (as a hostile
                // guest's may, or it may rewrite the table concurrently): then the
                // write can change the chain under the walk and fail. That is the only
                // way a chain rx_room accepted may fail.
                let table = || {
                    let mut t = vec![0u8; 16 * usize::from(SIZE)];
                    mem.read_slice(&mut t, GuestAddress(0)).unwrap();
                    t
                };
                let before = table();
                match chain::write_rx(c, &frame) {
                    Ok(written) => assert!(written <= room),
                    Err(e) => assert_ne!(
                        before,
                        table(),
                        "{e:?} on a chain rx_room accepted, table unchanged"
                    ),
                }
            }
        } else {
            // The copying and the mapping parser must agree on every chain.
            let copied = chain::read_tx(c.clone(), &mut buf);
            let mapped = chain::map_tx(c, &mut tx, buf.len());
            assert_eq!(copied.is_ok(), mapped.is_ok(), "{copied:?} vs {mapped:?}");
            if let (Ok(len), Ok(mlen)) = (copied, mapped) {
                assert_eq!(len, mlen);
                assert_eq!(&tx.head[..tx.head_len], &buf[..tx.head_len]);
                let mut at = tx.head_len;
                for v in &tx.iov {
                    let p = v.iov_base as usize;
                    assert!(
                        p >= base && p + v.iov_len <= base + MEM,
                        "iovec outside guest memory"
                    );
                    // SAFETY: checked just above to lie inside the mapping.
                    let got =
                        unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                    assert_eq!(got, &buf[at..at + v.iov_len]);
                    at += v.iov_len;
                }
                assert_eq!(at, len);
                let _ = filter::check(&buf[..len], &id);
            }
        }
    }
    let _ = filter::check(data, &id);
});
