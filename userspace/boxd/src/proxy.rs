//! The HTTPS proxy: `https://<name>.<zone>` to the port a machine exposes.
//!
//! - TLS (rustls: 1.2 and 1.3, ALPN h2 and http/1.1) with the certificate for the
//!   handshake's server name ([`crate::certs::Store`]); HTTP/1.1 keep-alive, HTTP/2,
//!   WebSocket upgrades and long-lived streams (bodies are streamed, never buffered).
//! - Plain HTTP answers a permanent redirect to HTTPS, except ACME HTTP-01 challenges
//!   and the internal CA's certificate (`/.well-known/boxd/ca.pem`).
//! - To the machine: HTTP/1.1 over the private path (the machine's host port, from
//!   10.0.0.1 to 10.0.0.2), pooled; `X-Forwarded-For`/`-Proto`/`-Host` are set from
//!   the connection, and whatever the client sent in them is dropped.
//! - A name with no machine gets a 404 page, a machine that is not running a 503 page
//!   (with Retry-After while it starts), one where nothing listens a 502 page, one that
//!   does not answer in time a 504 page: never a hang.
//! - Bounds: connections (semaphore), TLS handshake and request-header timeouts
//!   (slowloris), header size, HTTP/2 streams per connection, the time to the
//!   backend's response headers.

use crate::certs::Store;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

type Body = BoxBody<Bytes, hyper::Error>;

/// TLS handshakes must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must arrive within this (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The machine must answer with headers within this.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting to the machine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (HTTP/1.1 buffer; HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const MAX_H2_STREAMS: u32 = 256;

/// Where a host name goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A running machine: connect to `addr` on the first of `ports` that accepts,
    /// through `device` (the machine's host port) when given.
    Backend {
        name: String,
        device: Option<String>,
        addr: Ipv4Addr,
        ports: Vec<u16>,
    },
    /// A machine that exists but cannot take requests now; `retry` when it will soon.
    Down {
        name: String,
        why: String,
        retry: bool,
    },
    /// A private machine: the proxy never reaches it (its owner does, through an SSH
    /// tunnel, which `hint` says how to open).
    Private {
        name: String,
        hint: String,
    },
    /// No TLS termination: the raw stream, chosen by the ClientHello's SNI before any
    /// handshake, goes to `addr:443` (through `device`).
    Passthrough {
        name: String,
        device: Option<String>,
        addr: Ipv4Addr,
    },
    /// A machine that is paused (or suspended): a request wakes it and waits, bounded
    /// by [`WAKE_TIMEOUT`], until it is a backend again (a passthrough one: until its
    /// TLS stream can be joined, the ClientHello still unread in the socket).
    Asleep {
        name: String,
        owner: String,
        passthrough: bool,
    },
    NotFound,
}

/// How long a request waits for a sleeping machine to wake.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Wakes sleeping machines (in `boxd server`: a replicated state change to running,
/// which the worker carries out).
pub trait Waker: Send + Sync + 'static {
    fn wake(
        &self,
        owner: &str,
        name: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;
}

/// Maps host names to routes (the replicated state in `boxd server`, a file in
/// `boxd proxy serve`).
pub trait Router: Send + Sync + 'static {
    fn route(&self, host: &str) -> Route;
    /// Whether any route is a passthrough (only then is every ClientHello peeked at
    /// before the handshake).
    fn any_passthrough(&self) -> bool {
        false
    }
}

/// Routes from a fixed table, swapped whole (what both routers are built on).
#[derive(Default)]
pub struct Table {
    routes: RwLock<Arc<HashMap<String, Route>>>,
    passthrough: std::sync::atomic::AtomicBool,
}

