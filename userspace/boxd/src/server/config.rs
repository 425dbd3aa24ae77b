//! `boxd server`'s configuration: every field has a default, so `boxd server` with no
//! file runs a single node; a TOML file (`--config`) overrides what it names. Unknown
//! keys are refused (a misspelt option must not be silently ignored).

use crate::vmm::parse_size;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Everything the node keeps: control plane, machines' disks, keys, sockets.
    pub data_dir: PathBuf,
    pub ssh: Ssh,
    pub control: Control,
    pub machines: Machines,
    pub images: Images,
    pub network: Network,
    pub dns: Dns,
    pub proxy: Proxy,
    pub acme: Acme,
    /// The IPv4 address clients reach this node at: the proxy and the name server
    /// (`<name>.<zone>` and `ns1.<zone>` point here). Default: the uplink's address, or
    /// the address of the interface holding the default route.
    pub public_ipv4: Option<std::net::Ipv4Addr>,
    /// Who may register: `open` (any key), `invite` (a one-time invite), `allowlist`.
    pub registration: String,
    /// Machines get `<name>.<zone>`; this node's DNS server is authoritative for it.
    /// Empty: no domains, no DNS.
    pub zone: String,
    /// Machines a new account may have (existing accounts keep theirs).
    pub machine_quota: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ssh {
    pub listen: String,
    /// The host name users are told to connect to (messages, `help`).
    pub public_host: String,
    /// Concurrent SSH connections before new ones are refused.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// The Raft/QUIC endpoint (a single node only needs loopback).
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Machines {
    pub cpus: u32,
    pub memory: String,
    pub disk: String,
    /// Run VMMs without a cgroup (hosts without cgroup v2 delegation).
    pub no_cgroup: bool,
    /// Boot guests even where the KVM probe says Linux would be too slow.
    pub skip_kvm_check: bool,
    /// How long `new` waits for a machine to be reachable before it answers.
    pub ready_timeout_s: u64,
    /// vCPUs the scheduler may place per host CPU (machines mostly idle).
    pub cpu_overcommit: u32,
    /// Guest memory the scheduler may place per byte of host memory (guest memory is
    /// touched lazily; above 1.0 a host can run out when guests use what they have).
    pub memory_overcommit: f64,
    /// A running machine with no inbound traffic and no session (exec, ssh, console,
    /// tunnel) for this long is paused ("off": never).
    pub pause_after: String,
    /// A machine idle for this long is suspended to disk ("off": never).
    pub suspend_after: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Images {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The read-only root file system every machine's disk starts from.
    pub rootfs: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// The public IPv4 pool machines get their address from.
    pub pool: String,
    /// The interface public traffic arrives on (XDP attaches here). Without one,
    /// machines get no network device (the API, exec and the gateway still work).
    pub uplink: Option<String>,
    /// Generic (skb) XDP on an uplink without native XDP.
    pub allow_generic_xdp: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dns {
    /// Serve the zone (UDP and TCP).
    pub enabled: bool,
    pub listen: String,
    /// Answers per second per source address; over it, every second query gets an
    /// empty truncated answer (retry over TCP) and the rest none. 0: unlimited.
    pub rate_limit: u32,
    /// What `<name>.<zone>` points at: "proxy" (the public address, HTTPS through the
    /// proxy) or "machine" (the machine's own public IPv4).
    pub records: crate::dns::RecordTarget,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Proxy {
    /// Serve `https://<name>.<zone>` (and redirect plain HTTP to it).
    pub enabled: bool,
    pub https: String,
    /// Plain HTTP: redirects, ACME HTTP-01 challenges, the internal CA. Empty: none.
    pub http: String,
    /// Concurrent client connections (HTTP and HTTPS together).
    pub max_connections: usize,
    /// `Strict-Transport-Security: max-age=` in seconds; 0 sends none.
    pub hsts_max_age: u64,
}

/// Certificates from an ACME CA (Let's Encrypt, or any RFC 8555 server) instead of the
/// internal CA, for zones the public can resolve.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Acme {
    /// The CA's directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory.
    /// Empty: no ACME, the internal CA's certificates are served.
    pub directory: String,
    /// Account contacts (`mailto:ops@example.com`), for the CA's expiry notices.
    pub contact: Vec<String>,
    /// `dns-01`: one wildcard certificate for the zone, proved through this node's DNS
    /// server (the zone must be delegated to it). `http-01`: a certificate per machine,
    /// proved through the proxy's plain-HTTP port (which must be reachable on port 80).
    pub challenge: String,
    /// A PEM root to trust for the directory's own HTTPS (a private or test CA);
    /// default: the system's roots.
    pub ca_root: Option<PathBuf>,
    /// Renew when a certificate has fewer days left than this.
    pub renew_before_days: u32,
}

impl Default for Acme {
    fn default() -> Self {
        Self {
            directory: String::new(),
            contact: Vec::new(),
            challenge: "dns-01".into(),
            ca_root: None,
            renew_before_days: 30,
        }
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Self {
            enabled: true,
            https: "0.0.0.0:443".into(),
            http: "0.0.0.0:80".into(),
            max_connections: 10_000,
            hsts_max_age: 31_536_000,
        }
    }
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:53".into(),
            rate_limit: 200,
            records: crate::dns::RecordTarget::Proxy,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: "/var/lib/boxd".into(),
            ssh: Ssh::default(),
            control: Control::default(),
            machines: Machines::default(),
            images: Images::default(),
            network: Network::default(),
            dns: Dns::default(),
            proxy: Proxy::default(),
            acme: Acme::default(),
            public_ipv4: None,
            registration: "open".into(),
            zone: "boxd.internal".into(),
            machine_quota: 10,
        }
    }
}

impl Default for Ssh {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:2222".into(),
            public_host: "localhost".into(),
            max_connections: 256,
        }
    }
}

