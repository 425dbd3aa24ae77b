//! Helpers for boxd's end-to-end tests: the emulated KVM host and the paths tests share.

pub mod api;
pub mod bpf;
pub mod cluster;
pub mod guest;
pub mod linearizable;
pub mod net;
pub mod pkt;
pub mod qemu;
pub mod testhost;
pub mod tls;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is one level down")
        .to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` the way cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        None => root().join("target"),
    }
}
