//! Small helpers shared by every xtask: paths, running commands, hashing, progress.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};
use std::time::Instant;

pub use boxd_testkit::target_dir;

/// Where built guest images and their caches live.
pub fn images_dir() -> PathBuf {
    target_dir().join("images")
}

/// Runs a command to completion, inheriting stdio; fails with the command line on error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd.status().with_context(|| {
        format!("could not start `{shown}`; is it installed? (cargo xtask setup)")
    })?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout; on failure shows its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("could not start `{shown}`; is it installed? (cargo xtask setup)")
    })?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command quietly; its output is shown only when it fails.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(|_| ())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// SHA-256 of a file's content, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("open {} to hash it", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A short content key over several named inputs (order matters).
pub fn hash_parts(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..8])
}

/// One progress line per step, with its duration when done.
pub struct Step {
    what: String,
    started: Instant,
}

impl Step {
    pub fn start(what: impl Into<String>) -> Self {
        let what = what.into();
        eprintln!("==> {what}");
        Self {
            what,
            started: Instant::now(),
        }
    }

    pub fn done(self) {
        eprintln!(
            "    {} done in {:.1}s",
            self.what,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Writes `content` to `path` via a temporary file and rename, so readers never see
/// half a file and an interrupted build leaves no corrupt cache entry.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename into {}", path.display()))?;
    Ok(())
}

/// Points `link` at `target` (replacing an older link atomically).
pub fn symlink_force(target: &Path, link: &Path) -> Result<()> {
    let tmp = link.with_extension("lnk-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("symlink {} -> {}", tmp.display(), target.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("rename into {}", link.display()))?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
