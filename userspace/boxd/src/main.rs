//! `boxd`: every role of a boxd host in one binary, chosen by subcommand.

mod bpf;
mod certs;
mod cluster;
mod dns;
mod net;
mod proxy;
mod reconcile;
mod remote;
mod server;
mod signals;
mod vmm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "boxd",
    version,
    about = "Instant remote computers: persistent, forkable Linux VMs over SSH"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The per-VM monitor: run a VM, or control a running one.
    Vmm {
        #[command(subcommand)]
        command: vmm::VmmCommand,
    },
    /// The vhost-user network backend.
    Net {
        #[command(subcommand)]
        command: net::NetCommand,
    },
    /// The eBPF data path: set up, program and read the XDP/TC programs and their maps.
    Bpf {
        #[command(flatten)]
        pin: bpf::Pin,
        #[command(subcommand)]
        command: bpf::BpfCommand,
    },
    /// The control plane's cluster: create, join, inspect, change membership.
    Cluster {
        #[command(flatten)]
        dir: cluster::DataDir,
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Run a control-plane node (Raft over QUIC, the replicated state, the admin socket).
    Control {
        #[command(flatten)]
        dir: cluster::DataDir,
        #[command(subcommand)]
        command: cluster::ControlCommand,
    },
    /// Authoritative DNS: serve a zone file (`boxd server` serves the machines' zone).
    Dns {
        #[command(subcommand)]
        command: dns::DnsCommand,
    },
    /// The HTTPS proxy: serve a fixed routes file (`boxd server` proxies its machines).
    Proxy {
        #[command(subcommand)]
        command: proxy::ProxyCommand,
    },
    /// The in-guest agent (started by systemd inside every VM).
    Agent,
    /// Run a whole single node: control plane, worker, network, SSH API (port 2222).
    Server(server::ServerArgs),
}

/// mimalloc: the proxy's request path allocates and frees small buffers on every
/// request (headers, URIs, bodies' frames); glibc's malloc took about 3% of its CPU time
/// there, mimalloc's thread-local free lists about a third of that.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOXD_LOG")
                .unwrap_or_else(|_| "info,openraft=warn,quinn_udp=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person: logs in files and journald stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // API verbs (`boxd new`, `boxd ls --json`, ...) go to the host: over vsock from
    // inside a machine, over SSH with BOXD_HOST elsewhere.
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A CLI whose output is piped into `head` exits quietly when the pipe closes; the
    // daemons (server, proxy, DNS, network backend, VMM, agent) keep Rust's ignored
    // SIGPIPE, or a client that resets a connection mid-write would kill them.
    let cli = args.first().is_some_and(|a| {
        remote::VERBS.contains(&a.as_str()) || matches!(a.as_str(), "bpf" | "cluster")
    });
    if cli {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if args
        .first()
        .is_some_and(|a| remote::VERBS.contains(&a.as_str()))
    {
        match remote::main(args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("boxd: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let result = match Cli::parse().command {
        Command::Vmm { command } => vmm::main(command),
        Command::Net { command } => net::main(command),
        Command::Bpf { pin, command } => bpf::main(pin, command),
        Command::Cluster { dir, command } => cluster::main(dir, command),
        Command::Control { dir, command } => cluster::control_main(dir, command),
        Command::Dns { command } => dns::main(command),
        Command::Proxy { command } => proxy::main(command),
        Command::Agent => boxd_agent::server::run()
            .map(|()| 0)
            .map_err(|e| anyhow::anyhow!("agent: {e}")),
        Command::Server(args) => server::main(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("boxd: {e:#}");
            std::process::exit(1);
        }
    }
}

/// What a subcommand's `main` returns: the process exit code.
pub type Exit = anyhow::Result<i32>;

/// Prints rows as an aligned table (the first row is the header).
pub fn table(rows: Vec<Vec<String>>) {
    print!("{}", table_string(rows));
}

/// Rows as an aligned table, one line each.
pub fn table_string(rows: Vec<Vec<String>>) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
