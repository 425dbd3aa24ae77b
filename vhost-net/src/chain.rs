//! Descriptor chains from a guest's virtqueues, parsed defensively: a chain is
//! guest-controlled data, so every address, length, flag and link is checked before a
//! byte moves, and a bad chain is a counted [`Malformed`] verdict, never a panic or a
//! stuck backend. This is the code the fuzz target (`vhost-net/fuzz`) drives.

use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// No descriptor at all (bad head index or unreadable descriptor table).
    Empty,
    /// The chain does not end: a loop, a link past the table, or a bad indirect table.
    Unterminated,
    /// A descriptor points outside guest memory.
    BadAddress,
    /// A transmit chain with device-writable descriptors, or a receive chain with
    /// device-readable ones.
    WrongDirection,
    /// More bytes than the largest frame (transmit) or than any receive needs.
    TooLong,
}

/// Walks `chain`, checking that it ends and that every descriptor goes one way
/// (`writable`), and calls `each` with each descriptor's address and length.
fn walk<M>(
    chain: DescriptorChain<M>,
    writable: bool,
    max_bytes: usize,
    mut each: impl FnMut(vm_memory::GuestAddress, usize) -> Result<(), Malformed>,
) -> Result<usize, Malformed>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut total = 0usize;
    let mut count = 0usize;
    let mut more = false;
    for d in chain {
        count += 1;
        more = d.has_next();
        if d.is_write_only() != writable {
            return Err(Malformed::WrongDirection);
        }
        let len = d.len() as usize;
        total = total.checked_add(len).ok_or(Malformed::TooLong)?;
        if total > max_bytes {
            return Err(Malformed::TooLong);
        }
        each(d.addr(), len)?;
    }
    match (count, more) {
        (0, _) => Err(Malformed::Empty),
        // The iterator stopped while the last descriptor still links on: it ran out of
        // its time-to-live (a loop) or the link was invalid.
        (_, true) => Err(Malformed::Unterminated),
        _ => Ok(total),
    }
}

/// Copies a transmit chain (device-readable descriptors) into `buf`; returns the
/// frame's length (virtio-net header included).
pub fn read_tx<M>(chain: DescriptorChain<M>, buf: &mut [u8]) -> Result<usize, Malformed>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let keep = chain.clone();
    let mem = keep.memory();
    let mut at = 0usize;
    walk(chain, false, buf.len(), |addr, len| {
        mem.read_slice(&mut buf[at..at + len], addr)
            .map_err(|_| Malformed::BadAddress)?;
        at += len;
        Ok(())
    })
}

/// Room in a receive chain (device-writable descriptors), with every descriptor's
/// range checked against guest memory.
pub fn rx_room<M>(chain: DescriptorChain<M>) -> Result<usize, Malformed>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let keep = chain.clone();
    let mem = keep.memory();
    walk(chain, true, u32::MAX as usize, |addr, len| {
        if len > 0 && !mem.check_range(addr, len, vm_memory::Permissions::ReadWrite) {
            return Err(Malformed::BadAddress);
        }
        Ok(())
    })
}

/// Writes `data` into a receive chain already checked by [`rx_room`]; returns the
/// bytes written (the chain's room or the data's length, whichever is smaller).
pub fn write_rx<M>(chain: DescriptorChain<M>, data: &[u8]) -> Result<usize, Malformed>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let keep = chain.clone();
    let mem = keep.memory();
    let mut at = 0usize;
    walk(chain, true, u32::MAX as usize, |addr, len| {
        let n = len.min(data.len() - at);
        if n > 0 {
            mem.write_slice(&data[at..at + n], addr)
                .map_err(|_| Malformed::BadAddress)?;
            at += n;
        }
        Ok(())
    })?;
    Ok(at)
}

/// Bytes of every transmit frame copied out of guest memory before they are checked
/// and sent: the virtio-net header and every header field the identity filter reads
/// (Ethernet, and IPv4 or ARP), so the guest cannot change them between check and send.
pub const TX_HEAD: usize = 128;

/// A transmit frame mapped for a gather write: its head copied (and checked), the rest
/// left in guest memory, described by `iov`.
pub struct TxFrame {
    pub head: [u8; TX_HEAD],
    pub head_len: usize,
    pub len: usize,
    /// The rest of the frame, in guest memory (valid while the memory guard the chain
    /// was read with is held).
    pub iov: Vec<libc::iovec>,
}

impl Default for TxFrame {
    fn default() -> Self {
        Self {
            head: [0; TX_HEAD],
            head_len: 0,
            len: 0,
            iov: Vec::with_capacity(32),
        }
    }
}

// SAFETY: the raw pointers in `iov` are only dereferenced by the kernel during a
// writev made by the thread that holds the guest-memory guard they came from.
unsafe impl Send for TxFrame {}

/// Maps a transmit chain: the first [`TX_HEAD`] bytes copied into `f.head`, the rest
/// as iovecs into guest memory, at most `max` bytes in all. One copy fewer than
/// [`read_tx`]: the kernel copies straight from guest memory.
pub fn map_tx<M>(chain: DescriptorChain<M>, f: &mut TxFrame, max: usize) -> Result<usize, Malformed>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let keep = chain.clone();
    let mem = keep.memory();
    f.head_len = 0;
    f.iov.clear();
    let len = walk(chain, false, max, |addr, len| {
        let copy = len.min(TX_HEAD - f.head_len);
        if copy > 0 {
            mem.read_slice(&mut f.head[f.head_len..f.head_len + copy], addr)
                .map_err(|_| Malformed::BadAddress)?;
            f.head_len += copy;
        }
        let rest = len - copy;
        if rest > 0 {
            let at = vm_memory::GuestAddress(
                addr.0
                    .checked_add(copy as u64)
                    .ok_or(Malformed::BadAddress)?,
            );
            let slices = mem
                .get_slices(at, rest, vm_memory::Permissions::Read)
                .map_err(|_| Malformed::BadAddress)?;
            for s in slices {
                let s = s.map_err(|_| Malformed::BadAddress)?;
                // writev takes at most 1024 entries (IOV_MAX), one is the head.
                if f.iov.len() >= 1023 {
                    return Err(Malformed::TooLong);
                }
                f.iov.push(libc::iovec {
                    iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                });
            }
        }
        Ok(())
    })?;
    f.len = len;
    Ok(len)
}
