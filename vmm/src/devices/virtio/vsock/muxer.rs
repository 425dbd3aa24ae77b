//! The host side of virtio-vsock: guest stream connections mapped onto unix sockets.
//!
//! The convention is Firecracker's, so tools written for it work unchanged:
//! - host to guest: connect to the VM's socket `<uds>`, write `CONNECT <port>\n`, read
//!   `OK <host port>\n` once the guest accepted, then the stream is the connection;
//! - guest to host: a guest connecting to CID 2 port P reaches whoever listens on the
//!   unix socket `<uds>_P`.
//!
//! Flow control is vsock's credit scheme: each side advertises a receive buffer and how
//! much of it it has consumed, and never sends beyond the peer's free space. Every
//! buffer here is bounded by that credit, so a slow unix peer slows the guest instead of
//! growing memory.

use super::packet::*;
use crate::devices::virtio::worker::Registrar;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use vmm_sys_util::epoll::EventSet;

/// Receive buffer we advertise per connection (guest-to-host bytes we may hold).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Host-to-guest bytes read ahead from a unix socket per connection.
const STAGE_MAX: usize = 64 << 10;
/// Largest payload the guest may send in one packet (Linux: 64 KiB).
pub const PAYLOAD_MAX: usize = 64 << 10;
const CONNS_MAX: usize = 1024;
const PENDING_MAX: usize = 64;
const CONTROL_MAX: usize = 4096;
/// Longest "CONNECT <port>\n" line accepted.
const CONNECT_LINE_MAX: usize = 64;
/// Connections accepted per listener wake-up; the rest wait for the next one.
const ACCEPTS_PER_WAKE: usize = 32;
/// Host ports for host-initiated connections are allocated from here up.
const LOCAL_PORT_FIRST: u32 = 1 << 30;

