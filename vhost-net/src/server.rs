//! Serving ports: one thread per port accepts frontends on the port's socket, one
//! connection after another, for as long as the port exists; [`Registry`] is the set of
//! ports a `boxd net serve` daemon runs, changed through its control socket.

use crate::NetError;
use crate::control::PortSpec;
use crate::port::{Port, PortStats};
use crate::tap::Tap;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Most ports one daemon serves (each has a TAP, a keeper and a thread per queue pair).
pub const MAX_PORTS: usize = 4096;
/// How often an idle port's thread checks whether it should stop.
const ACCEPT_TICK: Duration = Duration::from_millis(200);

/// A port being served.
pub struct Running {
    pub spec: PortSpec,
    pub port: Port<Tap>,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<Result<(), NetError>>>,
}

impl Running {
    /// Opens the port's TAP (one queue per queue pair), binds its socket and starts
    /// serving; `connections` ends the port after that many frontends (None: never).
    pub fn start(spec: PortSpec, connections: Option<u64>) -> Result<Self, NetError> {
        let cfg = spec.config()?;
        let taps = Tap::open(&spec.tap, cfg.queue_pairs)?;
        let port = Port::new(cfg, taps)?;
        let listener = Listener::new(&spec.socket, true).map_err(|e| NetError::Socket {
            socket: spec.socket.clone(),
            message: e.to_string(),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(None));
        let thread = {
            let (port, stop, live) = (port.clone(), stop.clone(), live.clone());
            let socket = spec.socket.clone();
            std::thread::Builder::new()
                .name(format!("net-port-{}", spec.name))
                .spawn(move || serve(&port, listener, &socket, &stop, &live, connections))?
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
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.live.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            h.shutdown();
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
    live: &Mutex<Option<ShutdownHandle>>,
    connections: Option<u64>,
) -> Result<(), NetError> {
    let err = |message: String| NetError::Daemon {
        socket: socket.to_path_buf(),
        message,
    };
    let mut listener = listener;
    let mut served = 0u64;
    while connections.is_none_or(|n| served < n) && !stop.load(Ordering::Acquire) {
        // Each connection gets a fresh daemon: a daemon's worker threads end with its
        // connection. The port (TAP, hold, counters) lives on.
        port.new_connection()?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(format!("net-{}", port.config().name), port.clone(), mem)
                .map_err(|e| err(format!("{e:?}")))?;
        for (pair, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            for (fd, token, events) in port.listeners(pair) {
                handler
                    .register_listener(fd, events, token)
                    .map_err(|e| err(format!("register fd: {e}")))?;
            }
        }
        if !wait_readable(listener.as_raw_fd(), stop) {
            break;
        }
        daemon
            .start(&mut listener)
            .map_err(|e| err(format!("accept: {e:?}")))?;
        port.connected();
        *live.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        tracing::info!(port = %port.config().name, "frontend connected");
        let r = daemon.wait();
        *live.lock().unwrap_or_else(|e| e.into_inner()) = None;
        port.disconnected();
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
        served += 1;
        match r {
            Ok(()) => tracing::info!(port = %port.config().name, "frontend disconnected"),
            Err(e) => tracing::warn!(port = %port.config().name, "frontend dropped: {e:?}"),
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

/// The ports of one daemon, by name.
#[derive(Default)]
pub struct Registry {
    ports: Mutex<BTreeMap<String, Running>>,
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
        if spec.socket.exists() {
            return Err(NetError::Invalid(format!(
                "{} already exists; remove the stale socket or choose another path",
                spec.socket.display()
            )));
        }
        let name = spec.name.clone();
        let running = Running::start(spec, None)?;
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
