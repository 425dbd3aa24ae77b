//! The worker: runs this node's machines as `boxd vmm run` processes, driven from the
//! replicated state by a reconciler. A machine the state wants running gets a network
//! port (`bx<id>` on the vhost-user backend), a VMM, and, once its agent answers, its
//! host name and its owner's keys; then it is "ready". A machine the state wants stopped
//! gets an ACPI shutdown (hard stop after a grace period); a deleted one loses its VMM,
//! port and disk. VMMs are their own sessions: they keep running when `boxd server`
//! stops, and a restarted server adopts them through their control sockets.

use super::config::Config;
use crate::reconcile::port_name;
use boxd_agent::Agent;
use boxd_control::node::Node;
use boxd_control::reconcile::Reconciler;
use boxd_control::state::StateMachine;
use boxd_control::types::{Command, Machine, MachineState, NodeId, Query, QueryReply, UserInfo};
use boxd_vmm::control::{Client as VmmClient, Request as VmmRequest};
use std::collections::{HashMap, VecDeque};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The vsock port on the host where a machine's own API calls arrive (the in-VM `boxd`).
pub const API_PORT: u32 = 1025;
/// Crash restarts allowed per minute before a machine is marked failed.
const RESTARTS_PER_MINUTE: usize = 5;
/// How long a stop waits for the guest to power off before pulling the plug.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// A suspended machine's snapshot, in its folder (see docs/vmm.md, "Snapshots").
pub const SNAPSHOT_DIR: &str = "snapshot";
/// How long writing a suspended machine's memory to disk may take.
const SUSPEND_LIMIT: Duration = Duration::from_secs(600);

/// Run in a new machine with the seconds it may take (`$1`): succeeds once eth0 has
/// its address and sshd listens on port 22. Bounded by the guest's own clock, not by a
/// count of tries: in the emulated KVM host one try (a grep and an `ip`) can take a
/// second.
const WAIT_NETWORK: &str = "read u _ </proc/uptime; end=$(( ${u%.*} + $1 + 1 )); \
     while :; do \
     if grep -q ':0016 0*:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        && ip -4 -o addr show dev eth0 | grep -q inet; then exit 0; fi; \
     read u _ </proc/uptime; [ \"${u%.*}\" -lt \"$end\" ] || break; \
     sleep 0.1; done; ip -4 -o addr show dev eth0; exit 1";

/// Where a machine is on its way up (or down), as the API waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Booting,
    Ready,
    Down,
    Failed(String),
}

enum Proc {
    None,
    Child(Child),
    /// Started by an earlier `boxd server`; alive while its control socket answers.
    Adopted,
}

struct Vm {
    name: String,
    dir: PathBuf,
    proc: Proc,
    phase: watch::Sender<Phase>,
    /// A stop, restart or delete is in progress outside the lock: reconcile leaves it be.
    busy: bool,
    starts: VecDeque<Instant>,
    /// Counts VMM starts: a bring-up gives up when its start is no longer the current one.
    generation: u64,
    api: Option<tokio::task::JoinHandle<()>>,
    /// The VMM's vCPUs are paused (as last set, or read at adoption).
    paused: bool,
    /// The running VMM was started from the machine's snapshot (a wake from suspend).
    restoring: bool,
}

/// What the worker calls for each connection a machine makes to [`API_PORT`].
pub type ApiHook = Arc<dyn Fn(u64, tokio::net::UnixStream) + Send + Sync>;

pub struct Worker {
    cfg: Arc<Config>,
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    boxd: PathBuf,
    net_control: Option<PathBuf>,
    vms: Mutex<HashMap<u64, Vm>>,
    api_hook: Mutex<Option<ApiHook>>,
    /// Sessions open per machine (exec, ssh, console, tunnels) and when the last one
    /// ended: what keeps a machine from counting as idle.
    sessions: Arc<Mutex<HashMap<u64, (u32, Instant)>>>,
}

