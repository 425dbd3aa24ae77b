//! The control socket of `boxd net serve`: one JSON request per line, one JSON response
//! per line. The worker adds a port when it creates a VM and removes it when the VM is
//! deleted; operators read counters with `boxd net stats`.
//!
//! ```text
//! {"op":"add_port","name":"my-app","tap":"bx-my-app","socket":"/run/boxd/net/my-app.sock",
//!  "mac":"06:b0:c5:00:00:02","ip":"10.0.0.2","queue_pairs":2}
//! {"op":"remove_port","name":"my-app"}
//! {"op":"list"}
//! {"op":"stats"}            {"op":"stats","name":"my-app"}
//! ```

use crate::NetError;
use crate::events::Event;
use crate::filter::Identity;
use crate::hold::HoldLimits;
use crate::port::{MAX_QUEUE_PAIRS, PortConfig, PortStats};
use crate::server::Registry;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 << 10;
/// Most control clients served at once.
const MAX_CLIENTS: usize = 64;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The link identity every VM sees (DESIGN.md: every VM has the same link).
pub const DEFAULT_MAC: &str = "06:b0:c5:00:00:02";
pub const DEFAULT_IP: &str = "10.0.0.2";

fn default_mac() -> String {
    DEFAULT_MAC.into()
}
fn default_ip() -> String {
    DEFAULT_IP.into()
}
fn default_pairs() -> usize {
    1
}
fn default_hold_frames() -> usize {
    HoldLimits::default().frames
}
fn default_hold_bytes() -> usize {
    HoldLimits::default().bytes
}

/// A port as the worker describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub tap: String,
    pub socket: PathBuf,
    #[serde(default = "default_mac")]
    pub mac: String,
    #[serde(default = "default_ip")]
    pub ip: String,
    #[serde(default = "default_pairs")]
    pub queue_pairs: usize,
    #[serde(default = "default_hold_frames")]
    pub hold_frames: usize,
    #[serde(default = "default_hold_bytes")]
    pub hold_bytes: usize,
}

impl PortSpec {
    /// A spec with the default identity and limits.
    pub fn new(name: &str, tap: &str, socket: &Path) -> Self {
        Self {
            name: name.into(),
            tap: tap.into(),
            socket: socket.into(),
            mac: default_mac(),
            ip: default_ip(),
            queue_pairs: 1,
            hold_frames: default_hold_frames(),
            hold_bytes: default_hold_bytes(),
        }
    }

    /// Checks every field and builds the port's configuration.
    pub fn config(&self) -> Result<PortConfig, NetError> {
        let bad = |m: String| Err(NetError::Invalid(m));
        let n = &self.name;
        if n.is_empty()
            || n.len() > 63
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            || n.starts_with('-')
            || n.ends_with('-')
        {
            return bad(format!(
                "port name {n:?} must be a DNS label: 1 to 63 of a-z, 0-9 and '-', not at either end"
            ));
        }
        if self.tap.is_empty()
            || self.tap.len() > 15
            || !self
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(format!(
                "TAP name {:?} must be 1 to 15 of letters, digits, '-' and '_'",
                self.tap
            ));
        }
        if !self.socket.is_absolute() {
            return bad(format!(
                "socket path {} must be absolute",
                self.socket.display()
            ));
        }
        if self.socket.as_os_str().len() > 100 {
            return bad(format!(
                "socket path {} is longer than a unix socket address allows (100 bytes here)",
                self.socket.display()
            ));
        }
        if !self.socket.parent().is_some_and(Path::is_dir) {
            return bad(format!(
                "the directory of {} does not exist; create it first",
                self.socket.display()
            ));
        }
        let mac = parse_mac(&self.mac).ok_or_else(|| {
            NetError::Invalid(format!(
                "MAC {:?} must be six hex bytes like 06:b0:c5:00:00:02",
                self.mac
            ))
        })?;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return bad(format!("MAC {} must be a unicast address", self.mac));
        }
        let ip: std::net::Ipv4Addr = self
            .ip
            .parse()
            .map_err(|_| NetError::Invalid(format!("IPv4 address {:?} is not valid", self.ip)))?;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return bad(format!("IPv4 address {ip} cannot be a VM's own address"));
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.queue_pairs) {
            return bad(format!(
                "queue_pairs {} must be 1 to {MAX_QUEUE_PAIRS}",
                self.queue_pairs
            ));
        }
        if !(1..=65_536).contains(&self.hold_frames) {
            return bad(format!(
                "hold_frames {} must be 1 to 65536",
                self.hold_frames
            ));
        }
        if !((64 << 10)..=(256 << 20)).contains(&self.hold_bytes) {
            return bad(format!(
                "hold_bytes {} must be 64 KiB to 256 MiB",
                self.hold_bytes
            ));
        }
        Ok(PortConfig {
            name: self.name.clone(),
            identity: Identity {
                mac,
                ip: ip.octets(),
            },
            queue_pairs: self.queue_pairs,
            hold: HoldLimits {
                frames: self.hold_frames,
                bytes: self.hold_bytes,
            },
        })
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    AddPort(PortSpec),
    RemovePort {
        name: String,
    },
    List,
    Stats {
        name: Option<String>,
    },
    /// Keeps the connection open and streams [`Event`](crate::events::Event)s, one JSON
    /// line each, after an `{"ok":true}` line.
    Watch,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats: Vec<PortStats>,
}