impl Table {
    pub fn set(&self, routes: HashMap<String, Route>) {
        let any = routes.values().any(|r| {
            matches!(
                r,
                Route::Passthrough { .. }
                    | Route::Asleep {
                        passthrough: true,
                        ..
                    }
            )
        });
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        self.passthrough
            .store(any, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Router for Table {
    fn any_passthrough(&self) -> bool {
        self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn route(&self, host: &str) -> Route {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        routes.get(host).cloned().unwrap_or(Route::NotFound)
    }
}

/// ACME HTTP-01 answers: token to key authorization.
#[derive(Default)]
pub struct Challenges {
    tokens: RwLock<HashMap<String, String>>,
}

impl Challenges {
    /// Replaces the whole table (from the replicated state's HTTP-01 challenges).
    pub fn replace(&self, tokens: HashMap<String, String>) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
    }

    pub fn get(&self, token: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }
}

/// How the proxy listens.
#[derive(Debug, Clone)]
pub struct Options {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub max_connections: usize,
    /// Serving threads, each with its own event loop, listeners (SO_REUSEPORT) and
    /// backend pool, as nginx runs a worker per core: a request and its backend call
    /// never cross threads.
    pub threads: usize,
}

pub struct Proxy {
    pub router: Arc<dyn Router>,
    pub certs: Arc<Store>,
    pub challenges: Arc<Challenges>,
    pub waker: Option<Arc<dyn Waker>>,
    /// Machines a wake write is in flight for.
    waking: std::sync::Mutex<std::collections::HashSet<String>>,
    hsts: Option<HeaderValue>,
}

impl Proxy {
    /// Wakes a sleeping machine and waits (bounded) until `host` routes elsewhere: the
    /// new route, or why not.
    async fn wake(&self, host: &str, owner: &str, name: &str) -> Result<Route, String> {
        let Some(waker) = &self.waker else {
            return Err(format!("{name} is asleep."));
        };
        let deadline = std::time::Instant::now() + WAKE_TIMEOUT;
        // One wake write per machine at a time, however many requests are waiting.
        let first = self
            .waking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        if first {
            tracing::info!(machine = name, "waking for a request");
            let res = tokio::time::timeout(WAKE_TIMEOUT, waker.wake(owner, name)).await;
            self.waking
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("{name} is asleep and could not be woken: {e}")),
                Err(_) => {
                    return Err(format!(
                        "{name} is asleep and the wake was not recorded within {WAKE_TIMEOUT:?}"
                    ));
                }
            }
        }
        loop {
            let route = self.router.route(host);
            if !matches!(route, Route::Asleep { .. }) {
                return Ok(route);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{name} did not wake within {WAKE_TIMEOUT:?}; try again."
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn new(
        router: Arc<dyn Router>,
        certs: Arc<Store>,
        challenges: Arc<Challenges>,
        waker: Option<Arc<dyn Waker>>,
        hsts_max_age: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            router,
            certs,
            challenges,
            waker,
            waking: Default::default(),
            hsts: (hsts_max_age > 0)
                .then(|| HeaderValue::from_str(&format!("max-age={hsts_max_age}")).ok())
                .flatten(),
        })
    }
}

thread_local! {
    /// Each serving thread's pool of backend connections (used only on that thread).
    static CLIENT: std::cell::OnceCell<Client<Connector, Body>> =
        const { std::cell::OnceCell::new() };
}

fn client() -> Client<Connector, Body> {
    CLIENT.with(|c| {
        c.get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(256)
                .pool_timer(TokioTimer::new())
                .build(Connector)
        })
        .clone()
    })
}

/// `n` listeners on `addr` sharing it through SO_REUSEPORT (the kernel spreads
/// connections across them).
fn listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    // A plain bind first: an address another process holds (even one that shares it
    // through SO_REUSEPORT) is an error here, not a silent split of the connections.
    drop(std::net::TcpListener::bind(addr)?);
    (0..n)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(s.into())
        })
        .collect()
}

/// Binds the listeners (errors come back before anything is served), then serves them
/// on `threads` threads of their own.
pub async fn serve(proxy: Arc<Proxy>, opts: &Options) -> anyhow::Result<()> {
    use anyhow::Context;
    let threads = opts.threads.clamp(1, 256);
    let https = listeners(opts.https, threads).with_context(|| {
        format!(
            "listen for HTTPS on {}: set [proxy] https to another address, or enabled = false",
            opts.https
        )
    })?;
    let http = match opts.http {
        Some(a) => Some(listeners(a, threads).with_context(|| {
            format!("listen for HTTP on {a}: set [proxy] http to another address")
        })?),
        None => None,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Resolver(proxy.certs.clone())));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let mut http = http.map(Vec::into_iter);
    for (i, https) in https.into_iter().enumerate() {
        let http = http.as_mut().and_then(Iterator::next);
        let (proxy, acceptor, slots) = (proxy.clone(), acceptor.clone(), slots.clone());
        std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || serve_thread(proxy, acceptor, slots, https, http))
            .context("start a proxy thread")?;
    }
    Ok(())
}

