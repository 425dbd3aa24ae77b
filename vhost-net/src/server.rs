//! Serving ports: one thread per port accepts frontends on the port's socket, one
//! connection after another, for as long as the port exists; [`Registry`] is the set of
//! ports a `boxd net serve` daemon runs, changed through its control socket.

use crate::NetError;
use crate::control::PortSpec;
use crate::device::Device;
use crate::events::Bus;
use crate::port::{Port, PortStats};
use crate::tap::Tap;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError, Listener};

/// Most ports one daemon serves (each has a TAP, a keeper and a thread per queue pair).
pub const MAX_PORTS: usize = 4096;
/// How often an idle port's thread checks whether it should stop.
const ACCEPT_TICK: Duration = Duration::from_millis(200);

/// A port being served.
pub struct Running {
    pub spec: PortSpec,
    pub port: Port<Tap>,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<Result<(), NetError>>>,
}

impl Running {
    /// Opens the port's TAP (one queue per queue pair), binds its socket and starts
    /// serving; `connections` ends the port after that many frontends (None: never).
    pub fn start(
        spec: PortSpec,
        connections: Option<u64>,
        events: Arc<Bus>,
    ) -> Result<Self, NetError> {
        let cfg = spec.config()?;
        let taps = Tap::open(&spec.tap, cfg.queue_pairs)?;
        let port = Port::new(cfg, taps, events)?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(None));
        let started = Listener::new(&spec.socket, true)
            .map_err(|e| NetError::Socket {
                socket: spec.socket.clone(),
                message: e.to_string(),
            })
            .and_then(|listener| {
                let (port, stop, live) = (port.clone(), stop.clone(), live.clone());
                let socket = spec.socket.clone();
                std::thread::Builder::new()
                    .name(format!("net-port-{}", spec.name))
                    .spawn(move || serve(&port, listener, &socket, &stop, &live, connections))
                    .map_err(NetError::from)
            });
        let thread = match started {
            Ok(t) => t,
            Err(e) => {
                // Nothing may keep the TAP open (the keeper would steal its frames).
                port.close();
                return Err(e);
            }
        };
        Ok(Self {
            spec,
            port,
            stop,
            live,
            thread: Some(thread),
        })
    }

    /// Waits until the port stops by itself (its connection count ran out).
    pub fn wait(mut self) -> Result<(), NetError> {
        let r = self.join();
        self.port.close();
        r
    }

    fn join(&mut self) -> Result<(), NetError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(NetError::Daemon {
                socket: self.spec.socket.clone(),
                message: "the port's thread panicked".into(),
            }),
            None => Ok(()),
        }
    }

    /// Disconnects the frontend (if any), stops serving, closes the TAP and removes
    /// the socket.
    pub fn stop(mut self) {
        {
            let slot = self.live.lock().unwrap_or_else(|e| e.into_inner());
            self.stop.store(true, Ordering::Release);
            if let Some(s) = slot.as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Err(e) = self.join() {
            tracing::warn!(port = %self.spec.name, "stopping: {e}");
        }
        self.port.close();
        let _ = std::fs::remove_file(&self.spec.socket);
    }
}

fn serve(
    port: &Port<Tap>,
    listener: Listener,
    socket: &Path,
    stop: &AtomicBool,
    live: &Mutex<Option<UnixStream>>,
    connections: Option<u64>,
) -> Result<(), NetError> {
    let name = &port.config().name;
    let mut served = 0u64;
    while connections.is_none_or(|n| served < n) && !stop.load(Ordering::Acquire) {
        if !wait_readable(listener.as_raw_fd(), stop) {
            break;
        }
        // Transient failures (out of fds, memory) end this connection, not the port:
        // the VMM can try again.
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(port = %name, socket = %socket.display(), "accept: {e}");
                std::thread::sleep(ACCEPT_TICK);
                continue;
            }
        };
        {
            let mut slot = live.lock().unwrap_or_else(|e| e.into_inner());
            // Checked under the lock stop() takes: a stop that came in between accept
            // and here would otherwise miss this connection.
            if stop.load(Ordering::Acquire) {
                break;
            }
            *slot = stream.try_clone().ok();
        }
        // The port (TAP, hold, counters) lives on; the device is this connection's.
        let device = match Device::new(port.clone()) {
            Ok(d) => Arc::new(Mutex::new(d)),
            Err(e) => {
                tracing::warn!(port = %name, "cannot set up the connection: {e}");
                *live.lock().unwrap_or_else(|e| e.into_inner()) = None;
                continue;
            }
        };
        let mut handler = BackendReqHandler::from_stream(stream, device.clone());
        tracing::info!(port = %name, "frontend connected");
        let mut tolerated = 0u32;
        let end = loop {
            match handler.handle_request() {
                Ok(()) => {}
                // QEMU enables the first queue pair before SET_FEATURES (see
                // device.rs); the request changes nothing we rely on, so it is
                // dropped, a bounded number of times, instead of the connection.
                Err(VhostUserError::InactiveFeature(f)) if tolerated < 64 => {
                    tolerated += 1;
                    tracing::debug!(port = %name, "request before feature {f:?} was negotiated: ignored");
                }
                Err(e) => break e,
            }
        };
        *live.lock().unwrap_or_else(|e| e.into_inner()) = None;
        drop(handler);
        // The last reference: its workers stop and the port detaches.
        drop(device);
        served += 1;
        match end {
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_) => {
                tracing::info!(port = %name, "frontend disconnected")
            }
            e => tracing::warn!(port = %name, "frontend dropped: {e}"),
        }
    }
    Ok(())
}

