//! The replicated vocabulary: the Raft type configuration, the commands every node
//! applies in the same order, their results, and the rows the state machine holds.

use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// A node's identity in the cluster (and in its certificate: `node-<id>.boxd`).
pub type NodeId = u64;

/// What Raft membership records about a node: where its QUIC endpoint listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub addr: String,
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// boxd's Raft: JSON commands in, command results out, SQLite files as snapshots.
    pub TypeConfig:
        D = Proposal,
        R = Vec<Reply>,
        NodeId = NodeId,
        Node = PeerAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, PeerAddr>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, PeerAddr>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// One log entry's worth of client commands: the leader batches the writes that arrive
/// while the previous batch is being made durable, so one fsync commits many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub requests: Vec<Request>,
}

/// One client command as it travels through the log: who asked, a request id that makes
/// a retried command apply once, the wall-clock time the leader stamped, and the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The actor for the audit log: `user:<fingerprint>`, `node:<id>`, `operator`.
    pub actor: String,
    /// Unique per logical request; a retry after a lost reply carries the same id and
    /// gets the first reply back instead of applying twice. Empty: no deduplication.
    pub id: String,
    /// Milliseconds since the Unix epoch, stamped by the leader as it proposes (what a
    /// client sets is overwritten): applying never reads the clock, so every node
    /// computes the same state.
    pub at_ms: u64,
    pub cmd: Command,
}

/// Every mutation of the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Cluster settings (registration policy, zone, ...): a plain replicated register.
    SetSetting {
        key: String,
        value: String,
    },
    CreateUser {
        fingerprint: String,
        name: String,
        public_key: String,
    },
    /// An unknown key's first connection: registers an account if the policy allows.
    Register {
        fingerprint: String,
        public_key: String,
        /// What the client offered as a name (the SSH user name); made a unique label.
        name_hint: String,
        /// The SHA-256 of an invite's secret, when the policy is `invite`.
        invite: Option<String>,
    },
    /// An invite for `registration = invite` (only its hash is stored).
    CreateInvite {
        hash: String,
        expires_ms: u64,
    },
    /// Puts a key on (or takes it off) the allow-list for `registration = allowlist`.
    AllowKey {
        fingerprint: String,
        allowed: bool,
    },
    AddKey {
        user: String,
        fingerprint: String,
        public_key: String,
    },
    RemoveKey {
        user: String,
        fingerprint: String,
    },
    SetQuota {
        user: String,
        machines: u32,
    },
    /// Creates a team or resizes its shared vCPU/memory pool.
    SetTeam {
        name: String,
        cpus: u32,
        memory_mib: u64,
    },
    /// Puts a user in a team (or takes them out).
    SetUserTeam {
        user: String,
        team: Option<String>,
    },
    AddPool {
        name: String,
        cidr: String,
    },
    RegisterNode {
        id: NodeId,
        addr: String,
        role: NodeRole,
        cpus: u32,
        memory_mib: u64,
    },
    SetNodeHealth {
        id: NodeId,
        healthy: bool,
    },
    RemoveNode {
        id: NodeId,
    },
    CreateMachine {
        owner: String,
        name: String,
        spec: MachineSpec,
        parent: Option<String>,
    },
    SetMachineState {
        owner: String,
        name: String,
        state: MachineState,
    },
    DeleteMachine {
        owner: String,
        name: String,
    },
    Expose {
        owner: String,
        name: String,
        port: u16,
    },
    Unexpose {
        owner: String,
        name: String,
        port: u16,
    },
    /// A one-time join token: only its SHA-256 is stored.
    CreateJoinToken {
        hash: String,
        expires_ms: u64,
    },
    /// Spends a join token and registers the joining node under the next free id.
    ConsumeJoinToken {
        hash: String,
        addr: String,
        role: NodeRole,
    },
    /// A TLS certificate the proxies serve (or the internal CA that signs them):
    /// replicated so every proxy node has it. The key is never audited.
    PutCertificate {
        /// What it is for: a domain (`*.zone`, `app.example.com`) or `ca:internal`.
        name: String,
        cert_pem: String,
        key_pem: String,
        not_after_ms: u64,
        /// `internal` (our CA) or `acme`.
        issuer: String,
    },
    /// Traffic for a paused machine: back to running, and only from paused (a machine
    /// stopped or suspended meanwhile stays so; anonymous traffic never boots one).
    WakeMachine {
        owner: String,
        name: String,
    },
    /// How the proxy serves a machine (see [`WebMode`]).
    SetWeb {
        owner: String,
        name: String,
        mode: WebMode,
    },
    /// A domain of the owner's own (they point its DNS here) served like the
    /// machine's name. A domain belongs to one machine at most.
    AddDomain {
        owner: String,
        name: String,
        domain: String,
    },
    RemoveDomain {
        owner: String,
        name: String,
        domain: String,
    },
    /// An ACME challenge answer to publish: `dns-01` (a TXT record at `name`, the
    /// `_acme-challenge` name) or `http-01` (`name` is the token, served by every proxy
    /// under /.well-known/acme-challenge/). Replicated so whichever node the CA asks
    /// answers. Expires within the hour; expired ones are dropped.
    PutAcmeChallenge {
        kind: String,
        name: String,
        value: String,
        expires_ms: u64,
    },
    RemoveAcmeChallenge {
        kind: String,
        name: String,
        value: String,
    },
    /// An ACME account's credentials (its key, JSON) for one directory URL, so any node
    /// can order with it. Never audited.
    PutAcmeAccount {
        directory: String,
        credentials: String,
    },
    /// The cluster CA's certificate (its key never enters the log: it lives only in the
    /// voters' data directories, see docs/control.md).
    SetClusterCa {
        cert_pem: String,
    },
}