/// One serving thread: its own single-threaded event loop over its own listeners.
fn serve_thread(
    proxy: Arc<Proxy>,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<tokio::sync::Semaphore>,
    https: std::net::TcpListener,
    http: Option<std::net::TcpListener>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("proxy thread: no event loop: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let (https, http) = match (
            tokio::net::TcpListener::from_std(https),
            http.map(tokio::net::TcpListener::from_std).transpose(),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("proxy thread: listener: {e}");
                return;
            }
        };
        serve_listeners(proxy, acceptor, slots, https, http).await;
    });
}

async fn serve_listeners(
    proxy: Arc<Proxy>,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<tokio::sync::Semaphore>,
    https: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
) {
    let https = tokio::spawn(accept_loop(https, slots.clone(), {
        let proxy = proxy.clone();
        move |stream, peer, permit| {
            let proxy = proxy.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // One deadline for the peek and the handshake together.
                let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                if proxy.router.any_passthrough()
                    && let Ok(Some(host)) =
                        tokio::time::timeout_at(deadline, peek_sni(&stream)).await
                {
                    let mut route = proxy.router.route(&host);
                    let woken = matches!(route, Route::Asleep { .. });
                    if let Route::Asleep {
                        name,
                        owner,
                        passthrough: true,
                    } = &route
                    {
                        // Nothing is read yet: the ClientHello waits in the socket.
                        match proxy.wake(&host, owner, name).await {
                            Ok(r) => route = r,
                            Err(why) => {
                                tracing::info!("passthrough: {why}");
                                return;
                            }
                        }
                    }
                    if let Route::Passthrough { name, device, addr } = route {
                        passthrough(stream, &name, device, addr, woken).await;
                        return;
                    }
                }
                let Ok(Ok(tls)) = tokio::time::timeout_at(deadline, acceptor.accept(stream)).await
                else {
                    return;
                };
                let sni = tls
                    .get_ref()
                    .1
                    .server_name()
                    .map(|s| s.to_ascii_lowercase());
                // ALPN already chose the protocol: no sniffing of the first bytes.
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let service = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    let sni = sni.clone();
                    async move { Ok::<_, std::convert::Infallible>(proxy.https(req, peer, sni).await) }
                });
                let builder = connection_builder();
                let builder = if h2 {
                    builder.http2_only()
                } else {
                    builder.http1_only()
                };
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    }));
    if let Some(http) = http {
        tokio::spawn(accept_loop(http, slots, move |stream, peer, permit| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(proxy.plain(req, peer)) }
                });
                let _ = connection_builder()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }));
    }
    // The loops run for the life of the process.
    let _ = https.await;
}

/// The server name of the ClientHello waiting on `stream`, read without consuming it
/// (peeked, parsed by rustls), so the stream can still go anywhere whole.
async fn peek_sni(stream: &tokio::net::TcpStream) -> Option<String> {
    // A ClientHello fits in one TLS record: 16 KiB and its header.
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let mut seen = 0;
    for _ in 0..500 {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if n != seen {
            seen = n;
            let mut acceptor = rustls::server::Acceptor::default();
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                if acceptor.read_tls(&mut rd).ok()? == 0 {
                    break;
                }
            }
            match acceptor.accept() {
                Ok(Some(hello)) => {
                    return hello
                        .client_hello()
                        .server_name()
                        .map(|s| s.to_ascii_lowercase());
                }
                Ok(None) if n < buf.len() => {}
                _ => return None,
            }
        }
        // More of the ClientHello is on its way (peek returns what is there at once).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Joins a client's untouched TLS stream to the machine's port 443.
async fn passthrough(
    mut client: tokio::net::TcpStream,
    name: &str,
    device: Option<String>,
    addr: Ipv4Addr,
    woken: bool,
) {
    let target = Target {
        device,
        addr,
        ports: vec![443],
    };
    let machine = if woken {
        target
            .connect_by(tokio::time::Instant::now() + WAKE_TIMEOUT)
            .await
    } else {
        target.connect().await
    };
    match machine {
        Ok(mut machine) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut machine).await;
        }
        Err(e) => tracing::debug!(machine = name, "passthrough: {e}"),
    }
}

