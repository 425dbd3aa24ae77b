//! `boxd agent`: the guest side. Started early by systemd, it tells the host it is up
//! (vsock port READY_PORT), then serves one request per vsock connection on AGENT_PORT.

use crate::proto::*;
use crate::vsock;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests served at once; more connections are refused until some end.
const CONNECTIONS_MAX: usize = 256;
/// After a command exits, how long its output pipes may stay open (a daemonised
/// grandchild can hold them) before the agent stops reading them and reports the exit.
const OUTPUT_DRAIN_MAX: Duration = Duration::from_secs(2);

/// Runs the agent until the process is killed.
pub fn run() -> io::Result<()> {
    let listener = vsock::Listener::bind(AGENT_PORT)?;
    std::thread::spawn(report_ready);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            let mut c = conn;
            let _ = write_json(
                &mut c,
                Kind::Response,
                &Response::error("agent busy: too many requests at once"),
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let active = active.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                if let Err(e) = serve(conn) {
                    tracing::debug!("connection ended: {e}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::error!("cannot start a thread for a request");
        }
    }
}

pub fn info() -> Info {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Info {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        hostname: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        uptime_s: read("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
    }
}

/// Tells the host the agent is up: one JSON line to host port READY_PORT. Retried
/// (bounded) in case the host end is not listening yet.
fn report_ready() {
    for attempt in 0..50u32 {
        if let Ok(mut c) = vsock::connect_host(READY_PORT) {
            let mut line = serde_json::to_vec(&info()).unwrap_or_default();
            line.push(b'\n');
            if c.write_all(&line).is_ok() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20 * u64::from(attempt.min(10) + 1)));
    }
    tracing::warn!("could not report readiness to the host");
}

fn serve(mut conn: File) -> io::Result<()> {
    let Some((Kind::Request, payload)) = read_frame(&mut conn)? else {
        return write_json(
            &mut conn,
            Kind::Response,
            &Response::error("expected a request frame first"),
        );
    };
    let request: Request = match parse(&payload) {
        Ok(r) => r,
        Err(e) => {
            return write_json(
                &mut conn,
                Kind::Response,
                &Response::error(format!("bad request: {e}")),
            );
        }
    };
    match request {
        Request::Ping {} => write_json(
            &mut conn,
            Kind::Response,
            &Response {
                info: Some(info()),
                ..Response::ok()
            },
        ),
        Request::Exec {
            argv,
            env,
            cwd,
            user,
            pty,
            kill_on_disconnect,
        } => exec(
            conn,
            ExecSpec {
                argv,
                env,
                cwd,
                user,
                pty,
                kill_on_disconnect,
            },
        ),
        Request::WriteFile {
            path,
            mode,
            create_dirs,
        } => {
            let r = write_file(&mut conn, &path, mode, create_dirs);
            write_json(
                &mut conn,
                Kind::Response,
                &r.unwrap_or_else(|e| Response::error(format!("write {path}: {e}"))),
            )
        }
        Request::ReadFile { path } => read_file(&mut conn, &path),
        Request::SetHostname { hostname } => {
            let r = set_hostname(&hostname)
                .map(|()| Response::ok())
                .unwrap_or_else(Response::error);
            write_json(&mut conn, Kind::Response, &r)
        }
        Request::InstallKeys { user, keys } => {
            let r = install_keys(&user, &keys)
                .map(|()| Response::ok())
                .unwrap_or_else(Response::error);
            write_json(&mut conn, Kind::Response, &r)
        }
        Request::Shutdown { reboot } => {
            write_json(&mut conn, Kind::Response, &Response::ok())?;
            drop(conn);
            let verb = if reboot { "reboot" } else { "poweroff" };
            if Command::new("systemctl")
                .arg(verb)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            // No systemd: do it ourselves after syncing.
            // SAFETY: sync and reboot have no memory preconditions.
            unsafe {
                libc::sync();
                libc::reboot(if reboot {
                    libc::RB_AUTOBOOT
                } else {
                    libc::RB_POWER_OFF
                });
            }
            Ok(())
        }
    }
}

struct ExecSpec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
    pty: Option<Pty>,
    kill_on_disconnect: bool,
}

struct Account {
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
    name: String,
}

fn lookup_user(name: &str) -> Result<Account, String> {
    let c = CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy what we
    // need before any other call could overwrite it (the agent calls it from one
    // request thread at a time per request, and only reads).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(format!("no user {name:?} in this machine"));
    }
    // SAFETY: non-null result of getpwnam: valid passwd struct with C strings.
    unsafe {
        let s = |p: *const libc::c_char| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        Ok(Account {
            uid: (*pw).pw_uid,
            gid: (*pw).pw_gid,
            home: s((*pw).pw_dir),
            shell: s((*pw).pw_shell),
            name: name.into(),
        })
    }
}

type Writer = Arc<Mutex<File>>;

fn send(w: &Writer, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut f = w
        .lock()
        .map_err(|_| io::Error::other("writer lock poisoned"))?;
    write_frame(&mut *f, kind, payload)
}

