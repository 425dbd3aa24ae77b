//! Control-plane clusters for tests and benchmarks: real `boxd control run` processes,
//! each in its own network namespace on a shared bridge (so a node can be cut off by
//! taking its bridge port down), or all on loopback. Driven through each node's real
//! admin socket; killed with SIGKILL and restarted on the same data directory.

use crate::bpf::run_ok;
use crate::net::Netns;
use anyhow::{Context, Result, bail};
use boxd_control::admin::{AdminRequest, Client};
use boxd_control::node::Status;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ClusterNode {
    pub id: u64,
    pub dir: PathBuf,
    pub addr: String,
    /// The namespace the node runs in (None: the host's, on loopback).
    ns: Option<Netns>,
    /// The node's port on the hub bridge.
    hub_port: Option<String>,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    hub: Option<Netns>,
    boxd: PathBuf,
    root: PathBuf,
}

/// Waits until a node's admin socket answers (it opens once the node is set up).
pub fn wait_admin(sock: &Path, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Client::connect(sock, Duration::from_secs(1)).is_err() {
        if Instant::now() > deadline {
            bail!("{} did not open within {within:?}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Cluster {
    /// `n` voters, each in its own namespace (`tag` keeps concurrent tests apart: at
    /// most 5 characters).
    pub fn netns(boxd: &Path, tag: &str, n: usize, subnet: u8) -> Result<Self> {
        let hub = Netns::new(&format!("{tag}hub"))?;
        hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        hub.ip(&["link", "set", "br0", "up"])?;
        let root = std::env::temp_dir().join(format!("boxd-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let mut nodes = Vec::new();
        for i in 1..=n {
            let ns = Netns::new(&format!("{tag}{i}"))?;
            let port = format!("p{i}");
            crate::bpf::veth(&hub.name, &port, &ns.name, "eth0")?;
            hub.ip(&["link", "set", &port, "master", "br0"])?;
            let ip = format!("10.{subnet}.0.{i}");
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            nodes.push(ClusterNode {
                id: i as u64,
                dir: root.join(format!("n{i}")),
                addr: format!("{ip}:7946"),
                ns: Some(ns),
                hub_port: Some(port),
                child: None,
            });
        }
        let mut c = Self {
            nodes,
            hub: Some(hub),
            boxd: boxd.to_path_buf(),
            root,
        };
        c.form()?;
        Ok(c)
    }

    /// `n` voters on loopback ports `base+1..`.
    pub fn loopback(boxd: &Path, tag: &str, n: usize, base: u16) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("boxd-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let nodes = (1..=n)
            .map(|i| ClusterNode {
                id: i as u64,
                dir: root.join(format!("n{i}")),
                addr: format!("127.0.0.1:{}", base + i as u16),
                ns: None,
                hub_port: None,
                child: None,
            })
            .collect();
        let mut c = Self {
            nodes,
            hub: None,
            boxd: boxd.to_path_buf(),
            root,
        };
        c.form()?;
        Ok(c)
    }

    fn cmd(&self, i: usize, args: &[&str]) -> Command {
        let node = &self.nodes[i];
        let mut c = match &node.ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name))
                    .arg(&self.boxd);
                c
            }
            None => Command::new(&self.boxd),
        };
        c.args(args).arg("--data-dir").arg(&node.dir);
        c
    }

    /// Init node 1, join the others with tokens, make them all voters.
    fn form(&mut self) -> Result<()> {
        run_ok(self.cmd(
            0,
            &["cluster", "init", "--listen", &self.nodes[0].addr.clone()],
        ))?;
        self.start(0)?;
        for i in 1..self.nodes.len() {
            let token: String = self.client(0)?.call(&AdminRequest::Token { ttl_s: 600 })?;
            let addr = self.nodes[i].addr.clone();
            let out = run_ok(self.cmd(
                i,
                &[
                    "cluster", "join", &token, "--listen", &addr, "--role", "server", "--json",
                ],
            ))?;
            let id = serde_json::from_slice::<serde_json::Value>(&out.stdout)?["id"]
                .as_u64()
                .context("join printed no id")?;
            if id != self.nodes[i].id {
                bail!("node {} joined as id {id}", self.nodes[i].id);
            }
            self.start(i)?;
            self.client(0)?.call::<()>(&AdminRequest::AddVoter { id })?;
        }
        Ok(())
    }

    /// Starts node `i` (index) on its data directory.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let log = std::fs::File::create(self.root.join(format!("n{}.log", i + 1)))?;
        let mut c = self.cmd(i, &["control", "run"]);
        c.env("BOXD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .stdin(Stdio::null());
        let child = c.spawn().context("starting boxd control run")?;
        self.nodes[i].child = Some(child);
        wait_admin(&self.socket(i), Duration::from_secs(20))
            .with_context(|| format!("node {}: {}", i + 1, self.log(i)))
    }

    /// SIGKILL: no shutdown, nothing flushed that wasn't already.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("node {} did not stop on SIGTERM: {}", i + 1, self.log(i));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Cuts node `i` off the network (its bridge port down), or reconnects it.
    pub fn set_connected(&self, i: usize, up: bool) -> Result<()> {
        let (Some(hub), Some(port)) = (&self.hub, &self.nodes[i].hub_port) else {
            bail!("partitions need a netns cluster")
        };
        hub.ip(&["link", "set", port, if up { "up" } else { "down" }])
    }

    pub fn client(&self, i: usize) -> Result<Client> {
        Ok(Client::connect(
            &self.nodes[i].dir.join("admin.sock"),
            Duration::from_secs(15),
        )?)
    }

    /// Runs `f` inside node `i`'s network namespace (on this host's own when the
    /// cluster is on loopback), where the other nodes' addresses are reachable.
    pub fn run_as<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let h = match &self.nodes[i].ns {
            Some(ns) => ns.run(f),
            None => std::thread::spawn(f),
        };
        h.join()
            .map_err(|_| anyhow::anyhow!("the thread in node {}'s namespace panicked", i + 1))?
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("admin.sock")
    }

    pub fn status(&self, i: usize) -> Result<Status> {
        Ok(self.client(i)?.call(&AdminRequest::Status)?)
    }

    /// The index of the node every running node agrees leads, waiting up to `timeout`.
    pub fn leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let views: Vec<Option<u64>> = (0..self.nodes.len())
                .filter(|&i| self.is_running(i))
                .map(|i| {
                    self.status(i)
                        .ok()
                        .and_then(|s| (s.state == "leader").then_some(s.id))
                })
                .collect();
            let leaders: Vec<u64> = views.iter().flatten().copied().collect();
            if leaders.len() == 1 {
                return Ok(leaders[0] as usize - 1);
            }
            if Instant::now() > deadline {
                bail!("no single leader after {timeout:?}: {views:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self, i: usize) -> String {
        let text =
            std::fs::read_to_string(self.root.join(format!("n{}.log", i + 1))).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        text[text.floor_char_boundary(start)..].to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!("cluster logs kept in {}", self.root.display());
        }
    }
}
