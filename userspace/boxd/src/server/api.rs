//! The command set users drive over SSH (and machines through their API port): parsing,
//! authorisation (a caller sees and touches only their own machines), the Raft commands
//! and reads behind each verb, and the output, as aligned text or one JSON document.

use super::config::Config;
use super::worker::{Phase, Worker};
use boxd_agent::proto::{ExitStatus, Kind, Pty, Request as AgentRequest, Resize, Response};
use boxd_control::node::Node;
use boxd_control::types::{
    AppError, Applied, Command, Machine, MachineSpec, MachineState, Query, QueryReply, UserInfo,
    WebMode,
};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Longest command line accepted.
pub const MAX_COMMAND: usize = 64 << 10;
/// Bytes of console a `console` shows by default.
const CONSOLE_BYTES: u64 = 16 << 10;
/// How long `stop` waits for the machine to be down before it answers.
const STOP_WAIT: Duration = Duration::from_secs(45);
/// How long a suspend may take (writing the guest's memory to disk).
const SUSPEND_WAIT: Duration = Duration::from_secs(600);
/// How long pause and resume may take (the VMM parks every vCPU within a second).
const PAUSE_WAIT: Duration = Duration::from_secs(15);

/// Output of a command, in order.
#[derive(Debug)]
pub enum Out {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Input to a command: the client's stdin and terminal size changes.
#[derive(Debug)]
pub enum In {
    Data(Vec<u8>),
    Eof,
    Resize { rows: u16, cols: u16 },
}

/// A command's channel to its client.
pub struct Io {
    pub out: mpsc::Sender<Out>,
    pub input: mpsc::Receiver<In>,
    /// The client's terminal, when it asked for one.
    pub pty: Option<Pty>,
}

impl Io {
    /// A pair of ends: the command's `Io` and the transport's side.
    pub fn pair(pty: Option<Pty>) -> (Io, mpsc::Receiver<Out>, mpsc::Sender<In>) {
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(64);
        (
            Io {
                out: out_tx,
                input: in_rx,
                pty,
            },
            out_rx,
            in_tx,
        )
    }

    pub async fn print(&self, s: impl Into<String>) {
        let mut s = s.into();
        if self.pty.is_some() {
            s = s.replace('\n', "\r\n");
        }
        let _ = self.out.send(Out::Stdout(s.into_bytes())).await;
    }

    pub async fn eprint(&self, s: impl Into<String>) {
        let mut s = s.into();
        if self.pty.is_some() {
            s = s.replace('\n', "\r\n");
        }
        let _ = self.out.send(Out::Stderr(s.into_bytes())).await;
    }
}

/// Who is calling: an account, through one of its keys or from one of its machines.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserInfo,
    /// The key's fingerprint (SSH), or the machine's name (in-VM calls).
    pub via: String,
    /// The audit log's actor: `user:<id>`, `user:<id>@vm:<machine>` from a machine.
    pub actor: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
    /// The exit status (2: usage).
    pub exit: i32,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            exit: 1,
        }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<boxd_control::net::CallError> for ApiError {
    fn from(e: boxd_control::net::CallError) -> Self {
        match e {
            boxd_control::net::CallError::App(a) => a.into(),
            other => ApiError::new("unavailable", format!("control plane: {other}; retry")),
        }
    }
}

type Res<T> = Result<T, ApiError>;

