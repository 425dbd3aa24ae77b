//! `boxd server`: every role of a single node in one process: the control plane (one
//! voter), the worker (VMMs), the network backend and data path when an uplink is
//! configured, the SSH API, and each machine's own API port.

pub mod acme;
pub mod api;
pub mod config;
pub mod idle;
pub mod ssh;
pub mod web;
pub mod worker;

use crate::Exit;
use anyhow::{Context, Result, bail};
use api::{Api, Caller, In, Io, Out};
use boxd_agent::proto::{ExitStatus, Kind, Pty, Resize};
use boxd_control::node::{self, Node};
use boxd_control::types::{AppError, Command, Query, QueryReply};
use clap::Args;
use config::Config;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServerArgs {
    /// A TOML file overriding the defaults (see docs/api.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `[ssh] listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Operator commands against the running server (default: run it).
    #[command(subcommand)]
    op: Option<ServerOp>,
}

#[derive(clap::Subcommand)]
pub enum ServerOp {
    /// Mint a one-time invite (for `registration = "invite"`); users then run
    /// `ssh -p 2222 host register INVITE`.
    Invite {
        /// How long it stays valid, in seconds.
        #[arg(long, default_value_t = 7 * 86400)]
        ttl_s: u64,
        #[arg(long)]
        json: bool,
    },
    /// Put a key (its fingerprint, `SHA256:...`, as `ssh-keygen -lf KEY` prints it) on
    /// the allow-list (for `registration = "allowlist"`).
    Allow { fingerprint: String },
    /// Take a key off the allow-list.
    Disallow { fingerprint: String },
}

/// One API call from inside a machine (over its vsock API port).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineCall {
    pub argv: Vec<String>,
    #[serde(default)]
    pub pty: Option<Pty>,
}

