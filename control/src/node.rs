//! A running control-plane node: its data directory, the Raft instance, the QUIC
//! endpoint other nodes call, the local admin socket, and the operations every client
//! of the control plane uses (write, read, status, tokens, membership).
//!
//! Data directory layout:
//! - `node.json`: id, listen and advertised addresses, role
//! - `ca.pem`, `node.pem`, `node.key` (0600): the cluster CA and this node's identity
//! - `raft/`: the RocksDB log; `state.db`: the SQLite state machine
//! - `admin.sock`: the operator's socket (`boxd cluster ...`), guarded by file mode 0600
//! - `init-pending`: present between `cluster init` and the first start

use crate::log::LogStore;
use crate::net::{self, AdminOp, CallError, JoinReply, JoinRequest, Peer, Rpc};
use crate::state::StateMachine;
use crate::tls::{self, Identity, JoinToken};
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a client write or linearizable read may take, forwarding and leader
/// changes included, before the caller gets a timeout (and may retry with the same id).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Join tokens live this long unless asked otherwise.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where the QUIC endpoint binds.
    pub listen: String,
    /// Where other nodes dial it (defaults to `listen`).
    pub advertise: String,
    pub role: NodeRole,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Log(#[from] crate::log::LogOpenError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("joining: {0}")]
    Join(CallError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// 128 random bits, hex: a request id no retry of another request will share.
pub fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The Raft timing boxd runs with: elections within about a second of a leader's death.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "boxd".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        install_snapshot_timeout: 5000,
        max_payload_entries: 512,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        // Chunks travel as JSON arrays (up to 4 bytes per byte): 1 MiB fits MAX_MESSAGE.
        snapshot_max_chunk_size: 1 << 20,
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
}

fn write_private(path: &Path, data: &str) -> Result<(), NodeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", path.display())))
}

fn check_new_dir(dir: &Path) -> Result<(), NodeError> {
    if dir.join("node.json").exists() {
        return Err(NodeError::Setup(format!(
            "{} already holds a node (node.json exists); use another --data-dir, or remove it to start over",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("securing {}", dir.display())))
}

fn check_addr(addr: &str, what: &str) -> Result<(), NodeError> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| {
            NodeError::Setup(format!(
                "{what} {addr:?} is not an IP:port (like 10.0.0.1:7946)"
            ))
        })
}

/// `boxd cluster init`: a new cluster of one voter (node 1) with a fresh CA.
pub fn init(dir: &Path, listen: &str, advertise: Option<&str>) -> Result<NodeConfig, NodeError> {
    check_addr(listen, "--listen")?;
    let advertise = advertise.unwrap_or(listen);
    check_addr(advertise, "--advertise")?;
    check_new_dir(dir)?;
    let ca = tls::new_ca()?;
    let me = tls::issue_node(&ca, 1)?;
    let cfg = NodeConfig {
        id: 1,
        listen: listen.into(),
        advertise: advertise.into(),
        role: NodeRole::Server,
    };
    write_private(&dir.join("ca.pem"), &ca.cert_pem)?;
    // The CA key stays on voters only (never in the replicated log); the certificate is
    // replicated at first start.
    write_private(&dir.join("ca.key"), &ca.key_pem)?;
    write_private(&dir.join("init-pending"), &ca.cert_pem)?;
    write_private(&dir.join("node.pem"), &me.cert_pem)?;
    write_private(&dir.join("node.key"), &me.key_pem)?;
    write_private(
        &dir.join("node.json"),
        &serde_json::to_string_pretty(&cfg).expect("json"),
    )?;
    Ok(cfg)
}

