//! The SSH front door (russh): public-key authentication only; the key's SHA-256
//! fingerprint is the identity, and an unknown key registers an account on its first
//! connection as the registration policy allows. A session's command line runs an API
//! command; with a machine's name as the SSH user (`ssh -p 2222 my-app@host`) the
//! session is a gateway into that machine instead: a shell, a command, or sftp/scp.

use super::api::{Api, Caller, Gateway, In, Io, Out, split_command};
use boxd_agent::proto::Pty;
use boxd_control::types::{AppError, Applied, Command, Query, QueryReply};
use russh::keys::{HashAlg, PrivateKey};
use russh::server::{Auth, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Loads the host key from `path`, making a fresh Ed25519 one on first start.
pub fn host_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        return russh::keys::load_secret_key(path, None).map_err(|e| {
            anyhow::anyhow!(
                "the SSH host key {} cannot be read ({e}); restore it, or remove it to make a new one (clients will warn)",
                path.display()
            )
        });
    }
    let mut seed = [0u8; 32];
    {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    }
    let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    let pem = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encode the host key: {e}"))?;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    tracing::info!(path = %path.display(), "made a new SSH host key");
    Ok(key)
}

pub fn config(key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-boxd_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(500),
        // OpenSSH first asks with "none" to learn the methods: answer at once.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        max_auth_attempts: 8,
        nodelay: true,
        ..Default::default()
    }
}

pub struct Server {
    pub api: Arc<Api>,
    pub slots: Arc<Semaphore>,
}

impl russh::server::Server for Server {
    type Handler = Handler;

    fn new_client(&mut self, peer: Option<std::net::SocketAddr>) -> Handler {
        Handler {
            api: self.api.clone(),
            peer,
            user: String::new(),
            caller: None,
            pending: None,
            channels: HashMap::new(),
            ptys: HashMap::new(),
            tunnels: Arc::new(Semaphore::new(TUNNELS_PER_CONNECTION)),
            gone: tokio::sync::watch::channel(()).0,
            _slot: self.slots.clone().try_acquire_owned().ok(),
        }
    }
}

/// Port forwards (`ssh -L`) one connection may have open at once.
const TUNNELS_PER_CONNECTION: usize = 64;

pub struct Handler {
    api: Arc<Api>,
    peer: Option<std::net::SocketAddr>,
    /// The SSH user name: a machine's name for the gateway, anything otherwise.
    user: String,
    caller: Option<Caller>,
    /// A key not registered yet (invite policy): only `register INVITE` is served.
    pending: Option<(String, String)>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    ptys: HashMap<ChannelId, Pty>,
    /// `ssh -L` forwards open at once on this connection.
    tunnels: Arc<Semaphore>,
    /// Dropped with the connection: its tunnels end then too.
    gone: tokio::sync::watch::Sender<()>,
    /// None when the server is at its connection limit: every request is refused.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Handler {
    async fn lookup(&self, fp: &str) -> Result<Option<Caller>, String> {
        self.lookup_read(fp, false).await
    }

    /// `lookup`, reading through the leader: sees every write acknowledged so far.
    async fn lookup_fresh(&self, fp: &str) -> Result<Option<Caller>, String> {
        self.lookup_read(fp, true).await
    }

