//! Authoritative DNS for the machines' zone.
//!
//! Every node answers for `<zone>` from its own copy of the replicated state: SOA and NS
//! at the apex (with glue), `<name>.<zone>` A records for every machine (pointing at the
//! proxy address by default, or at the machine's own public IPv4), the ACME DNS-01 TXT
//! records, NXDOMAIN for names that don't exist, REFUSED for names outside the zone (no
//! recursion, ever). A reconciler rebuilds an immutable [`Zone`] whenever the applied
//! index moves, so answers follow `new`/`rm` within one apply.
//!
//! The wire format is hickory's (hickory-server's request and response types, hickory-
//! proto's records); the sockets are ours: hickory-server's `ServerFuture` spawns a task
//! per UDP query and does not bound TCP connections, so UDP is served by one blocking
//! thread per core on `SO_REUSEPORT` sockets and TCP by a bounded accept loop.
//! Amplification: ANY gets the RFC 8482 minimal answer, UDP answers are capped at 1232
//! bytes (or 512 without EDNS) with TC set beyond, and each source address has a token
//! bucket; a source over its rate gets every second answer as an empty truncated reply
//! (a real resolver retries over TCP) and the rest dropped.

use hickory_proto::op::{Edns, Header, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, HINFO, NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// TTL of machine records: short, machines come and go.
pub const HOST_TTL: u32 = 30;
/// TTL of the apex records (SOA, NS, glue).
pub const APEX_TTL: u32 = 3600;
/// Largest UDP answer we send, whatever the client advertises (DNS flag day 2020).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Largest query we read (UDP datagram or TCP message).
pub const MAX_QUERY: usize = 4096;
/// Concurrent TCP connections, idle time per connection, queries per connection.
pub const MAX_TCP_CONNECTIONS: usize = 256;
pub const TCP_IDLE: Duration = Duration::from_secs(10);
pub const TCP_MAX_QUERIES: usize = 1000;

/// What the zone holds, in plain values: built from the replicated state (or a file, for
/// `boxd dns serve`), compared to decide whether to rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub struct ZoneSpec {
    /// The zone, e.g. `boxd.example.com` (no trailing dot).
    pub zone: String,
    /// Name servers: (host name, address). Names inside the zone get glue A records.
    pub nameservers: Vec<(String, Ipv4Addr)>,
    /// The apex's own A record (the proxy), if any.
    pub apex: Option<Ipv4Addr>,
    /// `<label>.<zone>` A records.
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// TXT records: (owner name relative to the zone, e.g. `_acme-challenge.app`, value).
    pub txt: Vec<(String, String)>,
}

/// Why a zone could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("{0:?} is not a valid DNS name: {1}; use labels of a-z, 0-9 and '-'")]
    BadName(String, String),
    #[error("no zone is set; set `zone` in the server configuration")]
    NoZone,
}

/// An immutable, indexed zone: what the query path reads.
#[derive(Debug)]
pub struct Zone {
    origin: LowerName,
    soa: Record,
    ns: Vec<Record>,
    /// Records by owner name (A, TXT, NS glue), every owner that exists in the zone.
    names: HashMap<LowerName, Vec<Record>>,
}

fn name(s: &str) -> Result<Name, ZoneError> {
    let bad = |why: &str| ZoneError::BadName(s.into(), why.into());
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    if trimmed.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("labels are 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("only letters, digits, '-' and '_' are allowed"));
        }
    }
    let mut n = Name::from_ascii(s).map_err(|e| ZoneError::BadName(s.into(), e.to_string()))?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

