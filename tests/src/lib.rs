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
use std::process::Child;

/// Waits (at most 20 s) until something accepts TCP connections on loopback `port`.
pub fn wait_port(port: u16) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "nothing listens on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// A child process killed and reaped when dropped, so nothing a test or bench starts
/// (a server, a backend, QEMU, a load generator) outlives it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