fn connection_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // One buffer per response head and small body: over TLS that is one record
        // and one write, not one per part.
        .writev(false)
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    on: impl Fn(tokio::net::TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit),
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the bound the connection is closed at once: the others keep being served.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        on(stream, peer, permit);
    }
}

/// Picks the certificate by SNI; no SNI gets the zone's certificate if there is one.
#[derive(Debug)]
struct Resolver(Arc<Store>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // A name without a certificate gets the default one: the client then sees a
        // name mismatch (or, told to ignore it, our 404 page), not a bare alert.
        hello
            .server_name()
            .and_then(|name| self.0.find(name))
            .or_else(|| self.0.default_cert())
    }
}

/// The host a request is for: the URI's authority (HTTP/2) or the Host header, without
/// the port, lowercase; `None` when it is missing or not a host name.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h.to_string(),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            match h.rsplit_once(':') {
                Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_string(),
                _ => h.to_string(),
            }
        }
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(host)
}

/// A 200 with a body of a fixed type.
fn fixed(content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn page(status: StatusCode, title: &str, message: &str) -> Response<Body> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{} {}</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\">\
         <h1>{}</h1><p>{}</p><hr><p><small>boxd</small></p></body></html>\n",
        status.as_u16(),
        esc(title),
        esc(title),
        esc(message)
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(html))
        .expect("a valid response")
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// Hop-by-hop headers (RFC 9110 7.6.1), plus whatever the Connection header names.
/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), parsed once.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What clients may claim about themselves; the proxy sets its own from the connection.
const CLIENT_CLAIMS: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn is_websocket<B>(req: &Request<B>) -> bool {
    let has = |name: HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

impl Proxy {
    /// Plain HTTP: ACME challenges and the CA certificate; everything else redirects.
    fn plain(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path();
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            return match self.challenges.get(token) {
                Some(ka) => fixed("application/octet-stream", ka),
                None => page(
                    StatusCode::NOT_FOUND,
                    "No such challenge",
                    "Unknown ACME token.",
                ),
            };
        }
        if path == "/.well-known/boxd/ca.pem" {
            return self.ca_response();
        }
        let Some(host) = request_host(&req) else {
            return page(
                StatusCode::BAD_REQUEST,
                "No host",
                "The request names no valid host.",
            );
        };
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let status = if matches!(req.method(), &hyper::Method::GET | &hyper::Method::HEAD) {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        Response::builder()
            .status(status)
            .header(header::LOCATION, format!("https://{host}{pq}"))
            .header(header::CONTENT_LENGTH, "0")
            .body(full(Bytes::new()))
            .expect("a valid response")
    }

    fn same_certificate(&self, a: &str, b: &str) -> bool {
        match (self.certs.find(a), self.certs.find(b)) {
            (Some(x), Some(y)) => Arc::ptr_eq(&x, &y),
            _ => false,
        }
    }

    fn ca_response(&self) -> Response<Body> {
        match self.certs.ca_pem() {
            Some(pem) => fixed("application/x-pem-file", pem),
            None => page(
                StatusCode::NOT_FOUND,
                "No internal CA",
                "This installation's certificates come from ACME; there is no CA to download.",
            ),
        }
    }

    async fn https(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        sni: Option<String>,
    ) -> Response<Body> {
        let mut resp = self.https_inner(req, peer, sni).await;
        if let Some(h) = &self.hsts {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
        }
        resp
    }

    async fn https_inner(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        sni: Option<String>,
    ) -> Response<Body> {
        if req.uri().path() == "/.well-known/boxd/ca.pem" {
            return self.ca_response();
        }
        let Some(host) = request_host(&req) else {
            return page(
                StatusCode::BAD_REQUEST,
                "No host",
                "The request names no valid host.",
            );
        };
        // A connection may carry requests for another name only where its certificate
        // vouches for that name too (browsers coalesce HTTP/2 connections across a
        // wildcard's names); anything else is misdirected (RFC 9110 15.5.20).
        if let Some(sni) = &sni
            && *sni != host
            && !self.same_certificate(sni, &host)
        {
            return page(
                StatusCode::MISDIRECTED_REQUEST,
                "Misdirected request",
                &format!("This connection is for {sni}; open a new one for {host}."),
            );
        }
        let mut route = self.router.route(&host);
        let woken = matches!(route, Route::Asleep { .. });
        if let Route::Asleep { name, owner, .. } = &route {
            route = match self.wake(&host, owner, name).await {
                Ok(r) => r,
                Err(why) => {
                    let mut r = page(StatusCode::SERVICE_UNAVAILABLE, "Machine asleep", &why);
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                    return r;
                }
            };
        }
        let (name, device, addr, ports) = {
            match route {
                Route::Asleep { name, .. } => {
                    return page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Machine asleep",
                        &format!("{name} is asleep."),
                    );
                }
                Route::Private { name, hint } => {
                    return page(
                        StatusCode::FORBIDDEN,
                        "Private machine",
                        &format!("{name} is private. Its owner reaches it with {hint}."),
                    );
                }
                Route::Passthrough { name, .. } => {
                    return page(
                        StatusCode::MISDIRECTED_REQUEST,
                        "Misdirected request",
                        &format!("{name} serves its own TLS: connect with the server name {host}."),
                    );
                }
                Route::NotFound => {
                    return page(
                        StatusCode::NOT_FOUND,
                        "No such machine",
                        &format!("There is no machine at {host}."),
                    );
                }
                Route::Down { name, why, retry } => {
                    let mut r = page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Machine unavailable",
                        &format!("{name}: {why}"),
                    );
                    if retry {
                        r.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                    }
                    return r;
                }
                Route::Backend {
                    name,
                    device,
                    addr,
                    ports,
                } => (name, device, addr, ports),
            }
        };
        let websocket = is_websocket(&req);
        let upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if !websocket {
            strip_hop_by_hop(&mut parts.headers);
        }
        for h in &CLIENT_CLAIMS {
            parts.headers.remove(h);
        }
        let client_ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            ip => ip,
        };
        let [xff, xfp, xfh, ..] = &CLIENT_CLAIMS;
        if let Ok(v) = HeaderValue::from_str(&client_ip.to_string()) {
            parts.headers.insert(xff.clone(), v);
        }
        parts
            .headers
            .insert(xfp.clone(), HeaderValue::from_static("https"));
        if let Ok(v) = HeaderValue::from_str(&host) {
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, v.clone());
            }
            parts.headers.insert(xfh.clone(), v);
        }
        let target = Target {
            device,
            addr,
            ports: ports.clone(),
        };
        if woken {
            // Just woken (restored from disk, perhaps): its first steps may be slow, so
            // wait, bounded, until it answers on a port before the request is sent.
            target
                .answering(tokio::time::Instant::now() + WAKE_TIMEOUT)
                .await;
        }
        let mut uri = hyper::http::uri::Parts::default();
        uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
        uri.authority = hyper::http::uri::Authority::try_from(target.authority()).ok();
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        );
        parts.uri = match hyper::Uri::from_parts(uri) {
            Ok(u) => u,
            Err(_) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "The path is not valid.",
                );
            }
        };
        parts.version = hyper::Version::HTTP_11;
        let down = |e: String| {
            tracing::debug!(machine = name, "backend: {e}");
            page(
                StatusCode::BAD_GATEWAY,
                "Nothing answers",
                &format!(
                    "{name} is running, but nothing accepts connections on port {}. Start a web server there, or expose the port yours listens on (ssh HOST expose {name} PORT).",
                    ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )
        };
        if let Some(client_side) = upgrade {
            return match websocket_to(
                &target,
                Request::from_parts(parts, body.boxed()),
                client_side,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => down(e),
            };
        }
        let req = Request::from_parts(parts, body.boxed());
        match tokio::time::timeout(BACKEND_TIMEOUT, client().request(req)).await {
            Err(_) => page(
                StatusCode::GATEWAY_TIMEOUT,
                "Timed out",
                &format!(
                    "{name} did not answer within {} s.",
                    BACKEND_TIMEOUT.as_secs()
                ),
            ),
            Ok(Err(e)) => down(format!("{e:?}")),
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
        }
    }
}