impl Zone {
    /// Builds the zone; `serial` goes into the SOA.
    pub fn build(spec: &ZoneSpec, serial: u32) -> Result<Zone, ZoneError> {
        if spec.zone.is_empty() {
            return Err(ZoneError::NoZone);
        }
        let origin = name(&spec.zone)?;
        let sub = |label: &str| -> Result<Name, ZoneError> {
            let full = format!("{label}.{}", spec.zone);
            name(&full)
        };
        let mut names: HashMap<LowerName, Vec<Record>> = HashMap::new();
        let mut add = |owner: &Name, r: Record| {
            names.entry(LowerName::new(owner)).or_default().push(r);
        };
        let mut ns = Vec::new();
        for (host, addr) in &spec.nameservers {
            let host = name(host)?;
            ns.push(Record::from_rdata(
                origin.clone(),
                APEX_TTL,
                RData::NS(NS(host.clone())),
            ));
            if origin.zone_of(&host) {
                add(
                    &host,
                    Record::from_rdata(host.clone(), APEX_TTL, RData::A(A(*addr))),
                );
            }
        }
        let mname = ns
            .first()
            .and_then(|r| match &r.data {
                RData::NS(n) => Some(n.0.clone()),
                _ => None,
            })
            .unwrap_or_else(|| origin.clone());
        let soa = Record::from_rdata(
            origin.clone(),
            APEX_TTL,
            RData::SOA(SOA::new(
                mname,
                sub("hostmaster")?,
                serial,
                3600,
                600,
                86400,
                // Negative answers are cached this long: short, names appear with `new`.
                HOST_TTL,
            )),
        );
        add(&origin, soa.clone());
        for r in &ns {
            add(&origin, r.clone());
        }
        if let Some(apex) = spec.apex {
            add(
                &origin,
                Record::from_rdata(origin.clone(), HOST_TTL, RData::A(A(apex))),
            );
        }
        for (label, addr) in &spec.hosts {
            let owner = sub(label)?;
            add(
                &owner,
                Record::from_rdata(owner.clone(), HOST_TTL, RData::A(A(*addr))),
            );
        }
        for (rel, value) in &spec.txt {
            let owner = sub(rel)?;
            add(
                &owner,
                Record::from_rdata(
                    owner.clone(),
                    // ACME validators must see a fresh value: no caching to speak of.
                    1,
                    RData::TXT(TXT::new(vec![value.clone()])),
                ),
            );
        }
        // Empty non-terminals (`app.zone` when only `_acme-challenge.app.zone` has
        // records) exist: NODATA, not NXDOMAIN (RFC 8020).
        let owners: Vec<LowerName> = names.keys().cloned().collect();
        for owner in owners {
            let mut n = owner.base_name();
            while origin_lower(&origin).zone_of(&n) && n != origin_lower(&origin) {
                names.entry(n.clone()).or_default();
                n = n.base_name();
            }
        }
        Ok(Zone {
            origin: LowerName::new(&origin),
            soa,
            ns,
            names,
        })
    }

    /// The zone's SOA serial.
    pub fn serial(&self) -> u32 {
        match &self.soa.data {
            RData::SOA(s) => s.serial,
            _ => 0,
        }
    }

    /// How many owner names the zone holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }
}

fn origin_lower(origin: &Name) -> LowerName {
    LowerName::new(origin)
}

/// The answer to one question, as record references into the zone.
#[derive(Debug, PartialEq)]
pub struct Answer<'z> {
    pub code: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<&'z Record>,
    pub authority: Vec<&'z Record>,
    pub additional: Vec<&'z Record>,
    /// RFC 8482's synthesized HINFO for ANY (owned, not in the zone).
    pub any: Option<Record>,
}