fn exec(conn: File, spec: ExecSpec) -> io::Result<()> {
    let writer: Writer = Arc::new(Mutex::new(conn.try_clone()?));
    let reply_error = |msg: String| {
        send(
            &writer,
            Kind::Response,
            &serde_json::to_vec(&Response::error(msg)).unwrap_or_default(),
        )
    };
    if spec.argv.is_empty() {
        return reply_error("exec needs a command".into());
    }
    let account = match lookup_user(spec.user.as_deref().unwrap_or("root")) {
        Ok(a) => a,
        Err(e) => return reply_error(e),
    };
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", &account.home)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        .env("SHELL", &account.shell)
        .env("LANG", "C.UTF-8")
        .current_dir(spec.cwd.as_deref().unwrap_or(&account.home));
    if let Some(p) = &spec.pty {
        cmd.env("TERM", &p.term);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let (uid, gid) = (account.uid, account.gid);
    let user_c = CString::new(account.name.clone()).unwrap_or_default();
    let pty = match &spec.pty {
        Some(p) => match open_pty(p.rows, p.cols) {
            Ok(pair) => Some(pair),
            Err(e) => return reply_error(format!("cannot allocate a terminal: {e}")),
        },
        None => None,
    };
    let slave_fd = pty.as_ref().map(|(_, s)| s.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (setsid, ioctl, setgroups-family, setgid, setuid).
    unsafe {
        cmd.pre_exec(move || {
            // Own session and process group, so the whole job can be signalled.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if slave_fd.is_some() && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if uid != 0
                && (libc::initgroups(user_c.as_ptr(), gid) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut master = None;
    if let Some((m, s)) = pty {
        cmd.stdin(Stdio::from(s.try_clone()?))
            .stdout(Stdio::from(s.try_clone()?))
            .stderr(Stdio::from(s));
        master = Some(m);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return reply_error(format!("cannot run {:?}: {e}", spec.argv[0])),
    };
    // The command's stdin: a pipe, or the terminal's master side.
    let mut stdin: Option<Box<dyn Write + Send>> = match (&master, child.stdin.take()) {
        (Some(m), _) => Some(Box::new(m.try_clone()?)),
        (None, Some(pipe)) => Some(Box::new(pipe)),
        (None, None) => None,
    };
    let mut pumps = Vec::new();
    let outputs: Vec<(Box<dyn Read + Send>, Kind)> = match &master {
        Some(m) => vec![(Box::new(m.try_clone()?), Kind::Stdout)],
        None => {
            let mut v: Vec<(Box<dyn Read + Send>, Kind)> = Vec::new();
            if let Some(o) = child.stdout.take() {
                v.push((Box::new(o), Kind::Stdout));
            }
            if let Some(e) = child.stderr.take() {
                v.push((Box::new(e), Kind::Stderr));
            }
            v
        }
    };
    for (mut source, kind) in outputs {
        let w = writer.clone();
        pumps.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let mut client_gone = false;
            loop {
                match source.read(&mut buf) {
                    // EIO is how a terminal says its last slave closed.
                    Ok(0) | Err(_) => break,
                    Ok(n) if !client_gone => client_gone = send(&w, kind, &buf[..n]).is_err(),
                    // Nobody to send to: keep draining so the command never blocks.
                    Ok(_) => {}
                }
            }
        }));
    }
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter_conn = conn.try_clone()?;
    let waiter_writer = writer.clone();
    std::thread::spawn(move || {
        let status = child.wait();
        let code = match &status {
            Ok(s) => ExitStatus {
                code: s.code().unwrap_or(128 + s.signal().unwrap_or(0)),
                signal: s.signal(),
            },
            Err(_) => ExitStatus {
                code: 255,
                signal: None,
            },
        };
        // Give the pumps the rest of the output, but not forever.
        let deadline = std::time::Instant::now() + OUTPUT_DRAIN_MAX;
        for p in pumps {
            while !p.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = send(
            &waiter_writer,
            Kind::Exit,
            &serde_json::to_vec(&code).unwrap_or_default(),
        );
        vsock::shutdown(&waiter_conn, libc::SHUT_RDWR);
        let _ = done_tx.send(());
    });

    // This thread: the client's input until it or the command ends.
    let mut reader = conn;
    loop {
        match read_frame(&mut reader) {
            Ok(Some((Kind::Stdin, data))) => {
                if let Some(s) = stdin.as_mut()
                    && s.write_all(&data).is_err()
                {
                    stdin = None;
                }
            }
            Ok(Some((Kind::StdinEof, _))) => {
                if master.is_some() {
                    // A terminal has no half-close; ^D is how it says end of input.
                    if let Some(s) = stdin.as_mut() {
                        let _ = s.write_all(&[4]);
                    }
                } else {
                    stdin = None;
                }
            }
            Ok(Some((Kind::Resize, data))) => {
                if let (Some(m), Ok(r)) = (&master, parse::<Resize>(&data)) {
                    set_winsize(m, r.rows, r.cols);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                // The client went away (or the waiter closed the socket after exit).
                if done_rx.try_recv().is_err() && spec.kill_on_disconnect {
                    // SAFETY: signalling the process group the command leads.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                break;
            }
        }
    }
    drop(stdin);
    Ok(())
}

fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    let mut master = 0;
    let mut slave = 0;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the provided ints; name and termios
    // pointers may be null; the winsize pointer is valid for the call.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh from openpty and owned by us.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &s] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((File::from(m), File::from(s)))
}

fn set_winsize(master: &File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that is valid for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

fn write_file(conn: &mut File, path: &str, mode: u32, create_dirs: bool) -> io::Result<Response> {
    let target = Path::new(path);
    if !target.is_absolute() {
        return Ok(Response::error(format!("{path}: use an absolute path")));
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    if create_dirs {
        std::fs::create_dir_all(dir)?;
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.boxd-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let mut bytes = 0u64;
    let result = (|| -> io::Result<()> {
        loop {
            match read_frame(conn)? {
                Some((Kind::Data, chunk)) => {
                    file.write_all(&chunk)?;
                    bytes += chunk.len() as u64;
                }
                Some((Kind::DataEnd, _)) => break,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client stopped before the end of the file",
                    ));
                }
            }
        }
        file.sync_all()?;
        std::fs::set_permissions(
            &tmp,
            std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
        )?;
        std::fs::rename(&tmp, target)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself is durable only once the directory is synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Response {
        bytes: Some(bytes),
        ..Response::ok()
    })
}

fn read_file(conn: &mut File, path: &str) -> io::Result<()> {
    let opened = File::open(path).and_then(|f| {
        let m = f.metadata()?;
        if m.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            ));
        }
        Ok((f, m))
    });
    let (mut f, meta) = match opened {
        Ok(x) => x,
        Err(e) => {
            return write_json(
                conn,
                Kind::Response,
                &Response::error(format!("read {path}: {e}")),
            );
        }
    };
    use std::os::unix::fs::PermissionsExt;
    write_json(
        conn,
        Kind::Response,
        &Response {
            bytes: Some(meta.len()),
            mode: Some(meta.permissions().mode()),
            ..Response::ok()
        },
    )?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        write_frame(conn, Kind::Data, &buf[..n])?;
    }
    write_frame(conn, Kind::DataEnd, &[])
}

/// RFC 1123 host name: dot-separated labels of letters, digits and hyphens.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn set_hostname(hostname: &str) -> Result<(), String> {
    if !valid_hostname(hostname) {
        return Err(format!(
            "{hostname:?} is not a valid host name (letters, digits, '-', dots; at most 63 per label)"
        ));
    }
    // SAFETY: the pointer and length describe `hostname`'s bytes for the call.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(format!("sethostname: {}", io::Error::last_os_error()));
    }
    std::fs::write("/etc/hostname", format!("{hostname}\n"))
        .map_err(|e| format!("/etc/hostname: {e}"))?;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let short = hostname.split('.').next().unwrap_or(hostname);
    let mut lines: Vec<String> = hosts
        .lines()
        .filter(|l| !l.starts_with("127.0.1.1"))
        .map(str::to_string)
        .collect();
    lines.push(format!("127.0.1.1\t{hostname} {short}"));
    std::fs::write("/etc/hosts", lines.join("\n") + "\n")
        .map_err(|e| format!("/etc/hosts: {e}"))?;
    Ok(())
}

