//! One cgroup per VMM process, with cpu, memory and pids limits.
//!
//! cgroup v2 is the target (`/sys/fs/cgroup/boxd/<vm>`); hosts still on the v1 layout
//! get the same three limits in the v1 controllers. The VMM moves itself in before it
//! allocates guest memory, so every page the guest touches is charged to the VM, and
//! moves itself back out and removes the group when it ends, leaving nothing behind.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const GROUP: &str = "boxd";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CgroupLimits {
    /// CPU time: this many CPUs' worth.
    pub cpus: u32,
    pub memory_bytes: u64,
    pub pids: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup {path}: {source}; run the VMM as root, or pass --no-cgroup to run without limits"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no usable cgroup hierarchy at {ROOT}; mount cgroup2 there, or pass --no-cgroup")]
    NoHierarchy,
    #[error("VM name {0:?} cannot name a cgroup: use letters, digits, '-', '_' and '.' only")]
    BadName(String),
    #[error(
        "a VM named {name:?} is already running on this host (pid {pids}); stop it or pick another name"
    )]
    InUse { name: String, pids: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

/// A cgroup (or, on v1, one per controller) holding this process.
pub struct Cgroup {
    /// Groups created, innermost last per controller.
    dirs: Vec<PathBuf>,
    /// Where this process was before, to go back to on drop: (procs file, ...).
    origins: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates the VM's cgroup, applies the limits and moves this process into it.
    pub fn enter(name: &str, limits: &CgroupLimits) -> Result<Self, CgroupError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || name.starts_with('.')
        {
            return Err(CgroupError::BadName(name.to_string()));
        }
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            Self::enter_v2(root, name, limits)
        } else if root.join("memory").is_dir()
            && root.join("cpu").is_dir()
            && root.join("pids").is_dir()
        {
            Self::enter_v1(root, name, limits)
        } else {
            Err(CgroupError::NoHierarchy)
        }
    }

    fn enter_v2(root: &Path, name: &str, limits: &CgroupLimits) -> Result<Self, CgroupError> {
        let origin = own_v2_cgroup(root)?;
        let parent = root.join(GROUP);
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        // Controllers must be enabled top-down for the leaf to have them.
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory +pids");
        write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
        let dir = parent.join(name);
        claim(&dir, name)?;
        let me = Self {
            dirs: vec![dir.clone()],
            origins: vec![origin.join("cgroup.procs")],
        };
        let period = 100_000u64;
        write(
            &dir.join("cpu.max"),
            &format!("{} {period}", u64::from(limits.cpus) * period),
        )?;
        write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        write(&dir.join("pids.max"), &limits.pids.to_string())?;
        // Swapping a guest's memory would make it slow in ways it cannot see.
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        write(&dir.join("cgroup.procs"), &std::process::id().to_string())?;
        Ok(me)
    }

    fn enter_v1(root: &Path, name: &str, limits: &CgroupLimits) -> Result<Self, CgroupError> {
        let mut me = Self {
            dirs: Vec::new(),
            origins: Vec::new(),
        };
        let period = 100_000u64;
        let settings: [(&str, Vec<(&str, String)>); 3] = [
            (
                "cpu",
                vec![
                    ("cpu.cfs_period_us", period.to_string()),
                    (
                        "cpu.cfs_quota_us",
                        (u64::from(limits.cpus) * period).to_string(),
                    ),
                ],
            ),
            (
                "memory",
                vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
            ),
            ("pids", vec![("pids.max", limits.pids.to_string())]),
        ];
        for (controller, files) in settings {
            let hierarchy = root.join(controller);
            let origin = own_v1_cgroup(&hierarchy, controller)?;
            let dir = hierarchy.join(GROUP).join(name);
            std::fs::create_dir_all(hierarchy.join(GROUP)).map_err(io(&dir))?;
            claim(&dir, name)?;
            me.dirs.push(dir.clone());
            me.origins.push(origin.join("cgroup.procs"));
            for (file, value) in files {
                write(&dir.join(file), &value)?;
            }
            write(&dir.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        Ok(me)
    }

    #[cfg(test)]
    pub fn paths(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        for origin in &self.origins {
            let _ = std::fs::write(origin, &pid);
        }
        for dir in &self.dirs {
            // Other threads may still be moving out; a few tries are enough.
            for _ in 0..10 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Creates the VM's group. One left by a VMM that was killed (no processes in it) is
/// replaced; one with processes belongs to a running VM of the same name.
fn claim(dir: &Path, name: &str) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(CgroupError::Io {
                path: dir.to_path_buf(),
                source: e,
            });
        }
        Err(_) => {}
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let pids: Vec<&str> = procs.split_whitespace().collect();
    if !pids.is_empty() {
        return Err(CgroupError::InUse {
            name: name.to_string(),
            pids: pids.join(", "),
        });
    }
    tracing::info!(cgroup = %dir.display(), "replacing the cgroup a killed VMM left behind");
    std::fs::remove_dir(dir).map_err(io(dir))?;
    std::fs::create_dir(dir).map_err(io(dir))
}

/// This process's cgroup in the v2 hierarchy.
fn own_v2_cgroup(root: &Path) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoHierarchy)?;
    Ok(root.join(rel.trim_start_matches('/')))
}

