//! The host side: talk to a VM's agent through the VMM's vsock unix socket.

use crate::proto::*;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the VM's vsock socket {path}: {source}; is the VM running?")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the guest did not accept a connection to the agent (port {AGENT_PORT}): {0}")]
    Refused(String),
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("the agent said: {0}")]
    Remote(String),
    #[error("the agent broke the protocol: {0}")]
    Protocol(String),
    #[error("the agent did not answer within {0:?}; last error: {1}")]
    NotReady(Duration, String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// What a collected exec produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    uds: PathBuf,
    /// Read/write timeout of each connection (the longest silence tolerated).
    pub io_timeout: Duration,
}

impl Agent {
    pub fn new(vsock_uds: &Path) -> Self {
        Self {
            uds: vsock_uds.to_path_buf(),
            io_timeout: Duration::from_secs(120),
        }
    }

    /// A fresh connection to the agent, past the vsock muxer's CONNECT handshake.
    fn connect(&self) -> Result<UnixStream> {
        let mut s = UnixStream::connect(&self.uds).map_err(|source| AgentError::Connect {
            path: self.uds.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.io_timeout))?;
        s.set_write_timeout(Some(self.io_timeout))?;
        s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        // "OK <port>\n" is short; read it byte by byte so nothing after it is consumed.
        while line.len() < 64 {
            match s.read(&mut byte) {
                Ok(0) => return Err(AgentError::Refused("connection closed before OK".into())),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
                Err(e) => return Err(AgentError::Refused(e.to_string())),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(AgentError::Refused(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
        Ok(s)
    }

    /// A connection that has sent `req`, for callers that drive the frames themselves
    /// (the SSH gateway relays an exec's frames asynchronously).
    pub fn open(&self, req: &Request) -> Result<UnixStream> {
        self.request(req)
    }

    fn request(&self, req: &Request) -> Result<UnixStream> {
        let mut s = self.connect()?;
        write_json(&mut s, Kind::Request, req)?;
        Ok(s)
    }

    fn response(s: &mut UnixStream) -> Result<Response> {
        match read_frame(s)? {
            Some((Kind::Response, p)) => {
                let r: Response = parse(&p)?;
                if r.ok {
                    Ok(r)
                } else {
                    Err(AgentError::Remote(r.error.unwrap_or_default()))
                }
            }
            Some((k, _)) => Err(AgentError::Protocol(format!(
                "expected a response, got {k:?}"
            ))),
            None => Err(AgentError::Protocol(
                "connection closed without a response".into(),
            )),
        }
    }

    fn simple(&self, req: &Request) -> Result<Response> {
        let mut s = self.request(req)?;
        Self::response(&mut s)
    }

    pub fn ping(&self) -> Result<Info> {
        self.simple(&Request::Ping {})?
            .info
            .ok_or_else(|| AgentError::Protocol("ping without info".into()))
    }

    /// Pings until the agent answers or `limit` passes.
    pub fn wait_ready(&self, limit: Duration) -> Result<Info> {
        let deadline = Instant::now() + limit;
        let mut last;
        loop {
            match self.ping() {
                Ok(info) => return Ok(info),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(AgentError::NotReady(limit, last));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a command to completion, collecting its output (each stream bounded by
    /// `output_max` bytes; the rest is dropped, the command still runs to its end).
    pub fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, output_max: usize) -> Result<Output> {
        let req = Request::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            pty: None,
            kill_on_disconnect: true,
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let status = self.exec_stream(
            &req,
            stdin.map(|s| Box::new(io::Cursor::new(s.to_vec())) as Box<dyn Read + Send>),
            &mut |kind, data| {
                let buf = if kind == Kind::Stdout {
                    &mut out
                } else {
                    &mut err
                };
                let room = output_max.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..data.len().min(room)]);
            },
        )?;
        Ok(Output {
            status,
            stdout: out,
            stderr: err,
        })
    }

    /// Runs `req` (an Exec), feeding `stdin` (then EOF) and handing every output chunk to
    /// `on_output` as it arrives.
    pub fn exec_stream(
        &self,
        req: &Request,
        stdin: Option<Box<dyn Read + Send>>,
        on_output: &mut dyn FnMut(Kind, &[u8]),
    ) -> Result<ExitStatus> {
        let mut s = self.request(req)?;
        let feeder = match stdin {
            Some(mut input) => {
                let mut w = s.try_clone()?;
                Some(std::thread::spawn(move || -> io::Result<()> {
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        let n = input.read(&mut buf)?;
                        if n == 0 {
                            return write_frame(&mut w, Kind::StdinEof, &[]);
                        }
                        write_frame(&mut w, Kind::Stdin, &buf[..n])?;
                    }
                }))
            }
            None => {
                write_frame(&mut s, Kind::StdinEof, &[])?;
                None
            }
        };
        let result = loop {
            match read_frame(&mut s)? {
                Some((k @ (Kind::Stdout | Kind::Stderr), data)) => on_output(k, &data),
                Some((Kind::Exit, p)) => break Ok(parse::<ExitStatus>(&p)?),
                Some((Kind::Response, p)) => {
                    let r: Response = parse(&p)?;
                    break Err(AgentError::Remote(
                        r.error.unwrap_or_else(|| "exec failed".into()),
                    ));
                }
                Some((k, _)) => {
                    break Err(AgentError::Protocol(format!(
                        "unexpected {k:?} during exec"
                    )));
                }
                None => {
                    break Err(AgentError::Protocol(
                        "connection closed before the command's exit status".into(),
                    ));
                }
            }
        };
        drop(s);
        if let Some(f) = feeder {
            // The feeder ends when its input ends or the socket closes.
            let _ = f.join();
        }
        result
    }

    /// Writes `data` to `path` in the guest (atomically: temp file, fsync, rename).
    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<u64> {
        let mut s = self.request(&Request::WriteFile {
            path: path.into(),
            mode,
            create_dirs: true,
        })?;
        for chunk in data.chunks(CHUNK) {
            write_frame(&mut s, Kind::Data, chunk)?;
        }
        write_frame(&mut s, Kind::DataEnd, &[])?;
        Ok(Self::response(&mut s)?.bytes.unwrap_or(0))
    }

    /// Reads a whole file from the guest, refusing files over `max` bytes.
    pub fn read_file(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let mut s = self.request(&Request::ReadFile { path: path.into() })?;
        let r = Self::response(&mut s)?;
        let size = r.bytes.unwrap_or(0);
        if size > max {
            return Err(AgentError::Remote(format!(
                "{path} is {size} bytes, over the {max}-byte limit"
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        loop {
            match read_frame(&mut s)? {
                Some((Kind::Data, chunk)) => {
                    if data.len() as u64 + chunk.len() as u64 > max {
                        return Err(AgentError::Remote(format!(
                            "{path} grew past the {max}-byte limit"
                        )));
                    }
                    data.extend_from_slice(&chunk);
                }
                Some((Kind::DataEnd, _)) => return Ok(data),
                other => {
                    return Err(AgentError::Protocol(format!(
                        "unexpected {other:?} in a file transfer"
                    )));
                }
            }
        }
    }

    pub fn set_hostname(&self, hostname: &str) -> Result<()> {
        self.simple(&Request::SetHostname {
            hostname: hostname.into(),
        })
        .map(drop)
    }

    pub fn install_keys(&self, user: &str, keys: &[String]) -> Result<()> {
        self.simple(&Request::InstallKeys {
            user: user.into(),
            keys: keys.to_vec(),
        })
        .map(drop)
    }

    pub fn shutdown(&self, reboot: bool) -> Result<()> {
        self.simple(&Request::Shutdown { reboot }).map(drop)
    }
}