impl Zone {
    /// Answers `qname`/`qtype`/`qclass` from the zone alone (never recursion).
    pub fn answer(&self, qname: &LowerName, qtype: RecordType, qclass: DNSClass) -> Answer<'_> {
        let mut a = Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            any: None,
        };
        if qclass != DNSClass::IN || !self.origin.zone_of(qname) {
            a.code = ResponseCode::Refused;
            a.authoritative = false;
            return a;
        }
        let Some(records) = self.names.get(qname) else {
            a.code = ResponseCode::NXDomain;
            a.authority.push(&self.soa);
            return a;
        };
        if qtype == RecordType::ANY {
            let mut owner = Name::from(qname);
            owner.set_fqdn(true);
            a.any = Some(Record::from_rdata(
                owner,
                HOST_TTL,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            ));
            return a;
        }
        a.answers
            .extend(records.iter().filter(|r| r.record_type() == qtype));
        if a.answers.is_empty() {
            // NODATA: the name exists, not with this type.
            a.authority.push(&self.soa);
        } else if qtype == RecordType::NS && *qname == self.origin {
            for r in &self.ns {
                if let RData::NS(host) = &r.data
                    && let Some(glue) = self.names.get(&LowerName::new(&host.0))
                {
                    a.additional
                        .extend(glue.iter().filter(|g| g.record_type() == RecordType::A));
                }
            }
        }
        a
    }
}

/// The zone every query reads; swapped whole by the reconciler.
#[derive(Default)]
pub struct Authority {
    zone: RwLock<Option<Arc<Zone>>>,
}

impl Authority {
    pub fn get(&self) -> Option<Arc<Zone>> {
        self.zone.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, zone: Option<Zone>) {
        *self.zone.write().unwrap_or_else(|e| e.into_inner()) = zone.map(Arc::new);
    }
}

/// A per-source token bucket (one table per UDP thread; bounded).
pub struct RateLimit {
    per_s: f64,
    burst: f64,
    table: HashMap<IpAddr, (f64, Instant, u32)>,
}

/// Sources tracked per thread before the table is cleared (an attacker spraying source
/// addresses resets everyone's buckets, never grows memory).
const RATE_TABLE_MAX: usize = 65536;

/// What to do with a query from a source.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    Answer,
    /// Over the limit: an empty truncated answer (the client may retry over TCP).
    Slip,
    Drop,
}

impl RateLimit {
    /// `per_s` answers a second per source (0 = unlimited), bursts of twice that.
    pub fn new(per_s: u32) -> Self {
        Self {
            per_s: per_s as f64,
            burst: (per_s as f64 * 2.0).max(1.0),
            table: HashMap::new(),
        }
    }

