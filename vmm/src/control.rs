//! The VMM's control socket: one JSON request per line, one JSON response per line.
//!
//! ```text
//! {"op":"status"}                    -> {"ok":true,"status":{...}}
//! {"op":"pause"} / {"op":"resume"}   -> {"ok":true}
//! {"op":"shutdown","timeout_ms":N}   -> {"ok":true}  (ACPI power button; hard stop after N ms)
//! {"op":"stop"}                      -> {"ok":true}  (immediately)
//! {"op":"console","bytes":N}         -> {"ok":true,"console":"...last N bytes..."}
//! {"op":"snapshot","dir":"D","then":"resume|pause|stop"}
//!                                    -> {"ok":true,"snapshot":{"save_ms":..,"memory_bytes":..}}
//! anything else                      -> {"ok":false,"error":"..."}
//! ```

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request line accepted.
pub const REQUEST_MAX: usize = 64 << 10;
/// Control clients served at once.
const CLIENTS_MAX: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Braces even without fields, so that serde rejects unknown fields here too.
    Status {},
    Pause {},
    Resume {},
    Shutdown {
        #[serde(default = "default_shutdown_ms")]
        timeout_ms: u64,
    },
    Stop {},
    Console {
        #[serde(default = "default_console_bytes")]
        bytes: usize,
    },
    /// Writes a snapshot into `dir` (which must not exist yet).
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        then: crate::AfterSnapshot,
    },
}

fn default_shutdown_ms() -> u64 {
    30_000
}

fn default_console_bytes() -> usize {
    4096
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<serde_json::Value>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }
}

/// A client for the control socket (the CLI and tests use it).
pub struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "control socket {}: {e}; is the VMM running?",
                    path.display()
                ),
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// How long a call may wait for its reply (60 s unless set; a snapshot of a large
    /// guest takes longer).
    pub fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.reader.get_ref().set_read_timeout(Some(timeout))
    }

    pub fn call(&mut self, request: &Request) -> std::io::Result<Response> {
        let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
        line.push('\n');
        self.reader.get_mut().write_all(line.as_bytes())?;
        let mut reply = String::new();
        // Bounded like the server's requests.
        (&mut self.reader)
            .take(REQUEST_MAX as u64 * 4)
            .read_line(&mut reply)?;
        serde_json::from_str(&reply).map_err(|e| {
            std::io::Error::new(
                ErrorKind::InvalidData,
                format!("bad control reply {reply:?}: {e}"),
            )
        })
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The server half, driven by the VMM's main loop.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, Conn>,
}

pub enum Event {
    /// A parsed request from the client on this fd.
    Request(RawFd, Result<Request, String>),
}

impl Server {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("control socket {} belongs to a running VMM", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn is_client(&self, fd: RawFd) -> bool {
        self.conns.contains_key(&fd)
    }

    /// Accepts new clients; returns their fds for the caller to watch.
    pub fn accept(&mut self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        for _ in 0..CLIENTS_MAX {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= CLIENTS_MAX || stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.conns.insert(
                        fd,
                        Conn {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                    fds.push(fd);
                }
                Err(_) => break,
            }
        }
        fds
    }

    /// Reads what a client sent; returns complete requests, or None when the client
    /// is gone (the caller stops watching `fd`).
    pub fn read(&mut self, fd: RawFd) -> Option<Vec<Result<Request, String>>> {
        let conn = self.conns.get_mut(&fd)?;
        let mut chunk = [0u8; 4096];
        let mut out = Vec::new();
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    self.conns.remove(&fd);
                    return None;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns.remove(&fd);
                    return None;
                }
            }
            if conn.buf.len() > REQUEST_MAX {
                let _ = conn
                    .stream
                    .write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n");
                self.conns.remove(&fd);
                return None;
            }
        }
        while let Some(end) = conn.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if text.trim().is_empty() {
                continue;
            }
            out.push(serde_json::from_str(&text).map_err(|e| {
                format!("bad request {text:?}: {e}; expected e.g. {{\"op\":\"status\"}}")
            }));
        }
        Some(out)
    }

    pub fn reply(&mut self, fd: RawFd, response: &Response) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut line = serde_json::to_vec(response).unwrap_or_default();
        line.push(b'\n');
        // Replies are small; a client that does not read them loses its connection.
        let _ = conn.stream.set_nonblocking(false);
        let _ = conn.stream.set_write_timeout(Some(Duration::from_secs(5)));
        if conn.stream.write_all(&line).is_err() {
            self.conns.remove(&fd);
            return;
        }
        let _ = conn.stream.set_nonblocking(true);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults_and_reject_unknowns() {
        let r: Request = serde_json::from_str(r#"{"op":"shutdown"}"#).unwrap();
        assert_eq!(r, Request::Shutdown { timeout_ms: 30_000 });
        let r: Request = serde_json::from_str(r#"{"op":"console","bytes":10}"#).unwrap();
        assert_eq!(r, Request::Console { bytes: 10 });
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"pause","x":1}"#).is_err());
    }
}
