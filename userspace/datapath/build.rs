//! Builds the eBPF object (ebpf/programs) with the pinned nightly toolchain for
//! bpfel-unknown-none and leaves it in OUT_DIR for `include_bytes!`.
//!
//! We drive cargo ourselves rather than through aya-build: aya-build wants the eBPF crate
//! inside this workspace, where every stable `cargo build/clippy/test --workspace` would
//! then try to compile a `no_std`, `no_main` BPF binary for the host. Keeping it in its
//! own workspace (ebpf/programs, with its own rust-toolchain.toml and lock file) keeps
//! the two toolchains apart.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The toolchain ebpf/programs/rust-toolchain.toml pins (`channel = "nightly-..."`).
fn pinned(ebpf: &std::path::Path) -> String {
    let path = ebpf.join("programs/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("{} names no channel", path.display()))
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../../ebpf");
    for p in [
        "programs/src",
        "programs/Cargo.toml",
        "programs/Cargo.lock",
        "programs/rust-toolchain.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=BOXD_EBPF_TOOLCHAIN");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let toolchain = env::var("BOXD_EBPF_TOOLCHAIN").unwrap_or_else(|_| pinned(&ebpf));
    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain, "cargo", "build", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf.join("programs/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        // The outer (stable) build's settings must not leak into the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTUP_TOOLCHAIN");
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run rustup to build the eBPF programs ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building the eBPF programs (ebpf/programs) with the {toolchain} toolchain failed; \
             `cargo xtask setup` installs what they need (nightly with rust-src, bpf-linker \
             built against LLVM 22)"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/boxd-ebpf");
    std::fs::copy(&built, out.join("boxd-ebpf"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
}
