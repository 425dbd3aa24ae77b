//! A real `boxd server` for end-to-end tests, the demo and the API bench, driven with
//! OpenSSH's own `ssh` and `scp`. Where the network is wanted, the "client" lives in its
//! own network namespace behind a veth pair whose host end is the server's uplink, so it
//! reaches machines' public addresses through the eBPF data path like a remote client.

use crate::guest::boxd_binary;
use crate::testhost::Images;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The client namespace and its link to the server (the server's uplink).
pub const CLIENT_NS: &str = "bxclient";
pub const UPLINK: &str = "bxup0";
pub const CLIENT_ADDR: &str = "192.0.2.2";
pub const POOL: &str = "100.64.0.0/24";

pub struct Server {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
    network: bool,
}

/// What a test can vary about the server.
pub struct Options {
    pub network: bool,
    pub machine_quota: u32,
    pub memory: &'static str,
    pub cpus: u32,
    pub registration: &'static str,
    /// The address `<name>.<zone>` points at (`public_ipv4`).
    pub public: &'static str,
    /// More configuration, appended to the file (whole TOML sections).
    pub extra: String,
    /// Lines added to sections the file already has: (`"dns"`, `"rate_limit = 0"`).
    pub settings: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            network: false,
            machine_quota: 10,
            memory: "1G",
            cpus: 1,
            registration: "open",
            public: PUBLIC,
            extra: String::new(),
            settings: Vec::new(),
        }
    }
}

/// The zone every test server is authoritative for, and the address its names point at.
pub const ZONE: &str = "boxd.test";
pub const PUBLIC: &str = "192.0.2.1";

fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh").args(["-c", cmd]).output()?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The client namespace joined to the host by a veth pair (host end: UPLINK). The
/// client's end computes full checksums, as packets off a wire carry them.
fn client_network() -> Result<()> {
    let _ = sh(&format!(
        "ip netns del {CLIENT_NS} 2>/dev/null; ip link del {UPLINK} 2>/dev/null"
    ));
    sh(&format!(
        "ip netns add {CLIENT_NS} && ip link add {UPLINK} type veth peer name bxc0 && \
         ip link set bxc0 netns {CLIENT_NS} && ip addr add 192.0.2.1/24 dev {UPLINK} && \
         ip link set {UPLINK} up && ip -n {CLIENT_NS} addr add {CLIENT_ADDR}/24 dev bxc0 && \
         ip -n {CLIENT_NS} link set bxc0 up && ip -n {CLIENT_NS} link set lo up && \
         ip -n {CLIENT_NS} route add {POOL} via 192.0.2.1 && \
         ip netns exec {CLIENT_NS} ethtool -K bxc0 tx off >/dev/null"
    ))
}

/// ssh's connect timeout for connections straight to a machine (see `Server::direct`).
const DIRECT_CONNECT_TIMEOUT: &str = "ConnectTimeout=90";