#[derive(Parser, Debug)]
#[command(
    name = "boxd",
    no_binary_name = true,
    disable_version_flag = true,
    disable_help_subcommand = true,
    about = "boxd: instant remote computers. Every command takes --json."
)]
pub struct ApiCli {
    /// One JSON document on stdout (errors too: {"error": {"code", "message"}}).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Create a machine and wait until it is reachable.
    New {
        /// A DNS label (a-z, 0-9, '-'); default: a generated one.
        #[arg(long)]
        name: Option<String>,
        /// The image (only `debian` so far).
        #[arg(long, default_value = "debian")]
        image: String,
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. 2G, 512M.
        #[arg(long)]
        memory: Option<String>,
        /// Disk size, e.g. 100G.
        #[arg(long)]
        disk: Option<String>,
        /// Answer as soon as the machine is recorded, without waiting for it to boot.
        #[arg(long)]
        no_wait: bool,
    },
    /// List your machines.
    Ls,
    /// Show one machine.
    Info {
        name: String,
    },
    /// Delete a machine and its disk.
    Rm {
        name: String,
    },
    /// Start a stopped machine, or wake a paused one (and wait until it is reachable).
    Start {
        name: String,
    },
    /// Pause a running machine: its vCPUs stop, its memory stays. It wakes in
    /// milliseconds on its next HTTPS request, exec, ssh, console or `start`.
    Pause {
        name: String,
    },
    /// Suspend a machine to disk: its memory and device state are written to a
    /// snapshot and its VMM ends, so it holds no host memory. Processes, open files and
    /// connections wait; traffic to it, HTTPS, exec, ssh or `start` wakes it.
    Suspend {
        name: String,
    },
    /// Power a machine off (ACPI, then the plug after 30 s); its disk stays.
    Stop {
        name: String,
    },
    /// Stop and start a machine.
    Restart {
        name: String,
    },
    /// Run a command in a machine: `exec NAME -- CMD...` (stdout, stderr, exit code).
    Exec {
        name: String,
        /// Allocate a terminal (default: when your ssh client has one).
        #[arg(short, long)]
        tty: bool,
        /// Kill the command when you disconnect (default: it keeps running).
        #[arg(long)]
        kill_on_disconnect: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// An interactive shell in a machine (like `ssh -p PORT NAME@HOST`).
    Ssh {
        name: String,
    },
    /// A machine's serial console.
    Console {
        name: String,
        /// Keep printing what the console writes until you disconnect.
        #[arg(short, long)]
        follow: bool,
        /// How much of the end to show.
        #[arg(long, default_value_t = CONSOLE_BYTES)]
        bytes: u64,
    },
    /// Make a machine's port the target of its HTTPS domain.
    Expose {
        name: String,
        port: u16,
    },
    Unexpose {
        name: String,
        port: u16,
    },
    /// How https://NAME.<zone> is served: `web NAME` shows it; `public` (TLS ends at
    /// the proxy, HTTP to the machine), `private` (the proxy serves it to nobody; you
    /// reach it through `ssh -L 8080:NAME:80 -p PORT HOST`; the machine's own public
    /// IPv4 is as open as its firewall), `passthrough` (the raw TLS stream, chosen by
    /// SNI, to the machine's port 443: bring your own certificate).
    Web {
        name: String,
        mode: Option<String>,
    },
    /// Domains of your own served like NAME.<zone> (point their DNS at this server):
    /// `domain add NAME www.example.com`, `domain rm NAME www.example.com`.
    Domain {
        #[command(subcommand)]
        op: DomainOp,
    },
    /// Your SSH keys: list, `keys add 'ssh-ed25519 AAAA... comment'`, `keys rm FINGERPRINT`.
    Keys {
        #[command(subcommand)]
        op: Option<KeysOp>,
    },
    /// Who the server thinks you are.
    Whoami,
    /// Your limits and what you use of them.
    Quota,
    /// What your account did, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Register your key with an invite (servers with `registration = "invite"`).
    Register {
        invite: String,
    },
    /// This list, or one command's options.
    Help {
        command: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysOp {
    Add {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        key: Vec<String>,
    },
    Rm {
        fingerprint: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum DomainOp {
    Add { name: String, domain: String },
    Rm { name: String, domain: String },
}

/// How a gateway session enters a machine.
pub enum Gateway {
    Shell,
    Exec(String),
    Subsystem(String),
}

pub struct Api {
    pub cfg: Arc<Config>,
    pub node: Arc<Node>,
    pub worker: Arc<Worker>,
}

/// Splits an SSH command line the way a POSIX shell would; the text after a lone `--`
/// is kept verbatim too (it becomes the command run in the machine, as sshd would run it).
pub fn split_command(raw: &str) -> Res<(Vec<String>, Option<String>)> {
    if raw.len() > MAX_COMMAND {
        return Err(ApiError::new(
            "invalid",
            format!(
                "the command line is {} bytes; the limit is {} KiB",
                raw.len(),
                MAX_COMMAND >> 10
            ),
        ));
    }
    let argv = shlex::split(raw).ok_or_else(|| {
        ApiError::new(
            "invalid",
            "unbalanced quotes in the command line".to_string(),
        )
    })?;
    let tail = raw
        .find(" -- ")
        .map(|i| raw[i + 4..].to_string())
        .filter(|t| !t.trim().is_empty());
    Ok((argv, tail))
}

impl Api {
    /// Runs one command line for `caller`; returns the exit status.
    pub async fn run(
        &self,
        caller: &Caller,
        argv: Vec<String>,
        tail: Option<String>,
        mut io: Io,
    ) -> i32 {
        // `--json` anywhere but inside an exec'd command line asks for JSON (trailing
        // arguments like a key's words would otherwise swallow it).
        let mut argv = argv;
        let json = if argv.first().is_some_and(|a| a == "exec") {
            argv.iter()
                .take_while(|a| *a != "--")
                .any(|a| a == "--json")
        } else {
            let had = argv.iter().any(|a| a == "--json");
            argv.retain(|a| a != "--json");
            had
        };
        let cli = match ApiCli::try_parse_from(&argv) {
            Ok(c) => c,
            Err(e) => {
                use clap::error::ErrorKind;
                if matches!(
                    e.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) && !json
                {
                    io.print(e.render().to_string()).await;
                    return if e.kind() == ErrorKind::DisplayHelp {
                        0
                    } else {
                        2
                    };
                }
                let msg = e.render().to_string();
                let msg = msg.trim_start_matches("error: ").trim().to_string();
                let err = ApiError {
                    code: "usage",
                    message: format!("{msg}\n(`help` lists the commands)"),
                    exit: 2,
                };
                return self.fail(&io, json, err).await;
            }
        };
        let json = json || cli.json;
        match self.dispatch(caller, cli.verb, tail, json, &mut io).await {
            Ok(code) => code,
            Err(e) => self.fail(&io, json, e).await,
        }
    }

    async fn fail(&self, io: &Io, json: bool, e: ApiError) -> i32 {
        if json {
            io.print(format!(
                "{}\n",
                json!({"error": {"code": e.code, "message": e.message}})
            ))
            .await;
        } else {
            io.eprint(format!("error: {}\n", e.message)).await;
        }
        e.exit
    }

    /// Prints `v` as JSON or `text` as is; exit 0.
    async fn emit(&self, io: &Io, json: bool, v: Value, text: String) -> Res<i32> {
        if json {
            io.print(format!(
                "{}\n",
                serde_json::to_string_pretty(&v).expect("json")
            ))
            .await;
        } else {
            io.print(text).await;
        }
        Ok(0)
    }

    async fn write(&self, caller: &Caller, cmd: Command) -> Res<Applied> {
        let req = self.node.request(&caller.actor, cmd);
        Ok(self.node.write(req).await?.result?)
    }

    async fn read(&self, q: Query) -> Res<QueryReply> {
        Ok(self.node.read(q, true).await?)
    }

    async fn machine(&self, caller: &Caller, name: &str) -> Res<Machine> {
        match self
            .read(Query::Machine {
                owner: caller.user.id.clone(),
                name: name.into(),
            })
            .await?
        {
            QueryReply::Machine { machine: Some(m) } => Ok(m),
            _ => Err(ApiError::new(
                "not_found",
                format!("you have no machine named {name:?}; `ls` lists yours"),
            )),
        }
    }

    fn machine_json(&self, m: &Machine) -> Value {
        let host = &self.cfg.ssh.public_host;
        let port = self.cfg.ssh_port();
        json!({
            "name": m.name,
            "id": m.id,
            "state": m.state.as_str(),
            "ipv4": m.ipv4,
            "domain": m.domain,
            "cpus": m.spec.cpus,
            "memory_mib": m.spec.memory_mib,
            "disk_gib": m.spec.disk_gib,
            "ports": m.ports,
            "web": m.web.as_str(),
            "domains": m.domains,
            "url": (!self.cfg.zone.is_empty()).then(|| format!("https://{}.{}", m.name, self.cfg.zone)),
            "node": m.node,
            "created_ms": m.created_ms,
            "state_since_ms": m.state_since_ms,
            "ssh": {
                "gateway": format!("ssh -p {port} {}@{host}", m.name),
                "direct": format!("ssh root@{}", m.ipv4),
            },
        })
    }

    async fn dispatch(
        &self,
        caller: &Caller,
        verb: Verb,
        tail: Option<String>,
        json: bool,
        io: &mut Io,
    ) -> Res<i32> {
        match verb {
            Verb::New {
                name,
                image,
                cpus,
                memory,
                disk,
                no_wait,
            } => {
                self.new_machine(caller, name, &image, cpus, memory, disk, no_wait, json, io)
                    .await
            }
            Verb::Ls => {
                let QueryReply::Machines { machines } = self
                    .read(Query::Machines {
                        owner: Some(caller.user.id.clone()),
                    })
                    .await?
                else {
                    return Err(ApiError::new("internal", "unexpected reply"));
                };
                let v = json!({"machines": machines.iter().map(|m| self.machine_json(m)).collect::<Vec<_>>()});
                let mut rows = vec![
                    vec![
                        "NAME", "STATE", "SINCE", "IPV4", "CPUS", "MEMORY", "DISK", "DOMAIN",
                    ]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>(),
                ];
                for m in &machines {
                    rows.push(vec![
                        m.name.clone(),
                        m.state.as_str().into(),
                        age(m.state_since_ms),
                        m.ipv4.clone(),
                        m.spec.cpus.to_string(),
                        format!("{}M", m.spec.memory_mib),
                        format!("{}G", m.spec.disk_gib),
                        m.domain.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
                let text = if machines.is_empty() {
                    "no machines yet; create one with `new --name=my-app`\n".into()
                } else {
                    crate::table_string(rows)
                };
                self.emit(io, json, v, text).await
            }
            Verb::Info { name } => {
                let m = self.machine(caller, &name).await?;
                let v = self.machine_json(&m);
                let text = format!(
                    "name:    {}\nstate:   {} (for {})\nipv4:    {}\ndomain:  {}\nsize:    {} vCPUs, {} MiB, {} GiB disk\nports:   {:?}\ngateway: {}\ndirect:  {}\n",
                    m.name,
                    m.state.as_str(),
                    age(m.state_since_ms),
                    m.ipv4,
                    m.domain.as_deref().unwrap_or("-"),
                    m.spec.cpus,
                    m.spec.memory_mib,
                    m.spec.disk_gib,
                    m.ports,
                    v["ssh"]["gateway"].as_str().unwrap_or_default(),
                    v["ssh"]["direct"].as_str().unwrap_or_default(),
                );
                self.emit(io, json, v, text).await
            }
            Verb::Rm { name } => {
                self.write(
                    caller,
                    Command::DeleteMachine {
                        owner: caller.user.id.clone(),
                        name: name.clone(),
                    },
                )
                .await?;
                self.emit(
                    io,
                    json,
                    json!({"deleted": name}),
                    format!("deleted {name}\n"),
                )
                .await
            }
            Verb::Start { name } => {
                let t = Instant::now();
                self.set_state(caller, &name, MachineState::Running).await?;
                let m = self.machine(caller, &name).await?;
                self.wait_paused(&m, false).await?;
                self.wait_ready(&m).await?;
                let m = self.machine(caller, &name).await?;
                self.emit(
                    io,
                    json,
                    self.machine_json(&m),
                    format!("started {name} in {:.1} s\n", t.elapsed().as_secs_f64()),
                )
                .await
            }
            Verb::Pause { name } => {
                let m = self.machine(caller, &name).await?;
                if !matches!(m.state, MachineState::Running | MachineState::Paused) {
                    return Err(ApiError::new(
                        "invalid",
                        format!(
                            "{name} is {}; only a running machine can be paused",
                            m.state.as_str()
                        ),
                    ));
                }
                let t = Instant::now();
                let m = self.set_state(caller, &name, MachineState::Paused).await?;
                self.wait_paused(&m, true).await?;
                self.emit(
                    io,
                    json,
                    self.machine_json(&m),
                    format!(
                        "paused {name} in {} ms: its memory is kept; its next HTTPS request, exec or ssh wakes it\n",
                        t.elapsed().as_millis()
                    ),
                )
                .await
            }
            Verb::Suspend { name } => {
                let m = self.machine(caller, &name).await?;
                if !matches!(m.state, MachineState::Running | MachineState::Paused) {
                    return Err(ApiError::new(
                        "invalid",
                        format!(
                            "{name} is {}; only a running or paused machine can be suspended",
                            m.state.as_str()
                        ),
                    ));
                }
                let t = Instant::now();
                let m = self
                    .set_state(caller, &name, MachineState::Suspended)
                    .await?;
                self.wait_suspended(caller, &m).await?;
                let m = self.machine(caller, &name).await?;
                let disk = self.worker.snapshot_bytes(m.id);
                let mut v = self.machine_json(&m);
                v["snapshot_bytes"] = json!(disk);
                self.emit(
                    io,
                    json,
                    v,
                    format!(
                        "suspended {name} in {:.1} s: {} MiB of memory on disk, no host memory held; its next connection, HTTPS request, exec, ssh or `start` wakes it\n",
                        t.elapsed().as_secs_f64(),
                        disk >> 20
                    ),
                )
                .await
            }
            Verb::Stop { name } => {
                let m = self.set_state(caller, &name, MachineState::Stopped).await?;
                self.wait_down(&m).await?;
                let m = self.machine(caller, &name).await?;
                self.emit(io, json, self.machine_json(&m), format!("stopped {name}\n"))
                    .await
            }
            Verb::Restart { name } => {
                let t = Instant::now();
                let m = self.machine(caller, &name).await?;
                if !matches!(m.state, MachineState::Running | MachineState::Creating) {
                    return Err(ApiError::new(
                        "invalid",
                        format!("{name} is {}; `start` it instead", m.state.as_str()),
                    ));
                }
                let w = self.worker.clone();
                let mc = m.clone();
                tokio::task::spawn_blocking(move || w.restart(&mc))
                    .await
                    .map_err(|e| ApiError::new("internal", e.to_string()))?
                    .map_err(|e| ApiError::new("unavailable", e))?;
                self.wait_ready(&m).await?;
                self.emit(
                    io,
                    json,
                    self.machine_json(&m),
                    format!("restarted {name} in {:.1} s\n", t.elapsed().as_secs_f64()),
                )
                .await
            }
            Verb::Exec {
                name,
                tty,
                kill_on_disconnect,
                command,
            } => {
                // With --json only errors are JSON: the command's output is its own.
                let m = self.running(caller, &name).await?;
                let script = match tail {
                    Some(t) => t,
                    None if !command.is_empty() => {
                        let c: Vec<&str> = command
                            .iter()
                            .map(String::as_str)
                            .skip_while(|a| *a == "--")
                            .collect();
                        shlex::try_join(c).map_err(|e| ApiError::new("invalid", e.to_string()))?
                    }
                    None => String::new(),
                };
                if script.trim().is_empty() {
                    return Err(ApiError {
                        code: "usage",
                        message: format!(
                            "give the command after --, e.g. `exec {name} -- uname -a`; for a shell use `ssh {name}`"
                        ),
                        exit: 2,
                    });
                }
                let pty = if tty || io.pty.is_some() {
                    Some(io.pty.clone().unwrap_or(Pty {
                        rows: 24,
                        cols: 80,
                        term: "xterm-256color".into(),
                    }))
                } else {
                    None
                };
                let argv = vec!["/bin/sh".into(), "-c".into(), script];
                let _session = self.worker.session(m.id);
                self.exec_in(&m, argv, pty, kill_on_disconnect, io).await
            }
            Verb::Ssh { name } => self.gateway(caller, &name, Gateway::Shell, io).await,
            Verb::Console {
                name,
                follow,
                bytes,
            } => {
                let m = self.machine(caller, &name).await?;
                let _session = follow.then(|| self.worker.session(m.id));
                self.console(&m, follow, bytes.min(1 << 20), json, io).await
            }
            Verb::Web { name, mode } => {
                let m = match mode {
                    None => self.machine(caller, &name).await?,
                    Some(mode) => {
                        let mode = WebMode::parse(&mode).ok_or_else(|| {
                            ApiError::new(
                                "invalid",
                                format!("{mode:?}: use public, private or passthrough"),
                            )
                        })?;
                        let cmd = Command::SetWeb {
                            owner: caller.user.id.clone(),
                            name: name.clone(),
                            mode,
                        };
                        self.write(caller, cmd).await?;
                        self.machine(caller, &name).await?
                    }
                };
                let how = match m.web {
                    WebMode::Public => {
                        "public: TLS ends at the proxy, HTTP goes to the machine".to_string()
                    }
                    WebMode::Private => format!(
                        "private: the proxy serves it to nobody; you reach it through `ssh -p {} -L 8080:{}:80 {}` then http://localhost:8080 (its own public IPv4 is as open as its firewall)",
                        self.cfg.ssh_port(),
                        m.name,
                        self.cfg.ssh.public_host
                    ),
                    WebMode::Passthrough => {
                        "passthrough: the TLS stream goes to the machine's port 443 untouched"
                            .to_string()
                    }
                };
                let text = format!("{name} is {how}\n");
                self.emit(io, json, self.machine_json(&m), text).await
            }
            Verb::Domain { op } => {
                let owner = caller.user.id.clone();
                let (name, cmd) = match op {
                    DomainOp::Add { name, domain } => (
                        name.clone(),
                        Command::AddDomain {
                            owner,
                            name,
                            domain,
                        },
                    ),
                    DomainOp::Rm { name, domain } => (
                        name.clone(),
                        Command::RemoveDomain {
                            owner,
                            name,
                            domain,
                        },
                    ),
                };
                self.write(caller, cmd).await?;
                let m = self.machine(caller, &name).await?;
                let text = if m.domains.is_empty() {
                    format!("{name} has no domains of its own\n")
                } else {
                    format!(
                        "{name} answers for {} (point their DNS at {})\n",
                        m.domains.join(", "),
                        self.cfg.ssh.public_host
                    )
                };
                self.emit(io, json, self.machine_json(&m), text).await
            }
            Verb::Expose { name, port } => self.expose(caller, name, port, true, json, io).await,
            Verb::Unexpose { name, port } => self.expose(caller, name, port, false, json, io).await,
            // A machine acts for its owner on machines, not on the account's keys: a
            // compromised guest must not be able to let another key in.
            Verb::Keys { op: Some(_) } if caller.via.starts_with("vm:") => Err(ApiError::new(
                "forbidden",
                "keys can be added and removed over SSH only, not from inside a machine",
            )),
            Verb::Keys { op } => self.keys(caller, op, json, io).await,
            Verb::Whoami => {
                let u = &caller.user;
                let v = json!({
                    "name": u.name,
                    "id": u.id,
                    "via": caller.via,
                    "keys": u.keys.len(),
                    "team": u.team,
                    "created_ms": u.created_ms,
                });
                let text = format!(
                    "{} ({}), {} key(s), via {}\n",
                    u.name,
                    u.id,
                    u.keys.len(),
                    caller.via
                );
                self.emit(io, json, v, text).await
            }
            Verb::Quota => {
                let u = self.user(caller).await?;
                let v = json!({
                    "machines": {"used": u.machines, "limit": u.machine_quota},
                    "team": u.team,
                    "defaults": {
                        "cpus": self.cfg.machines.cpus,
                        "memory_mib": self.cfg.memory_mib().unwrap_or(0),
                        "disk_gib": self.cfg.disk_gib().unwrap_or(0),
                    },
                });
                let text = format!(
                    "machines: {} of {}\nteam:     {}\n",
                    u.machines,
                    u.machine_quota,
                    u.team.as_deref().unwrap_or("-")
                );
                self.emit(io, json, v, text).await
            }
            Verb::Audit { limit } => {
                let QueryReply::Audit { entries } = self
                    .read(Query::Audit {
                        actor: Some(format!("user:{}", caller.user.id)),
                        limit: limit.min(1000),
                    })
                    .await?
                else {
                    return Err(ApiError::new("internal", "unexpected reply"));
                };
                let v = json!({"entries": entries});
                let mut rows = vec![
                    ["INDEX", "AT_MS", "ACTOR", "OP", "RESULT"]
                        .map(String::from)
                        .to_vec(),
                ];
                for e in &entries {
                    rows.push(vec![
                        e.index.to_string(),
                        e.at_ms.to_string(),
                        e.actor.clone(),
                        e.op.clone(),
                        e.result.clone(),
                    ]);
                }
                self.emit(io, json, v, crate::table_string(rows)).await
            }
            Verb::Register { .. } => Err(ApiError::new(
                "already_exists",
                format!("your key is already registered (user {})", caller.user.name),
            )),
            Verb::Help { command } => {
                let text = match command {
                    Some(c) => match ApiCli::try_parse_from([c.as_str(), "--help"]) {
                        Err(e) => e.render().to_string(),
                        Ok(_) => String::new(),
                    },
                    None => {
                        use clap::CommandFactory;
                        let mut text = ApiCli::command().render_long_help().to_string();
                        text.push_str(&format!(
                            "\nGateway: `ssh -p {} NAME@{}` opens a shell in machine NAME; scp and sftp work the same way.\n",
                            self.cfg.ssh_port(),
                            self.cfg.ssh.public_host
                        ));
                        text
                    }
                };
                self.emit(io, json, json!({"help": text}), text).await
            }
        }
    }
}

impl Api {
    #[allow(clippy::too_many_arguments)]
    async fn new_machine(
        &self,
        caller: &Caller,
        name: Option<String>,
        image: &str,
        cpus: Option<u32>,
        memory: Option<String>,
        disk: Option<String>,
        no_wait: bool,
        json: bool,
        io: &Io,
    ) -> Res<i32> {
        if image != "debian" {
            return Err(ApiError::new(
                "invalid",
                format!("unknown image {image:?}; available: debian"),
            ));
        }
        let size = |s: Option<String>, default: u64, shift: u32, what: &str| -> Res<u64> {
            match s {
                None => Ok(default),
                Some(s) => crate::vmm::parse_size(&s)
                    .map(|b| b.div_ceil(1 << shift))
                    .map_err(|e| ApiError::new("invalid", format!("--{what}: {e}"))),
            }
        };
        let spec = MachineSpec {
            cpus: cpus.unwrap_or(self.cfg.machines.cpus),
            memory_mib: size(memory, self.cfg.memory_mib().unwrap_or(8192), 20, "memory")?,
            disk_gib: size(disk, self.cfg.disk_gib().unwrap_or(100), 30, "disk")?,
        };
        // The disk is a copy-on-write layer over the image: it cannot be smaller.
        if let Ok((_, _, rootfs)) = self.cfg.images()
            && let Ok(meta) = std::fs::metadata(&rootfs)
            && spec.disk_gib << 30 < meta.len()
        {
            return Err(ApiError::new(
                "invalid",
                format!(
                    "a {} GiB disk is smaller than the {image} image ({} GiB); use --disk {}G or more",
                    spec.disk_gib,
                    meta.len().div_ceil(1 << 30),
                    meta.len().div_ceil(1 << 30)
                ),
            ));
        }
        let name = name.unwrap_or_else(generated_name);
        let t = Instant::now();
        let applied = self
            .write(
                caller,
                Command::CreateMachine {
                    owner: caller.user.id.clone(),
                    name: name.clone(),
                    spec,
                    parent: None,
                },
            )
            .await?;
        let Applied::Machine(m) = applied else {
            return Err(ApiError::new(
                "internal",
                "create answered without a machine",
            ));
        };
        if !no_wait {
            if !json {
                io.eprint(format!("created {name} ({}); booting...\n", m.ipv4))
                    .await;
            }
            self.wait_ready(&m).await?;
        }
        let m = self.machine(caller, &name).await.unwrap_or(m);
        let mut v = self.machine_json(&m);
        v["ready_ms"] = json!(if no_wait {
            None
        } else {
            Some(t.elapsed().as_millis() as u64)
        });
        let text = format!(
            "{name} is {} ({:.1} s): {}\n  shell:  {}\n  direct: {}\n",
            if no_wait { "created" } else { "ready" },
            t.elapsed().as_secs_f64(),
            m.ipv4,
            v["ssh"]["gateway"].as_str().unwrap_or_default(),
            v["ssh"]["direct"].as_str().unwrap_or_default(),
        );
        self.emit(io, json, v, text).await
    }

    async fn set_state(&self, caller: &Caller, name: &str, state: MachineState) -> Res<Machine> {
        let m = self.machine(caller, name).await?;
        self.local(&m)?;
        if m.state == state {
            return Ok(m);
        }
        self.write(
            caller,
            Command::SetMachineState {
                owner: caller.user.id.clone(),
                name: name.into(),
                state,
            },
        )
        .await?;
        self.machine(caller, name).await
    }

    /// This node's worker runs `m` (one node for now; a cluster forwards to the worker
    /// that runs it).
    fn local(&self, m: &Machine) -> Res<()> {
        if m.node != self.node.cfg.id {
            return Err(ApiError::new(
                "unavailable",
                format!(
                    "{} runs on node {}; this server reaches machines on its own node only",
                    m.name, m.node
                ),
            ));
        }
        Ok(())
    }

    async fn wait_ready(&self, m: &Machine) -> Res<()> {
        self.local(m)?;
        let limit = Duration::from_secs(self.cfg.machines.ready_timeout_s);
        self.worker.wait_ready(m.id, limit).await.map_err(|e| {
            ApiError::new(
                "not_ready",
                format!(
                    "{} is not reachable: {e}; `console {}` shows its boot log",
                    m.name, m.name
                ),
            )
        })
    }

    /// Waits (bounded) until the worker has paused or resumed `m`'s vCPUs.
    async fn wait_paused(&self, m: &Machine, paused: bool) -> Res<()> {
        self.local(m)?;
        let t = Instant::now();
        while self.worker.paused(m.id) != paused {
            if t.elapsed() > PAUSE_WAIT {
                return Err(ApiError::new(
                    "timeout",
                    format!(
                        "{} was not {} within {} s; its VMM log (`console {}`) may say why",
                        m.name,
                        if paused { "paused" } else { "resumed" },
                        PAUSE_WAIT.as_secs(),
                        m.name
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Waits (bounded) until the worker has written `m`'s snapshot and its VMM is gone;
    /// fails when the worker gave up (it then records the machine running again).
    async fn wait_suspended(&self, caller: &Caller, m: &Machine) -> Res<()> {
        self.local(m)?;
        let t = Instant::now();
        loop {
            if self.worker.suspended(m.id) {
                return Ok(());
            }
            let now = self.machine(caller, &m.name).await?;
            if now.state != MachineState::Suspended {
                return Err(ApiError::new(
                    "failed",
                    format!(
                        "{} could not be suspended and is {} again; its VMM log (`console {}`) says why",
                        m.name,
                        now.state.as_str(),
                        m.name
                    ),
                ));
            }
            if t.elapsed() > SUSPEND_WAIT {
                return Err(ApiError::new(
                    "timeout",
                    format!(
                        "{} was not suspended within {} s; it may still be writing its memory",
                        m.name,
                        SUSPEND_WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_down(&self, m: &Machine) -> Res<()> {
        let Some(mut rx) = self.worker.phase(m.id) else {
            return Ok(());
        };
        let r = tokio::time::timeout(STOP_WAIT, async {
            loop {
                if matches!(*rx.borrow_and_update(), Phase::Down | Phase::Failed(_)) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        r.map_err(|_| {
            ApiError::new(
                "timeout",
                format!(
                    "{} did not power off within {} s",
                    m.name,
                    STOP_WAIT.as_secs()
                ),
            )
        })
    }

    /// `name`, running and reachable (waits, bounded, for one still booting).
    async fn running(&self, caller: &Caller, name: &str) -> Res<Machine> {
        let mut m = self.machine(caller, name).await?;
        if matches!(m.state, MachineState::Paused | MachineState::Suspended) {
            // Using a sleeping machine wakes it, as a request through the proxy does.
            m = self.set_state(caller, name, MachineState::Running).await?;
            self.wait_paused(&m, false).await?;
        }
        if !matches!(m.state, MachineState::Running | MachineState::Creating) {
            return Err(ApiError::new(
                "invalid",
                format!("{name} is {}; `start {name}` first", m.state.as_str()),
            ));
        }
        self.wait_ready(&m).await?;
        Ok(m)
    }

    /// A TCP connection to `port` of the caller's machine `name` (woken if paused),
    /// over its host port: what `ssh -L` tunnels ride on.
    pub async fn tunnel(
        &self,
        caller: &Caller,
        name: &str,
        port: u16,
    ) -> Res<(tokio::net::TcpStream, super::worker::Session)> {
        let m = self.running(caller, name).await?;
        let session = self.worker.session(m.id);
        let tcp = crate::proxy::connect_machine(&crate::reconcile::port_name(m.id), port)
            .await
            .map_err(|e| ApiError::new("unavailable", format!("{name} port {port}: {e}")))?;
        Ok((tcp, session))
    }

    async fn user(&self, caller: &Caller) -> Res<UserInfo> {
        match self
            .read(Query::UserByKey {
                key: caller.user.id.clone(),
            })
            .await?
        {
            QueryReply::User { user: Some(u) } => Ok(u),
            _ => Err(ApiError::new("not_found", "your account is gone")),
        }
    }

    async fn expose(
        &self,
        caller: &Caller,
        name: String,
        port: u16,
        on: bool,
        json: bool,
        io: &Io,
    ) -> Res<i32> {
        let owner = caller.user.id.clone();
        let cmd = if on {
            Command::Expose {
                owner,
                name: name.clone(),
                port,
            }
        } else {
            Command::Unexpose {
                owner,
                name: name.clone(),
                port,
            }
        };
        self.write(caller, cmd).await?;
        let m = self.machine(caller, &name).await?;
        let text = format!("{name} exposes {:?}\n", m.ports);
        self.emit(io, json, self.machine_json(&m), text).await
    }

    async fn keys(&self, caller: &Caller, op: Option<KeysOp>, json: bool, io: &Io) -> Res<i32> {
        match op {
            None => {
                let u = self.user(caller).await?;
                let v = json!({"keys": u.keys.iter().map(|k| json!({
                    "fingerprint": k.fingerprint,
                    "public_key": k.public_key,
                    "current": k.fingerprint == caller.via,
                })).collect::<Vec<_>>()});
                let mut rows = vec![["FINGERPRINT", "KEY", ""].map(String::from).to_vec()];
                for k in &u.keys {
                    let short: String = k.public_key.chars().take(40).collect();
                    rows.push(vec![
                        k.fingerprint.clone(),
                        format!("{short}..."),
                        if k.fingerprint == caller.via {
                            "(this one)".into()
                        } else {
                            String::new()
                        },
                    ]);
                }
                self.emit(io, json, v, crate::table_string(rows)).await
            }
            Some(KeysOp::Add { key }) => {
                let line = key.join(" ");
                let pk = russh::keys::PublicKey::from_openssh(line.trim()).map_err(|e| {
                    ApiError::new(
                        "invalid",
                        format!("not an OpenSSH public key ({e}); paste a line like `ssh-ed25519 AAAA... me@laptop`"),
                    )
                })?;
                let fp = pk.fingerprint(russh::keys::HashAlg::Sha256).to_string();
                let public_key = pk
                    .to_openssh()
                    .map_err(|e| ApiError::new("invalid", e.to_string()))?;
                self.write(
                    caller,
                    Command::AddKey {
                        user: caller.user.id.clone(),
                        fingerprint: fp.clone(),
                        public_key,
                    },
                )
                .await?;
                self.emit(io, json, json!({"added": fp}), format!("added {fp}\n"))
                    .await
            }
            Some(KeysOp::Rm { fingerprint }) => {
                self.write(
                    caller,
                    Command::RemoveKey {
                        user: caller.user.id.clone(),
                        fingerprint: fingerprint.clone(),
                    },
                )
                .await?;
                self.emit(
                    io,
                    json,
                    json!({"removed": fingerprint}),
                    format!("removed {fingerprint}\n"),
                )
                .await
            }
        }
    }

    async fn console(
        &self,
        m: &Machine,
        follow: bool,
        bytes: u64,
        json: bool,
        io: &mut Io,
    ) -> Res<i32> {
        self.local(m)?;
        let path = self.worker.console_path(m.id);
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self
                    .emit(io, json, json!({"console": ""}), String::new())
                    .await;
            }
            Err(e) => return Err(ApiError::new("internal", format!("console: {e}"))),
        };
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(bytes);
        use tokio::io::AsyncSeekExt;
        f.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::new("internal", e.to_string()))?;
        let mut buf = Vec::new();
        (&mut f)
            .take(bytes)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| ApiError::new("internal", e.to_string()))?;
        if json {
            return self
                .emit(
                    io,
                    true,
                    json!({"console": String::from_utf8_lossy(&buf)}),
                    String::new(),
                )
                .await;
        }
        let _ = io.out.send(Out::Stdout(buf)).await;
        if !follow {
            return Ok(0);
        }
        // Until the client goes away (its input channel closes).
        let mut chunk = vec![0u8; 32 << 10];
        loop {
            tokio::select! {
                i = io.input.recv() => if i.is_none() {
                    return Ok(0);
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    loop {
                        let n = f.read(&mut chunk).await.map_err(|e| ApiError::new("internal", e.to_string()))?;
                        if n == 0 {
                            break;
                        }
                        if io.out.send(Out::Stdout(chunk[..n].to_vec())).await.is_err() {
                            return Ok(0);
                        }
                    }
                }
            }
        }
    }

    /// Enters machine `name` for a gateway session (shell, command, or sftp/scp).
    pub async fn gateway(
        &self,
        caller: &Caller,
        name: &str,
        how: Gateway,
        io: &mut Io,
    ) -> Res<i32> {
        let m = self.running(caller, name).await?;
        let _session = self.worker.session(m.id);
        let (argv, kill) = match how {
            Gateway::Shell => (vec!["/bin/bash".to_string(), "-l".into()], true),
            Gateway::Exec(cmd) => {
                if cmd.len() > MAX_COMMAND {
                    return Err(ApiError::new(
                        "invalid",
                        "the command line is longer than 64 KiB",
                    ));
                }
                (vec!["/bin/sh".into(), "-c".into(), cmd], false)
            }
            Gateway::Subsystem(s) if s == "sftp" => {
                (vec!["/usr/lib/openssh/sftp-server".into()], true)
            }
            Gateway::Subsystem(s) => {
                return Err(ApiError::new(
                    "invalid",
                    format!("no subsystem {s:?}; sftp is served"),
                ));
            }
        };
        let pty = io.pty.clone();
        self.exec_in(&m, argv, pty, kill, io).await
    }

    /// Runs `argv` in `m` through its agent, passing input and output through.
    async fn exec_in(
        &self,
        m: &Machine,
        argv: Vec<String>,
        pty: Option<Pty>,
        kill_on_disconnect: bool,
        io: &mut Io,
    ) -> Res<i32> {
        let agent = self.worker.agent(m.id);
        let req = AgentRequest::Exec {
            argv,
            env: vec![(
                "TERM".into(),
                pty.as_ref().map_or("dumb".into(), |p| p.term.clone()),
            )],
            cwd: Some("/root".into()),
            user: None,
            pty,
            kill_on_disconnect,
        };
        let s = tokio::task::spawn_blocking(move || agent.open(&req))
            .await
            .map_err(|e| ApiError::new("internal", e.to_string()))?
            .map_err(|e| ApiError::new("unavailable", format!("{}'s agent: {e}", m.name)))?;
        s.set_nonblocking(true)
            .map_err(|e| ApiError::new("internal", e.to_string()))?;
        let s = tokio::net::UnixStream::from_std(s)
            .map_err(|e| ApiError::new("internal", e.to_string()))?;
        let (rd, mut wr) = s.into_split();
        let mut frames = frame_reader(rd);
        let mut input_open = true;
        loop {
            tokio::select! {
                f = frames.recv() => match f.transpose() {
                    Ok(Some((Kind::Stdout, d))) => {
                        if io.out.send(Out::Stdout(d)).await.is_err() { return Ok(255) }
                    }
                    Ok(Some((Kind::Stderr, d))) => {
                        if io.out.send(Out::Stderr(d)).await.is_err() { return Ok(255) }
                    }
                    Ok(Some((Kind::Exit, p))) => {
                        let st: ExitStatus = serde_json::from_slice(&p)
                            .map_err(|e| ApiError::new("internal", e.to_string()))?;
                        return Ok(match st.signal { Some(sig) => 128 + sig, None => st.code });
                    }
                    Ok(Some((Kind::Response, p))) => {
                        let r: Response = serde_json::from_slice(&p)
                            .map_err(|e| ApiError::new("internal", e.to_string()))?;
                        return Err(ApiError::new("exec_failed", r.error.unwrap_or_else(|| "the command did not start".into())));
                    }
                    Ok(_) | Err(_) => return Err(ApiError::new("unavailable", format!("lost {}'s agent mid-command", m.name))),
                },
                i = io.input.recv(), if input_open => match i {
                    Some(In::Data(d)) => {
                        if write_frame(&mut wr, Kind::Stdin, &d).await.is_err() { input_open = false }
                    }
                    Some(In::Eof) => {
                        let _ = write_frame(&mut wr, Kind::StdinEof, &[]).await;
                        input_open = false;
                    }
                    Some(In::Resize { rows, cols }) => {
                        let b = serde_json::to_vec(&Resize { rows, cols }).expect("json");
                        let _ = write_frame(&mut wr, Kind::Resize, &b).await;
                    }
                    // The client went away: the agent keeps the command running
                    // unless it was asked to kill it.
                    None => return Ok(255),
                },
            }
        }
    }
}

/// Frames read from `r` by a task of their own, so that a `select!` on them is
/// cancel-safe (a frame read half-way is never lost). Ends with the stream or an error.
pub fn frame_reader(
    mut r: impl AsyncRead + Unpin + Send + 'static,
) -> mpsc::Receiver<std::io::Result<(Kind, Vec<u8>)>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let f = read_frame(&mut r).await;
            let end = !matches!(f, Ok(Some(_)));
            let item = match f {
                Ok(Some(frame)) => Ok(frame),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    rx
}

/// Reads one agent-protocol frame (`len:u32le kind:u8 payload`).
pub async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<(Kind, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > boxd_agent::proto::FRAME_MAX {
        return Err(std::io::Error::other(format!("bad frame length {len}")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    let kind = Kind::from_u8(buf[0]).ok_or_else(|| std::io::Error::other("unknown frame kind"))?;
    buf.remove(0);
    Ok(Some((kind, buf)))
}

pub async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(5 + payload.len());
    b.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    b.push(kind as u8);
    b.extend_from_slice(payload);
    w.write_all(&b).await
}

/// A name like `quiet-river-4821` for a machine created without one.
/// How long ago `since_ms` was, the way `ls` shows it: 42s, 5m, 3h, 2d.
fn age(since_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if since_ms == 0 {
        return "-".into();
    }
    let s = now.saturating_sub(since_ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn generated_name() -> String {
    const A: [&str; 16] = [
        "quiet", "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "kind", "lively",
        "merry", "nimble", "proud", "silly", "witty", "zesty",
    ];
    const B: [&str; 16] = [
        "river", "meadow", "falcon", "harbor", "canyon", "forest", "island", "lagoon", "mountain",
        "orchard", "prairie", "summit", "tundra", "valley", "willow", "glacier",
    ];
    let mut r = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut r);
    }
    format!(
        "{}-{}-{}",
        A[(r[0] & 15) as usize],
        B[(r[1] & 15) as usize],
        u16::from_le_bytes([r[2], r[3]]) % 10_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_like_a_shell_and_keep_the_exec_tail_verbatim() {
        let (argv, tail) = split_command("exec app -- 'echo $HOME; exit 3'").unwrap();
        assert_eq!(argv, ["exec", "app", "--", "echo $HOME; exit 3"]);
        assert_eq!(tail.as_deref(), Some("'echo $HOME; exit 3'"));
        let (argv, tail) = split_command("new --name=x --json").unwrap();
        assert_eq!(argv, ["new", "--name=x", "--json"]);
        assert_eq!(tail, None);
        assert_eq!(
            split_command("ls 'unterminated").unwrap_err().code,
            "invalid"
        );
        let huge = "x".repeat(MAX_COMMAND + 1);
        let e = split_command(&huge).unwrap_err();
        assert!(e.message.contains("64 KiB"), "{}", e.message);
    }

    #[test]
    fn every_verb_parses_and_flags_are_checked() {
        let good = [
            "new",
            "new --name=a --cpus 2 --memory 2G --disk 100G --no-wait",
            "ls --json",
            "info a",
            "exec a -- uname -a",
            "exec a -t --kill-on-disconnect -- sh",
            "console a -f --bytes 100",
            "expose a 8080",
            "keys add ssh-ed25519 AAAA c",
            "keys rm SHA256:x",
            "keys",
            "audit --limit 3",
            "help new",
            "rm a",
            "start a",
            "pause a",
            "suspend a",
            "stop a",
            "restart a",
            "ssh a",
            "unexpose a 8080",
            "web a",
            "web a private",
            "domain add a www.example.com",
            "domain rm a www.example.com",
            "whoami",
            "quota",
            "register TOKEN",
        ];
        for line in good {
            let argv = shlex::split(line).unwrap();
            assert!(ApiCli::try_parse_from(&argv).is_ok(), "{line}");
        }
        // Every verb has a line above: a new verb needs one.
        let verbs: Vec<String> = <ApiCli as clap::CommandFactory>::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert!(verbs.len() >= 21, "{verbs:?}");
        for v in &verbs {
            assert!(
                good.iter()
                    .any(|l| l.split_whitespace().next() == Some(v.as_str())),
                "verb {v} has no line in this test"
            );
        }
        for line in [
            "frobnicate",
            "ls --nope",
            "info",
            "expose a 99999",
            "new --cpus x",
        ] {
            let argv = shlex::split(line).unwrap();
            assert!(ApiCli::try_parse_from(&argv).is_err(), "{line}");
        }
    }

    #[test]
    fn generated_names_are_dns_labels() {
        for _ in 0..100 {
            let n = generated_name();
            assert!(
                n.len() <= 63 && !n.starts_with('-') && !n.ends_with('-'),
                "{n}"
            );
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{n}"
            );
        }
    }
}
