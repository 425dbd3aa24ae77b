//! Host-side fixtures for network tests: the real `boxd net serve` daemon, network
//! namespaces (an RAII guard each), and AF_PACKET sockets on a TAP.

use anyhow::{Context, Result, bail};
use boxd_vhost_net::PortStats;
use boxd_vhost_net::control::{Client, PortSpec, Request};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `boxd net serve` with its own control socket and scratch directory.
pub struct NetDaemon {
    child: Child,
    pub dir: PathBuf,
    pub control: PathBuf,
}

impl NetDaemon {
    pub fn start(tag: &str) -> Result<Self> {
        Self::start_in(tag, None)
    }

    /// Starts the daemon inside network namespace `netns` (its TAPs are created there).
    pub fn start_in(tag: &str, netns: Option<&str>) -> Result<Self> {
        let boxd = crate::guest::boxd_binary()?;
        let dir = PathBuf::from(format!("/tmp/bxnet-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let control = dir.join("net.sock");
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(boxd);
                c
            }
            None => Command::new(boxd),
        };
        let child = cmd
            .args(["net", "serve", "--control"])
            .arg(&control)
            .env("BOXD_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting boxd net serve")?;
        let d = Self {
            child,
            dir,
            control,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&d.control).is_err() {
            if Instant::now() > deadline {
                bail!("boxd net serve did not come up: {}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.control)?)
    }

    /// A port spec with a socket in this daemon's directory.
    pub fn spec(&self, name: &str, tap: &str) -> PortSpec {
        PortSpec::new(name, tap, &self.dir.join(format!("{name}.sock")))
    }

    pub fn add(&self, spec: PortSpec) -> Result<()> {
        self.client()?.call(&Request::AddPort(spec))?;
        Ok(())
    }

    pub fn stats(&self, name: &str) -> Result<PortStats> {
        let mut s = self.client()?.call(&Request::Stats {
            name: Some(name.into()),
        })?;
        s.stats.pop().context("no stats in the answer")
    }

    /// Waits until `pred` holds for port `name`'s counters.
    pub fn wait_stats(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&PortStats) -> bool,
    ) -> Result<PortStats> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats(name)?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("port {name}: waited 10 s for {what}; counters now {s:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the daemon process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // BOXD_KEEP=1 keeps the daemon's log, sockets and guest consoles for a look.
        if std::env::var_os("BOXD_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Moves interface `dev` into the namespace, gives it `addr` and brings it up.
    pub fn adopt(&self, dev: &str, addr: &str) -> Result<()> {
        ip(&["link", "set", dev, "netns", &self.name])?;
        self.ip(&["addr", "add", addr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns on this thread only, with a namespace fd we own.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Waits until interface `dev` exists (the daemon creates TAPs asynchronously to us).
pub fn wait_link(dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new("/sys/class/net").join(dev).exists() {
        if Instant::now() > deadline {
            bail!("interface {dev} did not appear");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A raw AF_PACKET socket on one interface: the host's view of a TAP.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    pub fn open(dev: &str) -> Result<Self> {
        wait_link(dev)?;
        let ifindex = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))?
            .trim()
            .parse()?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex;
        // SAFETY: `sa` is a valid sockaddr_ll of the size passed.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } != 0
        {
            bail!(
                "bind AF_PACKET to {dev}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { fd, ifindex })
    }

    /// Sends one Ethernet frame out of the interface (towards the VM).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sa` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n != frame.len() as isize {
            bail!("AF_PACKET send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame the interface received from the VM (outgoing frames of the host
    /// itself are skipped), or None after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `sa` are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sa as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            if sa.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(buf[..n as usize].to_vec()));
        }
    }
}

/// A tiny HTTP/1.1 server for guests: `GET /blob` answers `blob`, `PUT /...` stores the
/// body. Serves `conns` connections (one request each) and returns the uploaded bodies.
pub fn http_serve(
    listener: std::net::TcpListener,
    blob: &[u8],
    conns: usize,
) -> Result<Vec<Vec<u8>>> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut uploads = Vec::new();
    for _ in 0..conns {
        let (s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut out = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut request = String::new();
        r.read_line(&mut request)?;
        let (mut length, mut expect) = (0usize, false);
        for _ in 0..100 {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse()?;
            }
            expect |= lower.starts_with("expect: 100-continue");
        }
        if request.starts_with("GET /blob ") {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                blob.len()
            )?;
            out.write_all(blob)?;
        } else if request.starts_with("PUT ") {
            if expect {
                out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            let mut body = vec![0u8; length];
            r.read_exact(&mut body)?;
            uploads.push(body);
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        } else {
            out.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
    }
    Ok(uploads)
}