impl Server {
    /// Starts `boxd server` with its state in `dir` (created fresh) and an SSH key pair
    /// for each user in `users` (`dir/<user>.key`).
    pub fn start(dir: &Path, port: u16, opts: &Options, users: &[&str]) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let images = Images::load()?;
        if opts.network {
            client_network()?;
            if !Path::new("/sys/fs/bpf/boxd").exists() {
                let _ = sh("mount | grep -q ' /sys/fs/bpf ' || mount -t bpf bpf /sys/fs/bpf");
            }
        }
        let network = if opts.network {
            format!(
                "[network]\npool = \"{POOL}\"\nuplink = \"{UPLINK}\"\nallow_generic_xdp = true\n"
            )
        } else {
            format!("[network]\npool = \"{POOL}\"\n")
        };
        let config = format!(
            "data_dir = \"{data}\"\nmachine_quota = {quota}\nregistration = \"{reg}\"\n\
             zone = \"{ZONE}\"\npublic_ipv4 = \"{public}\"\n\
             [dns]\nlisten = \"127.0.0.1:{dport}\"\n\
             [proxy]\nhttps = \"127.0.0.1:{hport}\"\nhttp = \"127.0.0.1:{pport}\"\n\
             [ssh]\nlisten = \"127.0.0.1:{port}\"\npublic_host = \"127.0.0.1\"\n\
             [control]\nlisten = \"127.0.0.1:{cport}\"\n\
             [machines]\ncpus = {cpus}\nmemory = \"{mem}\"\nready_timeout_s = 400\n\
             [images]\nkernel = \"{k}\"\ninitrd = \"{i}\"\nrootfs = \"{r}\"\n{network}{extra}",
            public = opts.public,
            extra = opts.extra,
            data = dir.join("data").display(),
            quota = opts.machine_quota,
            reg = opts.registration,
            cport = port + 5000,
            dport = port + 6000,
            hport = port + 7000,
            pport = port + 8000,
            cpus = opts.cpus,
            mem = opts.memory,
            k = images.kernel.display(),
            i = images.initrd.display(),
            r = images.rootfs.display(),
        );
        let mut config = config;
        for (section, line) in &opts.settings {
            let header = format!("[{section}]\n");
            let at = config
                .find(&header)
                .with_context(|| format!("the test configuration has no [{section}]"))?;
            config.insert_str(at + header.len(), &format!("{line}\n"));
        }
        std::fs::write(dir.join("boxd.toml"), config)?;
        for u in users {
            let key = dir.join(format!("{u}.key"));
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", u, "-f"])
                .arg(&key)
                .output()
                .context("run ssh-keygen (OpenSSH client tools)")?;
            if !out.status.success() {
                bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Self::launch(dir, port, opts.network)
    }

    /// Kills `boxd server` with SIGKILL, as a node that dies would, leaving its machines'
    /// VMMs (their own sessions) running and nothing cleaned up; `restart` brings it back.
    pub fn kill9(mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        // No Drop: what a dead node leaves is what the next one must cope with.
        std::mem::forget(self);
        Ok(())
    }

    /// Starts `boxd server` again on the state and configuration a stopped one left.
    /// Its earlier log is kept as server.log.old.
    pub fn restart(dir: &Path, port: u16) -> Result<Self> {
        std::fs::rename(dir.join("server.log"), dir.join("server.log.old"))?;
        Self::launch(dir, port, false)
    }

    fn launch(dir: &Path, port: u16, network: bool) -> Result<Self> {
        let log = std::fs::File::create(dir.join("server.log"))?;
        let child = Command::new(boxd_binary()?)
            .arg("server")
            .arg("--config")
            .arg(dir.join("boxd.toml"))
            .env("BOXD_LOG", "info,openraft=warn,quinn_udp=warn,russh=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start boxd server")?;
        let mut s = Self {
            dir: dir.to_path_buf(),
            port,
            child: Some(child),
            network,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.log().contains("boxd server ready") {
            if let Some(c) = s.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("boxd server exited ({st}):\n{}", s.log());
            }
            if Instant::now() > deadline {
                bail!("boxd server not ready within 60 s:\n{}", s.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    /// The port the server's DNS listens on (UDP and TCP, loopback).
    pub fn dns_port(&self) -> u16 {
        self.port + 6000
    }

    /// The proxy's HTTPS and plain HTTP ports (loopback).
    pub fn https_port(&self) -> u16 {
        self.port + 7000
    }

    pub fn http_port(&self) -> u16 {
        self.port + 8000
    }

    /// Writes `file` into `user`'s machine `name` at `to` (through `exec`, as a user
    /// would pipe it).
    pub fn put_file(&self, user: &str, name: &str, file: &Path, to: &str) -> Result<()> {
        let o = self.ssh_input(
            user,
            user,
            &["exec", name, "--", &format!("cat > {to}")],
            &std::fs::read(file).with_context(|| format!("read {}", file.display()))?,
            false,
        )?;
        if !o.status.success() {
            bail!("copy {} into {name}: {}", file.display(), stderr(&o));
        }
        Ok(())
    }

    /// Starts tests/fixtures/web/backend.py in `user`'s machine `name` with `args`
    /// (PORT NAME [BIND [CERT KEY]]), in the background, outliving the exec.
    pub fn start_backend(&self, user: &str, name: &str, args: &str) -> Result<()> {
        let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/web");
        self.put_file(user, name, &web.join("backend.py"), "/root/backend.py")?;
        let cmd = format!("setsid nohup python3 /root/backend.py {args} >/dev/null 2>&1 &");
        let o = self.ssh(user, &["exec", name, "--", &cmd])?;
        if !o.status.success() {
            bail!("start the web backend in {name}: {}", stderr(&o));
        }
        Ok(())
    }

    /// Downloads the server's internal CA (plain HTTP, as a client would) to `to`.
    pub fn fetch_ca(&self, to: &Path) -> Result<()> {
        let o = Command::new("curl")
            .args(["-sSf", "--max-time", "10", "-o"])
            .arg(to)
            .arg(format!(
                "http://127.0.0.1:{}/.well-known/boxd/ca.pem",
                self.http_port()
            ))
            .output()
            .context("run curl")?;
        if !o.status.success() {
            bail!("CA download: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    }

    /// `curl https://HOST/` through the proxy, trusting `ca` (bounded as `direct` is: a
    /// request may wake a machine from disk): the output is the body
    /// followed by `|<status>|<HTTP version>`.
    pub fn https_get(&self, host: &str, ca: &Path) -> Result<Output> {
        let https = self.https_port();
        Command::new("curl")
            .args(["-sS", "--max-time", "90", "--cacert"])
            .arg(ca)
            .args(["--resolve", &format!("{host}:{https}:127.0.0.1")])
            .args(["-w", "|%{http_code}|%{http_version}"])
            .arg(format!("https://{host}:{https}/"))
            .output()
            .context("run curl")
    }

    /// [`Server::https_get`] until it answers 200 (a web server just started in a
    /// machine needs a moment), at most `within`; the last output.
    pub fn https_until_ok(&self, host: &str, ca: &Path, within: Duration) -> Result<Output> {
        let t0 = Instant::now();
        loop {
            let o = self.https_get(host, ca)?;
            if String::from_utf8_lossy(&o.stdout).contains("|200|") || t0.elapsed() > within {
                return Ok(o);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `dig @127.0.0.1 -p <dns port> ARGS`: the whole answer text.
    pub fn dig(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("dig")
            .args(["@127.0.0.1", "-p", &self.dns_port().to_string()])
            .args(["+tries=1", "+time=2"])
            .args(args)
            .output()
            .context("run dig (package bind9-dnsutils; cargo xtask setup)")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `boxd server --config ... ARGS` (operator commands against this server).
    pub fn operator(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(boxd_binary()?)
            .arg("server")
            .arg("--config")
            .arg(self.dir.join("boxd.toml"))
            .args(args)
            .output()?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// OpenSSH options: no config files, this user's key only, no host key prompts.
    pub fn ssh_opts(&self, user: &str) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-i",
            &self.dir.join(format!("{user}.key")).display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `ssh -p PORT login@127.0.0.1 ARGS...` as `user` (their key).
    pub fn ssh_cmd(&self, user: &str, login: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts(user))
            .args(["-p", &self.port.to_string()])
            .arg(format!("{login}@127.0.0.1"))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs an API command as `user`.
    pub fn ssh(&self, user: &str, args: &[&str]) -> Result<Output> {
        Ok(self.ssh_cmd(user, user, args).output()?)
    }

    /// Runs an API command with `--json` that must succeed; its document.
    pub fn json(&self, user: &str, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ssh(user, &a)?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`{}` printed no JSON (exit {:?}): {}{}",
                args.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if !out.status.success() {
            bail!(
                "`{}` failed (exit {:?}): {v}",
                args.join(" "),
                out.status.code()
            );
        }
        Ok(v)
    }

    /// Runs an API command with `--json` that must fail; its exit code and error code.
    pub fn json_err(&self, user: &str, args: &[&str]) -> Result<(i32, String, String)> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ssh(user, &a)?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`{}` printed no JSON: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if out.status.success() {
            bail!("`{}` succeeded but should have failed: {v}", args.join(" "));
        }
        Ok((
            out.status.code().unwrap_or(-1),
            v["error"]["code"].as_str().unwrap_or_default().to_string(),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ))
    }

    /// `scp` through the gateway (`-P PORT`), as `user`.
    pub fn scp(&self, user: &str, from: &str, to: &str) -> Result<Output> {
        Ok(Command::new("scp")
            .args(self.ssh_opts(user))
            .args(["-P", &self.port.to_string(), from, to])
            .stdin(Stdio::null())
            .output()?)
    }

    /// `ssh root@ADDR CMD` from the client namespace, straight to a machine's sshd.
    /// The connect timeout (it covers the banner exchange too) bounds a wake from disk
    /// in the emulated KVM host, where a restore and the guest's first steps take tens
    /// of seconds; how fast a wake is belongs to `cargo xtask bench`, not here.
    pub fn direct(&self, user: &str, addr: &str, cmd: &str) -> Result<Output> {
        if !self.network {
            bail!("this server was started without a network");
        }
        Ok(Command::new("ip")
            .args(["netns", "exec", CLIENT_NS, "ssh"])
            .args(self.ssh_opts(user))
            .args(["-o", DIRECT_CONNECT_TIMEOUT])
            .arg(format!("root@{addr}"))
            .arg(cmd)
            .stdin(Stdio::null())
            .output()?)
    }

    /// `ssh root@ADDR sh` from the client namespace, left open: commands go to its
    /// stdin, their output comes back on its stdout.
    pub fn direct_session(&self, user: &str, addr: &str) -> Result<std::process::Child> {
        if !self.network {
            bail!("this server was started without a network");
        }
        Ok(Command::new("ip")
            .args(["netns", "exec", CLIENT_NS, "ssh"])
            .args(self.ssh_opts(user))
            .args(["-o", DIRECT_CONNECT_TIMEOUT, "-o", "ServerAliveInterval=0"])
            .arg(format!("root@{addr}"))
            .arg("sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// Runs `args` as `user` with `input` on stdin (a terminal requested with `tty`).
    pub fn ssh_input(
        &self,
        user: &str,
        login: &str,
        args: &[&str],
        input: &[u8],
        tty: bool,
    ) -> Result<Output> {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts(user));
        if tty {
            c.arg("-tt");
        }
        c.args(["-p", &self.port.to_string()])
            .arg(format!("{login}@127.0.0.1"))
            .args(args);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(input)?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Machines outlive the server by design; a test's machines go with it.
        let _ = sh(&format!(
            "pkill -f 'boxd vmm .*{}' ; pkill -f 'net serve --control {}'",
            self.dir.join("data/machines").display(),
            self.dir.join("data/net.sock").display()
        ));
        if self.network {
            let _ = sh(&format!("ip netns del {CLIENT_NS}; ip link del {UPLINK}"));
        }
    }
}

/// Text of an output's stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
