//! Fixtures for data-path tests: hosts built from network namespaces and veth pairs,
//! and the real `boxd bpf` CLI run inside them (nsenter switches only the network
//! namespace, so the bpffs mount stays visible).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Runs `program args` inside network namespace `ns`.
pub fn in_ns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg(program)
        .args(args);
    c
}

/// Runs a command to completion; fails with its output when it fails.
pub fn run_ok(mut c: Command) -> Result<Output> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A data path set up by `boxd bpf up` in a namespace, with its own pin directory;
/// `boxd bpf down` when dropped.
pub struct Datapath {
    pub ns: String,
    pub pin: PathBuf,
    pub boxd: PathBuf,
}

impl Datapath {
    pub fn up(ns: &str, tag: &str, up_args: &[&str]) -> Result<Self> {
        let boxd = crate::guest::boxd_binary()?;
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/boxd-test-{}-{tag}",
            std::process::id()
        ));
        let dp = Self {
            ns: ns.into(),
            pin,
            boxd,
        };
        let _ = dp.cmd(&["down"]).output();
        let mut args = vec!["up"];
        args.extend_from_slice(up_args);
        run_ok(dp.cmd(&args))?;
        Ok(dp)
    }

    /// `boxd bpf --pin-dir PIN ARGS` in the namespace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = in_ns(&self.ns, self.boxd.to_str().expect("utf-8 path"), &["bpf"]);
        c.arg("--pin-dir").arg(&self.pin).args(args);
        c
    }

    /// Runs a subcommand with `--json` and parses its output.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = run_ok(self.cmd(&a))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "boxd bpf {} printed no JSON: {}",
                a.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Programs the maps from a desired state.
    pub fn apply(&self, desired: &Value) -> Result<Value> {
        let f = std::env::temp_dir().join(format!(
            "bx-desired-{}-{}.json",
            std::process::id(),
            self.pin.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::write(&f, serde_json::to_vec(desired)?)?;
        let r = self.json(&["apply", f.to_str().expect("utf-8")]);
        let _ = std::fs::remove_file(&f);
        r
    }

    /// One global counter.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let v = self.json(&["stats"])?;
        v["counters"][name]
            .as_u64()
            .with_context(|| format!("no counter {name} in {v}"))
    }

    /// A VM's row from `boxd bpf vms --json`.
    pub fn vm(&self, public: &str) -> Result<Value> {
        let v = self.json(&["vms"])?;
        v.as_array()
            .and_then(|a| a.iter().find(|r| r["public"] == public).cloned())
            .with_context(|| format!("no VM {public} in {v}"))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Not through nsenter: the namespace may be gone already, the pins are not.
        let _ = Command::new(&self.boxd)
            .args(["bpf", "--pin-dir"])
            .arg(&self.pin)
            .arg("down")
            .output();
    }
}

/// A veth pair `a` (in namespace `ns_a`) <-> `b` (in `ns_b`), both up.
pub fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<()> {
    veth_queues(ns_a, a, ns_b, b, 1)
}

/// [`veth`] with `queues` transmit and receive queues on each end (a NAPI instance per
/// receive queue, as a multi-queue NIC has).
pub fn veth_queues(ns_a: &str, a: &str, ns_b: &str, b: &str, queues: usize) -> Result<()> {
    let ip = |args: &[&str]| {
        run_ok({
            let mut c = Command::new("ip");
            c.args(args);
            c
        })
    };
    let q = queues.to_string();
    ip(&[
        "-n",
        ns_a,
        "link",
        "add",
        a,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ])?;
    ip(&["-n", ns_a, "link", "set", a, "up"])?;
    ip(&["-n", ns_b, "link", "set", b, "up"])?;
    Ok(())
}

/// The MAC of `dev` in namespace `ns`.
pub fn mac(ns: &str, dev: &str) -> Result<String> {
    // Not /sys/class/net: sysfs shows the namespace of whoever mounted it.
    let out = run_ok({
        let mut c = Command::new("ip");
        c.args(["-n", ns, "-br", "link", "show", "dev", dev]);
        c
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .map(str::to_string)
        .with_context(|| format!("no MAC for {dev} in {ns}: {text}"))
}

/// Turns off transmit checksum offload on `dev`, so its packets carry full checksums
/// the way packets arriving from a wire do (a veth otherwise hands the peer packets
/// whose TCP/UDP checksum is still to be computed, which XDP cannot see).
pub fn full_checksums(ns: &str, dev: &str) -> Result<()> {
    run_ok(in_ns(ns, "ethtool", &["-K", dev, "tx", "off"]))?;
    Ok(())
}

/// Whether the tools these tests drive exist; the reason when not.
pub fn tools_missing() -> Option<String> {
    for t in ["nsenter", "ethtool", "ip", "ping"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{t} is not installed (`cargo xtask setup` installs it)"
            ));
        }
    }
    None
}
