//! Frames for driving the network backend without a guest: Ethernet/IPv4/UDP/TCP
//! builders and parsers, with virtio-net headers (checksum and segmentation offload
//! requests) in front, as a guest's driver would write them.

/// virtio-net header flags and GSO types.
pub const NEEDS_CSUM: u8 = 1;
pub const DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const VNET_HDR_LEN: usize = 12;
pub const ETH: usize = 14;

pub const GUEST_MAC: [u8; 6] = [0x06, 0xb0, 0xc5, 0, 0, 2];
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
pub const HOST_IP: [u8; 4] = [10, 0, 0, 1];

/// The virtio-net header a frame starts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Self {
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
        }
    }
}

/// The Internet checksum of `data`, folded, starting from `sum`.
pub fn csum(mut sum: u32, data: &[u8]) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut s = 0u32;
    for c in src.chunks(2).chain(dst.chunks(2)) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    s + u32::from(proto) + len as u32
}

/// An Ethernet + IPv4 frame around `l4` (protocol `proto`), IPv4 checksum filled in.
pub fn ipv4_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = ipv4_header(src_mac, dst_mac, src, dst, proto, l4.len());
    f.extend_from_slice(l4);
    f
}

/// The Ethernet and IPv4 headers of a frame whose layer-4 part is `l4_len` bytes.
pub fn ipv4_header(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4_len: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH + 20 + 64);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(0, &ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// A UDP datagram frame with a full checksum.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    payload: &[u8],
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&src.1.to_be_bytes());
    u.extend_from_slice(&dst.1.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = csum(pseudo(src.0, dst.0, 17, len), &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src_mac, dst_mac, src.0, dst.0, 17, &u)
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment as the guest sends it: the checksum is left to the host (virtio-net
/// NEEDS_CSUM, the pseudo-header sum in place), and a payload longer than `mss` asks
/// the host to segment it (GSO TCPv4).
#[allow(clippy::too_many_arguments)]
pub fn tcp_guest_frame(
    dst_mac: [u8; 6],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    opts: &[u8],
    payload: &[u8],
    mss: u16,
) -> Vec<u8> {
    let mut f = tcp_guest_headers(
        dst_mac,
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        opts,
        payload.len(),
        mss,
    );
    f.extend_from_slice(payload);
    f
}

/// The headers (virtio-net, Ethernet, IPv4, TCP) of [`tcp_guest_frame`], for a payload
/// of `payload_len` bytes sent separately: with NEEDS_CSUM, no header depends on the
/// payload's bytes.
#[allow(clippy::too_many_arguments)]
pub fn tcp_guest_headers(
    dst_mac: [u8; 6],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    opts: &[u8],
    payload_len: usize,
    mss: u16,
) -> Vec<u8> {
    assert!(
        opts.len().is_multiple_of(4) && opts.len() <= 40,
        "TCP options come in words"
    );
    let thl = 20 + opts.len();
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((thl / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&window.to_be_bytes());
    t.extend_from_slice(opts);
    // NEEDS_CSUM: the checksum field carries the folded pseudo-header sum.
    let p = pseudo(GUEST_IP, HOST_IP, 6, thl + payload_len);
    let folded = !csum(p, &[]);
    t[16..18].copy_from_slice(&folded.to_be_bytes());
    let gso = payload_len > usize::from(mss);
    let hdr = VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: if gso { GSO_TCPV4 } else { GSO_NONE },
        hdr_len: if gso { (ETH + 20 + thl) as u16 } else { 0 },
        gso_size: if gso { mss } else { 0 },
        csum_start: (ETH + 20) as u16,
        csum_offset: 16,
    };
    let mut f = hdr.bytes().to_vec();
    f.extend_from_slice(&ipv4_header(
        GUEST_MAC,
        dst_mac,
        GUEST_IP,
        HOST_IP,
        6,
        thl + payload_len,
    ));
    f.extend_from_slice(&t);
    f
}

/// The parts of a received TCP/IPv4 frame (virtio-net header first) a test needs.
#[derive(Debug, Clone)]
pub struct TcpSeg {
    pub hdr: VnetHdr,
    pub src_mac: [u8; 6],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The window scale option (SYN segments only).
    pub wscale: Option<u8>,
    pub payload: Vec<u8>,
}

pub fn parse_tcp(frame: &[u8]) -> Option<TcpSeg> {
    let hdr = VnetHdr::parse(frame.get(..VNET_HDR_LEN)?);
    let eth = &frame[VNET_HDR_LEN..];
    if eth.get(12..14)? != [8, 0] {
        return None;
    }
    let ip = &eth[ETH..];
    let ihl = usize::from(ip.first()? & 0xf) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let t = ip.get(ihl..total)?;
    let off = usize::from(t.get(12)? >> 4) * 4;
    let mut wscale = None;
    let mut o = t.get(20..off)?;
    while let Some(&kind) = o.first() {
        match kind {
            0 => break,
            1 => o = &o[1..],
            _ => {
                let len = usize::from(*o.get(1)?).max(2);
                if kind == 3 {
                    wscale = o.get(2).copied();
                }
                o = o.get(len..)?;
            }
        }
    }
    Some(TcpSeg {
        wscale,
        hdr,
        src_mac: eth[6..12].try_into().ok()?,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        flags: t[13],
        window: u16::from_be_bytes([t[14], t[15]]),
        payload: t.get(off..)?.to_vec(),
    })
}

/// An ARP reply from the guest telling the host where `GUEST_IP` is.
pub fn arp_reply(dst_mac: [u8; 6], dst_ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&dst_ip);
    f
}

/// If `frame` is an ARP request for `GUEST_IP`, the asker's MAC and address.
pub fn arp_request_for_guest(frame: &[u8]) -> Option<([u8; 6], [u8; 4])> {
    let eth = frame.get(VNET_HDR_LEN..)?;
    if eth.get(12..14)? != [8, 6] || eth.get(20..22)? != [0, 1] || eth.get(38..42)? != GUEST_IP {
        return None;
    }
    Some((eth[22..28].try_into().ok()?, eth[28..32].try_into().ok()?))
}

/// TCP options of our SYNs: MSS 1460, window scale 7 (so windows can exceed 64 KiB).
pub const SYN_OPTS: [u8; 8] = [2, 4, 0x05, 0xb4, 1, 3, 3, 7];

/// Sequence-space comparison: a is before b.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Where a test guest's frames go: through our backend (a test frontend's queue pair)
/// or, as the benchmark's peer, straight into a TAP (what any TAP-backed backend costs
/// at the very least).
pub trait Link {
    /// Queues a frame (virtio-net header first); false when the link is full.
    fn queue(&mut self, frame: &[u8]) -> anyhow::Result<bool>;
    /// Queues a frame given in parts (headers, then payload), without joining them
    /// first where the link can.
    fn queue_parts(&mut self, parts: &[&[u8]]) -> anyhow::Result<bool> {
        self.queue(&parts.concat())
    }
    /// Makes queued frames go.
    fn flush(&mut self) -> anyhow::Result<()>;
    /// The next received frame (virtio-net header first), or None after `timeout`.
    fn recv(&mut self, timeout: std::time::Duration) -> anyhow::Result<Option<Vec<u8>>>;
    /// True when a received frame is waiting.
    fn rx_ready(&mut self) -> bool;
    /// Sends one frame, waiting (bounded) for room.
    fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self.queue(frame)? {
            anyhow::ensure!(std::time::Instant::now() < deadline, "link stayed full");
            self.flush()?;
            std::thread::yield_now();
        }
        self.flush()
    }
}