/// WebSocket: a connection of its own to the machine; on 101 both sides are joined.
async fn websocket_to(
    target: &Target,
    req: Request<Body>,
    client_side: hyper::upgrade::OnUpgrade,
) -> Result<Response<Body>, String> {
    // A connection of our own speaks origin-form (the pooled client converts for us).
    let mut req = req;
    let origin: hyper::Uri = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e| format!("path: {e}"))?;
    *req.uri_mut() = origin;
    let stream = target.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = tokio::time::timeout(BACKEND_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| "no answer to the upgrade".to_string())?
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        return Ok(Response::from_parts(parts, body.boxed()));
    }
    let backend_side = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(c), Ok(b)) = tokio::join!(client_side, backend_side) else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(b)).await;
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, full(Bytes::new())))
}

/// Where the connector goes, encoded in the request URI's authority so the pool keys
/// connections per machine: `<device>:<port>` (port 0: the machine's default ports),
/// or `<ip>:<port>` without a device.
#[derive(Clone, Debug)]
struct Target {
    device: Option<String>,
    addr: Ipv4Addr,
    ports: Vec<u16>,
}

impl Target {
    fn authority(&self) -> String {
        let port = if self.ports.len() == 1 {
            self.ports[0]
        } else {
            0
        };
        match &self.device {
            Some(d) => format!("{d}.dev:{port}"),
            None => format!("{}:{port}", self.addr),
        }
    }