    pub fn check(&mut self, src: IpAddr, now: Instant) -> Verdict {
        if self.per_s == 0.0 {
            return Verdict::Answer;
        }
        if self.table.len() >= RATE_TABLE_MAX && !self.table.contains_key(&src) {
            self.table.clear();
        }
        let (tokens, last, over) = self.table.entry(src).or_insert((self.burst, now, 0));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_s;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            *over = 0;
            return Verdict::Answer;
        }
        *over = over.wrapping_add(1);
        if *over % 2 == 1 {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// Answers one DNS message; `None` means send nothing (not a query, unreadable header).
pub fn respond(
    zone: Option<&Zone>,
    bytes: &[u8],
    src: SocketAddr,
    protocol: Protocol,
    verdict: Verdict,
) -> Option<Vec<u8>> {
    if verdict == Verdict::Drop {
        return None;
    }
    let mut decoder = BinDecoder::new(bytes);
    let header = Header::read(&mut decoder).ok()?;
    if header.metadata.message_type == MessageType::Response {
        // Never answer answers (reflection loops).
        return None;
    }
    let max = match protocol {
        Protocol::Udp => MAX_UDP_PAYLOAD,
        _ => u16::MAX,
    };
    let request = match Request::from_bytes(bytes.to_vec(), src, protocol) {
        Ok(r) => r,
        Err(_) => return Some(bare(&header.metadata, ResponseCode::FormErr)),
    };
    let mut edns = None;
    let udp_limit = match &request.edns {
        Some(req) => {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e.set_version(0);
            let limit = e.max_payload();
            if req.version() > 0 {
                let mut m = Metadata::response_from_request(&request.metadata);
                m.response_code = ResponseCode::BADVERS;
                edns = Some(e);
                return emit(
                    MessageResponseBuilder::new(&request.queries, edns.as_ref())
                        .build_no_records(m),
                    max,
                );
            }
            edns = Some(e);
            limit
        }
        None => 512,
    };
    let limit = if protocol == Protocol::Udp {
        udp_limit
    } else {
        max
    };
    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
    let mut meta = Metadata::response_from_request(&request.metadata);
    if request.metadata.op_code != OpCode::Query {
        meta.response_code = ResponseCode::NotImp;
        return emit(builder.build_no_records(meta), limit);
    }
    let queries = request.queries.queries();
    if queries.len() != 1 {
        meta.response_code = ResponseCode::FormErr;
        return emit(builder.build_no_records(meta), limit);
    }
    if verdict == Verdict::Slip {
        meta.truncation = true;
        return emit(builder.build_no_records(meta), limit);
    }
    let Some(zone) = zone else {
        meta.response_code = ResponseCode::ServFail;
        return emit(builder.build_no_records(meta), limit);
    };
    let q = &queries[0];
    let ans = zone.answer(q.name(), q.query_type(), q.query_class());
    meta.response_code = ans.code;
    meta.authoritative = ans.authoritative;
    let answers: Vec<&Record> = match &ans.any {
        Some(r) => vec![r],
        None => ans.answers.clone(),
    };
    emit(
        builder.build(
            meta,
            answers,
            ans.authority.iter().copied(),
            std::iter::empty(),
            ans.additional.iter().copied(),
        ),
        limit,
    )
}

fn emit<'q, 'a>(
    response: hickory_server::zone_handler::MessageResponse<
        'q,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    limit: u16,
) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(limit);
    // Records that do not fit are left out and TC set (hickory's emitter does both).
    response.destructive_emit(&mut encoder).ok()?;
    Some(bytes)
}

/// A header-only answer for a message whose question could not be read.
fn bare(request: &Metadata, code: ResponseCode) -> Vec<u8> {
    let mut m = Metadata::response_from_request(request);
    m.response_code = code;
    let header = Header {
        metadata: m,
        counts: Default::default(),
    };
    let mut bytes = Vec::with_capacity(12);
    let mut encoder = BinEncoder::new(&mut bytes);
    let _ = hickory_proto::serialize::binary::BinEncodable::emit(&header, &mut encoder);
    bytes
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Answers per second per source address (0: unlimited).
    pub rate_limit: u32,
    /// UDP threads (default: one per core).
    pub udp_threads: usize,
}

/// Binds UDP and TCP on `listen` and serves until the process ends. Bind errors come
/// back before anything is served.
pub fn serve(authority: Arc<Authority>, opts: &ServeOptions) -> anyhow::Result<()> {
    use anyhow::Context;
    let threads = opts.udp_threads.max(1);
    let mut sockets = Vec::new();
    for _ in 0..threads {
        sockets.push(udp_socket(opts.listen).with_context(|| {
            format!(
                "bind DNS (UDP) on {}: is another DNS server there? Set [dns] listen to another address, or enabled = false",
                opts.listen
            )
        })?);
    }
    let tcp = std::net::TcpListener::bind(opts.listen).with_context(|| {
        format!(
            "bind DNS (TCP) on {}: is another DNS server there? Set [dns] listen to another address, or enabled = false",
            opts.listen
        )
    })?;
    for (i, sock) in sockets.into_iter().enumerate() {
        let authority = authority.clone();
        let rate = opts.rate_limit;
        std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || udp_loop(sock, authority, rate))
            .context("start a DNS thread")?;
    }
    std::thread::Builder::new()
        .name("dns-tcp".into())
        .spawn(move || tcp_loop(tcp, authority))
        .context("start the DNS TCP thread")?;
    Ok(())
}