/// `boxd cluster join TOKEN`: asks the cluster for an id and a certificate, checking the
/// cluster against the CA fingerprint in the token first.
pub async fn join(
    dir: &Path,
    token: &str,
    listen: &str,
    advertise: Option<&str>,
    role: NodeRole,
    cpus: u32,
    memory_mib: u64,
) -> Result<NodeConfig, NodeError> {
    let token = JoinToken::parse(token)?;
    check_addr(listen, "--listen")?;
    let advertise = advertise.unwrap_or(listen);
    check_addr(advertise, "--advertise")?;
    if dir.join("node.json").exists() {
        check_new_dir(dir)?;
    }
    let (key, csr_pem) = tls::new_request()?;
    let bind: std::net::SocketAddr = "0.0.0.0:0".parse().expect("addr");
    let endpoint = quinn::Endpoint::client(bind).map_err(io("opening a UDP socket"))?;
    let peer = Peer::new(
        endpoint.clone(),
        net::quic_client(tls::join_client_config(&token.ca_fingerprint)?),
        &token.addr,
        tls::CLUSTER_NAME,
    );
    let req = JoinRequest {
        secret: token.secret.clone(),
        csr_pem,
        addr: advertise.into(),
        role,
        cpus,
        memory_mib,
    };
    let reply: JoinReply = peer
        .call(&Rpc::Join(req), REQUEST_TIMEOUT)
        .await
        .map_err(NodeError::Join)?;
    endpoint.close(0u32.into(), b"joined");
    check_new_dir(dir)?;
    let cfg = NodeConfig {
        id: reply.id,
        listen: listen.into(),
        advertise: advertise.into(),
        role,
    };
    write_private(&dir.join("ca.pem"), &reply.ca_pem)?;
    write_private(&dir.join("node.pem"), &reply.cert_pem)?;
    write_private(&dir.join("node.key"), &key.serialize_pem())?;
    write_private(
        &dir.join("node.json"),
        &serde_json::to_string_pretty(&cfg).expect("json"),
    )?;
    Ok(cfg)
}

/// What `boxd cluster status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied: Option<u64>,
    pub snapshot: Option<u64>,
    pub members: Vec<Member>,
    pub nodes: Vec<NodeRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub voter: bool,
    /// The last log index known replicated to it (on the leader only).
    pub matched: Option<u64>,
}

/// A running node.
pub struct Node {
    pub cfg: NodeConfig,
    pub raft: Raft,
    pub state: StateMachine,
    dir: PathBuf,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    peers: Mutex<HashMap<(NodeId, String), Arc<Peer>>>,
    proposals: tokio::sync::mpsc::Sender<Waiting>,
}

/// How long `add-voter` waits for a learner to catch up.
pub const CATCH_UP: Duration = Duration::from_secs(60);

/// How often the leader probes the other nodes.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Missed probes in a row before a node is recorded unhealthy.
pub const HEALTH_FAILURES: u32 = 3;

/// A write waiting to be proposed, and where its reply goes.
type Waiting = (
    Request,
    tokio::sync::oneshot::Sender<Result<Reply, CallError>>,
);

/// Writes queued for proposal at most (callers wait when it is full).
const PROPOSAL_QUEUE: usize = 4096;
/// Requests in one log entry at most.
const MAX_BATCH: usize = 512;
/// Log entries being proposed at once: while they are made durable, the next writes
/// gather into the next batch.
const IN_FLIGHT: usize = 2;