/// An OpenSSH public key line: `type base64 [comment]`, no newlines.
pub fn valid_public_key(k: &str) -> bool {
    let mut parts = k.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let body = parts.next().unwrap_or("");
    !k.contains(['\n', '\r', '\0'])
        && (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && body.len() >= 16
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
}

fn install_keys(user: &str, keys: &[String]) -> Result<(), String> {
    if let Some(bad) = keys.iter().find(|k| !valid_public_key(k)) {
        return Err(format!(
            "not an OpenSSH public key: {:?}",
            bad.chars().take(40).collect::<String>()
        ));
    }
    let account = lookup_user(user)?;
    let dir = Path::new(&account.home).join(".ssh");
    let chown = |p: &Path| -> Result<(), String> {
        std::os::unix::fs::chown(p, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("chown {}: {e}", p.display()))
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    chown(&dir)?;
    let file = dir.join("authorized_keys");
    let tmp = dir.join(".authorized_keys.boxd");
    let mut content = keys.join("\n");
    content.push('\n');
    std::fs::write(&tmp, content).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    chown(&tmp)?;
    std::fs::rename(&tmp, &file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_and_keys_are_validated() {
        assert!(valid_hostname("my-app"));
        assert!(valid_hostname("a.b-c.d"));
        for bad in [
            "",
            "-x",
            "x-",
            "a..b",
            "spa ce",
            &"x".repeat(64),
            "under_score",
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
        assert!(valid_public_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk9 me@laptop"
        ));
        assert!(!valid_public_key("ssh-ed25519 AAAA\nssh-rsa BBBB"));
        assert!(!valid_public_key(
            "command=\"rm -rf /\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk9"
        ));
        assert!(!valid_public_key("hello world"));
    }
}