/// The DNS UDP socket's receive buffer (bytes).
const UDP_RCVBUF: libc::c_int = 4 << 20;

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the UdpSocket below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let sock = unsafe { <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_int(fd, libc::SO_REUSEPORT, 1)?;
    // A burst (one resolver's retries, a flood the rate limit must see) must not be
    // dropped by the kernel before the limiter counts it: the default buffer holds
    // about 256 datagrams. Past rmem_max as root (FORCE), else as far as allowed.
    if set_int(fd, libc::SO_RCVBUFFORCE, UDP_RCVBUF).is_err() {
        let _ = set_int(fd, libc::SO_RCVBUF, UDP_RCVBUF);
    }
    let (ptr, len) = sockaddr(&addr);
    // SAFETY: ptr/len describe a valid sockaddr for this family, alive for the call.
    let rc = unsafe { libc::bind(fd, ptr.as_ptr() as *const libc::sockaddr, len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// Sets the int-valued socket option `opt` (SOL_SOCKET) of `fd` to `value`.
fn set_int(fd: libc::c_int, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setsockopt on a socket we own with a valid int value and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A sockaddr for `addr` as bytes, with its length.
fn sockaddr(addr: &SocketAddr) -> (Vec<u8>, libc::socklen_t) {
    match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>();
            // SAFETY: sockaddr_in is plain old data; we copy its bytes.
            let bytes = unsafe { std::slice::from_raw_parts(&sa as *const _ as *const u8, len) };
            (bytes.to_vec(), len as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            let len = std::mem::size_of::<libc::sockaddr_in6>();
            // SAFETY: sockaddr_in6 is plain old data; we copy its bytes.
            let bytes = unsafe { std::slice::from_raw_parts(&sa as *const _ as *const u8, len) };
            (bytes.to_vec(), len as libc::socklen_t)
        }
    }
}

fn udp_loop(sock: std::net::UdpSocket, authority: Arc<Authority>, rate: u32) {
    let mut buf = vec![0u8; MAX_QUERY];
    let mut limiter = RateLimit::new(rate);
    loop {
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("DNS UDP receive failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let verdict = limiter.check(src.ip(), Instant::now());
        let zone = authority.get();
        if let Some(out) = respond(zone.as_deref(), &buf[..n], src, Protocol::Udp, verdict) {
            let _ = sock.send_to(&out, src);
        }
    }
}

fn tcp_loop(listener: std::net::TcpListener, authority: Arc<Authority>) {
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if live.load(std::sync::atomic::Ordering::Relaxed) >= MAX_TCP_CONNECTIONS {
            // Over the bound: close at once rather than queue.
            continue;
        }
        live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let authority = authority.clone();
        let live = live.clone();
        let spawned = std::thread::Builder::new()
            .name("dns-tcp-conn".into())
            .stack_size(256 * 1024)
            .spawn({
                let live = live.clone();
                move || {
                    let _ = tcp_conn(conn, &authority);
                    live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn tcp_conn(mut conn: std::net::TcpStream, authority: &Authority) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let src = conn.peer_addr()?;
    conn.set_read_timeout(Some(TCP_IDLE))?;
    conn.set_write_timeout(Some(TCP_IDLE))?;
    let mut buf = vec![0u8; MAX_QUERY];
    for _ in 0..TCP_MAX_QUERIES {
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)?;
        let len = u16::from_be_bytes(len) as usize;
        if !(12..=MAX_QUERY).contains(&len) {
            return Ok(());
        }
        conn.read_exact(&mut buf[..len])?;
        let zone = authority.get();
        if let Some(out) = respond(
            zone.as_deref(),
            &buf[..len],
            src,
            Protocol::Tcp,
            Verdict::Answer,
        ) {
            let mut framed = Vec::with_capacity(out.len() + 2);
            framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
            framed.extend_from_slice(&out);
            conn.write_all(&framed)?;
        }
    }
    Ok(())
}

/// Where `<name>.<zone>` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordTarget {
    /// The proxy's address: HTTPS by name goes through the proxy (the default).
    Proxy,
    /// The machine's own public IPv4: everything by name goes straight to the machine.
    Machine,
}

/// The zone as the replicated state describes it; `None` while no zone is set.
pub fn spec_from_state(
    state: &boxd_control::state::StateMachine,
    target: RecordTarget,
    public: Ipv4Addr,
) -> Result<Option<ZoneSpec>, String> {
    use boxd_control::types::{Query, QueryReply};
    let zone = match state.query(&Query::Setting { key: "zone".into() }) {
        Ok(QueryReply::Setting { value: Some(z) }) if !z.is_empty() => z,
        Ok(_) => return Ok(None),
        Err(e) => return Err(format!("read the zone setting: {e}")),
    };
    let machines = match state.query(&Query::Machines { owner: None }) {
        Ok(QueryReply::Machines { machines }) => machines,
        Ok(other) => return Err(format!("unexpected reply to a machines query: {other:?}")),
        Err(e) => return Err(format!("read machines: {e}")),
    };
    let mut hosts = Vec::with_capacity(machines.len());
    for m in machines {
        let addr = match target {
            RecordTarget::Proxy => public,
            RecordTarget::Machine => match m.ipv4.parse() {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        hosts.push((m.name, addr));
    }
    hosts.sort();
    // ACME DNS-01 answers in the zone, by name relative to it.
    let mut txt = Vec::new();
    match state.query(&Query::AcmeChallenges) {
        Ok(QueryReply::AcmeChallenges { challenges }) => {
            for c in challenges.into_iter().filter(|c| c.kind == "dns-01") {
                let name = c.name.trim_end_matches('.').to_ascii_lowercase();
                let label = |l: &str| {
                    (1..=63).contains(&l.len())
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                };
                // A name that is not one would fail the whole zone: left out.
                if let Some(rel) = name.strip_suffix(&format!(".{zone}"))
                    && rel.split('.').all(label)
                {
                    txt.push((rel.to_string(), c.value));
                }
            }
        }
        Ok(other) => return Err(format!("unexpected reply to a challenges query: {other:?}")),
        Err(e) => return Err(format!("read ACME challenges: {e}")),
    }
    Ok(Some(ZoneSpec {
        nameservers: vec![(format!("ns1.{zone}"), public)],
        apex: Some(public),
        hosts,
        txt,
        zone,
    }))
}

/// Keeps an [`Authority`] in line with the replicated state (see the module docs).
pub struct ZoneReconciler {
    pub authority: Arc<Authority>,
    pub target: RecordTarget,
    pub public: Ipv4Addr,
    last: Option<ZoneSpec>,
    serial: u32,
}

impl ZoneReconciler {
    pub fn new(authority: Arc<Authority>, target: RecordTarget, public: Ipv4Addr) -> Self {
        Self {
            authority,
            target,
            public,
            last: None,
            serial: 0,
        }
    }
}

impl boxd_control::reconcile::Reconciler for ZoneReconciler {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn reconcile(
        &mut self,
        state: &boxd_control::state::StateMachine,
        _me: boxd_control::types::NodeId,
    ) -> Result<usize, String> {
        let spec = spec_from_state(state, self.target, self.public)?;
        if spec == self.last && (spec.is_some() == self.authority.get().is_some()) {
            return Ok(0);
        }
        // The serial only grows: the applied index when the contents changed.
        let applied = *state.watch_applied().borrow() as u32;
        self.serial = applied.max(self.serial.wrapping_add(1));
        let zone = match &spec {
            Some(s) => {
                let z = Zone::build(s, self.serial).map_err(|e| e.to_string())?;
                tracing::debug!(
                    zone = s.zone,
                    serial = z.serial(),
                    names = z.len(),
                    "zone rebuilt"
                );
                Some(z)
            }
            None => None,
        };
        self.authority.set(zone);
        self.last = spec;
        Ok(1)
    }
}

/// `boxd dns ...`
#[derive(clap::Subcommand)]
pub enum DnsCommand {
    /// Serve a zone described by a JSON file (zone, nameservers, apex, hosts, txt) until
    /// killed: for benchmarks and for checking answers without a control plane.
    /// `boxd server` serves the machines' zone itself.
    Serve {
        #[arg(long)]
        zone_file: std::path::PathBuf,
        #[arg(long, default_value = "127.0.0.1:53")]
        listen: SocketAddr,
        /// Answers per second per source address (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rate_limit: u32,
        /// UDP threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

pub fn main(cmd: DnsCommand) -> crate::Exit {
    use anyhow::Context;
    match cmd {
        DnsCommand::Serve {
            zone_file,
            listen,
            rate_limit,
            threads,
        } => {
            let text = std::fs::read_to_string(&zone_file)
                .with_context(|| format!("read {}", zone_file.display()))?;
            let spec: ZoneSpec = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a zone description (JSON with zone, nameservers, apex, hosts, txt)",
                    zone_file.display()
                )
            })?;
            let zone = Zone::build(&spec, 1)?;
            let names = zone.len();
            let authority = Arc::new(Authority::default());
            authority.set(Some(zone));
            let opts = ServeOptions {
                listen,
                rate_limit,
                udp_threads: threads.unwrap_or_else(default_threads),
            };
            serve(authority, &opts)?;
            eprintln!(
                "boxd dns: serving {} ({names} names) on {listen}",
                spec.zone
            );
            loop {
                std::thread::park();
            }
        }
    }
}

/// One UDP thread per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};

    fn spec() -> ZoneSpec {
        ZoneSpec {
            zone: "boxd.test".into(),
            nameservers: vec![("ns1.boxd.test".into(), Ipv4Addr::new(192, 0, 2, 1))],
            apex: Some(Ipv4Addr::new(192, 0, 2, 1)),
            hosts: vec![
                ("app".into(), Ipv4Addr::new(100, 64, 0, 7)),
                ("db".into(), Ipv4Addr::new(100, 64, 0, 8)),
            ],
            txt: vec![("_acme-challenge.app".into(), "token-value".into())],
        }
    }

    fn ask(zone: Option<&Zone>, qname: &str, qtype: RecordType, edns: bool) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.add_query(Query::query(Name::from_ascii(qname).unwrap(), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.edns = Some(e);
        }
        let bytes = m.to_vec().unwrap();
        let src = "127.0.0.1:5000".parse().unwrap();
        let out = respond(zone, &bytes, src, Protocol::Udp, Verdict::Answer).unwrap();
        Message::from_vec(&out).unwrap()
    }

    #[test]
    fn answers_machines_apex_and_txt() {
        let zone = Zone::build(&spec(), 7).unwrap();
        let r = ask(Some(&zone), "APP.boxd.test.", RecordType::A, false);
        assert_eq!(r.metadata.id, 4242);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(&r.answers[0].data, &RData::A(A::new(100, 64, 0, 7)));

        let r = ask(Some(&zone), "boxd.test.", RecordType::NS, true);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.additionals.len(), 1, "glue for ns1");

        let r = ask(Some(&zone), "boxd.test.", RecordType::SOA, false);
        match &r.answers[0].data {
            RData::SOA(s) => assert_eq!(s.serial, 7),
            other => panic!("not an SOA: {other:?}"),
        }

        // The apex itself answers with its address.
        let r = ask(Some(&zone), "boxd.test.", RecordType::A, false);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(&r.answers[0].data, &RData::A(A::new(192, 0, 2, 1)));

        let r = ask(
            Some(&zone),
            "_acme-challenge.app.boxd.test.",
            RecordType::TXT,
            false,
        );
        assert_eq!(r.answers.len(), 1);
        match &r.answers[0].data {
            RData::TXT(t) => {
                let text: Vec<u8> = t.txt_data.iter().flat_map(|d| d.iter().copied()).collect();
                assert_eq!(text, b"token-value");
            }
            other => panic!("not a TXT: {other:?}"),
        }
    }

    #[test]
    fn negative_answers() {
        let zone = Zone::build(&spec(), 1).unwrap();
        let r = ask(Some(&zone), "nope.boxd.test.", RecordType::A, false);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative);
        assert_eq!(r.authorities.len(), 1, "SOA for negative caching");
        // The name exists with another type: NODATA.
        let r = ask(Some(&zone), "app.boxd.test.", RecordType::AAAA, false);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        // Outside the zone: no recursion.
        let r = ask(Some(&zone), "example.com.", RecordType::A, false);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(!r.metadata.authoritative);
        // ANY: RFC 8482's one HINFO, nothing else.
        let r = ask(Some(&zone), "app.boxd.test.", RecordType::ANY, false);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].record_type(), RecordType::HINFO);
        // No zone yet: SERVFAIL, not a hang.
        let r = ask(None, "app.boxd.test.", RecordType::A, false);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn bad_packets() {
        let src: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let zone = Zone::build(&spec(), 1).unwrap();
        // Shorter than a header: nothing.
        assert!(respond(Some(&zone), &[1, 2, 3], src, Protocol::Udp, Verdict::Answer).is_none());
        // A header claiming a question that is not there: FORMERR with the id.
        let mut bytes = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&[3, b'a', b'b']);
        let out = respond(Some(&zone), &bytes, src, Protocol::Udp, Verdict::Answer).unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered.
        let mut resp = Message::query();
        resp.metadata.message_type = MessageType::Response;
        resp.add_query(Query::query(
            Name::from_ascii("app.boxd.test.").unwrap(),
            RecordType::A,
        ));
        let bytes = resp.to_vec().unwrap();
        assert!(respond(Some(&zone), &bytes, src, Protocol::Udp, Verdict::Answer).is_none());
        // Every random packet gets nothing or a well-formed answer.
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            let len = (seed % 300) as usize;
            let mut p = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                p.push(seed as u8);
            }
            if let Some(out) = respond(Some(&zone), &p, src, Protocol::Udp, Verdict::Answer) {
                assert!(out.len() <= MAX_UDP_PAYLOAD as usize);
                Message::from_vec(&out).expect("our answers parse");
            }
        }
    }

    #[test]
    fn big_answers_truncate_over_udp() {
        let mut s = spec();
        for i in 0..200 {
            s.txt
                .push(("_acme-challenge.app".into(), format!("{i:0>60}")));
        }
        let zone = Zone::build(&s, 1).unwrap();
        let r = ask(
            Some(&zone),
            "_acme-challenge.app.boxd.test.",
            RecordType::TXT,
            false,
        );
        assert!(r.metadata.truncation);
    }

    #[test]
    fn rate_limit_slips_then_drops() {
        let mut rl = RateLimit::new(10);
        let src: IpAddr = "192.0.2.9".parse().unwrap();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..40).map(|_| rl.check(src, t0)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Answer).count(),
            20
        );
        assert!(verdicts.contains(&Verdict::Slip));
        assert!(verdicts.contains(&Verdict::Drop));
        // Another source is not affected; time refills.
        assert_eq!(rl.check("192.0.2.10".parse().unwrap(), t0), Verdict::Answer);
        assert_eq!(rl.check(src, t0 + Duration::from_secs(1)), Verdict::Answer);
        assert_eq!(RateLimit::new(0).check(src, t0), Verdict::Answer);
    }

    #[test]
    fn bad_zone_names_are_refused() {
        let mut s = spec();
        s.hosts.push(("bad name".into(), Ipv4Addr::LOCALHOST));
        assert!(Zone::build(&s, 1).is_err());
        assert!(matches!(
            Zone::build(&ZoneSpec::default(), 1),
            Err(ZoneError::NoZone)
        ));
    }
}