/// Batches queued writes into log entries (see [`Proposal`]).
async fn proposer(raft: Raft, mut queue: tokio::sync::mpsc::Receiver<Waiting>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut stamp = 0u64;
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // The leader stamps the time (never earlier than its last stamp): the state
        // machine's only clock.
        stamp = stamp.max(now_ms());
        for (r, _) in &mut batch {
            r.at_ms = stamp;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (requests, waiters): (Vec<Request>, Vec<_>) = batch.into_iter().unzip();
            match raft.client_write(Proposal { requests }).await {
                Ok(r) => {
                    for (w, reply) in waiters.into_iter().zip(r.data) {
                        let _ = w.send(Ok(reply));
                    }
                }
                Err(e) => {
                    let err = leader_error(&e);
                    for w in waiters {
                        let _ = w.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

impl Node {
    /// Opens the data directory and starts Raft and the QUIC endpoint (not yet serving:
    /// see [`Node::serve`]).
    pub async fn start(dir: &Path) -> Result<Arc<Self>, NodeError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| {
                NodeError::Setup(format!(
                    "{}: {e}; is this a node's data directory? (`boxd cluster init` or `join` makes one)",
                    dir.join(name).display()
                ))
            })
        };
        let cfg: NodeConfig = serde_json::from_str(&read("node.json")?)
            .map_err(|e| NodeError::Setup(format!("{}: {e}", dir.join("node.json").display())))?;
        let ca_pem = read("ca.pem")?;
        let me = Identity {
            cert_pem: read("node.pem")?,
            key_pem: read("node.key")?,
        };
        let log = LogStore::open(&dir.join("raft"))?;
        let state = StateMachine::open(&dir.join("state.db"))?;
        let listen: std::net::SocketAddr = cfg.listen.parse().map_err(|_| {
            NodeError::Setup(format!(
                "listen address {:?} in node.json is not IP:port",
                cfg.listen
            ))
        })?;
        let endpoint =
            quinn::Endpoint::server(net::quic_server(tls::server_config(&ca_pem, &me)?), listen)
                .map_err(io(format!(
                    "binding UDP {listen} (another node running from this directory?)"
                )))?;
        let client_config = net::quic_client(tls::client_config(&ca_pem, &me)?);
        let network = net::Network {
            endpoint: endpoint.clone(),
            config: client_config.clone(),
        };
        let config = Arc::new(
            raft_config()
                .validate()
                .map_err(|e| NodeError::Setup(e.to_string()))?,
        );
        let raft = Raft::new(cfg.id, config, network, log, state.clone())
            .await
            .map_err(|e| NodeError::Setup(format!("starting Raft: {e}")))?;
        let (proposals, queue) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        tokio::spawn(proposer(raft.clone(), queue));
        Ok(Arc::new(Self {
            cfg,
            proposals,
            raft,
            state,
            dir: dir.to_path_buf(),
            endpoint,
            client_config,
            peers: Mutex::default(),
        }))
    }

    /// Serves node RPC and the admin socket until `shutdown` resolves; finishes a pending
    /// `cluster init` first.
    pub async fn serve(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let rpc = tokio::spawn(self.clone().accept_loop());
        let health = tokio::spawn(self.clone().health_loop());
        // The admin socket opens once a fresh cluster is fully set up, so the first
        // command an operator sends finds the CA and this node registered.
        if let Err(e) = self.finish_init().await {
            tracing::error!("finishing cluster init: {e}");
        }
        let admin = crate::admin::listen(self.clone(), &self.dir.join("admin.sock"))?;
        shutdown.await;
        tracing::info!(id = self.cfg.id, "shutting down");
        admin.abort();
        rpc.abort();
        health.abort();
        let _ = self.raft.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutdown");
        self.state.checkpoint();
        let _ = std::fs::remove_file(self.dir.join("admin.sock"));
        Ok(())
    }

    async fn finish_init(&self) -> Result<(), CallError> {
        let pending = self.dir.join("init-pending");
        let Ok(cert_pem) = std::fs::read_to_string(&pending) else {
            return Ok(());
        };
        let mut members = BTreeMap::new();
        members.insert(
            self.cfg.id,
            PeerAddr {
                addr: self.cfg.advertise.clone(),
            },
        );
        if let Err(e) = self.raft.initialize(members).await {
            tracing::info!("cluster already initialised: {e}");
        }
        let (cpus, memory_mib) = host_capacity();
        for cmd in [
            Command::SetClusterCa { cert_pem },
            Command::RegisterNode {
                id: self.cfg.id,
                addr: self.cfg.advertise.clone(),
                role: self.cfg.role,
                cpus,
                memory_mib,
            },
        ] {
            match self.write(self.request("operator", cmd)).await?.result {
                Ok(_) | Err(AppError::AlreadyExists(_)) => {}
                Err(e) => return Err(CallError::App(e)),
            }
        }
        let _ = std::fs::remove_file(&pending);
        Ok(())
    }

    /// A request stamped now, with a fresh id.
    pub fn request(&self, actor: &str, cmd: Command) -> Request {
        Request {
            actor: actor.into(),
            id: new_request_id(),
            at_ms: 0, // stamped by the leader's proposer
            cmd,
        }
    }

    fn peer(&self, id: NodeId, addr: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry((id, addr.to_string()))
            .or_insert_with(|| {
                Arc::new(Peer::new(
                    self.endpoint.clone(),
                    self.client_config.clone(),
                    addr,
                    &tls::node_name(id),
                ))
            })
            .clone()
    }

    /// The leader as this node knows it.
    fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Runs `local` here if this node leads, else sends `rpc` to the leader; retries
    /// through elections until [`REQUEST_TIMEOUT`].
    async fn via_leader<T, F, Fut>(&self, rpc: impl Fn() -> Rpc, local: F) -> Result<T, CallError>
    where
        T: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut last = CallError::NoLeader;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let res = match self.leader() {
                Some((id, _)) if id == self.cfg.id => {
                    match tokio::time::timeout(left, local()).await {
                        Ok(r) => r,
                        Err(_) => Err(CallError::Timeout(format!(
                            "no answer in {REQUEST_TIMEOUT:?}"
                        ))),
                    }
                }
                Some((id, addr)) => {
                    self.peer(id, &addr)
                        .call::<T>(&rpc(), left.min(net::CALL_TIMEOUT))
                        .await
                }
                None => Err(CallError::NoLeader),
            };
            match res {
                Err(
                    e @ (CallError::NoLeader | CallError::NotLeader(_) | CallError::Unreachable(_)),
                ) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A timed-out call may or may not have been applied; the caller retries
                // with the same request id, which makes that safe.
                other => return other,
            }
        }
        Err(match last {
            CallError::NoLeader => CallError::Timeout(
                "no leader was elected in time (is a majority of voters up?)".into(),
            ),
            e => CallError::Timeout(e.to_string()),
        })
    }

    /// Proposes a command through the leader; the reply once it is committed and applied.
    pub async fn write(&self, req: Request) -> Result<Reply, CallError> {
        self.via_leader(|| Rpc::Write(req.clone()), || self.write_local(req.clone()))
            .await
    }

    async fn write_local(&self, req: Request) -> Result<Reply, CallError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.proposals
            .send((req, tx))
            .await
            .map_err(|_| CallError::Raft("the node is shutting down".into()))?;
        rx.await.map_err(|_| {
            CallError::Raft("the write was dropped (the node is shutting down)".into())
        })?
    }

    /// A read; `linearizable` confirms leadership with a quorum first (through the leader),
    /// otherwise it is served from this node's state as applied so far.
    pub async fn read(&self, q: Query, linearizable: bool) -> Result<QueryReply, CallError> {
        if !linearizable {
            return self
                .state
                .query(&q)
                .map_err(|e| CallError::Raft(e.to_string()));
        }
        self.via_leader(|| Rpc::Read(q.clone()), || self.read_local(q.clone()))
            .await
    }

    async fn read_local(&self, q: Query) -> Result<QueryReply, CallError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => self
                .state
                .query(&q)
                .map_err(|e| CallError::Raft(e.to_string())),
            Err(e) => Err(leader_error(&e)),
        }
    }

    pub async fn admin(&self, op: AdminOp) -> Result<(), CallError> {
        self.via_leader(|| Rpc::Admin(op.clone()), || self.admin_local(op.clone()))
            .await
    }

    async fn admin_local(&self, op: AdminOp) -> Result<(), CallError> {
        let map = |e: openraft::error::RaftError<
            NodeId,
            openraft::error::ClientWriteError<NodeId, PeerAddr>,
        >| leader_error(&e);
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let known = |id: NodeId| membership.membership().get_node(&id).is_some();
        match op {
            AdminOp::AddLearner { id, addr } => {
                self.raft
                    .add_learner(id, PeerAddr { addr }, false)
                    .await
                    .map_err(map)?;
            }
            AdminOp::AddVoter { id } => {
                let Some(node) = membership.membership().get_node(&id).cloned() else {
                    return Err(CallError::Refused(format!(
                        "node {id} is not in the cluster; join it first (`boxd cluster join TOKEN`)"
                    )));
                };
                // Wait (bounded) for it to catch up before it counts towards the quorum.
                match tokio::time::timeout(CATCH_UP, self.raft.add_learner(id, node, true)).await {
                    Ok(r) => {
                        r.map_err(map)?;
                    }
                    Err(_) => {
                        return Err(CallError::Timeout(format!(
                            "node {id} did not catch up within {CATCH_UP:?}; is `boxd control run` running there?"
                        )));
                    }
                }
                self.raft
                    .change_membership(
                        openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                        false,
                    )
                    .await
                    .map_err(map)?;
                // A voter may lead, and the leader admits joining nodes: it needs the CA key.
                let key = std::fs::read_to_string(self.dir.join("ca.key")).map_err(|e| {
                    CallError::Refused(format!(
                        "this leader has no CA key ({e}); cannot hand it to node {id}"
                    ))
                })?;
                let addr = membership
                    .membership()
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .unwrap_or_default();
                // The new voter accepts the key from a node its own log lists as a voter:
                // retry (bounded) while it catches up with the membership change.
                let peer = self.peer(id, &addr);
                let mut tries = 0;
                loop {
                    match peer
                        .call::<()>(
                            &Rpc::CaKey {
                                key_pem: key.clone(),
                            },
                            net::CALL_TIMEOUT,
                        )
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if tries < 50 => {
                            tries += 1;
                            tracing::debug!("handing the CA key to node {id}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            AdminOp::Remove { id } => {
                let nodes = match self.state.query(&Query::Nodes) {
                    Ok(QueryReply::Nodes { nodes }) => nodes,
                    _ => Vec::new(),
                };
                let row = nodes.iter().find(|n| n.id == id);
                if let Some(n) = row
                    && n.machines > 0
                {
                    return Err(CallError::App(AppError::Invalid(format!(
                        "node {id} still holds {} machines; move or remove them first",
                        n.machines
                    ))));
                }
                if !known(id) && row.is_none() {
                    return Err(CallError::Refused(format!(
                        "node {id} is not in the cluster"
                    )));
                }
                let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(CallError::Refused("cannot remove the last voter".into()));
                    }
                    // Kept as a learner for now: if this leader removes itself and steps
                    // down, the retry on the next leader still finds it and finishes.
                    self.raft
                        .change_membership(
                            openraft::ChangeMembers::RemoveVoters(BTreeSet::from([id])),
                            true,
                        )
                        .await
                        .map_err(map)?;
                }
                if known(id) {
                    self.raft
                        .change_membership(
                            openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                            false,
                        )
                        .await
                        .map_err(map)?;
                }
                // Last, the revocation: its certificate is refused from now on.
                let reply = self
                    .write_local(self.request("operator", Command::RemoveNode { id }))
                    .await?;
                if let Err(e) = reply.result
                    && !matches!(e, AppError::NotFound(_))
                {
                    return Err(CallError::App(e));
                }
            }
        }
        Ok(())
    }

    /// `boxd cluster token`: a one-time join token valid for `ttl`.
    pub async fn token(&self, ttl: Duration) -> Result<String, CallError> {
        let Some(ca) = self.state.cluster_ca() else {
            return Err(CallError::Refused(
                "the cluster CA is not replicated here yet; retry in a moment".into(),
            ));
        };
        let token = JoinToken::new(&self.cfg.advertise, &ca);
        let cmd = Command::CreateJoinToken {
            hash: token.hash(),
            expires_ms: now_ms() + ttl.as_millis() as u64,
        };
        self.write(self.request("operator", cmd))
            .await?
            .result
            .map_err(CallError::App)?;
        Ok(token.to_string())
    }

    /// A joining node's request, admitted by the leader (a voter: it holds the CA key).
    async fn handle_join(&self, req: JoinRequest) -> Result<JoinReply, CallError> {
        self.via_leader(|| Rpc::Join(req.clone()), || self.join_local(req.clone()))
            .await
    }

    async fn join_local(&self, req: JoinRequest) -> Result<JoinReply, CallError> {
        check_addr(&req.addr, "the joining node's address")
            .map_err(|e| CallError::Refused(e.to_string()))?;
        let hash = tls::secret_hash(&req.secret);
        // Strangers cost a read, not a log entry: an unknown token is refused here.
        let q = Query::JoinToken {
            hash: hash.clone(),
            now_ms: now_ms(),
        };
        let known = matches!(
            self.read_local(q).await?,
            QueryReply::JoinToken { valid: true }
        );
        // Request ids derived from the token and the joiner's certificate request: a
        // join retried after a lost reply (same token, same key) gets the same node id
        // instead of "token already used", while anyone else holding the spent token
        // (another key) is refused, and never gets a certificate for that node.
        let joiner = tls::secret_hash(&req.csr_pem);
        let consume = Request {
            actor: "join".into(),
            id: format!("join:{hash}:{joiner}"),
            at_ms: 0, // stamped by the leader's proposer
            cmd: Command::ConsumeJoinToken {
                hash: hash.clone(),
                addr: req.addr.clone(),
                role: req.role,
            },
        };
        if !known {
            // Maybe a retry of a join that spent it: the request id answers that.
            if !self.state.replied(&consume.id) {
                return Err(CallError::App(AppError::TokenRejected(
                    "unknown join token (or already used, or expired); create one with `boxd cluster token`".into(),
                )));
            }
        }
        let reply = self.write_local(consume).await?;
        let Applied::Node { id } = reply.result.map_err(CallError::App)? else {
            return Err(CallError::Raft("unexpected reply to a join".into()));
        };
        let register = Request {
            actor: format!("node:{id}"),
            id: format!("join-register:{hash}:{joiner}"),
            at_ms: 0, // stamped by the leader's proposer
            cmd: Command::RegisterNode {
                id,
                addr: req.addr.clone(),
                role: req.role,
                cpus: req.cpus,
                memory_mib: req.memory_mib,
            },
        };
        self.write_local(register)
            .await?
            .result
            .map_err(CallError::App)?;
        self.admin_local(AdminOp::AddLearner {
            id,
            addr: req.addr.clone(),
        })
        .await?;
        let ca_pem = self.state.cluster_ca().ok_or_else(|| {
            CallError::Refused("the cluster CA is not replicated here yet".into())
        })?;
        let ca_key = std::fs::read_to_string(self.dir.join("ca.key"))
            .map_err(|e| CallError::Refused(format!("this leader has no CA key: {e}")))?;
        let cert_pem = tls::sign_request(
            &Identity {
                cert_pem: ca_pem.clone(),
                key_pem: ca_key,
            },
            &req.csr_pem,
            id,
        )
        .map_err(|e| CallError::Refused(format!("certificate request: {e}")))?;
        tracing::info!(id, addr = req.addr, "node joined");
        Ok(JoinReply {
            id,
            cert_pem,
            ca_pem,
        })
    }

    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                matched: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index),
            })
            .collect();
        let nodes = match self.state.query(&Query::Nodes) {
            Ok(QueryReply::Nodes { nodes }) => nodes,
            _ => Vec::new(),
        };
        Status {
            id: self.cfg.id,
            state: format!("{:?}", m.state).to_lowercase(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied: m.last_applied.map(|l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            members,
            nodes,
        }
    }

    /// On the leader: probes every registered node each [`HEALTH_INTERVAL`] and records
    /// a node unhealthy after [`HEALTH_FAILURES`] missed probes in a row (the scheduler
    /// then places nothing there), healthy again at its first answer.
    async fn health_loop(self: Arc<Self>) {
        let mut missed: HashMap<NodeId, u32> = HashMap::new();
        loop {
            tokio::time::sleep(HEALTH_INTERVAL).await;
            if self.leader().map(|(id, _)| id) != Some(self.cfg.id) {
                missed.clear();
                continue;
            }
            let Ok(QueryReply::Nodes { nodes }) = self.state.query(&Query::Nodes) else {
                continue;
            };
            let probes = nodes.iter().filter(|n| n.id != self.cfg.id).map(|n| {
                let peer = self.peer(n.id, &n.addr);
                async move {
                    (
                        n.id,
                        n.healthy,
                        peer.call::<NodeId>(&Rpc::Ping, HEALTH_INTERVAL)
                            .await
                            .is_ok(),
                    )
                }
            });
            for (id, healthy, up) in futures::future::join_all(probes).await {
                let m = missed.entry(id).or_default();
                *m = if up { 0 } else { m.saturating_add(1) };
                let now_healthy = if up {
                    true
                } else if *m >= HEALTH_FAILURES {
                    false
                } else {
                    healthy
                };
                if now_healthy != healthy {
                    tracing::warn!(id, healthy = now_healthy, "node health changed");
                    let cmd = Command::SetNodeHealth {
                        id,
                        healthy: now_healthy,
                    };
                    let _ = self.write(self.request("health", cmd)).await;
                }
            }
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let node = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => return tracing::debug!("incoming connection failed: {e}"),
                };
                let peer = conn
                    .peer_identity()
                    .and_then(|i| {
                        i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                            .ok()
                    })
                    .and_then(|certs| tls::peer_node_id(&certs));
                if let Some(id) = peer
                    && node.state.is_revoked(id)
                {
                    return conn.close(1u32.into(), b"node removed from the cluster");
                }
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let node = node.clone();
                    tokio::spawn(async move { node.serve_stream(peer, send, recv).await });
                }
            });
        }
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer: Option<NodeId>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        // Strangers (no certificate) may only ask to join: a small request.
        let limit = if peer.is_some() {
            net::MAX_MESSAGE
        } else {
            net::MAX_ANONYMOUS
        };
        let Ok(body) = recv.read_to_end(limit).await else {
            return;
        };
        let reply = match serde_json::from_slice::<Rpc>(&body) {
            Err(e) => encode::<()>(Err(CallError::Refused(format!("undecodable request: {e}")))),
            Ok(rpc) => self.dispatch(peer, rpc).await,
        };
        let _ = send.write_all(&reply).await;
        let _ = send.finish();
    }

    async fn dispatch(&self, peer: Option<NodeId>, rpc: Rpc) -> Vec<u8> {
        let refuse = |why: String| encode::<()>(Err(CallError::Refused(why)));
        let Some(peer) = peer else {
            return match rpc {
                Rpc::Join(j) => encode(self.handle_join(j).await),
                _ => refuse("a node certificate is required for this call".into()),
            };
        };
        // Checked per request: a removed node's open connections stop working too.
        if self.state.is_revoked(peer) {
            return refuse(format!("node {peer} was removed from the cluster"));
        }
        // Raft messages speak for the node that sends them: a certificate for node 3 can't
        // campaign or lead as node 1.
        let claimed = match &rpc {
            Rpc::AppendEntries(r) => Some(r.vote.leader_id.node_id),
            Rpc::Vote(r) => Some(r.vote.leader_id.node_id),
            Rpc::InstallSnapshot(r) => Some(r.vote.leader_id.node_id),
            _ => None,
        };
        if let Some(c) = claimed
            && c != peer
        {
            return refuse(format!("node {peer} sent a Raft message as node {c}"));
        }
        let voter = || {
            self.raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == peer)
        };
        match rpc {
            Rpc::AppendEntries(r) => encode(Ok(self.raft.append_entries(r).await)),
            Rpc::Vote(r) => encode(Ok(self.raft.vote(r).await)),
            Rpc::InstallSnapshot(r) => encode(Ok(self.raft.install_snapshot(r).await)),
            Rpc::Write(r) => encode(self.write_local(r).await),
            Rpc::Read(q) => encode(self.read_local(q).await),
            // Membership and keys: voters only.
            Rpc::Admin(_) | Rpc::CaKey { .. } if !voter() => refuse(format!(
                "node {peer} is not a voter: membership changes come from voters"
            )),
            Rpc::Admin(op) => encode(self.admin_local(op).await),
            Rpc::Join(j) => encode(self.join_local(j).await),
            Rpc::CaKey { key_pem } => {
                let path = self.dir.join("ca.key");
                if path.exists() {
                    return encode(Ok(()));
                }
                encode(
                    write_private(&path, &key_pem).map_err(|e| CallError::Refused(e.to_string())),
                )
            }
            Rpc::Ping => encode(Ok(self.cfg.id)),
        }
    }
}

/// A Raft API error as callers see it: "not the leader, try node N" (or "no leader
/// yet"), which [`Node::via_leader`] retries, or anything else.
fn leader_error<E>(e: &openraft::error::RaftError<NodeId, E>) -> CallError
where
    E: std::error::Error + openraft::TryAsRef<openraft::error::ForwardToLeader<NodeId, PeerAddr>>,
{
    match e.forward_to_leader() {
        Some(f) => f
            .leader_id
            .map(CallError::NotLeader)
            .unwrap_or(CallError::NoLeader),
        None => CallError::Raft(e.to_string()),
    }
}

fn encode<T: Serialize>(r: Result<T, CallError>) -> Vec<u8> {
    serde_json::to_vec(&r).unwrap_or_else(|e| {
        serde_json::to_vec(&Err::<(), _>(CallError::Refused(format!(
            "unencodable reply: {e}"
        ))))
        .expect("json")
    })
}

/// This machine's vCPUs and memory (MiB): what a node offers to the scheduler.
pub fn host_capacity() -> (u32, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    (cpus, host_memory_mib())
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