/// Waits until `fd` is readable (a frontend is connecting); false when asked to stop.
fn wait_readable(fd: i32, stop: &AtomicBool) -> bool {
    while !stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ACCEPT_TICK.as_millis() as i32) };
        if n > 0 {
            return true;
        }
    }
    false
}

/// Makes way for a new socket at `path`: nothing there is fine; a socket nobody
/// answers on (left by a daemon that was killed) is removed; a socket someone answers
/// on, or anything that is not a socket, is refused.
pub fn replace_stale_socket(path: &Path) -> Result<(), NetError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        return Err(NetError::Invalid(format!(
            "{} exists and is not a socket; choose another path",
            path.display()
        )));
    }
    if socket_answers(path) {
        return Err(NetError::Invalid(format!(
            "{} is in use by another process; choose another path",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(|e| {
        NetError::Invalid(format!(
            "{} is stale and cannot be removed: {e}",
            path.display()
        ))
    })
}

/// Whether a process listens on the unix socket at `path`, asked without blocking (a
/// listener with a full backlog counts as listening).
fn socket_answers(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return false;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket(2); closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: `addr` is a valid sockaddr_un of the size passed.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    r == 0 || err == Some(libc::EAGAIN) || err == Some(libc::EINPROGRESS)
}

/// The ports of one daemon, by name, and the events they raise.
#[derive(Default)]
pub struct Registry {
    ports: Mutex<BTreeMap<String, Running>>,
    pub events: Arc<Bus>,
}

impl Registry {
    /// Adds a port; on any error nothing changes.
    pub fn add(&self, spec: PortSpec) -> Result<(), NetError> {
        spec.config()?;
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        if ports.len() >= MAX_PORTS {
            return Err(NetError::Invalid(format!(
                "this daemon already serves {MAX_PORTS} ports; remove one first"
            )));
        }
        for p in ports.values() {
            let clash = if p.spec.name == spec.name {
                Some("name")
            } else if p.spec.tap == spec.tap {
                Some("TAP")
            } else if p.spec.socket == spec.socket {
                Some("socket")
            } else {
                None
            };
            if let Some(what) = clash {
                return Err(NetError::Invalid(format!(
                    "port {:?} already uses that {what}; remove it first or choose another",
                    p.spec.name
                )));
            }
        }
        replace_stale_socket(&spec.socket)?;
        let name = spec.name.clone();
        let running = Running::start(spec, None, self.events.clone())?;
        ports.insert(name, running);
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<(), NetError> {
        let running = self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| {
                NetError::Invalid(format!("no port named {name:?} (see `boxd net stats`)"))
            })?;
        running.stop();
        Ok(())
    }

    pub fn list(&self) -> Vec<PortSpec> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.values().map(|r| r.spec.clone()).collect()
    }

    pub fn stats(&self, name: Option<&str>) -> Result<Vec<PortStats>, NetError> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        match name {
            Some(n) => ports
                .get(n)
                .map(|r| vec![r.port.stats()])
                .ok_or_else(|| NetError::Invalid(format!("no port named {n:?}"))),
            None => Ok(ports.values().map(|r| r.port.stats()).collect()),
        }
    }

    /// Stops every port (daemon shutdown).
    pub fn stop_all(&self) {
        let ports = std::mem::take(&mut *self.ports.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, r) in ports {
            r.stop();
        }
    }

    pub fn socket_of(&self, name: &str) -> Option<PathBuf> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.get(name).map(|r| r.spec.socket.clone())
    }
}
