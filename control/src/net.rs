//! Node-to-node RPC over QUIC with mutual TLS. One bidirectional stream per call: the
//! request as JSON, the stream finished, the reply read to its end (bounded). One
//! connection per peer, re-dialled when it breaks; every call has a deadline.

use crate::tls;
use crate::types::*;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest request or reply on one stream: snapshot chunks are at most 4 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest request from a peer without a certificate (a join request).
pub const MAX_ANONYMOUS: usize = 64 << 10;
/// Deadline of a call that doesn't say otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything one node asks another. Externally tagged: Raft messages hold maps keyed
/// by node id, which an internally tagged enum cannot decode from JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded to the leader.
    Write(Request),
    /// A read forwarded to the leader (linearizable).
    Read(Query),
    /// A membership change or token forwarded to the leader.
    Admin(AdminOp),
    /// A node without a certificate asking to join (the only call it may make).
    Join(JoinRequest),
    /// Liveness probe from the leader's health checker.
    Ping,
    /// The leader hands the CA key to a node it just made a voter.
    CaKey {
        key_pem: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminOp {
    AddVoter { id: NodeId },
    Remove { id: NodeId },
    AddLearner { id: NodeId, addr: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub csr_pem: String,
    /// Where the joining node's QUIC endpoint will listen, as others should dial it.
    pub addr: String,
    pub role: NodeRole,
    pub cpus: u32,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub id: NodeId,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// Why a call failed, as the far side or the wire says.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum CallError {
    #[error("{0}")]
    Refused(String),
    #[error("no leader is known yet; retry in a moment")]
    NoLeader,
    #[error("not the leader; the leader is node {0}")]
    NotLeader(NodeId),
    #[error("{0}")]
    App(AppError),
    #[error("{0}")]
    Raft(String),
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// A dialled peer: the connection is made on first use and again after it breaks.
pub struct Peer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: String,
    server_name: String,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(Duration::from_secs(3).try_into().expect("3 s fits")));
    t.max_concurrent_bidi_streams(1024u32.into());
    Arc::new(t)
}

pub fn quic_client(cfg: rustls::ClientConfig) -> quinn::ClientConfig {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).expect("TLS 1.3 client config");
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport());
    c
}

pub fn quic_server(cfg: rustls::ServerConfig) -> quinn::ServerConfig {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(cfg).expect("TLS 1.3 server config");
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    s.transport_config(transport());
    s
}

impl Peer {
    pub fn new(
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: &str,
        server_name: &str,
    ) -> Self {
        Self {
            endpoint,
            config,
            addr: addr.to_string(),
            server_name: server_name.to_string(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, CallError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let unreachable = |e: String| CallError::Unreachable(format!("{} ({e})", self.addr));
        let addr: SocketAddr = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let c = self
            .endpoint
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// One call with a deadline; the reply decoded as `T`.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        rpc: &Rpc,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let body = serde_json::to_vec(rpc).map_err(|e| CallError::Refused(e.to_string()))?;
        let fut = async {
            let conn = self.connection().await?;
            // A peer that closed the connection on purpose says why (a removed node's
            // certificate, say): that is a refusal, not an unreachable peer.
            let broken = |e: String| match conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => CallError::Refused(format!(
                    "{} closed the connection: {}",
                    self.addr,
                    String::from_utf8_lossy(&c.reason)
                )),
                _ => CallError::Unreachable(format!("{} ({e})", self.addr)),
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(e.to_string()))?;
            send.write_all(&body)
                .await
                .map_err(|e| broken(e.to_string()))?;
            send.finish().map_err(|e| broken(e.to_string()))?;
            let reply = recv
                .read_to_end(MAX_MESSAGE)
                .await
                .map_err(|e| broken(e.to_string()))?;
            serde_json::from_slice::<Result<T, CallError>>(&reply).map_err(|e| {
                CallError::Refused(format!("undecodable reply from {}: {e}", self.addr))
            })?
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(format!(
                "{} did not answer in {timeout:?}",
                self.addr
            ))),
        }
    }
}

/// openraft's view of the network: one [`Peer`] per target, certificate pinned to it.
#[derive(Clone)]
pub struct Network {
    pub endpoint: quinn::Endpoint,
    pub config: quinn::ClientConfig,
}

pub struct PeerClient {
    target: NodeId,
    peer: Arc<Peer>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerAddr) -> PeerClient {
        PeerClient {
            target,
            peer: Arc::new(Peer::new(
                self.endpoint.clone(),
                self.config.clone(),
                &node.addr,
                &tls::node_name(target),
            )),
        }
    }
}

impl PeerClient {
    async fn raft_call<T, E>(
        &self,
        rpc: Rpc,
        option: &RPCOption,
    ) -> Result<T, RPCError<NodeId, PeerAddr, RaftError<NodeId, E>>>
    where
        T: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        match self
            .peer
            .call::<Result<T, RaftError<NodeId, E>>>(&rpc, option.hard_ttl())
            .await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e @ (CallError::Unreachable(_) | CallError::Timeout(_))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerAddr, RaftError<NodeId>>> {
        self.raft_call(Rpc::AppendEntries(rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, PeerAddr, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.raft_call(Rpc::InstallSnapshot(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerAddr, RaftError<NodeId>>> {
        self.raft_call(Rpc::Vote(rpc), &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}