/// An open session on a machine (see [`Worker::session`]); ends when dropped.
pub struct Session {
    sessions: Arc<Mutex<HashMap<u64, (u32, Instant)>>>,
    id: u64,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(e) = self.sessions.lock().unwrap().get_mut(&self.id) {
            e.0 = e.0.saturating_sub(1);
            e.1 = Instant::now();
        }
    }
}

impl Worker {
    pub fn new(
        cfg: Arc<Config>,
        node: Arc<Node>,
        net_control: Option<PathBuf>,
    ) -> anyhow::Result<Arc<Self>> {
        cfg.images()?;
        std::fs::create_dir_all(cfg.data_dir.join("machines"))?;
        Ok(Arc::new(Self {
            cfg,
            node,
            rt: tokio::runtime::Handle::current(),
            boxd: std::env::current_exe()?,
            net_control,
            vms: Mutex::new(HashMap::new()),
            api_hook: Mutex::new(None),
            sessions: Arc::default(),
        }))
    }

    pub fn set_api_hook(&self, hook: ApiHook) {
        *self.api_hook.lock().unwrap() = Some(hook);
    }

    pub fn machine_dir(&self, id: u64) -> PathBuf {
        self.cfg.data_dir.join("machines").join(id.to_string())
    }

    pub fn agent(&self, id: u64) -> Agent {
        Agent::new(&self.machine_dir(id).join("vsock.sock"))
    }

    pub fn console_path(&self, id: u64) -> PathBuf {
        self.machine_dir(id).join("console.log")
    }

    /// Follows machine `id`'s phase (None: this worker does not know it yet).
    /// Whether machine `id`'s vCPUs are paused.
    pub fn paused(&self, id: u64) -> bool {
        self.vms
            .lock()
            .unwrap()
            .get(&id)
            .is_some_and(|v| v.paused && !matches!(v.proc, Proc::None))
    }

    /// Whether this worker runs (or holds the snapshot of) machine `id`.
    pub fn runs(&self, id: u64) -> bool {
        self.vms.lock().unwrap().contains_key(&id)
    }

    /// Marks a session on machine `id` open until the returned guard drops.
    pub fn session(&self, id: u64) -> Session {
        let mut s = self.sessions.lock().unwrap();
        let e = s.entry(id).or_insert((0, Instant::now()));
        e.0 += 1;
        e.1 = Instant::now();
        Session {
            sessions: self.sessions.clone(),
            id,
        }
    }

    /// Sessions open on machine `id`, and when one last opened or closed.
    pub fn sessions(&self, id: u64) -> (u32, Option<Instant>) {
        self.sessions
            .lock()
            .unwrap()
            .get(&id)
            .map_or((0, None), |e| (e.0, Some(e.1)))
    }