    fn from_authority(host: &str, port: u16) -> Option<Target> {
        let ports = if port == 0 {
            DEFAULT_PORTS.to_vec()
        } else {
            vec![port]
        };
        if let Some(dev) = host.strip_suffix(".dev") {
            return Some(Target {
                device: Some(dev.to_string()),
                addr: MACHINE_LINK_ADDR,
                ports,
            });
        }
        Some(Target {
            device: None,
            addr: host.parse().ok()?,
            ports,
        })
    }

    /// Connects as `connect` does, trying again while no port answered at all (each
    /// attempt timed out or found no route: a machine still waking) until `deadline`
    /// (a try under way when it passes is finished); a refusal is an answer, and
    /// returned.
    async fn connect_by(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::net::TcpStream, String> {
        // Bounded by the deadline; each round lasts at least one connect timeout or
        // the pause below.
        loop {
            match self.connect_once().await {
                Ok(s) => return Ok(s),
                Err((why, false)) => return Err(why),
                Err((why, true)) => {
                    if tokio::time::Instant::now() + Duration::from_millis(200) > deadline {
                        return Err(why);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Waits (see `connect_by`) until the machine answers on one of its ports. The
    /// probe connection is closed at once: the machine's server sees a connection
    /// that sends nothing.
    async fn answering(&self, deadline: tokio::time::Instant) {
        let t = std::time::Instant::now();
        match self.connect_by(deadline).await {
            Ok(_) => {
                tracing::debug!(target = %self.authority(), ms = t.elapsed().as_millis() as u64, "woken machine answers")
            }
            Err(e) => tracing::debug!(target = %self.authority(), "woken machine: {e}"),
        }
    }

    async fn connect(&self) -> Result<tokio::net::TcpStream, String> {
        self.connect_once().await.map_err(|(why, _)| why)
    }

    /// One try of each port in turn: the first connection, or the last error and
    /// whether no port answered at all (timed out or unreachable; no refusal).
    async fn connect_once(&self) -> Result<tokio::net::TcpStream, (String, bool)> {
        let mut silent = true;
        let mut last = String::from("no port to try");
        for &port in &self.ports {
            let sock = tokio::net::TcpSocket::new_v4().map_err(|e| (e.to_string(), false))?;
            if let Some(dev) = &self.device {
                sock.bind_device(Some(dev.as_bytes()))
                    .map_err(|e| (format!("bind to {dev}: {e}"), false))?;
            }
            let addr = SocketAddr::new(IpAddr::V4(self.addr), port);
            match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => {
                    silent &= e.kind() != std::io::ErrorKind::ConnectionRefused;
                    last = format!("{addr}: {e}");
                }
                Err(_) => last = format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"),
            }
        }
        Err((last, silent))
    }
}

/// A connection to `port` of the machine behind host port `device`.
pub async fn connect_machine(device: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    Target {
        device: Some(device.to_string()),
        addr: MACHINE_LINK_ADDR,
        ports: vec![port],
    }
    .connect()
    .await
}

/// Every machine's side of its link (docs/datapath.md).
pub const MACHINE_LINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Ports tried when a machine exposes none.
pub const DEFAULT_PORTS: [u16; 2] = [80, 8080];

/// The pooled client's connector: decodes the [`Target`] from the URI.
#[derive(Clone)]
struct Connector;

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        Box::pin(async move {
            let target = uri
                .host()
                .and_then(|h| Target::from_authority(h, uri.port_u16().unwrap_or(0)))
                .ok_or_else(|| std::io::Error::other(format!("bad backend {uri}")))?;
            let s = target.connect().await.map_err(std::io::Error::other)?;
            Ok(TokioIo::new(s))
        })
    }
}

/// `boxd proxy ...`
#[derive(clap::Subcommand)]
pub enum ProxyCommand {
    /// Serve HTTPS for a fixed table of host names (a JSON object: host -> "IP:PORT")
    /// with one certificate, until killed: for benchmarks and trying the proxy without
    /// a control plane. `boxd server` runs the proxy for its machines itself.
    Serve {
        #[arg(long)]
        routes: std::path::PathBuf,
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        key: std::path::PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        #[arg(long)]
        http: Option<SocketAddr>,
        #[arg(long, default_value_t = 10_000)]
        max_connections: usize,
        /// Serving threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

pub fn main(cmd: ProxyCommand) -> crate::Exit {
    use anyhow::Context;
    let ProxyCommand::Serve {
        routes,
        cert,
        key,
        https,
        http,
        max_connections,
        threads,
    } = cmd;
    let threads = threads.unwrap_or_else(crate::dns::default_threads);
    let text =
        std::fs::read_to_string(&routes).with_context(|| format!("read {}", routes.display()))?;
    let table: HashMap<String, String> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON object of host -> \"IP:PORT\"",
            routes.display()
        )
    })?;
    let mut map = HashMap::new();
    for (host, target) in table {
        let a: std::net::SocketAddrV4 = target
            .parse()
            .with_context(|| format!("{host}: {target:?} is not IPv4:PORT"))?;
        map.insert(
            host.to_ascii_lowercase(),
            Route::Backend {
                name: host.clone(),
                device: None,
                addr: *a.ip(),
                ports: vec![a.port()],
            },
        );
    }
    let router = Arc::new(Table::default());
    router.set(map);
    let cert_pem =
        std::fs::read_to_string(&cert).with_context(|| format!("read {}", cert.display()))?;
    let key_pem =
        std::fs::read_to_string(&key).with_context(|| format!("read {}", key.display()))?;
    let store = Arc::new(Store::default());
    store.set_default(crate::certs::certified_key("default", &cert_pem, &key_pem)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async {
        let proxy = Proxy::new(
            router,
            store,
            Arc::new(Challenges::default()),
            None,
            63_072_000,
        );
        serve(
            proxy,
            &Options {
                https,
                http,
                max_connections,
                threads,
            },
        )
        .await?;
        eprintln!("boxd proxy: serving HTTPS on {https}");
        std::future::pending::<()>().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}
