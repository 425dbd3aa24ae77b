//! boxd's vhost-user network backend (`boxd net`): the switch port every VM's virtio-net
//! device talks to, with a TAP device as the host side.
//!
//! This is the first version: one port per [`serve_port`] call, one queue pair, frames
//! copied once between guest memory and the TAP. The backend owns the TAP, so a port
//! outlives the VMMs that connect to it: a restarted VMM reconnects to the same
//! socket and finds the same host interface. Multiqueue, identity stamping,
//! anti-spoofing, holding frames for sleeping VMs and the multi-port daemon with its
//! control socket are the next steps (the vhost-user backend issue).

mod port;
pub mod tap;

pub use port::{FEATURES, Port, PortStats};
pub use tap::{HostPort, Tap, TapError};

use std::path::Path;
use std::sync::{Arc, RwLock};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("vhost-user daemon for {socket}: {message}")]
    Daemon { socket: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves one VM port on `socket` with the TAP `tap`, one frontend connection after
/// another, until `connections` frontends have come and gone (None: forever).
pub fn serve_port(socket: &Path, tap: &str, connections: Option<u64>) -> Result<(), NetError> {
    let daemon_err = |message: String| NetError::Daemon {
        socket: socket.display().to_string(),
        message,
    };
    let tap = Tap::open(tap)?;
    // The port (and its TAP) lives across connections; each connection gets a fresh
    // daemon, since a daemon's worker threads end with its connection.
    let port = Arc::new(RwLock::new(Port::new(tap)?));
    let mut served = 0u64;
    while connections.is_none_or(|n| served < n) {
        port.write()
            .map_err(|_| daemon_err("port lock poisoned".into()))?
            .new_connection()?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("boxd-net".into(), port.clone(), mem)
            .map_err(|e| daemon_err(format!("{e:?}")))?;
        let listeners = port
            .read()
            .map_err(|_| daemon_err("port lock poisoned".into()))?
            .listeners();
        for handler in daemon.get_epoll_handlers() {
            for (fd, token, events) in listeners {
                handler
                    .register_listener(fd, events, token)
                    .map_err(|e| daemon_err(format!("register fd: {e}")))?;
            }
        }
        let _ = std::fs::remove_file(socket);
        tracing::info!(socket = %socket.display(), "waiting for a VMM");
        daemon
            .serve(socket)
            .map_err(|e| daemon_err(format!("{e:?}")))?;
        served += 1;
        tracing::info!(socket = %socket.display(), "VMM disconnected");
    }
    Ok(())
}
