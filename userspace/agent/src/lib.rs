//! The boxd agent: the process inside every VM that the host drives over vsock, and the
//! host-side client that drives it.
//!
//! - [`proto`]: frames and messages, shared by both sides;
//! - [`server`]: `boxd agent`, run by systemd inside the guest;
//! - [`client`]: [`Agent`], used by the VMM's callers (worker, tests, CLI).

pub mod client;
pub mod proto;
pub mod server;
pub mod vsock;

pub use client::{Agent, AgentError, Output};
pub use proto::{AGENT_PORT, READY_PORT};