fn own_v1_cgroup(hierarchy: &Path, controller: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, rel) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if controllers.split(',').any(|c| c == controller) {
            return Ok(hierarchy.join(rel.trim_start_matches('/')));
        }
    }
    Ok(hierarchy.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entering a cgroup moves the whole test process, so these tests take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn limits() -> CgroupLimits {
        CgroupLimits {
            cpus: 1,
            memory_bytes: 256 << 20,
            pids: 4096,
        }
    }

    /// A group left behind by a killed VMM is taken over; a live one is refused.
    #[test]
    fn leftover_groups_are_replaced_and_live_ones_refused() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if unsafe_is_not_root() {
            boxd_testkit::skip!("cgroups need root");
        }
        let root = Path::new(ROOT);
        let name = format!("test-left-{}", std::process::id());
        // What SIGKILL leaves: the VM's group(s), empty.
        let leftovers: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
            vec![root.join(GROUP).join(&name)]
        } else if root.join("memory").is_dir() {
            ["cpu", "memory", "pids"]
                .iter()
                .map(|c| root.join(c).join(GROUP).join(&name))
                .collect()
        } else {
            boxd_testkit::skip!("no cgroup hierarchy here");
        };
        for d in &leftovers {
            std::fs::create_dir_all(d).unwrap();
        }
        let cg = Cgroup::enter(&name, &limits()).expect("a leftover group is replaced");
        // While this process is inside, a second VMM of the same name is refused.
        let e = Cgroup::enter(&name, &limits()).err().expect("refused");
        assert!(matches!(e, CgroupError::InUse { .. }), "{e}");
        assert!(
            e.to_string().contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(cg);
        for d in leftovers {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }

    #[test]
    fn names_are_checked_before_anything_is_created() {
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(
                matches!(Cgroup::enter(bad, &limits()), Err(CgroupError::BadName(_))),
                "{bad}"
            );
        }
    }

    /// Real cgroups: enter, see the limits and our pid, leave, and find nothing left.
    /// Needs root and a writable cgroup hierarchy; says so when it has neither.
    #[test]
    fn entering_applies_limits_and_leaving_removes_the_group() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if unsafe_is_not_root() {
            boxd_testkit::skip!("cgroups need root");
        }
        let name = format!("test-{}", std::process::id());
        let cg = match Cgroup::enter(&name, &limits()) {
            Ok(cg) => cg,
            Err(CgroupError::NoHierarchy) => {
                boxd_testkit::skip!("no cgroup hierarchy here");
            }
            Err(e) => panic!("{e}"),
        };
        let dirs = cg.paths().to_vec();
        assert!(!dirs.is_empty());
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(own.contains(&name), "{own}");
        let memory_limit = dirs
            .iter()
            .find_map(|d| {
                std::fs::read_to_string(d.join("memory.max"))
                    .or_else(|_| std::fs::read_to_string(d.join("memory.limit_in_bytes")))
                    .ok()
            })
            .expect("a memory limit file");
        assert_eq!(memory_limit.trim(), (256u64 << 20).to_string());
        let read_any = |files: &[&str]| {
            dirs.iter()
                .find_map(|d| {
                    files
                        .iter()
                        .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
                })
                .unwrap_or_else(|| panic!("none of {files:?} in {dirs:?}"))
        };
        assert_eq!(read_any(&["pids.max"]).trim(), "4096");
        // One vCPU's worth of CPU time per period: cgroup v2 writes both in cpu.max.
        let cpu = read_any(&["cpu.max", "cpu.cfs_quota_us"]);
        assert!(
            cpu.trim() == "100000 100000" || cpu.trim() == "100000",
            "cpu limit {cpu:?}"
        );
        drop(cg);
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        assert!(
            !std::fs::read_to_string("/proc/self/cgroup")
                .unwrap()
                .contains(&name)
        );
    }

    fn unsafe_is_not_root() -> bool {
        // SAFETY: geteuid cannot fail and has no preconditions.
        unsafe { libc::geteuid() != 0 }
    }
}