    /// Inbound frames counted by the network backend, per port (machine) name.
    pub fn port_rx_packets(&self) -> HashMap<String, u64> {
        let Some(control) = &self.net_control else {
            return HashMap::new();
        };
        boxd_vhost_net::Client::connect(control)
            .and_then(|mut c| c.call(&boxd_vhost_net::Request::Stats { name: None }))
            .map(|r| {
                r.stats
                    .into_iter()
                    .map(|s| (s.name, s.rx_packets))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether machine `id` is suspended here: its snapshot is on disk and no VMM runs.
    pub fn suspended(&self, id: u64) -> bool {
        let vms = self.vms.lock().unwrap();
        vms.get(&id).is_some_and(|v| {
            !v.busy
                && matches!(v.proc, Proc::None)
                && v.dir.join(SNAPSHOT_DIR).join("state").is_file()
        })
    }

    /// Bytes machine `id`'s snapshot takes on disk (0 without one).
    pub fn snapshot_bytes(&self, id: u64) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = self.machine_dir(id).join(SNAPSHOT_DIR);
        ["state", "memory"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    pub fn phase(&self, id: u64) -> Option<watch::Receiver<Phase>> {
        self.vms
            .lock()
            .unwrap()
            .get(&id)
            .map(|v| v.phase.subscribe())
    }

    /// Waits (bounded) until machine `id` is ready, failed or gone down.
    pub async fn wait_ready(&self, id: u64, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        // The reconciler picks a new machine up within a moment of its creation.
        let mut rx = loop {
            if let Some(rx) = self.phase(id) {
                break rx;
            }
            if tokio::time::Instant::now() > deadline {
                return Err("the worker did not pick the machine up".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let r = tokio::time::timeout_at(deadline, async {
            loop {
                match rx.borrow_and_update().clone() {
                    Phase::Ready => return Ok(()),
                    Phase::Failed(e) => return Err(e),
                    Phase::Booting | Phase::Down => {}
                }
                if rx.changed().await.is_err() {
                    return Err("the machine was deleted".to_string());
                }
            }
        })
        .await;
        r.unwrap_or_else(|_| Err(format!("not ready within {} s", limit.as_secs())))
    }

    /// Stops machine `id` (ACPI power button, then the plug) and starts it again.
    pub fn restart(self: &Arc<Self>, m: &Machine) -> Result<(), String> {
        {
            let mut vms = self.vms.lock().unwrap();
            let vm = vms
                .get_mut(&m.id)
                .ok_or("the worker does not run this machine")?;
            if vm.busy {
                return Err("the machine is busy stopping or restarting; retry in a moment".into());
            }
            vm.busy = true;
        }
        let proc = self.take_proc(m.id);
        self.halt(m.id, proc, STOP_GRACE);
        let mut vms = self.vms.lock().unwrap();
        let vm = vms.get_mut(&m.id).ok_or("the machine was deleted")?;
        vm.busy = false;
        vm.starts.clear();
        self.spawn(m, vm)
    }

    fn take_proc(&self, id: u64) -> Proc {
        let mut vms = self.vms.lock().unwrap();
        vms.get_mut(&id)
            .map(|v| std::mem::replace(&mut v.proc, Proc::None))
            .unwrap_or(Proc::None)
    }

    /// Powers a VMM's guest off (bounded by `grace`, then a hard stop) and waits for
    /// the process to go.
    fn halt(&self, id: u64, proc: Proc, grace: Duration) {
        let control = self.machine_dir(id).join("control.sock");
        let call = |r: &VmmRequest| VmmClient::connect(&control).and_then(|mut c| c.call(r));
        let _ = call(&VmmRequest::Shutdown {
            timeout_ms: grace.as_millis() as u64,
        });
        let deadline = Instant::now() + grace + Duration::from_secs(5);
        match proc {
            Proc::Child(mut c) => loop {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            },
            Proc::Adopted => {
                while call(&VmmRequest::Status {}).is_ok() {
                    if Instant::now() > deadline {
                        let _ = call(&VmmRequest::Stop {});
                        std::thread::sleep(Duration::from_millis(200));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Proc::None => {}
        }
        self.set_phase(id, Phase::Down);
    }

    /// Writes a suspended machine's VMM state and memory into `<dir>/snapshot` and
    /// lets the VMM exit. On failure the VMM goes on (as it was) and is handed back.
    fn suspend(&self, m: &Machine, dir: &Path, proc: Proc) -> Result<(), (String, Proc)> {
        let control = dir.join("control.sock");
        let snapshot = dir.join(SNAPSHOT_DIR);
        if snapshot.exists() {
            // Left by a wake that never consumed it cannot be: a running VMM came from
            // it or from a cold boot, and either way this is stale.
            if let Err(e) = std::fs::remove_dir_all(&snapshot) {
                return Err((
                    format!("remove the stale {}: {e}", snapshot.display()),
                    proc,
                ));
            }
        }
        let t = Instant::now();
        let reply = VmmClient::connect(&control).and_then(|mut c| {
            c.set_timeout(SUSPEND_LIMIT)?;
            c.call(&VmmRequest::Snapshot {
                dir: snapshot.clone(),
                then: boxd_vmm::AfterSnapshot::Stop,
            })
        });
        let report = match reply {
            Ok(r) if r.ok => r.snapshot.unwrap_or_default(),
            Ok(r) => return Err((r.error.unwrap_or_default(), proc)),
            Err(e) => return Err((format!("the VMM's control socket: {e}"), proc)),
        };
        // The VMM exits once the snapshot is on disk (bounded; then it is killed: the
        // snapshot is complete, nothing is lost).
        let deadline = Instant::now() + Duration::from_secs(30);
        match proc {
            Proc::Child(mut c) => loop {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            },
            Proc::Adopted => {
                while VmmClient::connect(&control).is_ok() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Proc::None => {}
        }
        tracing::info!(
            machine = m.name,
            took_ms = t.elapsed().as_millis() as u64,
            save_ms = report["save_ms"].as_f64().unwrap_or_default(),
            memory_mib = report["memory_bytes"].as_u64().unwrap_or_default() >> 20,
            "suspended to disk"
        );
        Ok(())
    }

    /// Records machine `m` in `state` (in the background: the reconciler holds locks).
    fn record_state(&self, m: &Machine, state: MachineState) {
        let req = self.node.request(
            "node",
            Command::SetMachineState {
                owner: m.owner.clone(),
                name: m.name.clone(),
                state,
            },
        );
        let node = self.node.clone();
        let name = m.name.clone();
        self.rt.spawn(async move {
            if let Err(e) = node.write(req).await {
                tracing::warn!(
                    machine = name,
                    "could not record it {}: {e}",
                    state.as_str()
                );
            }
        });
    }

    fn set_phase(&self, id: u64, p: Phase) {
        if let Some(vm) = self.vms.lock().unwrap().get(&id) {
            vm.phase.send_replace(p);
        }
    }

    /// Starts machine `m`'s VMM (port and API listener first). Called with the lock held;
    /// everything slow happens on a bring-up thread.
    fn spawn(self: &Arc<Self>, m: &Machine, vm: &mut Vm) -> Result<(), String> {
        std::fs::create_dir_all(&vm.dir).map_err(|e| format!("{}: {e}", vm.dir.display()))?;
        let net = match &self.net_control {
            Some(control) => Some(self.ensure_port(control, m)?),
            None => None,
        };
        if vm.api.is_none() {
            vm.api = Some(self.listen_api(m.id, &vm.dir)?);
        }
        let (kernel, initrd, rootfs) = self.cfg.images().map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm.dir.join("vmm.log"))
            .map_err(|e| format!("vmm.log: {e}"))?;
        let mut cmd = std::process::Command::new(&self.boxd);
        // A suspended machine continues from its snapshot, which says everything else
        // (its files are in this folder, its network port was kept).
        let snapshot = vm.dir.join(SNAPSHOT_DIR);
        let restoring = snapshot.is_dir();
        if restoring {
            cmd.args(["vmm", "restore", "--consume", "--snapshot"])
                .arg(&snapshot);
        } else {
            cmd.args(["vmm", "run", "--name", &m.name])
                .arg("--dir")
                .arg(&vm.dir)
                .arg("--kernel")
                .arg(kernel)
                .arg("--initrd")
                .arg(initrd)
                .arg("--disk-base")
                .arg(rootfs)
                .args(["--disk-size", &format!("{}G", m.spec.disk_gib)])
                .args(["--cpus", &m.spec.cpus.to_string()])
                .args(["--memory", &format!("{}M", m.spec.memory_mib)]);
            if let Some(sock) = net {
                cmd.arg("--net").arg(sock);
            }
            if self.cfg.machines.no_cgroup {
                cmd.arg("--no-cgroup");
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Its own session: a machine outlives the server's terminal and the server.
            .process_group(0);
        if self.cfg.machines.skip_kvm_check {
            cmd.arg("--skip-kvm-check");
        }
        let child = cmd.spawn().map_err(|e| format!("start boxd vmm: {e}"))?;
        tracing::info!(
            machine = m.name,
            id = m.id,
            pid = child.id(),
            from_snapshot = restoring,
            "VMM started"
        );
        vm.proc = Proc::Child(child);
        vm.paused = false;
        vm.restoring = restoring;
        vm.starts.push_back(Instant::now());
        vm.generation += 1;
        vm.phase.send_replace(Phase::Booting);
        self.bring_up(m.clone(), vm.generation);
        Ok(())
    }

    /// Waits for the agent, then names the machine and installs its owner's keys.
    fn bring_up(self: &Arc<Self>, m: Machine, generation: u64) {
        let me = self.clone();
        std::thread::spawn(move || {
            let limit = Duration::from_secs(me.cfg.machines.ready_timeout_s);
            let r = me.configure(&m, generation, limit);
            if !me.current(m.id, generation) {
                return;
            }
            match r {
                Ok(()) => {
                    if m.state == MachineState::Creating {
                        let req = me.node.request(
                            "node",
                            Command::SetMachineState {
                                owner: m.owner.clone(),
                                name: m.name.clone(),
                                state: MachineState::Running,
                            },
                        );
                        let node = me.node.clone();
                        if let Err(e) = me.rt.block_on(async move { node.write(req).await }) {
                            tracing::warn!(machine = m.name, "could not record it running: {e}");
                        }
                    }
                    tracing::info!(machine = m.name, "machine ready");
                    me.set_phase(m.id, Phase::Ready);
                }
                Err(e) => {
                    tracing::warn!(machine = m.name, "bring-up failed: {e}");
                    me.set_phase(m.id, Phase::Failed(e));
                }
            }
        });
    }

    /// Whether start `generation` of machine `id` is still the running one.
    fn current(&self, id: u64, generation: u64) -> bool {
        self.vms
            .lock()
            .unwrap()
            .get(&id)
            .is_some_and(|v| v.generation == generation && !matches!(v.proc, Proc::None))
    }

    fn configure(&self, m: &Machine, generation: u64, limit: Duration) -> Result<(), String> {
        let mut agent = self.agent(m.id);
        let deadline = Instant::now() + limit;
        while agent.ping().is_err() {
            if !self.current(m.id, generation) {
                return Err("the VMM stopped before the machine was ready".into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the machine's agent did not answer within {} s",
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
            .set_hostname(&m.name)
            .map_err(|e| format!("set the host name: {e}"))?;
        let keys = self.owner_keys(&m.owner)?;
        agent
            .install_keys("root", &keys)
            .map_err(|e| format!("install the owner's keys: {e}"))?;
        if self.net_control.is_some() {
            // Ready means reachable: the link configured and sshd listening (the agent
            // starts early in boot, before either), within what is left of the limit.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            agent.io_timeout = Duration::from_secs(left + 30);
            let out = agent
                .exec(
                    &[
                        "/bin/sh",
                        "-c",
                        WAIT_NETWORK,
                        "wait-network",
                        &left.to_string(),
                    ],
                    None,
                    4096,
                )
                .map_err(|e| format!("wait for the network: {e}"))?;
            if out.status.code != 0 {
                return Err(format!(
                    "the machine's network or sshd did not come up within {left} s: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                ));
            }
        }
        Ok(())
    }

    fn owner_keys(&self, owner: &str) -> Result<Vec<String>, String> {
        // The owner's id is the fingerprint of their first key.
        match self
            .node
            .state
            .query(&Query::UserByKey { key: owner.into() })
            .map_err(|e| e.to_string())?
        {
            QueryReply::User {
                user: Some(UserInfo { keys, .. }),
            } => Ok(keys.into_iter().map(|k| k.public_key).collect()),
            _ => Err(format!("no account {owner}")),
        }
    }

    fn ensure_port(&self, control: &Path, m: &Machine) -> Result<PathBuf, String> {
        let dir = self.machine_dir(m.id);
        let sock = dir.join("net.sock");
        let spec = boxd_vhost_net::PortSpec::new(&m.name, &port_name(m.id), &sock);
        let mut c = boxd_vhost_net::Client::connect(control)
            .map_err(|e| format!("the network backend at {}: {e}", control.display()))?;
        let list = c
            .call(&boxd_vhost_net::Request::List)
            .map_err(|e| format!("network backend: {e}"))?;
        if !list.ports.iter().any(|p| p.name == m.name) {
            let r = c
                .call(&boxd_vhost_net::Request::AddPort(spec))
                .map_err(|e| format!("network backend: {e}"))?;
            if !r.ok {
                return Err(format!(
                    "network port for {}: {}",
                    m.name,
                    r.error.unwrap_or_default()
                ));
            }
        }
        gateway_address(&port_name(m.id))?;
        Ok(sock)
    }

    fn remove_port(&self, name: &str) {
        if let Some(control) = &self.net_control
            && let Ok(mut c) = boxd_vhost_net::Client::connect(control)
        {
            let _ = c.call(&boxd_vhost_net::Request::RemovePort { name: name.into() });
        }
    }

    /// Listens on `<dir>/vsock.sock_<API_PORT>`: the guest's connections to the host's
    /// API port arrive there, so whoever connects is this machine and no other.
    fn listen_api(&self, id: u64, dir: &Path) -> Result<tokio::task::JoinHandle<()>, String> {
        let path = dir.join(format!("vsock.sock_{API_PORT}"));
        let _ = std::fs::remove_file(&path);
        let _guard = self.rt.enter();
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| format!("API socket {}: {e}", path.display()))?;
        let hook = self.api_hook.lock().unwrap().clone();
        Ok(self.rt.spawn(async move {
            let Some(hook) = hook else { return };
            while let Ok((s, _)) = listener.accept().await {
                hook(id, s);
            }
        }))
    }

    fn reconcile_one(self: &Arc<Self>, m: &Machine) -> Result<usize, String> {
        let mut vms = self.vms.lock().unwrap();
        let vm = vms.entry(m.id).or_insert_with(|| Vm {
            name: m.name.clone(),
            dir: self.machine_dir(m.id),
            proc: Proc::None,
            phase: watch::channel(Phase::Down).0,
            busy: false,
            starts: VecDeque::new(),
            generation: 0,
            api: None,
            paused: false,
            restoring: false,
        });
        if vm.busy {
            return Ok(0);
        }
        let control = vm.dir.join("control.sock");
        // Is the VMM alive? A child we reap; an adopted one answers its socket.
        let exited = match &mut vm.proc {
            Proc::Child(c) => c.try_wait().ok().flatten().map(|s| s.code()),
            Proc::Adopted => VmmClient::connect(&control)
                .and_then(|mut c| c.call(&VmmRequest::Status {}))
                .is_err()
                .then_some(None),
            Proc::None => None,
        };
        // A paused machine keeps its VMM (memory and all), with the vCPUs parked.
        let want_up = matches!(
            m.state,
            MachineState::Creating | MachineState::Running | MachineState::Paused
        );
        if let Some(code) = exited {
            vm.proc = Proc::None;
            vm.phase.send_replace(Phase::Down);
            if vm.restoring && vm.dir.join(SNAPSHOT_DIR).is_dir() {
                // The VMM refused the snapshot (it takes it away only once loaded):
                // the machine stays suspended, snapshot and all, and says why.
                vm.restoring = false;
                let why = last_line(&vm.dir.join("vmm.log"));
                tracing::error!(machine = m.name, "cannot wake from the snapshot: {why}");
                vm.phase.send_replace(Phase::Failed(format!(
                    "cannot wake it from its snapshot: {why}"
                )));
                self.record_state(m, MachineState::Suspended);
                return Ok(1);
            }
            if want_up && code == Some(0) {
                // The guest powered itself off: the machine is stopped, as on a PC.
                tracing::info!(
                    machine = m.name,
                    "the guest powered off; recording it stopped"
                );
                let req = self.node.request(
                    "node",
                    Command::SetMachineState {
                        owner: m.owner.clone(),
                        name: m.name.clone(),
                        state: MachineState::Stopped,
                    },
                );
                let node = self.node.clone();
                self.rt.spawn(async move { node.write(req).await });
                return Ok(1);
            }
            if want_up {
                tracing::warn!(machine = m.name, ?code, "VMM exited; restarting it");
            }
        }
        if m.state == MachineState::Suspended
            && matches!(vm.proc, Proc::None)
            && VmmClient::connect(&control)
                .and_then(|mut c| c.call(&VmmRequest::Status {}))
                .is_ok()
        {
            // A VMM an earlier server left running (a node that died while suspending
            // it, or before it could): adopt it, and suspend it now.
            tracing::info!(machine = m.name, "adopting the running VMM to suspend it");
            vm.proc = Proc::Adopted;
        }
        if m.state == MachineState::Suspended && !matches!(vm.proc, Proc::None) {
            vm.busy = true;
            let proc = std::mem::replace(&mut vm.proc, Proc::None);
            let dir = vm.dir.clone();
            drop(vms);
            let me = self.clone();
            let m = m.clone();
            std::thread::spawn(move || {
                let r = me.suspend(&m, &dir, proc);
                let mut vms = me.vms.lock().unwrap();
                let Some(vm) = vms.get_mut(&m.id) else { return };
                vm.busy = false;
                match r {
                    Ok(()) => {
                        vm.paused = false;
                        vm.phase.send_replace(Phase::Down);
                    }
                    Err((e, proc)) => {
                        // The VMM goes on running (a failed save resumes it); the
                        // machine is recorded running again, so nothing waits forever.
                        tracing::error!(machine = m.name, "suspend failed: {e}");
                        vm.proc = proc;
                        drop(vms);
                        me.record_state(&m, MachineState::Running);
                    }
                }
            });
            return Ok(1);
        }
        if !want_up {
            if !matches!(vm.proc, Proc::None) {
                vm.busy = true;
                let proc = std::mem::replace(&mut vm.proc, Proc::None);
                drop(vms);
                let me = self.clone();
                let id = m.id;
                std::thread::spawn(move || {
                    me.halt(id, proc, STOP_GRACE);
                    if let Some(vm) = me.vms.lock().unwrap().get_mut(&id) {
                        vm.busy = false;
                    }
                });
                return Ok(1);
            }
            let snapshot = vm.dir.join(SNAPSHOT_DIR);
            if m.state == MachineState::Stopped && snapshot.exists() {
                // Stopping a suspended machine powers it off: its memory is dropped
                // and the next start boots from the disk.
                tracing::info!(
                    machine = m.name,
                    "stopped while suspended: dropping its snapshot"
                );
                if let Err(e) = std::fs::remove_dir_all(&snapshot) {
                    tracing::warn!(machine = m.name, "remove {}: {e}", snapshot.display());
                }
            }
            vm.phase.send_replace(Phase::Down);
            return Ok(0);
        }
        if !matches!(vm.proc, Proc::None) {
            let want_paused = m.state == MachineState::Paused;
            // Pausing waits for the bring-up to finish (the next pass does it).
            if want_paused == vm.paused || (want_paused && *vm.phase.borrow() != Phase::Ready) {
                return Ok(0);
            }
            let (req, what) = if want_paused {
                (VmmRequest::Pause {}, "pause")
            } else {
                (VmmRequest::Resume {}, "resume")
            };
            // The call (parking every vCPU can take a moment) runs without the lock.
            vm.busy = true;
            drop(vms);
            let t = Instant::now();
            let res = VmmClient::connect(&control).and_then(|mut c| c.call(&req));
            let mut vms = self.vms.lock().unwrap();
            let Some(vm) = vms.get_mut(&m.id) else {
                return Ok(0);
            };
            vm.busy = false;
            return match res {
                Ok(r) if r.ok => {
                    vm.paused = want_paused;
                    tracing::info!(
                        machine = m.name,
                        took_us = t.elapsed().as_micros() as u64,
                        "{what}d"
                    );
                    Ok(1)
                }
                Ok(r) => Err(format!(
                    "{what} {}: {}",
                    m.name,
                    r.error.unwrap_or_default()
                )),
                Err(e) => Err(format!("{what} {}: {e}", m.name)),
            };
        }
        if matches!(*vm.phase.borrow(), Phase::Failed(_)) && !vm.starts.is_empty() {
            // A failed bring-up stays failed until `restart`.
            return Ok(0);
        }
        // A VMM left running by an earlier server: adopt it.
        if vm.starts.is_empty()
            && VmmClient::connect(&control)
                .and_then(|mut c| c.call(&VmmRequest::Status {}))
                .is_ok()
        {
            tracing::info!(machine = m.name, "adopting the running VMM");
            vm.paused = VmmClient::connect(&control)
                .and_then(|mut c| c.call(&VmmRequest::Status {}))
                .ok()
                .and_then(|r| r.status)
                .is_some_and(|s| s["state"] == "paused");
            vm.proc = Proc::Adopted;
            vm.starts.push_back(Instant::now());
            vm.generation += 1;
            if vm.api.is_none() {
                vm.api = Some(self.listen_api(m.id, &vm.dir)?);
            }
            if vm.paused {
                // It was brought up before it was paused; its agent cannot answer with
                // the vCPUs parked, so no bring-up: it is ready as soon as it resumes.
                vm.phase.send_replace(Phase::Ready);
            } else {
                self.bring_up(m.clone(), vm.generation);
            }
            return Ok(1);
        }
        while vm
            .starts
            .front()
            .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
        {
            vm.starts.pop_front();
        }
        if vm.starts.len() >= RESTARTS_PER_MINUTE {
            let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            let msg = format!(
                "the VMM exited {RESTARTS_PER_MINUTE} times within a minute (last: {})",
                last.trim()
            );
            vm.phase.send_replace(Phase::Failed(msg));
            return Ok(0);
        }
        self.spawn(m, vm)?;
        Ok(1)
    }

    /// Removes machines the state no longer has: VMM, port, API listener, disk.
    fn remove(self: &Arc<Self>, id: u64) {
        let Some(mut vm) = self.vms.lock().unwrap().remove(&id) else {
            return;
        };
        if let Some(a) = vm.api.take() {
            a.abort();
        }
        let proc = std::mem::replace(&mut vm.proc, Proc::None);
        let control = vm.dir.join("control.sock");
        match proc {
            Proc::Child(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted | Proc::None => {
                let _ = VmmClient::connect(&control).and_then(|mut c| c.call(&VmmRequest::Stop {}));
            }
        }
        self.remove_port(&vm.name);
        if let Err(e) = std::fs::remove_dir_all(&vm.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %vm.dir.display(), "could not remove a deleted machine's files: {e}");
        }
        tracing::info!(machine = vm.name, id, "machine removed");
    }
}

/// Every machine sees the same link: it is 10.0.0.2/30 and its gateway is 10.0.0.1.
/// The host answers ARP for the gateway on each port, so each port carries 10.0.0.1
/// as a /32 without a prefix route (the ports would otherwise compete for 10.0.0.0/30);
/// what the machine sends beyond the gateway is the eBPF program's to route.
/// The last non-empty line of a log file (what a VMM said before it exited).
fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn gateway_address(port: &str) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args([
            "addr",
            "replace",
            "10.0.0.1/32",
            "dev",
            port,
            "noprefixroute",
        ])
        .output()
        .map_err(|e| format!("run ip (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "give {port} the gateway address: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The worker's reconciler (an `Arc` so the API can share the worker).
pub struct Reconcile(pub Arc<Worker>);

impl Reconciler for Reconcile {
    fn name(&self) -> &'static str {
        "worker"
    }

    fn reconcile(&mut self, state: &StateMachine, me: NodeId) -> Result<usize, String> {
        let w = &self.0;
        let QueryReply::Machines { machines } = state
            .query(&Query::Machines { owner: None })
            .map_err(|e| e.to_string())?
        else {
            return Err("unexpected reply to a machines query".into());
        };
        let mine: Vec<&Machine> = machines.iter().filter(|m| m.node == me).collect();
        let mut changes = 0;
        let mut errors = Vec::new();
        for m in &mine {
            match w.reconcile_one(m) {
                Ok(n) => changes += n,
                Err(e) => {
                    w.set_phase(m.id, Phase::Failed(e.clone()));
                    errors.push(format!("{}: {e}", m.name));
                }
            }
        }
        let gone: Vec<u64> = w
            .vms
            .lock()
            .unwrap()
            .keys()
            .filter(|id| !mine.iter().any(|m| m.id == **id))
            .copied()
            .collect();
        for id in gone {
            w.remove(id);
            changes += 1;
        }
        if errors.is_empty() {
            Ok(changes)
        } else {
            Err(errors.join("; "))
        }
    }
}