impl Response {
    fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            ..Self::default()
        }
    }
}

fn handle(registry: &Registry, req: Request) -> Response {
    let done = |r: Result<(), NetError>| match r {
        Ok(()) => Response {
            ok: true,
            ..Response::default()
        },
        Err(e) => Response::err(e),
    };
    match req {
        Request::AddPort(spec) => {
            tracing::info!(port = %spec.name, tap = %spec.tap, "add port");
            done(registry.add(spec))
        }
        Request::RemovePort { name } => {
            tracing::info!(port = %name, "remove port");
            done(registry.remove(&name))
        }
        Request::List => Response {
            ok: true,
            ports: registry.list(),
            ..Response::default()
        },
        Request::Watch => unreachable!("watch is answered by the client loop"),
        Request::Stats { name } => match registry.stats(name.as_deref()) {
            Ok(stats) => Response {
                ok: true,
                stats,
                ..Response::default()
            },
            Err(e) => Response::err(e),
        },
    }
}

/// Answers one client: requests line by line until it hangs up.
fn client(registry: &Registry, stream: UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST {
            let r = Response::err(format!("request longer than {MAX_REQUEST} bytes"));
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
            return Ok(());
        }
        let resp = match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Watch) => return watch(registry, out),
            Ok(req) => handle(registry, req),
            Err(e) => Response::err(format!(
                "bad request: {e}; expected one JSON object per line with \"op\" one of add_port, remove_port, list, stats"
            )),
        };
        writeln!(out, "{}", serde_json::to_string(&resp)?)?;
    }
}

/// Streams events to a watcher until it hangs up.
fn watch(registry: &Registry, mut out: UnixStream) -> std::io::Result<()> {
    let Some(rx) = registry.events.subscribe() else {
        let r = Response::err("too many watchers; try again");
        return writeln!(out, "{}", serde_json::to_string(&r)?);
    };
    let ok = Response {
        ok: true,
        ..Response::default()
    };
    writeln!(out, "{}", serde_json::to_string(&ok)?)?;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(e) => writeln!(out, "{}", serde_json::to_string(&e)?)?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Notice a watcher that left while nothing happened.
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&out),
                    events: libc::POLLRDHUP,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut p, 1, 0) };
                if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    return Ok(());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Serves the control socket at `path` until `stop` is set (checked every 200 ms).