pub const LISTENER_TOKEN: u64 = 3;
const FIRST_DYNAMIC_TOKEN: u64 = 16;

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Guest-to-host bytes the unix socket has not taken yet (at most BUF_ALLOC).
    tx: VecDeque<u8>,
    /// Guest bytes forwarded to the unix socket, mod 2^32 (advertised as fwd_cnt).
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Host-to-guest bytes read from the socket, not yet in a guest buffer.
    stage: Vec<u8>,
    /// Host-to-guest bytes sent, and the guest's advertised buffer and consumption.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The unix side reached EOF; SHUTDOWN goes out once `stage` drains.
    local_eof: bool,
    shutdown_sent: bool,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            tx: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            stage: Vec::new(),
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            local_eof: false,
            shutdown_sent: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            interest: EventSet::empty(),
        }
    }

    /// Free space in the guest's receive buffer.
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn wanted_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        let can_read = self.state == State::Established
            && !self.local_eof
            && !self.peer_shut_rcv
            && self.stage.is_empty()
            && self.peer_free() > 0;
        if can_read {
            e |= EventSet::IN;
        }
        if !self.tx.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Writes buffered guest bytes to the unix socket; Err means the peer is gone.
    fn flush_tx(&mut self) -> std::io::Result<()> {
        // Bounded by the buffer size: each round removes at least one byte or stops.
        while !self.tx.is_empty() {
            let (a, _) = self.tx.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A host client that connected to `<uds>` and has not sent its CONNECT line yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    pending: HashMap<u64, Pending>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Control>,
    ready: VecDeque<Key>,
}

impl Muxer {
    /// Binds `<uds>`; a stale socket file from a dead VMM is replaced.
    pub fn bind(uds: &Path, guest_cid: u64) -> std::io::Result<Self> {
        if uds.exists() {
            // Refuse to steal the socket of a live VMM: only remove it if nobody answers.
            if UnixStream::connect(uds).is_ok() {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("{} is served by a running VMM", uds.display()),
                ));
            }
            std::fs::remove_file(uds)?;
        }
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            uds: uds.to_path_buf(),
            listener,
            pending: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_DYNAMIC_TOKEN,
            next_local_port: LOCAL_PORT_FIRST,
            control: VecDeque::new(),
            ready: VecDeque::new(),
        })
    }

    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn queue_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= CONTROL_MAX {
            tracing::warn!(
                op,
                "vsock control queue full; dropping a packet for the guest"
            );
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    /// Something the worker must deliver to the guest is waiting.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    fn update_interest(&mut self, reg: &Registrar, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.wanted_interest();
        if want != c.interest {
            if let Err(e) = reg.modify(c.stream.as_raw_fd(), c.token, want) {
                tracing::warn!("vsock: cannot update interest of a connection: {e}");
            }
            c.interest = want;
        }
    }

    fn remove(&mut self, reg: &Registrar, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = reg.remove(c.stream.as_raw_fd());
            self.tokens.remove(&c.token);
            self.ready.retain(|k| *k != key);
        }
    }

    fn reset(&mut self, reg: &Registrar, key: Key) {
        self.remove(reg, key);
        self.queue_control(key, OP_RST, 0);
    }

    /// New host clients on `<uds>`.
    pub fn accept(&mut self, reg: &Registrar) {
        for _ in 0..ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept on {} failed: {e}", self.uds.display());
                    return;
                }
            };
            if self.pending.len() >= PENDING_MAX || self.conns.len() >= CONNS_MAX {
                tracing::warn!("vsock: too many connections; refusing a host client");
                continue; // dropping the stream closes it
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.token();
            if reg.add(stream.as_raw_fd(), token, EventSet::IN).is_ok() {
                self.pending.insert(
                    token,
                    Pending {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    /// Readiness on a pending host client or an established connection.
    pub fn event(&mut self, reg: &Registrar, token: u64, events: EventSet) {
        if self.pending.contains_key(&token) {
            self.read_connect_line(reg, token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let connecting = self
            .conns
            .get(&key)
            .is_some_and(|c| c.state == State::Connecting);
        if connecting && events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The host client gave up before the guest answered.
            self.reset(reg, key);
            return;
        }
        if events.contains(EventSet::OUT) {
            let c = self
                .conns
                .get_mut(&key)
                .expect("token maps to a live connection");
            if c.flush_tx().is_err() {
                self.reset(reg, key);
                return;
            }
            self.after_forward(reg, key);
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.read_host(reg, key);
        }
        self.update_interest(reg, key);
    }

    fn read_connect_line(&mut self, reg: &Registrar, token: u64) {
        let p = self.pending.get_mut(&token).expect("checked by caller");
        let mut buf = [0u8; CONNECT_LINE_MAX];
        let n = match p.stream.read(&mut buf[..CONNECT_LINE_MAX - p.line.len()]) {
            Ok(0) | Err(_) => {
                let p = self.pending.remove(&token).expect("present");
                let _ = reg.remove(p.stream.as_raw_fd());
                return;
            }
            Ok(n) => n,
        };
        p.line.extend_from_slice(&buf[..n]);
        let Some(end) = p.line.iter().position(|b| *b == b'\n') else {
            if p.line.len() >= CONNECT_LINE_MAX {
                let p = self.pending.remove(&token).expect("present");
                let _ = reg.remove(p.stream.as_raw_fd());
            }
            return;
        };
        let mut p = self.pending.remove(&token).expect("present");
        let line = String::from_utf8_lossy(&p.line[..end]).into_owned();
        let early_data = p.line[end + 1..].to_vec();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            let _ = p.stream.write_all(b"ERR expected \"CONNECT <port>\"\n");
            let _ = reg.remove(p.stream.as_raw_fd());
            return;
        };
        // Find a free host port (bounded: at most CONNS_MAX are in use).
        let mut local = self.next_local_port;
        for _ in 0..=CONNS_MAX {
            if !self.conns.contains_key(&(local, peer_port)) {
                break;
            }
            local = local.wrapping_add(1).max(LOCAL_PORT_FIRST);
        }
        self.next_local_port = local.wrapping_add(1).max(LOCAL_PORT_FIRST);
        let key = (local, peer_port);
        let _ = reg.modify(p.stream.as_raw_fd(), token, EventSet::empty());
        let mut conn = Conn::new(p.stream, token, State::Connecting);
        // Bytes the client sent right after its CONNECT line go out once connected.
        conn.stage = early_data;
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.queue_control(key, OP_REQUEST, 0);
    }

    fn read_host(&mut self, reg: &Registrar, key: Key) {
        let c = self.conns.get_mut(&key).expect("live connection");
        if c.state != State::Established || c.local_eof || !c.stage.is_empty() {
            return;
        }
        let room = (c.peer_free() as usize).min(STAGE_MAX);
        if room == 0 {
            return;
        }
        c.stage.resize(room, 0);
        match c.stream.read(&mut c.stage) {
            Ok(0) => {
                c.stage.clear();
                c.local_eof = true;
                self.maybe_send_shutdown(key);
            }
            Ok(n) => {
                c.stage.truncate(n);
                self.ready.push_back(key);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                c.stage.clear();
            }
            Err(_) => {
                c.stage.clear();
                self.reset(reg, key);
            }
        }
    }

    /// After the unix side ended: tell the guest once everything staged is delivered.
    fn maybe_send_shutdown(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.local_eof && c.stage.is_empty() && !c.shutdown_sent {
            c.shutdown_sent = true;
            self.queue_control(key, OP_SHUTDOWN, SHUTDOWN_SEND);
        }
    }

    /// After guest bytes reached the unix socket: half-close or finish, and tell the
    /// guest about freed credit when enough accumulated.
    fn after_forward(&mut self, reg: &Registrar, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.tx.is_empty() && c.peer_shut_send {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            if c.peer_shut_rcv || c.local_eof {
                // Both directions are done: end the connection.
                self.reset(reg, key);
                return;
            }
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.queue_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// A packet the guest put on its tx queue.
    pub fn on_guest_packet(&mut self, reg: &Registrar, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: dropped a packet with foreign addresses"
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match hdr.op {
                OP_REQUEST => self.guest_connect(reg, key, hdr),
                OP_RST => {}
                _ => self.queue_control(key, OP_RST, 0),
            }
            return;
        }
        let c = self.conns.get_mut(&key).expect("checked above");
        let had_credit = c.peer_free() > 0;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        if !had_credit && c.peer_free() > 0 && !c.stage.is_empty() && c.state == State::Established
        {
            self.ready.push_back(key);
        }
        let c = self.conns.get_mut(&key).expect("checked above");
        match hdr.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                let line = format!("OK {}\n", key.0);
                c.tx.extend(line.as_bytes());
                // The OK line is not guest data: keep it out of the credit count.
                c.fwd_cnt = c.fwd_cnt.wrapping_sub(line.len() as u32);
                if c.flush_tx().is_err() {
                    self.reset(reg, key);
                    return;
                }
                if !c.stage.is_empty() {
                    self.ready.push_back(key);
                }
            }
            OP_RW if c.state == State::Established => {
                if payload.len() > BUF_ALLOC as usize - c.tx.len() {
                    tracing::warn!("vsock: guest sent beyond its credit; resetting the connection");
                    self.reset(reg, key);
                    return;
                }
                c.tx.extend(payload);
                if c.flush_tx().is_err() {
                    self.reset(reg, key);
                    return;
                }
                self.after_forward(reg, key);
            }
            OP_CREDIT_REQUEST => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                c.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                c.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if c.peer_shut_rcv {
                    c.stage.clear();
                    self.ready.retain(|k| *k != key);
                }
                self.after_forward(reg, key);
            }
            OP_RST => {
                self.remove(reg, key);
                return;
            }
            _ => {
                self.reset(reg, key);
                return;
            }
        }
        self.update_interest(reg, key);
    }

    fn guest_connect(&mut self, reg: &Registrar, key: Key, hdr: &Header) {
        if self.conns.len() >= CONNS_MAX {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds.display(), key.0);
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.queue_control(key, OP_RST, 0);
                return;
            }
        };
        let token = self.token();
        if reg
            .add(stream.as_raw_fd(), token, EventSet::empty())
            .is_err()
        {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        let mut conn = Conn::new(stream, token, State::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.queue_control(key, OP_RESPONSE, 0);
        self.update_interest(reg, key);
    }

    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_sent = c.fwd_cnt;
                (BUF_ALLOC, c.fwd_cnt)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `payload_max` bytes of payload.
    pub fn next_rx(
        &mut self,
        reg: &Registrar,
        payload_max: usize,
        payload: &mut Vec<u8>,
    ) -> Option<Header> {
        payload.clear();
        if let Some(c) = self.control.pop_front() {
            return Some(self.header(c.key, c.op, c.flags, 0));
        }
        // Bounded: each ready entry is either served or dropped.
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let n = c.stage.len().min(payload_max).min(c.peer_free() as usize);
            if n == 0 {
                // Out of guest credit: the data stays staged, the connection leaves the
                // ready list, and the guest's next credit update puts it back. Ask for
                // that update once, in case the guest is waiting for us.
                if !c.stage.is_empty() {
                    return Some(self.header(key, OP_CREDIT_REQUEST, 0, 0));
                }
                continue;
            }
            payload.extend(c.stage.drain(..n));
            c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
            if c.stage.is_empty() {
                self.maybe_send_shutdown(key);
            } else {
                self.ready.push_back(key);
            }
            self.update_interest(reg, key);
            return Some(self.header(key, OP_RW, 0, n as u32));
        }
        None
    }
}
