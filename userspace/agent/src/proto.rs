//! The host<->agent protocol: length-prefixed frames over one stream per request.
//!
//! ```text
//! frame := len:u32le kind:u8 payload[len-1]        (len <= FRAME_MAX)
//! ```
//! A connection carries exactly one request: the client's first frame is a `Request`
//! (JSON); what follows depends on it (see [`Request`]). One request per connection
//! keeps the agent simple and lets many commands run at once over separate vsock
//! connections.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The vsock port the agent listens on inside the guest.
pub const AGENT_PORT: u32 = 1024;
/// The host vsock port the agent reports readiness to, once per start.
pub const READY_PORT: u32 = 52;
/// Largest frame accepted in either direction.
pub const FRAME_MAX: usize = 1 << 20;
/// Largest data chunk a sender puts in one frame.
pub const CHUNK: usize = 64 << 10;
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Response = 2,
    Stdin = 3,
    StdinEof = 4,
    Stdout = 5,
    Stderr = 6,
    Exit = 7,
    Resize = 8,
    Data = 9,
    DataEnd = 10,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::Stdin,
            4 => Kind::StdinEof,
            5 => Kind::Stdout,
            6 => Kind::Stderr,
            7 => Kind::Exit,
            8 => Kind::Resize,
            9 => Kind::Data,
            10 => Kind::DataEnd,
            _ => return None,
        })
    }
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() + 1 > FRAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame larger than FRAME_MAX",
        ));
    }
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    header[4] = kind as u8;
    // One write for small frames so concurrent writers behind a lock stay cheap.
    if payload.len() <= 4096 {
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        w.write_all(&buf)
    } else {
        w.write_all(&header)?;
        w.write_all(payload)
    }
}

pub fn write_json(w: &mut impl Write, kind: Kind, value: &impl Serialize) -> io::Result<()> {
    write_frame(
        w,
        kind,
        &serde_json::to_vec(value).map_err(io::Error::other)?,
    )
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > FRAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame length {len}"),
        ));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    let kind = Kind::from_u8(kind[0]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", kind[0]),
        )
    })?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

pub fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A terminal for `exec`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pty {
    pub rows: u16,
    pub cols: u16,
    #[serde(default = "default_term")]
    pub term: String,
}

fn default_term() -> String {
    "xterm-256color".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Response: `Response` with `info`.
    Ping {},
    /// Client may send Stdin / StdinEof / Resize frames; agent sends Stdout / Stderr
    /// frames and one Exit frame, or a Response with an error if the command could not
    /// start.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        cwd: Option<String>,
        /// Run as this user (default root).
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        pty: Option<Pty>,
        /// Kill the command when the client goes away (default: keep it running).
        #[serde(default)]
        kill_on_disconnect: bool,
    },
    /// Client sends Data frames then DataEnd; agent answers Response with `bytes`.
    WriteFile {
        path: String,
        #[serde(default = "default_mode")]
        mode: u32,
        #[serde(default)]
        create_dirs: bool,
    },
    /// Agent answers Response (with `bytes`, `mode`) then Data frames and DataEnd.
    ReadFile {
        path: String,
    },
    SetHostname {
        hostname: String,
    },
    /// Installs `keys` as the user's authorized_keys (replacing the file).
    InstallKeys {
        #[serde(default = "default_user")]
        user: String,
        keys: Vec<String>,
    },
    /// Powers the guest off (or reboots it) through systemd.
    Shutdown {
        #[serde(default)]
        reboot: bool,
    },
}

fn default_mode() -> u32 {
    0o644
}

fn default_user() -> String {
    "root".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// What the agent says about its machine (ping, and the ready message).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Info {
    pub agent_version: String,
    pub protocol: u32,
    pub hostname: String,
    pub kernel: String,
    pub uptime_s: f64,
}

/// How an exec'd command ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal number when killed by a signal (the shell's rule).
    pub code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(&mut buf, Kind::Request, &Request::Ping {}).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(k, Kind::Request);
        assert_eq!(parse::<Request>(&p).unwrap(), Request::Ping {});
        assert_eq!(read_frame(&mut r).unwrap(), None);

        let huge = ((FRAME_MAX + 1) as u32).to_le_bytes();
        assert!(read_frame(&mut &huge[..]).is_err());
        assert!(read_frame(&mut &[2, 0, 0, 0, 99, 0][..]).is_err());
        assert!(write_frame(&mut Vec::new(), Kind::Data, &vec![0; FRAME_MAX]).is_err());
    }

    #[test]
    fn requests_default_sensibly_and_reject_typos() {
        let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["uname","-r"]}"#).unwrap();
        assert!(matches!(
            r,
            Request::Exec {
                pty: None,
                kill_on_disconnect: false,
                ..
            }
        ));
        assert!(serde_json::from_str::<Request>(r#"{"op":"exec","argv":[],"ptty":{}}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","x":1}"#).is_err());
    }
}