pub fn serve(path: &Path, registry: Arc<Registry>, stop: &AtomicBool) -> Result<(), NetError> {
    crate::server::replace_stale_socket(path).map_err(|e| NetError::Socket {
        socket: path.to_path_buf(),
        message: format!("{e} (another net daemon? stop it first or choose another --control)"),
    })?;
    let listener = UnixListener::bind(path).map_err(|e| NetError::Socket {
        socket: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let clients = Arc::new(AtomicUsize::new(0));
    tracing::info!(control = %path.display(), "net backend ready");
    while !stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let mut s = stream;
            let r = Response::err("too many control clients; try again");
            let _ = writeln!(s, "{}", serde_json::to_string(&r).unwrap_or_default());
            continue;
        }
        let (registry, clients) = (registry.clone(), clients.clone());
        std::thread::spawn(move || {
            if let Err(e) = client(&registry, stream) {
                tracing::debug!("control client: {e}");
            }
            clients.fetch_sub(1, Ordering::AcqRel);
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// A client of the control socket.
pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, NetError> {
        let s = UnixStream::connect(path).map_err(|e| NetError::Socket {
            socket: path.to_path_buf(),
            message: format!(
                "{e}; is `boxd net serve --control {}` running?",
                path.display()
            ),
        })?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self {
            stream: BufReader::new(s),
        })
    }

    /// Sends one request; a refused request is an error carrying the daemon's message.
    pub fn call(&mut self, req: &Request) -> Result<Response, NetError> {
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line)?;
        let mut resp = String::new();
        self.stream.by_ref().take(16 << 20).read_line(&mut resp)?;
        let resp: Response = serde_json::from_str(&resp).map_err(|e| {
            NetError::Invalid(format!("the net daemon answered something unreadable: {e}"))
        })?;
        if !resp.ok {
            return Err(NetError::Refused(resp.error.unwrap_or_default()));
        }
        Ok(resp)
    }

    /// Subscribes to the daemon's events: an endless iterator (it ends when the daemon
    /// goes away).
    pub fn watch(mut self) -> Result<impl Iterator<Item = Result<Event, NetError>>, NetError> {
        self.call(&Request::Watch)?;
        self.stream.get_ref().set_read_timeout(None)?;
        let mut lines = self.stream.lines();
        Ok(std::iter::from_fn(move || {
            let line = match lines.next()? {
                Ok(l) => l,
                Err(e) => return Some(Err(e.into())),
            };
            Some(serde_json::from_str(&line).map_err(|e| {
                NetError::Invalid(format!("the net daemon sent an unreadable event: {e}"))
            }))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PortSpec {
        PortSpec::new("my-app", "bx-my-app", Path::new("/tmp/my-app.sock"))
    }

    #[test]
    fn a_good_spec_becomes_a_config_with_the_link_identity() {
        let c = spec().config().unwrap();
        assert_eq!(c.identity.mac, [6, 0xb0, 0xc5, 0, 0, 2]);
        assert_eq!(c.identity.ip, [10, 0, 0, 2]);
        assert_eq!((c.queue_pairs, c.hold), (1, HoldLimits::default()));
    }

    type Change = Box<dyn Fn(&mut PortSpec)>;

    #[test]
    fn every_bad_field_is_refused_with_its_name() {
        let cases: Vec<(&str, Change)> = vec![
            ("port name", Box::new(|s| s.name = "-bad".into())),
            ("port name", Box::new(|s| s.name = "a".repeat(64))),
            ("port name", Box::new(|s| s.name = "UPPER".into())),
            ("TAP name", Box::new(|s| s.tap = "sixteen-chars-xx".into())),
            ("TAP name", Box::new(|s| s.tap = "a/b".into())),
            ("absolute", Box::new(|s| s.socket = "x.sock".into())),
            (
                "longer than",
                Box::new(|s| s.socket = format!("/tmp/{}", "s".repeat(120)).into()),
            ),
            (
                "does not exist",
                Box::new(|s| s.socket = "/no/such/dir/x.sock".into()),
            ),
            ("MAC", Box::new(|s| s.mac = "06:b0:c5:00:00".into())),
            ("unicast", Box::new(|s| s.mac = "01:00:5e:00:00:01".into())),
            ("unicast", Box::new(|s| s.mac = "00:00:00:00:00:00".into())),
            ("IPv4", Box::new(|s| s.ip = "10.0.0".into())),
            ("cannot be", Box::new(|s| s.ip = "224.0.0.1".into())),
            ("cannot be", Box::new(|s| s.ip = "0.0.0.0".into())),
            ("queue_pairs", Box::new(|s| s.queue_pairs = 17)),
            ("hold_frames", Box::new(|s| s.hold_frames = 0)),
            ("hold_bytes", Box::new(|s| s.hold_bytes = 1024)),
        ];
        for (want, change) in cases {
            let mut s = spec();
            change(&mut s);
            let e = s.config().expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("06:B0:c5:00:00:02"),
            Some([6, 0xb0, 0xc5, 0, 0, 2])
        );
        for bad in [
            "",
            "06:b0:c5:00:00",
            "06:b0:c5:00:00:02:03",
            "6:b0:c5:00:00:02",
            "zz:b0:c5:00:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn requests_parse_and_unknown_fields_or_ops_do_not() {
        let r: Request = serde_json::from_str(r#"{"op":"stats","name":"x"}"#).unwrap();
        assert!(matches!(r, Request::Stats { name: Some(n) } if n == "x"));
        let r: Request = serde_json::from_str(
            r#"{"op":"add_port","name":"a","tap":"t","socket":"/tmp/a.sock","queue_pairs":2}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::AddPort(p) if p.queue_pairs == 2 && p.mac == DEFAULT_MAC));
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(
                r#"{"op":"add_port","name":"a","tap":"t","socket":"/s","qeue_pairs":2}"#
            )
            .is_err(),
            "a misspelt field must not be ignored"
        );
    }
}