/// One queue pair of a test frontend as a [`Link`].
pub struct FrontendLink<'a> {
    pub fe: &'a mut boxd_vhost_net::frontend::Frontend,
    pub pair: usize,
}

impl Link for FrontendLink<'_> {
    fn queue(&mut self, frame: &[u8]) -> anyhow::Result<bool> {
        Ok(self.fe.queue_tx(self.pair, frame)?)
    }
    fn queue_parts(&mut self, parts: &[&[u8]]) -> anyhow::Result<bool> {
        Ok(self.fe.queue_tx_parts(self.pair, parts)?)
    }
    fn flush(&mut self) -> anyhow::Result<()> {
        self.fe.flush(2 * self.pair + 1)?;
        Ok(())
    }
    fn recv(&mut self, timeout: std::time::Duration) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.fe.recv(self.pair, timeout)?)
    }
    fn rx_ready(&mut self) -> bool {
        self.fe.used_pending(2 * self.pair) > 0
    }
}

/// A TAP opened directly, with the virtio-net header, as a [`Link`].
pub struct TapLink {
    pub tap: boxd_vhost_net::Tap,
    buf: Vec<u8>,
}

impl TapLink {
    /// Opens TAP `name` with the offloads a guest accepting TSO and checksums has.
    pub fn open(name: &str) -> anyhow::Result<Self> {
        use boxd_vhost_net::HostPort;
        use boxd_vhost_net::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
        let mut tap = boxd_vhost_net::Tap::open(name, 1)?.remove(0);
        tap.set_offloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)?;
        Ok(Self {
            tap,
            buf: vec![0; 70_000],
        })
    }
}

