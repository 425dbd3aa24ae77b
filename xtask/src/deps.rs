//! xtask installs the system packages, so nothing it links may need one: `cargo xtask`
//! has to build on a machine with only Rust and a C compiler. This check reads xtask's
//! dependency graph (normal and build dependencies, as cargo resolves them) and fails
//! on any crate below.

use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::process::Command;

/// Crates xtask must never depend on, and what each would need first.
const FORBIDDEN: &[(&str, &str)] = &[
    (
        "librocksdb-sys",
        "RocksDB (librocksdb-dev, or a 15-minute bundled C++ build) and libclang",
    ),
    ("bindgen", "libclang"),
    ("clang-sys", "libclang"),
    ("llvm-sys", "LLVM"),
    (
        "aya-build",
        "the eBPF toolchain (nightly, rust-src, bpf-linker)",
    ),
    (
        "boxd-datapath",
        "the eBPF toolchain: its build.rs compiles the eBPF programs",
    ),
    ("boxd-control", "RocksDB and libclang (the Raft log)"),
    ("boxd-tests", "the data path and the control plane"),
    ("boxd", "every crate of the node"),
];

/// Fails when xtask's dependency graph holds a forbidden crate, naming the path to it.
pub fn check() -> Result<()> {
    let tree = cargo_tree(&["-p", "xtask"])?;
    let found = forbidden_in(&tree);
    if found.is_empty() {
        eprintln!(
            "xtask depends on {} crates, none of which needs a system package",
            crates(&tree).len()
        );
        return Ok(());
    }
    let mut why = String::new();
    for (name, needs) in &found {
        // How xtask reaches it, for whoever has to cut the edge.
        let path = cargo_tree(&["-p", "xtask", "-i", name]).unwrap_or_default();
        why.push_str(&format!(
            "\n- {name} (needs {needs}), reached through:\n{}",
            path.lines()
                .take(12)
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    bail!(
        "xtask must build before `cargo xtask setup` has installed anything, but it depends on:{why}\n\
         Move what needs these into the tests crate (a program xtask builds and runs after setup)."
    )
}

fn cargo_tree(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--quiet", "-e", "normal,build", "--prefix", "none"])
        .args(args)
        .output()
        .context("run cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The crate names in `cargo tree --prefix none` output ("name vX.Y.Z (path) (*)").
fn crates(tree: &str) -> BTreeSet<&str> {
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

fn forbidden_in(tree: &str) -> Vec<(&'static str, &'static str)> {
    let names = crates(tree);
    FORBIDDEN
        .iter()
        .filter(|(n, _)| names.contains(n))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_with_rocksdb_or_the_data_path_is_refused() {
        let bad = "xtask v0.1.0 (/w/xtask)\nboxd-testkit v0.1.0 (/w/tests/kit)\n\
                   boxd-control v0.1.0 (/w/control)\nrocksdb v0.25.0\nlibrocksdb-sys v0.17.3+9.10.0\n\
                   bindgen v0.72.1\nboxd-datapath v0.1.0 (/w/userspace/datapath) (*)\n";
        let found: Vec<&str> = forbidden_in(bad).iter().map(|(n, _)| *n).collect();
        assert_eq!(
            found,
            ["librocksdb-sys", "bindgen", "boxd-datapath", "boxd-control"]
        );
        // A name that merely starts like a forbidden one is not one.
        assert!(forbidden_in("boxd-testkit v0.1.0\nboxd-vmm v0.1.0\nanyhow v1\n").is_empty());
    }

    /// The real graph, as cargo resolves it now.
    #[test]
    fn xtask_needs_no_system_package() {
        check().unwrap();
    }
}
