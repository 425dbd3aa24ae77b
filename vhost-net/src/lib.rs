//! boxd's vhost-user network backend (`boxd net`): the switch port every VM's virtio-net
//! device talks to, with a TAP device as the host side.
//!
//! One daemon serves many ports (one per VM, one vhost-user socket each, 1..16 queue
//! pairs with a worker thread per pair). A port outlives the VMMs that connect to it:
//! it owns the TAP and the hold queue, so a paused, suspended or restarting VM's inbound
//! frames wait in order, and a restarted VMM reconnects to the same socket and finds
//! the same host interface. Each port stamps its VM's identity on the link and drops
//! (and counts) frames from any other source. See docs/net.md.

pub mod chain;
pub mod control;
mod device;
pub mod events;
pub mod filter;
pub mod frontend;
pub mod hold;
mod port;
pub mod server;
pub mod tap;

pub use control::{Client, PortSpec, Request, Response};
pub use port::{
    FEATURES, FRAME_MAX, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE, Port, PortConfig, PortStats, QUEUE_SIZE,
};
pub use server::{Registry, Running};
pub use tap::{HostPort, Tap, TapError, VNET_HDR_LEN};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("vhost-user daemon for {}: {message}", socket.display())]
    Daemon { socket: PathBuf, message: String },
    #[error("socket {}: {message}", socket.display())]
    Socket { socket: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the net daemon refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves one port until `connections` frontends have come and gone (None: forever):
/// `boxd net port`, for a VM run by hand without the daemon.
pub fn serve_port(spec: PortSpec, connections: Option<u64>) -> Result<(), NetError> {
    Running::start(spec, connections, std::sync::Arc::default())?.wait()
}