impl Link for TapLink {
    fn queue(&mut self, frame: &[u8]) -> anyhow::Result<bool> {
        self.queue_parts(&[frame])
    }
    fn queue_parts(&mut self, parts: &[&[u8]]) -> anyhow::Result<bool> {
        use boxd_vhost_net::HostPort;
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let len = parts.iter().map(|p| p.len()).sum();
        // SAFETY: the iovecs point into `parts`, borrowed for the call.
        match unsafe { self.tap.send_iov(&iov, len) } {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    fn recv(&mut self, timeout: std::time::Duration) -> anyhow::Result<Option<Vec<u8>>> {
        use boxd_vhost_net::HostPort;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.tap.recv(&mut self.buf) {
                Ok(n) => return Ok(Some(self.buf[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut p = libc::pollfd {
                fd: self.tap.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 10) as i32) };
        }
    }
    fn rx_ready(&mut self) -> bool {
        use boxd_vhost_net::HostPort;
        let mut p = libc::pollfd {
            fd: self.tap.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }
}

/// A minimal TCP endpoint on the guest side of a [`Link`]: just enough to exchange a
/// bulk stream with the host's real TCP stack, with checksums left to the host
/// (NEEDS_CSUM) and TSO segments both ways.
pub struct GuestTcp<'a> {
    pub link: &'a mut dyn Link,
    pub host_mac: [u8; 6],
    pub deadline: std::time::Instant,
    /// Frames received with a GSO type (host-side TSO reaching the guest whole).
    pub gso_frames: usize,
    /// Largest frame received.
    pub largest: usize,
}

impl GuestTcp<'_> {
    fn expired(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            std::time::Instant::now() < self.deadline,
            "TCP exchange timed out"
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        opts: &[u8],
        payload: &[u8],
        flush: bool,
    ) -> anyhow::Result<bool> {
        let h = tcp_guest_headers(
            self.host_mac,
            sport,
            dport,
            seq,
            ack,
            flags,
            u16::MAX,
            opts,
            payload.len(),
            1448,
        );
        let q = self.link.queue_parts(&[&h, payload])?;
        if flush || !q {
            self.link.flush()?;
        }
        Ok(q)
    }

    /// The next TCP segment from the host, answering ARP on the way.
    fn next(&mut self, wait: std::time::Duration) -> anyhow::Result<Option<TcpSeg>> {
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let Some(f) = self.link.recv(left)? else {
                return Ok(None);
            };
            if let Some((mac, ip)) = arp_request_for_guest(&f) {
                self.link.send(&arp_reply(mac, ip))?;
                continue;
            }
            if let Some(seg) = parse_tcp(&f) {
                self.largest = self.largest.max(f.len());
                if seg.hdr.gso_type != GSO_NONE {
                    self.gso_frames += 1;
                }
                return Ok(Some(seg));
            }
        }
    }

    /// Connects to the host's listener on `dport` and sends `data` in segments of up to
    /// `seg` bytes (TSO), within the host's window; returns when all is acknowledged.
    pub fn send_stream(
        &mut self,
        sport: u16,
        dport: u16,
        data: &[u8],
        seg: usize,
    ) -> anyhow::Result<()> {
        self.send_repeated(sport, dport, data, data.len(), seg)
    }

    /// Like [`Self::send_stream`], with `pattern` repeated up to `len` bytes (under
    /// 2 GiB: one sequence-space half).
    pub fn send_repeated(
        &mut self,
        sport: u16,
        dport: u16,
        pattern: &[u8],
        len: usize,
        seg: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(len < 1 << 31, "stream too long for one sequence-space half");
        let isn = 1000u32;
        let (host_isn, mut window, host_ws) = loop {
            self.expired()?;
            self.send(sport, dport, isn, 0, TCP_SYN, &SYN_OPTS, &[], true)?;
            if let Some(s) = self.next(std::time::Duration::from_millis(500))?
                && s.sport == dport
                && s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                && s.ack == isn + 1
            {
                break (s.seq, u32::from(s.window), u32::from(s.wscale.unwrap_or(0)));
            }
        };
        let ack = host_isn.wrapping_add(1);
        self.send(sport, dport, isn + 1, ack, TCP_ACK, &[], &[], true)?;
        let base = isn + 1;
        let end = base.wrapping_add(len as u32);
        let (mut acked, mut next) = (base, base);
        let mut last_progress = std::time::Instant::now();
        while before(acked, end) {
            self.expired()?;
            let mut sent = false;
            while before(next, end) {
                let off = next.wrapping_sub(base) as usize;
                let at = off % pattern.len();
                let n = seg.min(pattern.len() - at).min(len - off);
                if next.wrapping_sub(acked) as usize + n > window as usize {
                    break;
                }
                if !self.send(
                    sport,
                    dport,
                    next,
                    ack,
                    TCP_ACK | TCP_PSH,
                    &[],
                    &pattern[at..at + n],
                    false,
                )? {
                    break; // ring full: let the backend drain it
                }
                next = next.wrapping_add(n as u32);
                sent = true;
            }
            if sent {
                self.link.flush()?;
            }
            while let Some(s) =
                self.next(std::time::Duration::from_millis(if sent { 0 } else { 5 }))?
            {
                if s.sport == dport && s.flags & TCP_ACK != 0 {
                    if before(acked, s.ack) {
                        acked = s.ack;
                        last_progress = std::time::Instant::now();
                    }
                    window = u32::from(s.window) << host_ws;
                }
                if !self.link.rx_ready() {
                    break;
                }
            }
            if last_progress.elapsed() > std::time::Duration::from_millis(300) {
                next = acked; // go back: something was lost
                last_progress = std::time::Instant::now();
            }
        }
        self.send(sport, dport, end, ack, TCP_ACK | TCP_FIN, &[], &[], true)?;
        Ok(())
    }

    /// Accepts the host's connection to `port` and reads until the host closes it;
    /// returns what arrived.
    pub fn accept_stream(&mut self, port: u16, limit: usize) -> anyhow::Result<Vec<u8>> {
        let mut data = Vec::new();
        self.accept_stream_into(port, limit, &mut |p| data.extend_from_slice(p))?;
        Ok(data)
    }

    /// Like [`Self::accept_stream`], counting the bytes instead of keeping them.
    pub fn accept_stream_len(&mut self, port: u16, limit: usize) -> anyhow::Result<usize> {
        let mut n = 0;
        self.accept_stream_into(port, limit, &mut |p| n += p.len())?;
        Ok(n)
    }

    fn accept_stream_into(
        &mut self,
        port: u16,
        limit: usize,
        sink: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<()> {
        let isn = 5000u32;
        let (peer, host_isn) = loop {
            self.expired()?;
            if let Some(s) = self.next(std::time::Duration::from_millis(200))?
                && s.dport == port
                && s.flags & TCP_SYN != 0
            {
                break (s.sport, s.seq);
            }
        };
        let mut expected = host_isn.wrapping_add(1);
        // Our window: 65535 scaled by 2^7 (SYN_OPTS), 8 MiB.
        let syn_ack = |t: &mut Self, expected: u32| {
            t.send(
                port,
                peer,
                isn,
                expected,
                TCP_SYN | TCP_ACK,
                &SYN_OPTS,
                &[],
                true,
            )
        };
        syn_ack(self, expected)?;
        let mut got = 0usize;
        loop {
            self.expired()?;
            let Some(s) = self.next(std::time::Duration::from_millis(500))? else {
                // Nothing new: repeat the last acknowledgement.
                self.send(port, peer, isn + 1, expected, TCP_ACK, &[], &[], true)?;
                continue;
            };
            if s.dport != port || s.sport != peer {
                continue;
            }
            if s.flags & TCP_SYN != 0 {
                // Our SYN-ACK was lost: send it again.
                syn_ack(self, expected)?;
                continue;
            }
            if s.seq == expected && !s.payload.is_empty() {
                anyhow::ensure!(got + s.payload.len() <= limit, "more than {limit} bytes");
                got += s.payload.len();
                sink(&s.payload);
                expected = expected.wrapping_add(s.payload.len() as u32);
            }
            let fin =
                s.flags & TCP_FIN != 0 && s.seq.wrapping_add(s.payload.len() as u32) == expected;
            if fin {
                expected = expected.wrapping_add(1);
            }
            let flags = if fin { TCP_ACK | TCP_FIN } else { TCP_ACK };
            self.send(port, peer, isn + 1, expected, flags, &[], &[], true)?;
            if fin {
                return Ok(());
            }
        }
    }
}

/// Whether an Ethernet frame holding IPv4/UDP has a correct IPv4 header checksum and
/// a correct (or absent) UDP checksum.
pub fn udp_checksum_ok(frame: &[u8]) -> bool {
    l4_checksum_ok(frame, 17)
}

/// Whether an Ethernet frame holding IPv4 with protocol `proto` (TCP 6 or UDP 17) has
/// correct IPv4 and transport checksums.
pub fn l4_checksum_ok(frame: &[u8], proto: u8) -> bool {
    if frame.len() < ETH + 20 || frame[ETH + 9] != proto {
        return false;
    }
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    if frame.len() < ETH + total || total < ihl {
        return false;
    }
    if csum(0, &frame[ETH..ETH + ihl]) != 0 {
        return false;
    }
    let l4 = &frame[ETH + ihl..ETH + total];
    if proto == 17 && l4.len() >= 8 && l4[6..8] == [0, 0] {
        return true;
    }
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&frame[ETH + 12..ETH + 16]);
    dst.copy_from_slice(&frame[ETH + 16..ETH + 20]);
    csum(pseudo(src, dst, proto, l4.len()), l4) == 0
}

/// An IPv4 packet built field by field, for data-path fixtures: every checksum is
/// computed for the fields as given, so a fixture's expected output is simply the same
/// builder with the rewritten fields.
#[derive(Clone, Debug)]
pub struct Ip4 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset (in 8-byte units), as on the wire.
    pub frag: u16,
    pub proto: u8,
    /// IP options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// The transport header and payload; its checksum field is filled for TCP and UDP
    /// over the whole of `l4` (use [`Ip4::fragments`] to cut it afterwards).
    pub l4: Vec<u8>,
}

