//! The `boxd` CLI's API verbs (`boxd new`, `boxd ls`, ...). Inside a machine they go to
//! the host over the machine's own vsock API port, with no token: the host knows the
//! machine by the channel the call arrives on. Elsewhere, with `BOXD_HOST` set, they run
//! over SSH (`ssh -p $BOXD_PORT $BOXD_HOST VERB ...`), the same commands either way.

use crate::Exit;
use crate::server::MachineCall;
use crate::server::worker::API_PORT;
use anyhow::{Context, bail};
use boxd_agent::proto::{ExitStatus, Kind, Pty, parse, read_frame, write_frame, write_json};
use std::io::{IsTerminal, Read, Write};

/// The verbs that are API commands rather than local roles.
pub const VERBS: &[&str] = &[
    "new", "ls", "info", "rm", "start", "stop", "pause", "suspend", "restart", "exec", "ssh",
    "console", "expose", "unexpose", "web", "domain", "keys", "whoami", "quota", "audit",
    "register",
];

pub fn main(argv: Vec<String>) -> Exit {
    if let Ok(host) = std::env::var("BOXD_HOST") {
        let port = std::env::var("BOXD_PORT").unwrap_or_else(|_| "2222".into());
        let line =
            shlex::try_join(argv.iter().map(String::as_str)).context("quote the command line")?;
        let mut cmd = std::process::Command::new("ssh");
        cmd.args(["-p", &port]);
        if std::io::stdin().is_terminal() {
            cmd.arg("-t");
        }
        let st = cmd
            .arg(&host)
            .arg(line)
            .status()
            .context("run ssh (is OpenSSH's client installed?)")?;
        return Ok(st.code().unwrap_or(255));
    }
    let conn = boxd_agent::vsock::connect_host(API_PORT).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the boxd host ({e}): inside a machine this CLI talks to the host over vsock; \
             elsewhere set BOXD_HOST=host (and BOXD_PORT if it is not 2222)"
        )
    })?;
    let pty = std::io::stdin().is_terminal().then(|| Pty {
        rows: 24,
        cols: 80,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
    });
    let mut w = conn.try_clone()?;
    write_json(&mut w, Kind::Request, &MachineCall { argv, pty })?;
    // stdin -> host, on its own thread (the process exits when the command does).
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 << 10];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = write_frame(&mut w, Kind::StdinEof, &[]);
                    return;
                }
                Ok(n) => {
                    if write_frame(&mut w, Kind::Stdin, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut r = conn;
    loop {
        match read_frame(&mut r)? {
            Some((Kind::Stdout, d)) => {
                let mut o = std::io::stdout();
                o.write_all(&d)?;
                o.flush()?;
            }
            Some((Kind::Stderr, d)) => std::io::stderr().write_all(&d)?,
            Some((Kind::Exit, p)) => return Ok(parse::<ExitStatus>(&p)?.code),
            Some((k, _)) => bail!("unexpected {k:?} frame from the host"),
            None => bail!("the host closed the connection before the command finished"),
        }
    }
}
