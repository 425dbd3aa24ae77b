//! Real TLS ClientHellos: what curl, openssl s_client, Python and Chromium send, caught
//! on a loopback listener (the first TLS record of the connection).

use anyhow::{Context, Result, bail};
use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub enum Client {
    Curl,
    OpenSsl,
    Python,
    Chromium,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Curl => "curl",
            Client::OpenSsl => "openssl",
            Client::Python => "python3",
            Client::Chromium => "chromium",
        }
    }

    /// Whether the client is installed here.
    pub fn available(self) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {}", self.name())])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn command(self, host: &str, port: u16, profile: &std::path::Path) -> Command {
        match self {
            Client::Curl => {
                let mut c = Command::new("curl");
                c.args(["-sk", "--max-time", "5", "--resolve"])
                    .arg(format!("{host}:{port}:127.0.0.1"))
                    .arg(format!("https://{host}:{port}/"));
                c
            }
            Client::OpenSsl => {
                let mut c = Command::new("openssl");
                c.args(["s_client", "-connect"])
                    .arg(format!("127.0.0.1:{port}"))
                    .args(["-servername", host]);
                c
            }
            Client::Python => {
                let mut c = Command::new("python3");
                c.arg("-c").arg(format!(
                    "import ssl,socket\nc=ssl.create_default_context()\nc.check_hostname=False\n\
                     c.verify_mode=ssl.CERT_NONE\ns=socket.create_connection(('127.0.0.1',{port}),timeout=5)\n\
                     c.wrap_socket(s,server_hostname='{host}')"
                ));
                c
            }
            Client::Chromium => {
                // The flags that keep a headless Chromium off a closed network.
                let mut c = Command::new("chromium");
                c.args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg(format!("--host-resolver-rules=MAP {host} 127.0.0.1:{port}"))
                .arg(format!("https://{host}/"));
                c
            }
        }
    }
}

/// The first TLS record `client` sends when asked to connect to `https://host`.
pub fn capture(client: Client, host: &str) -> Result<Vec<u8>> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let profile = std::env::temp_dir().join(format!("bx-hello-{}-{port}", std::process::id()));
    let mut child = client
        .command(host, port, &profile)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", client.name()))?;
    let result = (|| {
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut c, _) = loop {
            match l.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("{} never connected", client.name());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        c.set_nonblocking(false)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut rec = vec![0u8; 5];
        c.read_exact(&mut rec)?;
        if rec[0] != 22 {
            bail!(
                "{} did not start with a handshake record: {rec:?}",
                client.name()
            );
        }
        let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        rec.resize(5 + len, 0);
        c.read_exact(&mut rec[5..])?;
        Ok(rec)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
    result
}

/// Where in `hello` the server_name's bytes are (offset, length), found by a plain
/// parse written independently of the eBPF one.
pub fn sni_position(hello: &[u8]) -> Option<(usize, usize)> {
    let be16 = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *hello.get(i)?,
            *hello.get(i + 1)?,
        ])))
    };
    let mut off = 5 + 4 + 2 + 32;
    off += 1 + usize::from(*hello.get(off)?);
    off += 2 + be16(off)?;
    off += 1 + usize::from(*hello.get(off)?);
    let end = off + 2 + be16(off)?;
    off += 2;
    while off + 4 <= end {
        let (ty, len) = (be16(off)?, be16(off + 2)?);
        if ty == 0 {
            let nlen = be16(off + 4 + 3)?;
            return Some((off + 4 + 5, nlen));
        }
        off += 4 + len;
    }
    None
}
