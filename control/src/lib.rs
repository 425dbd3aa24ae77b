//! boxd's control plane: Raft (openraft) over a RocksDB log and an SQLite state machine,
//! node-to-node RPC over QUIC with mutual TLS, and the cluster's membership, scheduling
//! and audit. See docs/control.md.

// openraft's StorageError is large and its traits return it by value: boxing it here
// would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod log;
pub mod net;
pub mod node;
pub mod reconcile;
pub mod state;
pub mod tls;
pub mod types;