impl Ip4 {
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8, l4: Vec<u8>) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x11],
            dst_mac: [0x02, 0, 0, 0, 0, 0x22],
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            proto,
            options: Vec::new(),
            l4,
        }
    }

    pub fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Self {
        let mut u = Vec::new();
        u.extend_from_slice(&src.1.to_be_bytes());
        u.extend_from_slice(&dst.1.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        Self::new(src.0, dst.0, 17, u)
    }

    pub fn tcp(
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        seq: u32,
        flags: u8,
        payload: &[u8],
    ) -> Self {
        let mut t = Vec::new();
        t.extend_from_slice(&src.1.to_be_bytes());
        t.extend_from_slice(&dst.1.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(payload);
        Self::new(src.0, dst.0, 6, t)
    }

    pub fn icmp_echo(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Self {
        let mut i = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        i.extend_from_slice(payload);
        let c = csum(0, &i);
        i[2..4].copy_from_slice(&c.to_be_bytes());
        Self::new(src, dst, 1, i)
    }

    /// The transport part with its checksum filled in.
    fn l4_with_checksum(&self) -> Vec<u8> {
        let mut l4 = self.l4.clone();
        let at = match self.proto {
            6 if l4.len() >= 20 => Some(16),
            17 if l4.len() >= 8 => Some(6),
            _ => None,
        };
        if let Some(at) = at {
            l4[at] = 0;
            l4[at + 1] = 0;
            let mut c = csum(pseudo(self.src, self.dst, self.proto, l4.len()), &l4);
            if self.proto == 17 && c == 0 {
                c = 0xffff;
            }
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    fn frame_with(&self, l4: &[u8], frag: u16, id: u16) -> Vec<u8> {
        let ihl = 20 + self.options.len();
        let mut f = Vec::with_capacity(ETH + ihl + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src);
        ip[16..20].copy_from_slice(&self.dst);
        ip.extend_from_slice(&self.options);
        let c = csum(0, &ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        self.frame_with(&self.l4_with_checksum(), self.frag, self.id)
    }

    /// The datagram cut into fragments of `size` bytes of transport data (a multiple
    /// of 8), checksum computed over the whole datagram first.
    pub fn fragments(&self, size: usize) -> Vec<Vec<u8>> {
        assert!(size.is_multiple_of(8) && size > 0);
        let l4 = self.l4_with_checksum();
        let mut out = Vec::new();
        let mut off = 0;
        while off < l4.len() {
            let end = (off + size).min(l4.len());
            let more = if end < l4.len() { 0x2000 } else { 0 };
            out.push(self.frame_with(&l4[off..end], more | (off / 8) as u16, self.id));
            off = end;
        }
        out
    }
}
