//! The host side of a VM port: a TAP device with a virtio-net header, so checksum and
//! segmentation offloads pass between the guest and the host kernel untouched.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// The virtio-net header on every frame (virtio 1.x: always 12 bytes, `num_buffers`
/// included).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// What the TAP may hand us (i.e. what the guest accepts on receive).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} must be 1 to 15 characters of letters, digits, '-' and '_'")]
    BadName(String),
    #[error("open /dev/net/tun: {0}; load the tun module and run as root")]
    Open(io::Error),
    #[error("TAP {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// The one interface the vring code needs from a host port, so that AF_XDP can take
/// the TAP's place later without touching it.
pub trait HostPort: Send {
    /// Reads one frame (virtio-net header first); `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame (virtio-net header first).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sends one frame gathered from `iov` (virtio-net header first), `len` bytes.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads for the duration of the call.
    unsafe fn send_iov(&mut self, iov: &[libc::iovec], len: usize) -> io::Result<()>;
    /// Restricts what `recv` may return to the offloads the guest accepted.
    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()>;
    /// Whether the host side steers inbound frames to this queue (a queue whose
    /// guest rings are off is taken out, so flows go to the queues that are served).
    fn set_attached(&mut self, attached: bool) -> io::Result<()>;
    fn fd(&self) -> RawFd;
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_err(name: &str, what: &'static str) -> TapError {
    TapError::Ioctl {
        name: name.to_string(),
        what,
        source: io::Error::last_os_error(),
    }
}

impl Tap {
    /// Creates (or attaches to) the TAP device `name` with `queues` queues (one fd
    /// each, so each vring thread has its own), non-blocking, with the 12-byte
    /// virtio-net header, and brings the link up.
    pub fn open(name: &str, queues: usize) -> Result<Vec<Self>, TapError> {
        if name.is_empty()
            || name.len() > 15
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(TapError::BadName(name.into()));
        }
        assert!(queues >= 1, "a TAP has at least one queue");
        let mut taps = Vec::with_capacity(queues);
        for _ in 0..queues {
            taps.push(Self::open_queue(name)?);
        }
        // The VM's link is IPv4 (the filter drops guest IPv6), so the host side keeps
        // its IPv6 chatter (router solicitations, MLD) off it, and out of the hold.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        taps[0].set_up()?;
        Ok(taps)
    }

    fn open_queue(name: &str) -> Result<Self, TapError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update) an ifreq that lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(ioctl_err(name, "TUNSETIFF"));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int that lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(ioctl_err(name, "TUNSETVNETHDRSZ"));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brings the link up (the addresses are the caller's business).
    fn set_up(&self) -> Result<(), TapError> {
        // SAFETY: a plain datagram socket used only for the interface-flags ioctls.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(ioctl_err(&self.name, "socket for SIOCSIFFLAGS"));
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq for the call.
        let ok = unsafe {
            libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) >= 0 && {
                req.flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) >= 0
            }
        };
        let err = (!ok).then(|| ioctl_err(&self.name, "SIOCSIFFLAGS (link up)"));
        // SAFETY: closing the socket we opened above.
        unsafe { libc::close(sock) };
        err.map_or(Ok(()), Err)
    }
}

impl HostPort for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A TAP takes one frame per write; a short write cannot happen for a frame
        // within its MTU plus offloads, and anything else is an error to count.
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to the TAP",
            ));
        }
        Ok(())
    }

    unsafe fn send_iov(&mut self, iov: &[libc::iovec], len: usize) -> io::Result<()> {
        let count = iov.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the caller guarantees every iovec is readable for the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to the TAP",
            ));
        }
        Ok(())
    }

    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                tun_flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_attached(&mut self, attached: bool) -> io::Result<()> {
        let mut req = IfReq {
            name: [0; 16],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads the ifreq's flags for the call.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is EINVAL.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

use std::os::unix::fs::OpenOptionsExt;