impl Default for Control {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7946".into(),
        }
    }
}

impl Default for Machines {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory: "8G".into(),
            disk: "100G".into(),
            no_cgroup: false,
            skip_kvm_check: false,
            ready_timeout_s: 300,
            cpu_overcommit: 4,
            memory_overcommit: 1.0,
            pause_after: "5m".into(),
            suspend_after: "1h".into(),
        }
    }
}

impl Default for Network {
    fn default() -> Self {
        Self {
            pool: "100.64.0.0/24".into(),
            uplink: None,
            allow_generic_xdp: false,
        }
    }
}

impl Config {
    /// Reads `path` (when given) over the defaults and checks every field.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let cfg: Config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("read the configuration {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("{} is not a valid boxd configuration", p.display()))?
            }
            None => Config::default(),
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if !matches!(self.registration.as_str(), "open" | "invite" | "allowlist") {
            bail!(
                "registration = {:?}: use \"open\", \"invite\" or \"allowlist\"",
                self.registration
            );
        }
        self.ssh
            .listen
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("[ssh] listen = {:?} is not IP:port", self.ssh.listen))?;
        self.memory_mib()?;
        self.disk_gib()?;
        if !self.zone.is_empty()
            && (self.zone.len() > 189
                || !self.zone.split('.').all(boxd_control::state::valid_label))
        {
            bail!(
                "zone = {:?}: use a DNS name of lowercase labels (a-z, 0-9, '-'), at most 189 characters, or \"\" for none",
                self.zone
            );
        }
        if self.proxy.enabled {
            self.proxy
                .https
                .parse::<std::net::SocketAddr>()
                .with_context(|| {
                    format!("[proxy] https = {:?} is not IP:port", self.proxy.https)
                })?;
            if !self.proxy.http.is_empty() {
                self.proxy
                    .http
                    .parse::<std::net::SocketAddr>()
                    .with_context(|| {
                        format!(
                            "[proxy] http = {:?} is not IP:port (or \"\" for none)",
                            self.proxy.http
                        )
                    })?;
            }
            if !(1..=1_000_000).contains(&self.proxy.max_connections) {
                bail!(
                    "[proxy] max_connections = {}: use 1-1000000",
                    self.proxy.max_connections
                );
            }
        }
        if !self.acme.directory.is_empty() {
            let a = &self.acme;
            if !a.directory.starts_with("https://") {
                bail!(
                    "[acme] directory = {:?}: use the CA's https:// directory URL (or \"\" for the internal CA)",
                    a.directory
                );
            }
            match a.challenge.as_str() {
                "dns-01" if !self.dns.enabled => bail!(
                    "[acme] challenge = \"dns-01\" needs this node's DNS server: set [dns] enabled = true, or use \"http-01\""
                ),
                "http-01" if !self.proxy.enabled || self.proxy.http.is_empty() => bail!(
                    "[acme] challenge = \"http-01\" needs the proxy's plain-HTTP port: set [proxy] http, or use \"dns-01\""
                ),
                "http-01" if self.dns.records == crate::dns::RecordTarget::Machine => bail!(
                    "[acme] challenge = \"http-01\" needs names to point at the proxy, but [dns] records = \"machine\" points them at the machines: use records = \"proxy\" or challenge = \"dns-01\""
                ),
                "dns-01" | "http-01" => {}
                other => bail!("[acme] challenge = {other:?}: use \"dns-01\" or \"http-01\""),
            }
            if self.zone.is_empty() || !self.proxy.enabled {
                bail!("[acme] needs a zone and the proxy (zone = \"...\", [proxy] enabled = true)");
            }
            if let Some(p) = &a.ca_root
                && !p.exists()
            {
                bail!("[acme] ca_root = {}: no such file", p.display());
            }
            if !(1..=180).contains(&a.renew_before_days) {
                bail!(
                    "[acme] renew_before_days = {}: use 1-180",
                    a.renew_before_days
                );
            }
            for c in &a.contact {
                if !c.starts_with("mailto:") {
                    bail!("[acme] contact = {c:?}: use mailto:ADDRESS");
                }
            }
        }
        if self.dns.enabled {
            self.dns
                .listen
                .parse::<std::net::SocketAddr>()
                .with_context(|| format!("[dns] listen = {:?} is not IP:port", self.dns.listen))?;
        }
        if !(1..=64).contains(&self.machines.cpu_overcommit) {
            bail!(
                "[machines] cpu_overcommit = {}: use 1-64",
                self.machines.cpu_overcommit
            );
        }
        if !(0.1..=16.0).contains(&self.machines.memory_overcommit) {
            bail!(
                "[machines] memory_overcommit = {}: use 0.1-16",
                self.machines.memory_overcommit
            );
        }
        if !(1..=64).contains(&self.machines.cpus) {
            bail!("[machines] cpus = {}: use 1-64", self.machines.cpus);
        }
        let (pause, suspend) = self.idle_policy()?;
        if let (Some(p), Some(s)) = (pause, suspend)
            && s < p
        {
            bail!(
                "[machines] suspend_after = {:?} is shorter than pause_after = {:?}: a machine is paused first",
                self.machines.suspend_after,
                self.machines.pause_after
            );
        }
        Ok(())
    }

    /// After how long without use a machine is paused, and suspended (None: never).
    pub fn idle_policy(&self) -> Result<(Option<Duration>, Option<Duration>)> {
        let parse = |key: &str, v: &str| -> Result<Option<Duration>> {
            if v == "off" {
                return Ok(None);
            }
            let d = crate::vmm::parse_duration(v)
                .map_err(|e| anyhow::anyhow!("[machines] {key} = {v:?}: {e}, or \"off\""))?;
            if d < Duration::from_secs(10) {
                bail!("[machines] {key} = {v:?}: use at least 10s, or \"off\"");
            }
            Ok(Some(d))
        };
        Ok((
            parse("pause_after", &self.machines.pause_after)?,
            parse("suspend_after", &self.machines.suspend_after)?,
        ))
    }

    /// The SSH port users connect to (`[ssh] listen` is checked at load).
    pub fn ssh_port(&self) -> u16 {
        self.ssh
            .listen
            .parse::<std::net::SocketAddr>()
            .map(|a| a.port())
            .unwrap_or(2222)
    }

    pub fn memory_mib(&self) -> Result<u64> {
        let b = parse_size(&self.machines.memory)
            .map_err(|e| anyhow::anyhow!("[machines] memory: {e}"))?;
        Ok(b >> 20)
    }

    pub fn disk_gib(&self) -> Result<u64> {
        let b =
            parse_size(&self.machines.disk).map_err(|e| anyhow::anyhow!("[machines] disk: {e}"))?;
        Ok(b.div_ceil(1 << 30))
    }

    /// The guest kernel, initrd and root file system, checked to exist.
    pub fn images(&self) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let get = |p: &Option<PathBuf>, what: &str, file: &str| -> Result<PathBuf> {
            let p = p
                .clone()
                .unwrap_or_else(|| self.data_dir.join("images").join(file));
            if !p.exists() {
                bail!(
                    "the guest {what} {} is missing: set [images] {what} in the configuration, \
                     or build the images with `cargo xtask images`",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok((
            get(&self.images.kernel, "kernel", "vmlinuz")?,
            get(&self.images.initrd, "initrd", "initrd.img")?,
            get(&self.images.rootfs, "rootfs", "rootfs.img")?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let dir = std::env::temp_dir().join(format!("boxd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join(format!("{:x}.toml", text.len()));
        std::fs::write(&p, text)?;
        let r = Config::load(Some(&p));
        let _ = std::fs::remove_file(&p);
        r
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("").unwrap();
        assert_eq!(c.ssh.listen, "0.0.0.0:2222");
        assert_eq!(
            (c.memory_mib().unwrap(), c.disk_gib().unwrap()),
            (8192, 100)
        );
        let c = parse("registration = \"invite\"\n[machines]\nmemory = \"1G\"\n").unwrap();
        assert_eq!(c.registration, "invite");
        assert_eq!(c.memory_mib().unwrap(), 1024);
    }

    #[test]
    fn mistakes_are_refused_with_the_field_named() {
        for (text, want) in [
            ("registration = \"maybe\"", "registration"),
            ("[ssh]\nlisten = \"nowhere\"", "listen"),
            ("[machines]\nmemory = \"lots\"", "memory"),
            ("[machines]\ncpus = 0", "cpus"),
            ("[machines]\ncpu_overcommit = 0", "cpu_overcommit"),
            ("[machnes]\ncpus = 2", "machnes"),
            ("[ssh]\nlisen = \"0.0.0.0:22\"", "lisen"),
            ("[acme]\ndirectory = \"http://ca/dir\"", "directory"),
            (
                "[acme]\ndirectory = \"https://ca/dir\"\nchallenge = \"tls-alpn-01\"",
                "challenge",
            ),
            (
                "[acme]\ndirectory = \"https://ca/dir\"\ncontact = [\"ops@x\"]",
                "contact",
            ),
            (
                "[acme]\ndirectory = \"https://ca/dir\"\nca_root = \"/nonexistent.pem\"",
                "ca_root",
            ),
            (
                "[dns]\nrecords = \"machine\"\n[acme]\ndirectory = \"https://ca/dir\"\nchallenge = \"http-01\"",
                "records",
            ),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
