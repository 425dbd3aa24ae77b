//! AF_VSOCK stream sockets with libc (std has none): listen inside the guest, and dial
//! the host.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

pub const VMADDR_CID_ANY: u32 = u32::MAX;
pub const VMADDR_CID_HOST: u32 = 2;

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value before we fill it.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub struct Listener(OwnedFd);

impl Listener {
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let a = addr(VMADDR_CID_ANY, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` is a valid sockaddr_vm of `len` bytes for the duration of the call.
        if unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&a as *const libc::sockaddr_vm).cast(),
                len,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Accepts one connection as a `File` (read/write are the socket's recv/send).
    pub fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: accept4 on our listening socket; peer address not requested.
            let fd = unsafe {
                libc::accept4(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor from accept4.
                return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Connects to `port` on the host.
pub fn connect_host(port: u32) -> io::Result<File> {
    let fd = socket()?;
    let a = addr(VMADDR_CID_HOST, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes for the duration of the call.
    if unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&a as *const libc::sockaddr_vm).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

/// shutdown(2) on a socket held as a File.
pub fn shutdown(f: &File, how: libc::c_int) {
    // SAFETY: shutdown on a descriptor we hold; failure (e.g. already closed) is harmless.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(f), how) };
}