    async fn lookup_read(&self, fp: &str, linearizable: bool) -> Result<Option<Caller>, String> {
        match self
            .api
            .node
            .read(Query::UserByKey { key: fp.into() }, linearizable)
            .await
        {
            Ok(QueryReply::User { user: Some(user) }) => Ok(Some(Caller {
                actor: format!("user:{}", user.id),
                via: fp.into(),
                user,
            })),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Lets a just-registered key in as its account.
    async fn accept_registered(&mut self, fp: &str) -> Result<Auth, russh::Error> {
        match self.lookup_fresh(fp).await {
            Ok(Some(c)) => {
                self.caller = Some(c);
                Ok(Auth::Accept)
            }
            Ok(None) => {
                tracing::warn!(key = fp, "a registered key has no account");
                Ok(Auth::reject())
            }
            Err(e) => {
                tracing::warn!("SSH auth: control plane: {e}");
                Ok(Auth::reject())
            }
        }
    }

    fn start(&mut self, id: ChannelId, what: What) {
        let Some(channel) = self.channels.remove(&id) else {
            return;
        };
        let api = self.api.clone();
        let caller = self.caller.clone();
        let pending = self.pending.clone();
        let user = self.user.clone();
        let pty = self.ptys.remove(&id);
        tokio::spawn(serve(api, caller, pending, user, what, channel, pty));
    }
}

enum What {
    Shell,
    Exec(String),
    Subsystem(String),
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self._slot.is_none() {
            tracing::warn!(peer = ?self.peer, "SSH connection refused: at the connection limit");
            return Ok(Auth::reject());
        }
        let fp = key.public_key.fingerprint(HashAlg::Sha256).to_string();
        let openssh = key.public_key.to_openssh().unwrap_or_default();
        self.user = user.chars().take(64).collect();
        match self.lookup(&fp).await {
            Ok(Some(c)) => {
                self.caller = Some(c);
                return Ok(Auth::Accept);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("SSH auth: control plane: {e}");
                return Ok(Auth::reject());
            }
        }
        // An unknown key: register by the policy.
        let req = self.api.node.request(
            &format!("key:{fp}"),
            Command::Register {
                fingerprint: fp.clone(),
                public_key: openssh.clone(),
                name_hint: self.user.clone(),
                invite: None,
            },
        );
        match self.api.node.write(req).await.map(|r| r.result) {
            Ok(Ok(Applied::User { name })) => {
                tracing::info!(user = name, key = fp, peer = ?self.peer, "registered a new account");
                self.accept_registered(&fp).await
            }
            // Another connection of the same key registered it first (an agent opening
            // many at once): this one is that account's too.
            Ok(Err(AppError::AlreadyExists(_))) => self.accept_registered(&fp).await,
            // Invite policy: let the key in to say `register INVITE`, nothing else (an
            // allow-list refusal is a refusal).
            Ok(Err(AppError::Forbidden(e))) => {
                let policy = self
                    .api
                    .node
                    .read(
                        Query::Setting {
                            key: "registration".into(),
                        },
                        false,
                    )
                    .await;
                if matches!(policy, Ok(QueryReply::Setting { value: Some(p) }) if p == "invite") {
                    self.pending = Some((fp, openssh));
                    Ok(Auth::Accept)
                } else {
                    tracing::info!(key = fp, peer = ?self.peer, "registration refused: {e}");
                    Ok(Auth::reject())
                }
            }
            Ok(other) => {
                tracing::info!(key = fp, peer = ?self.peer, "registration refused: {other:?}");
                Ok(Auth::reject())
            }
            Err(e) => {
                tracing::warn!("SSH registration: control plane: {e}");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // A bounded number of sessions per connection.
        if self.channels.len() >= 16 {
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    /// `ssh -L LOCAL:NAME:PORT`: a TCP connection to port PORT of the caller's machine
    /// NAME (or NAME.<zone>), woken if paused; how private machines are reached.
    #[allow(clippy::too_many_arguments)]
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(caller) = self.caller.clone() else {
            return Ok(()); // dropping the handle refuses the channel
        };
        let Ok(permit) = self.tunnels.clone().try_acquire_owned() else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        let zone = format!(".{}", self.api.cfg.zone);
        let host = host_to_connect.trim_end_matches('.').to_ascii_lowercase();
        let name = host.strip_suffix(&zone).unwrap_or(&host).to_string();
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let api = self.api.clone();
        let mut gone = self.gone.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            match api.tunnel(&caller, &name, port).await {
                Ok((mut tcp, _session)) => {
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp) => {}
                        _ = gone.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::info!(
                        actor = caller.actor,
                        machine = name,
                        port,
                        "tunnel refused: {}",
                        e.message
                    );
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.ptys.insert(
            channel,
            Pty {
                rows: row_height.clamp(1, 1000) as u16,
                cols: col_width.clamp(1, 1000) as u16,
                term: term.chars().take(64).collect(),
            },
        );
        session.channel_success(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        self.start(channel, What::Shell);
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        self.start(
            channel,
            What::Exec(String::from_utf8_lossy(data).into_owned()),
        );
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        self.start(channel, What::Subsystem(name.into()));
        Ok(())
    }
}

/// One session channel: runs the command (or the gateway) and relays its input and
/// output until it ends or the client goes away.
async fn serve(
    api: Arc<Api>,
    caller: Option<Caller>,
    pending: Option<(String, String)>,
    user: String,
    what: What,
    channel: Channel<Msg>,
    pty: Option<Pty>,
) {
    let (mut rd, wr) = channel.split();
    let (mut io, mut out_rx, in_tx) = Io::pair(pty);
    let work = tokio::spawn(async move {
        let Some(caller) = caller else {
            return register(&api, pending, &user, what, &io).await;
        };
        // `ssh NAME@host`: NAME is one of the caller's machines -> gateway.
        let gateway = user != caller.user.name
            && matches!(
                api.node
                    .read(
                        Query::Machine {
                            owner: caller.user.id.clone(),
                            name: user.clone()
                        },
                        false
                    )
                    .await,
                Ok(QueryReply::Machine { machine: Some(_) })
            );
        if gateway {
            let how = match what {
                What::Shell => Gateway::Shell,
                What::Exec(c) => Gateway::Exec(c),
                What::Subsystem(s) => Gateway::Subsystem(s),
            };
            return match api.gateway(&caller, &user, how, &mut io).await {
                Ok(code) => code,
                Err(e) => {
                    io.eprint(format!("error: {}\n", e.message)).await;
                    e.exit
                }
            };
        }
        match what {
            What::Exec(raw) => match split_command(&raw) {
                Ok((argv, _)) if argv.is_empty() => {
                    api.run(&caller, vec!["help".into()], None, io).await
                }
                Ok((argv, tail)) => api.run(&caller, argv, tail, io).await,
                Err(e) => {
                    let json = raw.contains("--json");
                    if json {
                        io.print(format!(
                            "{}\n",
                            serde_json::json!({"error": {"code": e.code, "message": e.message}})
                        ))
                        .await;
                    } else {
                        io.eprint(format!("error: {}\n", e.message)).await;
                    }
                    e.exit
                }
            },
            What::Shell if io.pty.is_some() => repl(&api, &caller, io).await,
            What::Shell => {
                io.print(format!(
                    "Welcome to boxd, {}. Run commands as `ssh -p {} {} COMMAND`:\n\n",
                    caller.user.name,
                    api.cfg.ssh_port(),
                    api.cfg.ssh.public_host
                ))
                .await;
                api.run(&caller, vec!["help".into()], None, io).await
            }
            What::Subsystem(s) => {
                io.eprint(format!(
                    "error: subsystem {s:?} needs a machine: connect as MACHINE@host (e.g. `scp -P 2222 file my-app@host:`)\n"
                ))
                .await;
                1
            }
        }
    });
    let mut in_tx = Some(in_tx);
    loop {
        tokio::select! {
            o = out_rx.recv() => match o {
                Some(Out::Stdout(d)) => { let _ = wr.data_bytes(d).await; }
                Some(Out::Stderr(d)) => { let _ = wr.extended_data_bytes(1, d).await; }
                None => break,
            },
            m = rd.wait(), if in_tx.is_some() => {
                let tx = in_tx.as_ref().expect("checked");
                let sent = match m {
                    Some(ChannelMsg::Data { data }) => tx.send(In::Data(data.to_vec())).await,
                    Some(ChannelMsg::Eof) => tx.send(In::Eof).await,
                    Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                        tx.send(In::Resize {
                            rows: row_height.clamp(1, 1000) as u16,
                            cols: col_width.clamp(1, 1000) as u16,
                        })
                        .await
                    }
                    Some(ChannelMsg::Close) | None => {
                        // The client went away: the command learns it from its input.
                        in_tx = None;
                        Ok(())
                    }
                    Some(_) => Ok(()),
                };
                if sent.is_err() {
                    in_tx = None;
                }
            }
        }
    }
    let code = work.await.unwrap_or(255);
    let _ = wr.exit_status(code as u32).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
}

/// A key not yet registered on an invite-only server: `register INVITE` is the one
/// command it may run.
async fn register(
    api: &Api,
    pending: Option<(String, String)>,
    user: &str,
    what: What,
    io: &Io,
) -> i32 {
    let Some((fp, public_key)) = pending else {
        io.eprint("error: not authenticated\n").await;
        return 1;
    };
    let argv = match &what {
        What::Exec(raw) => shlex::split(raw).unwrap_or_default(),
        _ => Vec::new(),
    };
    let invite = match argv.as_slice() {
        [verb, invite] if verb == "register" => invite.clone(),
        _ => {
            io.eprint(format!(
                "error: this server registers new keys by invite; run `ssh -p {} {} register INVITE`\n",
                api.cfg.ssh_port(),
                api.cfg.ssh.public_host
            ))
            .await;
            return 1;
        }
    };
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(invite.as_bytes()));
    let req = api.node.request(
        &format!("key:{fp}"),
        Command::Register {
            fingerprint: fp,
            public_key,
            name_hint: user.into(),
            invite: Some(hash),
        },
    );
    match api.node.write(req).await.map(|r| r.result) {
        Ok(Ok(Applied::User { name })) => {
            io.print(format!("registered: you are {name}\n")).await;
            0
        }
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            io.eprint(format!("error: {e}\n")).await;
            1
        }
        Err(e) => {
            io.eprint(format!("error: control plane: {e}; retry\n"))
                .await;
            1
        }
    }
}

/// Longest line the prompt takes.
const LINE_MAX: usize = 4096;

/// `ssh -p 2222 host` with a terminal: a prompt that runs commands until `exit` or ^D.
/// Line editing is the minimum a terminal user expects: echo, backspace, ^C, ^D, ^U.
async fn repl(api: &Api, caller: &Caller, mut io: Io) -> i32 {
    io.print(format!(
        "Welcome to boxd, {}. Type a command (`help` lists them), `exit` to leave.\n",
        caller.user.name
    ))
    .await;
    let mut pending: std::collections::VecDeque<u8> = Default::default();
    loop {
        io.print("boxd> ").await;
        let mut line: Vec<u8> = Vec::new();
        // Read one line, echoing.
        loop {
            let Some(b) = pending.pop_front() else {
                match io.input.recv().await {
                    None | Some(In::Eof) => return 0,
                    Some(In::Resize { rows, cols }) => {
                        if let Some(p) = io.pty.as_mut() {
                            (p.rows, p.cols) = (rows, cols);
                        }
                    }
                    Some(In::Data(d)) => pending.extend(d),
                }
                continue;
            };
            match b {
                b'\r' | b'\n' => {
                    // A CR LF pair ends one line, not two.
                    if b == b'\r' && pending.front() == Some(&b'\n') {
                        pending.pop_front();
                    }
                    io.print("\n").await;
                    break;
                }
                0x7f | 0x08 if line.pop().is_some() => io.print("\x08 \x08").await,
                0x15 => {
                    io.print("\x08 \x08".repeat(line.len())).await;
                    line.clear();
                }
                0x03 => {
                    io.print("^C\n").await;
                    line.clear();
                    io.print("boxd> ").await;
                }
                0x04 if line.is_empty() => {
                    io.print("\n").await;
                    return 0;
                }
                0x20..=0x7e if line.len() < LINE_MAX => {
                    line.push(b);
                    let _ = io.out.send(Out::Stdout(vec![b])).await;
                }
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&line).trim().to_string();
        match text.as_str() {
            "" => continue,
            "exit" | "quit" | "logout" => return 0,
            _ => {}
        }
        let (argv, tail) = match split_command(&text) {
            Ok(x) => x,
            Err(e) => {
                io.eprint(format!("error: {}\n", e.message)).await;
                continue;
            }
        };
        // Run it with its own channel ends, relaying output and (for exec and ssh)
        // input until it finishes.
        let (sub, mut out_rx, in_tx) = Io::pair(io.pty.clone());
        let run = api.run(caller, argv, tail, sub);
        tokio::pin!(run);
        let mut in_tx = Some(in_tx);
        let code = loop {
            tokio::select! {
                code = &mut run => break code,
                o = out_rx.recv() => if let Some(o) = o {
                    let _ = io.out.send(o).await;
                },
                i = io.input.recv(), if in_tx.is_some() => match i {
                    Some(i) => {
                        let _ = in_tx.as_ref().expect("checked").send(i).await;
                    }
                    None => in_tx = None,
                },
            }
        };
        while let Ok(o) = out_rx.try_recv() {
            let _ = io.out.send(o).await;
        }
        if in_tx.is_none() {
            return code;
        }
        if code != 0 {
            io.print(format!("(exit {code})\n")).await;
        }
    }
}
