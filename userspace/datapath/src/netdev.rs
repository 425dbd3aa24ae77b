//! Interface names, indexes and MACs (from the kernel, in the caller's network namespace).

use crate::{DpError, Result};

/// The ifindex of `name`.
pub fn ifindex(name: &str) -> Result<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(DpError::Invalid(format!(
            "{name:?} is not an interface name (1 to 15 bytes, no '/')"
        )));
    }
    let c = std::ffi::CString::new(name)
        .map_err(|_| DpError::Invalid(format!("{name:?} contains a NUL byte")))?;
    // SAFETY: a NUL-terminated string; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(DpError::NoInterface(name.into()));
    }
    Ok(i)
}

/// The name of interface `ifindex`.
pub fn name(ifindex: u32) -> Result<String> {
    let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: the buffer has IFNAMSIZ bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(DpError::NoInterface(format!("ifindex {ifindex}")));
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(s.to_string_lossy().into_owned())
}

/// The name of `ifindex`, or a placeholder when it is gone.
pub fn name_or_index(ifindex: u32) -> String {
    name(ifindex).unwrap_or_else(|_| format!("#{ifindex}"))
}

/// The MAC address of `name` (from sysfs, which follows the caller's namespace for
/// processes that mounted it there; falls back to SIOCGIFHWADDR).
pub fn mac(name: &str) -> Result<[u8; 6]> {
    ifindex(name)?;
    // SAFETY: a plain UDP socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(crate::io_err("socket for SIOCGIFHWADDR")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: an ifreq zeroed, then the name copied within IFNAMSIZ - 1 bytes.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(crate::io_err(format!("reading the MAC of {name}"))(err));
    }
    // SAFETY: after SIOCGIFHWADDR the union holds the hardware address.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for i in 0..6 {
        mac[i] = data[i] as u8;
    }
    Ok(mac)
}

/// The MTU of `name`.
pub fn mtu(name: &str) -> Result<u32> {
    ifindex(name)?;
    // SAFETY: a plain UDP socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(crate::io_err("socket for SIOCGIFMTU")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: an ifreq zeroed, then the name copied within IFNAMSIZ - 1 bytes.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU fills the ifreq we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(crate::io_err(format!("reading the MTU of {name}"))(err));
    }
    // SAFETY: after SIOCGIFMTU the union holds the MTU.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || {
        DpError::Invalid(format!(
            "{s:?} is not a MAC address (like 06:b0:c5:00:00:02)"
        ))
    };
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// The neighbour (interface and MAC) through which `addr` is reached, resolved by the
/// kernel: a datagram to the discard port makes it ARP, then /proc/net/arp (which shows
/// the caller's namespace) has the answer. Bounded to `within`.
pub fn resolve_neighbour(
    addr: std::net::Ipv4Addr,
    within: std::time::Duration,
) -> Result<(u32, [u8; 6])> {
    let deadline = std::time::Instant::now() + within;
    let mut poked = std::time::Instant::now() - within;
    loop {
        if let Some((dev, mac)) = arp_entry(addr)? {
            return Ok((ifindex(&dev)?, mac));
        }
        if std::time::Instant::now() >= deadline {
            return Err(DpError::Invalid(format!(
                "node address {addr} does not answer ARP (is it on a directly connected \
                 network, and is the node up?)"
            )));
        }
        if poked.elapsed() >= std::time::Duration::from_millis(300) {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")
                .map_err(crate::io_err("a UDP socket to resolve a neighbour"))?;
            // The datagram itself does not matter (discard port); the ARP it causes does.
            let _ = s.send_to(&[], (addr, 9));
            poked = std::time::Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A complete ARP entry for `addr`: (device, MAC).
fn arp_entry(addr: std::net::Ipv4Addr) -> Result<Option<(String, [u8; 6])>> {
    let text =
        std::fs::read_to_string("/proc/net/arp").map_err(crate::io_err("reading /proc/net/arp"))?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[0] != addr.to_string() {
            continue;
        }
        // Flags 0x2: ATF_COM, the entry is complete.
        let complete = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap_or(0) & 2 != 0;
        if complete && let Ok(mac) = parse_mac(f[3]) {
            return Ok(Some((f[5].to_string(), mac)));
        }
    }
    Ok(None)
}