pub fn main(args: ServerArgs) -> Exit {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(l) = args.listen {
        cfg.ssh.listen = l;
    }
    if let Some(op) = args.op {
        return operator(&cfg, op);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(run(Arc::new(cfg)))
}

/// Operator commands: Raft commands through the running node's admin socket.
fn operator(cfg: &Config, op: ServerOp) -> Exit {
    use boxd_control::admin::{AdminRequest, Client};
    use boxd_control::types::{Reply, Request};
    let sock = cfg.data_dir.join("control/admin.sock");
    let write = |cmd: Command| -> Result<()> {
        let mut c = Client::connect(&sock, Duration::from_secs(15)).with_context(|| {
            format!(
                "no running boxd server with data in {} (start it, or pass --data-dir/--config)",
                cfg.data_dir.display()
            )
        })?;
        let reply: Reply = c.call(&AdminRequest::Write(Request {
            actor: "operator".into(),
            id: String::new(),
            at_ms: 0,
            cmd,
        }))?;
        reply.result.map(|_| ()).map_err(|e| anyhow::anyhow!("{e}"))
    };
    match op {
        ServerOp::Invite { ttl_s, json } => {
            if !(60..=90 * 86400).contains(&ttl_s) {
                bail!("--ttl-s {ttl_s}: use 60 s to 90 days");
            }
            let mut secret = [0u8; 16];
            {
                use std::io::Read;
                std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
            }
            let invite = format!("inv-{}", hex::encode(secret));
            use sha2::Digest;
            let hash = hex::encode(sha2::Sha256::digest(invite.as_bytes()));
            write(Command::CreateInvite {
                hash,
                expires_ms: node::now_ms() + ttl_s * 1000,
            })?;
            if json {
                println!("{}", serde_json::json!({"invite": invite, "ttl_s": ttl_s}));
            } else {
                println!("{invite}");
                let port = cfg.ssh_port();
                eprintln!(
                    "one-time, valid {ttl_s} s: ssh -p {port} {} register {invite}",
                    cfg.ssh.public_host
                );
            }
        }
        ServerOp::Allow { fingerprint } | ServerOp::Disallow { fingerprint }
            if !fingerprint.starts_with("SHA256:") =>
        {
            bail!(
                "{fingerprint:?} is not a key fingerprint like SHA256:abc... (`ssh-keygen -lf KEY.pub` prints it)"
            );
        }
        ServerOp::Allow { fingerprint } => {
            write(Command::AllowKey {
                fingerprint: fingerprint.clone(),
                allowed: true,
            })?;
            println!("allowed {fingerprint}");
        }
        ServerOp::Disallow { fingerprint } => {
            write(Command::AllowKey {
                fingerprint: fingerprint.clone(),
                allowed: false,
            })?;
            println!("disallowed {fingerprint}");
        }
    }
    Ok(0)
}

async fn run(cfg: Arc<Config>) -> Exit {
    let dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("create the data directory {}", dir.display()))?;
    cfg.images()?;
    let cdir = dir.join("control");
    if !cdir.join("node.json").exists() {
        node::init(&cdir, &cfg.control.listen, None)?;
        tracing::info!(dir = %cdir.display(), "initialised a single-node control plane");
    }
    let node = Node::start(&cdir).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = {
        let node = node.clone();
        tokio::spawn(async move {
            node.serve(async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    // The admin socket appears once the cluster is set up (CA, this node registered).
    let admin = cdir.join("admin.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !admin.exists() {
        if std::time::Instant::now() > deadline {
            bail!("the control plane did not come up within 60 s (see the log above)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bootstrap(&node, &cfg).await?;

    let net_control = match &cfg.network.uplink {
        Some(uplink) => Some(network(&cfg, &node, uplink).await?),
        None => {
            tracing::info!("no [network] uplink configured: machines get no network device");
            None
        }
    };
    let public = public_ipv4(&cfg);
    let mut dns_authority = None;
    if cfg.dns.enabled && !cfg.zone.is_empty() {
        let authority = Arc::new(crate::dns::Authority::default());
        dns_authority = Some(authority.clone());
        let opts = crate::dns::ServeOptions {
            listen: cfg.dns.listen.parse().context("[dns] listen")?,
            rate_limit: cfg.dns.rate_limit,
            udp_threads: crate::dns::default_threads(),
        };
        crate::dns::serve(authority.clone(), &opts)?;
        boxd_control::reconcile::spawn(
            node.clone(),
            crate::dns::ZoneReconciler::new(authority, cfg.dns.records, public),
        );
        tracing::info!(zone = cfg.zone, listen = cfg.dns.listen, %public, "serving DNS");
    }
    if cfg.proxy.enabled && !cfg.zone.is_empty() {
        web::ensure_certificates(&node, &cfg.zone).await?;
        let table = Arc::new(crate::proxy::Table::default());
        let certs = Arc::new(crate::certs::Store::default());
        let challenges = Arc::new(crate::proxy::Challenges::default());
        boxd_control::reconcile::spawn(
            node.clone(),
            web::WebReconciler {
                table: table.clone(),
                certs: certs.clone(),
                challenges: challenges.clone(),
                ssh: format!("ssh -p {} {}", cfg.ssh_port(), cfg.ssh.public_host),
                loaded: None,
            },
        );
        if !cfg.acme.directory.is_empty() {
            let kind = acme::ChallengeKind::parse(&cfg.acme.challenge)?;
            let (tx, rx) = tokio::sync::watch::channel((node.cfg.id, Vec::new()));
            boxd_control::reconcile::spawn(
                node.clone(),
                acme::WantReconciler {
                    challenge: kind,
                    http: !cfg.proxy.http.is_empty(),
                    tx,
                },
            );
            let manager = acme::Manager {
                node: node.clone(),
                cfg: cfg.acme.clone(),
                authority: dns_authority.clone(),
                challenges: challenges.clone(),
                account: None,
                backoff: acme::Backoff::default(),
            };
            tokio::spawn(manager.run(rx));
            tracing::info!(
                directory = cfg.acme.directory,
                challenge = cfg.acme.challenge,
                "certificates from ACME"
            );
        }
        let proxy = crate::proxy::Proxy::new(
            table,
            certs,
            challenges,
            Some(Arc::new(web::NodeWaker {
                node: node.clone(),
                rt: tokio::runtime::Handle::current(),
            })),
            cfg.proxy.hsts_max_age,
        );
        let opts = crate::proxy::Options {
            https: cfg.proxy.https.parse().context("[proxy] https")?,
            http: match cfg.proxy.http.as_str() {
                "" => None,
                a => Some(a.parse().context("[proxy] http")?),
            },
            max_connections: cfg.proxy.max_connections,
            threads: crate::dns::default_threads(),
        };
        crate::proxy::serve(proxy, &opts).await?;
        // Renewal: the internal certificates are checked twice a day.
        let (n, zone) = (node.clone(), cfg.zone.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
                if let Err(e) = web::ensure_certificates(&n, &zone).await {
                    tracing::warn!("certificate renewal failed (retried in 12 h): {e:#}");
                }
            }
        });
        tracing::info!(
            https = cfg.proxy.https,
            http = cfg.proxy.http,
            "serving HTTPS for {}",
            cfg.zone
        );
    }
    let worker = worker::Worker::new(cfg.clone(), node.clone(), net_control)?;
    let api = Arc::new(Api {
        cfg: cfg.clone(),
        node: node.clone(),
        worker: worker.clone(),
    });
    {
        let api = api.clone();
        worker.set_api_hook(Arc::new(move |id, s| {
            tokio::spawn(machine_call(api.clone(), id, s));
        }));
    }
    boxd_control::reconcile::spawn(node.clone(), worker::Reconcile(worker.clone()));
    let (pause_after, suspend_after) = cfg.idle_policy()?;
    idle::spawn(node.clone(), worker.clone(), pause_after, suspend_after);

    let key = ssh::host_key(&dir.join("ssh_host_ed25519_key"))?;
    let listener = tokio::net::TcpListener::bind(&cfg.ssh.listen)
        .await
        .with_context(|| format!("listen for SSH on {}", cfg.ssh.listen))?;
    let mut server = ssh::Server {
        api: api.clone(),
        slots: Arc::new(tokio::sync::Semaphore::new(cfg.ssh.max_connections)),
    };
    let ssh_config = Arc::new(ssh::config(key));
    let ssh_task = tokio::spawn(async move {
        use russh::server::Server as _;
        server.run_on_socket(ssh_config, &listener).await
    });
    let port = cfg.ssh_port();
    tracing::info!(
        ssh = cfg.ssh.listen,
        data = %dir.display(),
        "boxd server ready: try `ssh -p {port} {} new --name=my-app`",
        cfg.ssh.public_host
    );
    eprintln!("boxd server ready on {}", cfg.ssh.listen);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        r = ssh_task => bail!("the SSH server stopped: {r:?}"),
    }
    // Machines keep running (their VMMs are their own sessions); a restarted server
    // adopts them.
    let _ = stop_tx.send(());
    let _ = serving.await;
    Ok(0)
}

/// The address clients reach this node at (see `public_ipv4` in the configuration).
fn public_ipv4(cfg: &Config) -> std::net::Ipv4Addr {
    if let Some(a) = cfg.public_ipv4 {
        return a;
    }
    let run = |args: &[&str]| -> String {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    // `ip -4 -o addr show dev X`: "2: eth0    inet 192.0.2.1/24 brd ..."
    let from_addr = |out: &str| {
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
    };
    // `ip -4 route get 192.0.2.0`: "... src 192.0.2.1 uid 0"
    let from_route = |out: &str| {
        out.split_whitespace()
            .skip_while(|w| *w != "src")
            .nth(1)
            .and_then(|a| a.parse().ok())
    };
    let found = match &cfg.network.uplink {
        Some(u) => from_addr(&run(&["-4", "-o", "addr", "show", "dev", u])),
        None => None,
    }
    .or_else(|| from_route(&run(&["-4", "route", "get", "192.0.2.0"])));
    found.unwrap_or_else(|| {
        tracing::warn!(
            "could not tell this node's public IPv4 (no uplink address, no default route); \
             using 127.0.0.1: set public_ipv4 in the configuration"
        );
        std::net::Ipv4Addr::LOCALHOST
    })
}

/// Settings and the address pool from the configuration, written once (a node that
/// restarts with the same file changes nothing).
async fn bootstrap(node: &Arc<Node>, cfg: &Config) -> Result<()> {
    let (cpus, memory_mib) = node::host_capacity();
    let mut cmds = vec![
        Command::AddPool {
            name: "default".into(),
            cidr: cfg.network.pool.clone(),
        },
        // What the scheduler may place here, with the configured overcommit.
        Command::RegisterNode {
            id: node.cfg.id,
            addr: node.cfg.advertise.clone(),
            role: node.cfg.role,
            cpus: cpus * cfg.machines.cpu_overcommit,
            memory_mib: (memory_mib as f64 * cfg.machines.memory_overcommit) as u64,
        },
    ];
    let mut settings = vec![
        ("registration", cfg.registration.clone()),
        ("machine_quota", cfg.machine_quota.to_string()),
    ];
    settings.push(("zone", cfg.zone.clone()));
    for (k, v) in settings {
        let cur = node
            .read(Query::Setting { key: k.into() }, true)
            .await
            .map_err(|e| anyhow::anyhow!("read setting {k}: {e}"))?;
        if !matches!(&cur, QueryReply::Setting { value: Some(x) } if *x == v) {
            cmds.push(Command::SetSetting {
                key: k.into(),
                value: v,
            });
        }
    }
    for cmd in cmds {
        let what = cmd.name();
        match node.write(node.request("operator", cmd)).await {
            Ok(r) => match r.result {
                Ok(_) | Err(AppError::AlreadyExists(_)) => {}
                Err(e) => bail!("configuration ({what}): {e}"),
            },
            Err(e) => bail!("configuration ({what}): {e}"),
        }
    }
    Ok(())
}

/// The network backend daemon (its own process: it keeps machines' ports, and the
/// frames held for them, across VMM and server restarts) and the eBPF data path on the
/// uplink, programmed from the state.
async fn network(cfg: &Config, node: &Arc<Node>, uplink: &str) -> Result<PathBuf> {
    let control = cfg.data_dir.join("net.sock");
    // A backend left by an earlier server still serves the running machines' ports
    // (and holds their frames): keep it.
    if boxd_vhost_net::Client::connect(&control).is_ok() {
        tracing::info!("reusing the running network backend");
    } else {
        start_net_backend(cfg, &control).await?;
    }
    let pin = boxd_datapath::PinDir::default();
    let opts = boxd_datapath::UpOptions {
        pin: pin.clone(),
        config: boxd_datapath::NodeConfig {
            node_id: node.cfg.id as u32,
            node_addr: None,
            vm_addr: "10.0.0.2".parse().expect("addr"),
            gw_addr: "10.0.0.1".parse().expect("addr"),
            edge: true,
            edge_node: node.cfg.id as u32,
            wake_interval_ms: 1000,
        },
        interfaces: vec![uplink.to_string()],
        allow_generic: cfg.network.allow_generic_xdp,
    };
    let rep = tokio::task::spawn_blocking(move || boxd_datapath::up(&opts))
        .await?
        .with_context(|| format!("attach the data path to the uplink {uplink}"))?;
    for w in &rep.warnings {
        tracing::warn!("data path: {w}");
    }
    boxd_control::reconcile::spawn(node.clone(), crate::reconcile::BpfMaps { pin: pin.clone() });
    match boxd_datapath::events::subscribe(&pin) {
        Ok(sub) => wake_on_traffic(node.clone(), sub),
        Err(e) => tracing::warn!(
            "wake events not followed (a paused machine wakes on HTTPS, exec, ssh or start, not on its IPv4's first packet): {e:#}"
        ),
    }
    Ok(control)
}

/// The data path raises an event when traffic arrives for a machine that is not
/// running (the router, for its public IPv4; the SNI parser, for its domain): a paused
/// or suspended machine is woken (the state goes back to running, audited as
/// `datapath`; the worker resumes or restores it). The packet itself waits in the machine's queue or is retransmitted.
fn wake_on_traffic(node: Arc<Node>, sub: boxd_datapath::events::Subscription) {
    let rt = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("wake-events".into())
        .spawn(move || {
            loop {
                let w = match sub.next(Duration::from_millis(500)) {
                    boxd_datapath::events::Next::Event(w) => w,
                    boxd_datapath::events::Next::Timeout => continue,
                    boxd_datapath::events::Next::Closed => {
                        tracing::warn!(
                            "the data path's wake events ended: paused machines now wake on HTTPS, exec, ssh or start only"
                        );
                        return;
                    }
                };
                if w.state != "paused" && w.state != "suspended" {
                    continue;
                }
                let n = node.clone();
                rt.spawn(async move {
                    let machines = match n.read(Query::Machines { owner: None }, false).await {
                        Ok(QueryReply::Machines { machines }) => machines,
                        _ => return,
                    };
                    let Some(m) = machines
                        .into_iter()
                        .find(|m| {
                            m.id == u64::from(w.vm_id)
                                && matches!(
                                    m.state,
                                    boxd_control::types::MachineState::Paused
                                        | boxd_control::types::MachineState::Suspended
                                )
                        })
                    else {
                        return;
                    };
                    tracing::info!(machine = m.name, reason = w.reason, public = %w.public, "waking on traffic");
                    let cmd = Command::WakeMachine {
                        owner: m.owner,
                        name: m.name.clone(),
                    };
                    if let Err(e) = n.write(n.request("datapath", cmd)).await {
                        tracing::warn!(machine = m.name, "wake on traffic: {e}");
                    }
                });
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("wake events not followed: {e}");
    }
}

/// Starts `boxd net serve` on `control` (it outlives this process on purpose: running
/// machines keep their ports when the server restarts) and waits until it answers.
async fn start_net_backend(cfg: &Config, control: &std::path::Path) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.data_dir.join("net.log"))?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["net", "serve", "--control"])
        .arg(control)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start the network backend (boxd net serve)")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while boxd_vhost_net::Client::connect(control).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!(
                "the network backend exited ({st}); see {}",
                cfg.data_dir.join("net.log").display()
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("the network backend did not answer within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not waited for: the backend is meant to outlive this process (init reaps it).
    std::mem::forget(child);
    Ok(())
}

/// One call from inside machine `id`: the caller is the machine's owner, known by the
/// socket the call arrived on (the machine's own vsock), never by anything it says.
async fn machine_call(api: Arc<Api>, id: u64, s: tokio::net::UnixStream) {
    let (rd, mut wr) = s.into_split();
    let mut frames = api::frame_reader(rd);
    let first = tokio::time::timeout(Duration::from_secs(10), frames.recv()).await;
    let call: MachineCall = match first {
        Ok(Some(Ok((Kind::Request, p)))) => match serde_json::from_slice(&p) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply_error(&mut wr, &format!("bad request: {e}")).await;
                return;
            }
        },
        _ => return,
    };
    let caller = match machine_owner(&api, id).await {
        Ok(c) => c,
        Err(e) => {
            let _ = reply_error(&mut wr, &e).await;
            return;
        }
    };
    let (io, mut out_rx, in_tx) = Io::pair(call.pty);
    let argv = call.argv;
    let run = {
        let api = api.clone();
        tokio::spawn(async move { api.run(&caller, argv, None, io).await })
    };
    let mut in_tx = Some(in_tx);
    loop {
        tokio::select! {
            o = out_rx.recv() => {
                let r = match o {
                    Some(Out::Stdout(d)) => api::write_frame(&mut wr, Kind::Stdout, &d).await,
                    Some(Out::Stderr(d)) => api::write_frame(&mut wr, Kind::Stderr, &d).await,
                    None => break,
                };
                if r.is_err() {
                    in_tx = None;
                }
            }
            f = frames.recv(), if in_tx.is_some() => {
                let tx = in_tx.as_ref().expect("checked");
                let sent = match f {
                    Some(Ok((Kind::Stdin, d))) => tx.send(In::Data(d)).await,
                    Some(Ok((Kind::StdinEof, _))) => tx.send(In::Eof).await,
                    Some(Ok((Kind::Resize, p))) => match serde_json::from_slice::<Resize>(&p) {
                        Ok(r) => tx.send(In::Resize { rows: r.rows, cols: r.cols }).await,
                        Err(_) => Ok(()),
                    },
                    _ => {
                        in_tx = None;
                        Ok(())
                    }
                };
                if sent.is_err() {
                    in_tx = None;
                }
            }
        }
    }
    let code = run.await.unwrap_or(255);
    let st = serde_json::to_vec(&ExitStatus { code, signal: None }).expect("json");
    let _ = api::write_frame(&mut wr, Kind::Exit, &st).await;
}

async fn reply_error(
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    e: &str,
) -> std::io::Result<()> {
    api::write_frame(wr, Kind::Stderr, format!("error: {e}\n").as_bytes()).await?;
    let st = serde_json::to_vec(&ExitStatus {
        code: 1,
        signal: None,
    })
    .expect("json");
    api::write_frame(wr, Kind::Exit, &st).await
}

async fn machine_owner(api: &Api, id: u64) -> Result<Caller, String> {
    let QueryReply::Machines { machines } = api
        .node
        .read(Query::Machines { owner: None }, false)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err("unexpected reply".into());
    };
    let m = machines
        .into_iter()
        .find(|m| m.id == id)
        .ok_or("this machine no longer exists")?;
    match api
        .node
        .read(
            Query::UserByKey {
                key: m.owner.clone(),
            },
            false,
        )
        .await
        .map_err(|e| e.to_string())?
    {
        QueryReply::User { user: Some(user) } => Ok(Caller {
            actor: format!("user:{}@vm:{}", user.id, m.name),
            via: format!("vm:{}", m.name),
            user,
        }),
        _ => Err("the machine's owner is gone".into()),
    }
}
