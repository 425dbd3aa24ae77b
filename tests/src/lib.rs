//! Helpers for boxd's end-to-end tests: the emulated KVM host and the paths tests share.

pub mod api;
pub mod bench;
pub mod bpf;
pub mod cluster;
pub mod guest;
pub mod linearizable;
pub mod net;
pub mod pkt;
pub mod qemu;
pub mod tls;

// What the emulated KVM host, skips and paths need lives in boxd-testkit, which `cargo
// xtask` links too; re-exported so that tests name one place.
pub use boxd_testkit::{
    Killed, boxd_binary, have, is_root, ledger, missing_tools, root, skip, skipped, strict,
    target_dir, testhost, wait_port,
};
