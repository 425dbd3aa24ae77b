//! The operator's socket: `admin.sock` in the node's data directory (mode 0600, so only
//! the node's user reaches it). One JSON request per line, one JSON reply per line,
//! any number per connection. `boxd cluster ...` and the local API server speak it.

use crate::net::{AdminOp, CallError};
use crate::node::Node;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "req", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    /// A command (the leader stamps `at_ms`); an empty id means "make one".
    Write(Request),
    Read {
        query: Query,
        linearizable: bool,
    },
    Token {
        ttl_s: u64,
    },
    AddVoter {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
}

pub fn listen(
    node: Arc<Node>,
    path: &Path,
) -> Result<tokio::task::JoinHandle<()>, crate::node::NodeError> {
    let _ = std::fs::remove_file(path);
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|source| crate::node::NodeError::Io {
            what: format!("binding the admin socket {}", path.display()),
            source,
        })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!("admin socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r);
                let mut line = String::new();
                loop {
                    line.clear();
                    match (&mut lines)
                        .take(MAX_LINE as u64 + 1)
                        .read_line(&mut line)
                        .await
                    {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let reply = if line.len() > MAX_LINE {
                        encode(Err::<(), _>(CallError::Refused(format!(
                            "request longer than {MAX_LINE} bytes"
                        ))))
                    } else {
                        match serde_json::from_str::<AdminRequest>(&line) {
                            Ok(req) => handle(&node, req).await,
                            Err(e) => encode(Err::<(), _>(CallError::Refused(format!(
                                "bad request: {e}"
                            )))),
                        }
                    };
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    if line.len() > MAX_LINE {
                        return;
                    }
                }
            });
        }
    }))
}

fn encode<T: Serialize>(r: Result<T, CallError>) -> String {
    let mut s = serde_json::to_string(&r).expect("replies serialise");
    s.push('\n');
    s
}

async fn handle(node: &Node, req: AdminRequest) -> String {
    match req {
        AdminRequest::Status => encode(Ok(node.status())),
        AdminRequest::Write(mut r) => {
            if r.id.is_empty() {
                r.id = crate::node::new_request_id();
            }
            encode(node.write(r).await)
        }
        AdminRequest::Read {
            query,
            linearizable,
        } => encode(node.read(query, linearizable).await),
        AdminRequest::Token { ttl_s } => encode(
            node.token(Duration::from_secs(ttl_s.clamp(60, 7 * 86400)))
                .await,
        ),
        AdminRequest::AddVoter { id } => encode(node.admin(AdminOp::AddVoter { id }).await),
        AdminRequest::Remove { id } => encode(node.admin(AdminOp::Remove { id }).await),
    }
}

/// A blocking client of the admin socket (the CLI, tests and benchmarks use it).
pub struct Client {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the node's admin socket {path}: {source} (is `boxd control run` running with this --data-dir?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("admin socket sent an undecodable reply: {0}")]
    Decode(#[from] serde_json::Error),
    #[error(transparent)]
    Call(#[from] CallError),
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
            ClientError::Connect {
                path: path.display().to_string(),
                source,
            }
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Self {
            reader: std::io::BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    pub fn call<T: serde::de::DeserializeOwned>(
        &mut self,
        req: &AdminRequest,
    ) -> Result<T, ClientError> {
        use std::io::{BufRead, Write};
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            )));
        }
        Ok(serde_json::from_str::<Result<T, CallError>>(&reply)??)
    }
}