impl Command {
    /// The command's name in the audit log.
    pub fn name(&self) -> &'static str {
        match self {
            Command::SetSetting { .. } => "set_setting",
            Command::CreateUser { .. } => "create_user",
            Command::Register { .. } => "register",
            Command::CreateInvite { .. } => "create_invite",
            Command::AllowKey { .. } => "allow_key",
            Command::AddKey { .. } => "add_key",
            Command::RemoveKey { .. } => "remove_key",
            Command::SetQuota { .. } => "set_quota",
            Command::SetTeam { .. } => "set_team",
            Command::SetUserTeam { .. } => "set_user_team",
            Command::AddPool { .. } => "add_pool",
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeHealth { .. } => "set_node_health",
            Command::RemoveNode { .. } => "remove_node",
            Command::CreateMachine { .. } => "create_machine",
            Command::SetMachineState { .. } => "set_machine_state",
            Command::DeleteMachine { .. } => "delete_machine",
            Command::Expose { .. } => "expose",
            Command::Unexpose { .. } => "unexpose",
            Command::PutCertificate { .. } => "put_certificate",
            Command::PutAcmeChallenge { .. } => "put_acme_challenge",
            Command::SetWeb { .. } => "set_web",
            Command::WakeMachine { .. } => "wake_machine",
            Command::AddDomain { .. } => "add_domain",
            Command::RemoveDomain { .. } => "remove_domain",
            Command::RemoveAcmeChallenge { .. } => "remove_acme_challenge",
            Command::PutAcmeAccount { .. } => "put_acme_account",
            Command::CreateJoinToken { .. } => "create_join_token",
            Command::ConsumeJoinToken { .. } => "consume_join_token",
            Command::SetClusterCa { .. } => "set_cluster_ca",
        }
    }

    /// The audit log's summary of the arguments (secrets left out).
    pub fn summary(&self) -> String {
        match self {
            Command::SetClusterCa { .. } => String::new(),
            Command::PutAcmeAccount { directory, .. } => format!("directory={directory}"),
            Command::PutCertificate {
                name,
                not_after_ms,
                issuer,
                ..
            } => format!("name={name} not_after_ms={not_after_ms} issuer={issuer}"),
            Command::CreateJoinToken { expires_ms, .. }
            | Command::CreateInvite { expires_ms, .. } => {
                format!("expires_ms={expires_ms}")
            }
            Command::ConsumeJoinToken { addr, role, .. } => format!("addr={addr} role={role:?}"),
            other => {
                let mut v = serde_json::to_value(other).unwrap_or_default();
                if let Some(m) = v.as_object_mut() {
                    m.remove("op");
                    m.remove("public_key");
                    m.remove("invite");
                }
                v.to_string()
            }
        }
    }
}

/// The state machine's answer to one command. Domain refusals are results, not Raft
/// failures: they are replicated (and audited) like successes, and change nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub result: Result<Applied, AppError>,
    /// The log index the command was applied at.
    pub index: u64,
}

// One reply per command, moved to its caller and never held in bulk: a boxed machine
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Applied {
    Done,
    Machine(Machine),
    Node {
        id: NodeId,
    },
    /// A registered account's name.
    User {
        name: String,
    },
    /// The setting's previous value.
    Setting {
        previous: Option<String>,
    },
}

/// Refusals every node reaches identically from the same state and command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub enum AppError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    PoolExhausted(String),
    #[error("{0}")]
    NoCapacity(String),
    #[error("{0}")]
    TokenRejected(String),
    #[error("{0}")]
    Forbidden(String),
    /// This node's database failed while applying; never replicated as a result.
    #[error("internal: {0}")]
    Internal(String),
}

impl AppError {
    /// The stable code clients see in `{"error": {"code": ...}}`.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::Invalid(_) => "invalid",
            AppError::NotFound(_) => "not_found",
            AppError::AlreadyExists(_) => "already_exists",
            AppError::QuotaExceeded(_) => "quota_exceeded",
            AppError::PoolExhausted(_) => "pool_exhausted",
            AppError::NoCapacity(_) => "no_capacity",
            AppError::TokenRejected(_) => "token_rejected",
            AppError::Forbidden(_) => "forbidden",
            AppError::Internal(_) => "internal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Raft voter candidate that also runs machines.
    Server,
    /// Runs machines; never votes.
    Worker,
    /// Holds public addresses and the proxy; never votes.
    Edge,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Server => "server",
            NodeRole::Worker => "worker",
            NodeRole::Edge => "edge",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "server" => Some(NodeRole::Server),
            "worker" => Some(NodeRole::Worker),
            "edge" => Some(NodeRole::Edge),
            _ => None,
        }
    }

    /// Whether machines may be placed on a node of this role.
    pub fn runs_machines(self) -> bool {
        matches!(self, NodeRole::Server | NodeRole::Worker)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Default for MachineSpec {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 8192,
            disk_gib: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    Creating,
    Running,
    Paused,
    Suspended,
    Stopped,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Creating => "creating",
            MachineState::Running => "running",
            MachineState::Paused => "paused",
            MachineState::Suspended => "suspended",
            MachineState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => MachineState::Creating,
            "running" => MachineState::Running,
            "paused" => MachineState::Paused,
            "suspended" => MachineState::Suspended,
            "stopped" => MachineState::Stopped,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// A number never reused, for the data path (counters, ports: `bx<id>`).
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub spec: MachineSpec,
    pub state: MachineState,
    pub node: NodeId,
    pub ipv4: String,
    pub domain: Option<String>,
    pub ports: Vec<u16>,
    pub parent: Option<String>,
    pub created_ms: u64,
    /// How the HTTPS proxy serves it.
    #[serde(default)]
    pub web: WebMode,
    /// Custom domains served like `<name>.<zone>`.
    #[serde(default)]
    pub domains: Vec<String>,
    /// When it entered `state` (Unix ms).
    #[serde(default)]
    pub state_since_ms: u64,
}

/// How the HTTPS proxy serves a machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebMode {
    /// TLS ends at the proxy; HTTP goes to the machine's port.
    #[default]
    Public,
    /// Nobody reaches it through the proxy; its owner does through an SSH tunnel.
    Private,
    /// No termination: the raw TLS stream (chosen by SNI) goes to the machine's 443.
    Passthrough,
}

impl WebMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WebMode::Public => "public",
            WebMode::Private => "private",
            WebMode::Passthrough => "passthrough",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "public" => WebMode::Public,
            "private" => WebMode::Private,
            "passthrough" => WebMode::Passthrough,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    pub id: NodeId,
    pub addr: String,
    pub role: NodeRole,
    pub cpus: u32,
    pub memory_mib: u64,
    pub healthy: bool,
    pub used_cpus: u32,
    pub used_memory_mib: u64,
    pub machines: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRow {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after_ms: u64,
    pub issuer: String,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeRow {
    /// `dns-01` or `http-01`.
    pub kind: String,
    /// The TXT record's owner name (`_acme-challenge.<domain>`) or the HTTP token.
    pub name: String,
    pub value: String,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub index: u64,
    pub at_ms: u64,
    pub actor: String,
    pub op: String,
    pub args: String,
    pub result: String,
}

/// Reads served from the state machine (linearizable when asked through the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "q", rename_all = "snake_case")]
pub enum Query {
    Setting {
        key: String,
    },
    /// Whether a join token with this hash exists, unspent and unexpired at `now_ms`.
    JoinToken {
        hash: String,
        now_ms: u64,
    },
    Machines {
        owner: Option<String>,
    },
    Machine {
        owner: String,
        name: String,
    },
    Nodes,
    Audit {
        actor: Option<String>,
        limit: u32,
    },
    /// How many rows every table holds, and the applied index: for consistency checks.
    Counts,
    /// The account a public key (by its SHA256 fingerprint) belongs to; an account's
    /// id (the fingerprint it registered with) finds it too.
    UserByKey {
        key: String,
    },
    /// Every stored certificate, keys included (for the proxies; operators only).
    Certificates,
    /// The published ACME challenges (expired ones included until the next put).
    AcmeChallenges,
    /// The ACME account for a directory URL.
    AcmeAccount {
        directory: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QueryReply {
    Setting {
        value: Option<String>,
    },
    JoinToken {
        valid: bool,
    },
    Machines {
        machines: Vec<Machine>,
    },
    Machine {
        machine: Option<Machine>,
    },
    Nodes {
        nodes: Vec<NodeRow>,
    },
    Audit {
        entries: Vec<AuditRow>,
    },
    Counts {
        applied: u64,
        tables: Vec<(String, u64)>,
    },
    User {
        user: Option<UserInfo>,
    },
    Certificates {
        certs: Vec<CertRow>,
    },
    AcmeChallenges {
        challenges: Vec<ChallengeRow>,
    },
    AcmeAccount {
        credentials: Option<String>,
    },
}

/// An account: its id is the fingerprint of the key it registered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub id: String,
    pub name: String,
    pub created_ms: u64,
    pub machine_quota: u32,
    pub machines: u32,
    pub team: Option<String>,
    pub keys: Vec<KeyRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRow {
    pub fingerprint: String,
    pub public_key: String,
}
