//! The state machine: every committed command applied to SQLite, deterministically.
//!
//! One database file per node (`state.db`). A batch of log entries is applied in one
//! transaction together with the applied log id and membership, so the file is always
//! at a log boundary: after a crash the node resumes from what the file says it applied.
//! Each command runs inside a savepoint: a refusal (duplicate name, quota, exhausted
//! pool) rolls back whatever the command had done, and only the audit row and the
//! request's reply remain. Applying never reads the clock or any other local input.
//!
//! Snapshots are the database file itself (`VACUUM INTO`), so a new or lagging node
//! installs exactly the bytes the leader had.

use crate::types::*;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
     CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE teams (name TEXT PRIMARY KEY, cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL);
     CREATE TABLE users (fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                         created_ms INTEGER NOT NULL, machine_quota INTEGER NOT NULL,
                         team TEXT REFERENCES teams(name));
     CREATE TABLE keys (fingerprint TEXT PRIMARY KEY,
                        user TEXT NOT NULL REFERENCES users(fingerprint) ON DELETE CASCADE,
                        public_key TEXT NOT NULL);
     CREATE TABLE nodes (id INTEGER PRIMARY KEY, addr TEXT NOT NULL, role TEXT NOT NULL,
                         cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL,
                         healthy INTEGER NOT NULL);
     CREATE TABLE pools (name TEXT PRIMARY KEY, network INTEGER NOT NULL, prefix INTEGER NOT NULL);
     CREATE TABLE machines (name TEXT PRIMARY KEY, vid INTEGER NOT NULL UNIQUE,
                            owner TEXT NOT NULL REFERENCES users(fingerprint),
                            cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, disk_gib INTEGER NOT NULL,
                            state TEXT NOT NULL, node INTEGER NOT NULL REFERENCES nodes(id),
                            ipv4 INTEGER NOT NULL UNIQUE, domain TEXT, ports TEXT NOT NULL,
                            parent TEXT, created_ms INTEGER NOT NULL);
     CREATE INDEX machines_owner ON machines(owner);
     CREATE INDEX machines_node ON machines(node);
     CREATE TABLE allocations (ipv4 INTEGER PRIMARY KEY, pool TEXT NOT NULL REFERENCES pools(name),
                               machine TEXT NOT NULL UNIQUE);
     CREATE TABLE join_tokens (hash TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL,
                               used_by INTEGER);
     CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE revoked (id INTEGER PRIMARY KEY);
     CREATE TABLE requests (id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL, reply TEXT NOT NULL);
     CREATE INDEX requests_at ON requests(at_ms);
     CREATE TABLE audit (seq INTEGER PRIMARY KEY, idx INTEGER NOT NULL, at_ms INTEGER NOT NULL,
                         actor TEXT NOT NULL, op TEXT NOT NULL, args TEXT NOT NULL,
                         result TEXT NOT NULL);
     CREATE INDEX audit_actor ON audit(actor);",
    // 2: registration of unknown keys: invites and the allow-list.
    "CREATE TABLE invites (hash TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL, used_by TEXT);
     CREATE TABLE allowlist (fingerprint TEXT PRIMARY KEY);",
    // 3: certificates the proxies serve (and the internal CA).
    "CREATE TABLE certificates (name TEXT PRIMARY KEY, cert_pem TEXT NOT NULL,
                                key_pem TEXT NOT NULL, not_after_ms INTEGER NOT NULL,
                                issuer TEXT NOT NULL, updated_ms INTEGER NOT NULL);",
    // 4: ACME: the challenges every DNS server and proxy answers, and the accounts.
    "CREATE TABLE acme_challenges (kind TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
                                   expires_ms INTEGER NOT NULL, PRIMARY KEY (kind, name, value));
     CREATE TABLE acme_accounts (directory TEXT PRIMARY KEY, credentials TEXT NOT NULL,
                                 updated_ms INTEGER NOT NULL);
     ALTER TABLE machines ADD COLUMN web TEXT NOT NULL DEFAULT 'public';
     CREATE TABLE domains (domain TEXT PRIMARY KEY,
                           machine TEXT NOT NULL REFERENCES machines(name) ON DELETE CASCADE);
     CREATE INDEX domains_machine ON domains(machine);",
    // 5: since when a machine is in its state (`ls`/`info`, the idle policy).
    "ALTER TABLE machines ADD COLUMN state_since_ms INTEGER NOT NULL DEFAULT 0;
     UPDATE machines SET state_since_ms = created_ms;",
];

/// How long a request id is remembered for deduplication (a client retrying later than
/// this gets a second application).
pub const DEDUP_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Machines per user unless `SetQuota` says otherwise.
pub const DEFAULT_MACHINE_QUOTA: u32 = 10;
/// Exposed ports per machine.
pub const MAX_PORTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state database {path} is unreadable or corrupt ({reason}); this node cannot serve. \
         In a cluster: on a healthy node run `boxd cluster remove <this node's id>`, move \
         this data directory aside, and join again with a new token (`boxd cluster token`): \
         the state is rebuilt from the other nodes. A single-node cluster has no other copy: \
         restore the data directory from a backup"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "state database {path} has schema version {found}, newer than this boxd knows ({known}): \
         it was written by a newer boxd. Run that version (do not delete the file)"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("state database {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Opens (creating and migrating) the state database and checks its integrity.
pub fn open_db(path: &Path) -> Result<Connection, StateError> {
    let sql = |source| StateError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let conn = Connection::open(path).map_err(sql)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| corrupt(e.to_string()))?;
    if check != "ok" {
        return Err(corrupt(check));
    }
    conn.set_prepared_statement_cache_capacity(128);
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(|e| corrupt(e.to_string()))?;
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| corrupt(e.to_string()))? as usize;
    if version > MIGRATIONS.len() {
        return Err(StateError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
        conn.execute_batch(&format!(
            "BEGIN; {m}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .map_err(sql)?;
    }
    Ok(conn)
}

/// The last snapshot built or installed: its meta and the database file's bytes.
type CurrentSnapshot = (SnapshotMeta, Vec<u8>);

/// The SQLite state machine shared by the Raft core (which applies) and the node's
/// readers. One connection behind a mutex: statements are short and local.
#[derive(Clone)]
pub struct StateMachine {
    pub(crate) db: Arc<Mutex<Connection>>,
    path: PathBuf,
    snapshot: Arc<Mutex<Option<CurrentSnapshot>>>,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
    applied: tokio::sync::watch::Sender<u64>,
    /// Removed node ids, kept in memory: node RPC checks every request against it.
    revoked: Arc<std::sync::RwLock<std::collections::HashSet<NodeId>>>,
}

fn load_revoked(conn: &Connection) -> rusqlite::Result<std::collections::HashSet<NodeId>> {
    conn.prepare("SELECT id FROM revoked")?
        .query_map([], |r| r.get(0))?
        .collect()
}

impl StateMachine {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let conn = open_db(path)?;
        let applied = read_applied(&conn)
            .map_err(|e| StateError::Sql {
                path: path.to_path_buf(),
                source: e,
            })?
            .map(|l| l.index)
            .unwrap_or(0);
        let revoked = load_revoked(&conn).map_err(|e| StateError::Sql {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Self {
            revoked: Arc::new(std::sync::RwLock::new(revoked)),
            db: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            snapshot: Arc::default(),
            snapshot_seq: Arc::default(),
            applied: tokio::sync::watch::channel(applied).0,
        })
    }

    /// The applied index, as a watch: reconcilers wake when it moves.
    pub fn watch_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Answers a read from the local state (as fresh as this node's applied index).
    pub fn query(&self, q: &Query) -> Result<QueryReply, rusqlite::Error> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        query(&db, q)
    }

    /// Folds the write-ahead log into the database file (at a clean shutdown).
    pub fn checkpoint(&self) {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!("checkpointing {}: {e}", self.path.display());
        }
    }

    /// Whether a request with this id has been applied (and its reply kept).
    pub fn replied(&self, id: &str) -> bool {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        row1(
            &db,
            "SELECT 1 FROM requests WHERE id = ?1",
            [id],
            |_| Ok(()),
        )
        .optional()
        .map(|o| o.is_some())
        .unwrap_or(false)
    }

    /// Whether node `id` was removed from the cluster (its certificate is refused).
    pub fn is_revoked(&self, id: NodeId) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    /// Re-reads the removed node ids (after an apply that removed one, or an install).
    fn reload_revoked(&self, db: &Connection) -> Result<(), StorageError> {
        let set = load_revoked(db).map_err(|e| self.storage_err(e))?;
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = set;
        Ok(())
    }

    /// The cluster CA's certificate, once `SetClusterCa` has been applied.
    pub fn cluster_ca(&self) -> Option<String> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let get = |n: &str| -> Option<String> {
            row1(&db, "SELECT value FROM secrets WHERE name = ?1", [n], |r| {
                r.get(0)
            })
            .optional()
            .ok()
            .flatten()
        };
        get("ca_cert")
    }

    fn storage_err(&self, e: impl std::fmt::Display) -> StorageError {
        let io = std::io::Error::other(format!("state database {}: {e}", self.path.display()));
        openraft::StorageIOError::write_state_machine(&io).into()
    }
}

fn read_applied(conn: &Connection) -> rusqlite::Result<Option<LogId>> {
    let v: Option<String> = conn
        .query_row("SELECT v FROM meta WHERE k = 'applied'", [], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
}

fn read_membership(conn: &Connection) -> rusqlite::Result<StoredMembership> {
    let v: Option<String> = conn
        .query_row("SELECT v FROM meta WHERE k = 'membership'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default())
}

fn set_meta(tx: &Transaction, k: &str, v: &impl serde::Serialize) -> rusqlite::Result<()> {
    let v = serde_json::to_string(v).expect("log ids and memberships serialise");
    exec(
        tx,
        "INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)",
        params![k, v],
    )?;
    Ok(())
}

/// A DNS label: what a machine's name must be, since it becomes `<name>.<zone>`.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_cidr(s: &str) -> Option<(u32, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    if !(8..=32).contains(&len) {
        return None;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let ip = u32::from(ip);
    (ip & mask == ip).then_some((ip, len))
}

/// Usable addresses of a pool: all but network and broadcast below /31.
fn pool_range(network: u32, prefix: u8) -> (u32, u32) {
    let size = 1u64 << (32 - prefix);
    let last = (u64::from(network) + size - 1) as u32;
    if prefix >= 31 {
        (network, last)
    } else {
        (network + 1, last - 1)
    }
}

type Res<T> = Result<T, AppError>;

/// Executes a statement through the connection's statement cache: applying runs the
/// same few statements thousands of times a second, parsing them once is worth it.
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// One row through the statement cache.
fn row1<T>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

/// A failure of this node's database while applying (disk full, I/O error, a schema
/// bug) is not a refusal: recording it as one would make this node's state differ from
/// the others'. It stops the apply instead (see [`apply_request`]).
fn sql(e: rusqlite::Error) -> AppError {
    AppError::Internal(e.to_string())
}

/// Applies one command inside the caller's savepoint.
fn apply_cmd(tx: &Connection, req: &Request) -> Res<Applied> {
    let now = req.at_ms;
    match &req.cmd {
        Command::SetSetting { key, value } => {
            if key.is_empty() || key.len() > 128 || value.len() > 65536 {
                return Err(AppError::Invalid(
                    "setting keys are 1-128 bytes and values at most 64 KiB".into(),
                ));
            }
            if key == "machine_quota" && !value.parse::<u32>().is_ok_and(|q| q <= 10_000) {
                return Err(AppError::Invalid(format!(
                    "machine_quota {value:?} is not a number of machines from 0 to 10000"
                )));
            }
            if key == "zone"
                && !value.is_empty()
                && (value.len() > 189 || !value.split('.').all(valid_label))
            {
                return Err(AppError::Invalid(format!(
                    "zone {value:?} is not a DNS name of labels (a-z, 0-9, '-') up to 189 characters"
                )));
            }
            let previous: Option<String> = row1(
                tx,
                "SELECT value FROM settings WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
            exec(
                tx,
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(sql)?;
            Ok(Applied::Setting { previous })
        }
        Command::CreateUser {
            fingerprint,
            name,
            public_key,
        } => {
            create_user(tx, fingerprint, name, public_key, now)?;
            Ok(Applied::Done)
        }
        Command::Register {
            fingerprint,
            public_key,
            name_hint,
            invite,
        } => register(
            tx,
            fingerprint,
            public_key,
            name_hint,
            invite.as_deref(),
            now,
        ),
        Command::CreateInvite { hash, expires_ms } => {
            exec(
                tx,
                "INSERT OR IGNORE INTO invites (hash, expires_ms, used_by) VALUES (?1, ?2, NULL)",
                params![hash, expires_ms],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::AllowKey {
            fingerprint,
            allowed,
        } => {
            if *allowed {
                exec(
                    tx,
                    "INSERT OR IGNORE INTO allowlist (fingerprint) VALUES (?1)",
                    [fingerprint],
                )
            } else {
                exec(
                    tx,
                    "DELETE FROM allowlist WHERE fingerprint = ?1",
                    [fingerprint],
                )
            }
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::AddKey {
            user,
            fingerprint,
            public_key,
        } => {
            need_user(tx, user)?;
            if exists(
                tx,
                "SELECT 1 FROM keys WHERE fingerprint = ?1",
                [fingerprint],
            )? {
                return Err(AppError::AlreadyExists(format!(
                    "key {fingerprint} is already registered"
                )));
            }
            exec(
                tx,
                "INSERT INTO keys (fingerprint, user, public_key) VALUES (?1, ?2, ?3)",
                params![fingerprint, user, public_key],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::RemoveKey { user, fingerprint } => {
            let n: i64 = row1(
                tx,
                "SELECT COUNT(*) FROM keys WHERE user = ?1",
                [user],
                |r| r.get(0),
            )
            .map_err(sql)?;
            if !exists(
                tx,
                "SELECT 1 FROM keys WHERE fingerprint = ?1 AND user = ?2",
                params![fingerprint, user],
            )? {
                return Err(AppError::NotFound(format!(
                    "key {fingerprint} is not one of {user}'s keys"
                )));
            }
            if n <= 1 {
                return Err(AppError::Invalid(
                    "cannot remove a user's last key; add another first".into(),
                ));
            }
            exec(tx, "DELETE FROM keys WHERE fingerprint = ?1", [fingerprint]).map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::SetQuota { user, machines } => {
            need_user(tx, user)?;
            exec(
                tx,
                "UPDATE users SET machine_quota = ?2 WHERE fingerprint = ?1",
                params![user, machines],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::SetTeam {
            name,
            cpus,
            memory_mib,
        } => {
            if !valid_label(name) {
                return Err(AppError::Invalid(format!(
                    "team name {name:?} is not a DNS label"
                )));
            }
            exec(
                tx,
                "INSERT INTO teams (name, cpus, memory_mib) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET cpus = ?2, memory_mib = ?3",
                params![name, cpus, memory_mib],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::SetUserTeam { user, team } => {
            need_user(tx, user)?;
            if let Some(t) = team
                && !exists(tx, "SELECT 1 FROM teams WHERE name = ?1", [t])?
            {
                return Err(AppError::NotFound(format!(
                    "no team {t:?}; create it with SetTeam"
                )));
            }
            exec(
                tx,
                "UPDATE users SET team = ?2 WHERE fingerprint = ?1",
                params![user, team],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::AddPool { name, cidr } => {
            let (network, prefix) = parse_cidr(cidr).ok_or_else(|| {
                AppError::Invalid(format!(
                    "{cidr:?} is not an IPv4 network (like 203.0.113.0/24, /8 to /32, host bits zero)"
                ))
            })?;
            if exists(tx, "SELECT 1 FROM pools WHERE name = ?1", [name])? {
                return Err(AppError::AlreadyExists(format!("pool {name:?} exists")));
            }
            let (lo, hi) = pool_range(network, prefix);
            for (other, n, p) in pools(tx)? {
                let (olo, ohi) = pool_range(n, p);
                if lo <= ohi && olo <= hi {
                    return Err(AppError::AlreadyExists(format!(
                        "{cidr} overlaps pool {other:?}"
                    )));
                }
            }
            exec(
                tx,
                "INSERT INTO pools (name, network, prefix) VALUES (?1, ?2, ?3)",
                params![name, network, prefix],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::RegisterNode {
            id,
            addr,
            role,
            cpus,
            memory_mib,
        } => {
            exec(tx,
                "INSERT INTO nodes (id, addr, role, cpus, memory_mib, healthy) VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT(id) DO UPDATE SET addr = ?2, role = ?3, cpus = ?4, memory_mib = ?5",
                params![id, addr, role.as_str(), cpus, memory_mib],
            )
            .map_err(sql)?;
            Ok(Applied::Node { id: *id })
        }
        Command::SetNodeHealth { id, healthy } => {
            let n = exec(
                tx,
                "UPDATE nodes SET healthy = ?2 WHERE id = ?1",
                params![id, healthy],
            )
            .map_err(sql)?;
            if n == 0 {
                return Err(AppError::NotFound(format!("no node {id}")));
            }
            Ok(Applied::Done)
        }
        Command::RemoveNode { id } => {
            let n: i64 = row1(
                tx,
                "SELECT COUNT(*) FROM machines WHERE node = ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(sql)?;
            if n > 0 {
                return Err(AppError::Invalid(format!(
                    "node {id} still holds {n} machines; move or remove them first"
                )));
            }
            if exec(tx, "DELETE FROM nodes WHERE id = ?1", [id]).map_err(sql)? == 0 {
                return Err(AppError::NotFound(format!("no node {id}")));
            }
            // Its certificate stops working everywhere, and its id is never reused.
            exec(tx, "INSERT OR IGNORE INTO revoked (id) VALUES (?1)", [id]).map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::CreateMachine {
            owner,
            name,
            spec,
            parent,
        } => create_machine(tx, owner, name, spec, parent, now),
        Command::WakeMachine { owner, name } => {
            let m = need_machine(tx, owner, name)?;
            match m.state {
                MachineState::Paused => {}
                // Back from disk: it needs its vCPUs and memory again.
                MachineState::Suspended => resume_room(tx, owner, &m)?,
                // Stopped, creating or already running: traffic changes nothing.
                _ => return Ok(Applied::Machine(m)),
            }
            exec(
                tx,
                "UPDATE machines SET state = 'running', state_since_ms = ?2 WHERE name = ?1",
                params![name, now],
            )
            .map_err(sql)?;
            Ok(Applied::Machine(need_machine(tx, owner, name)?))
        }
        Command::SetMachineState { owner, name, state } => {
            let m = need_machine(tx, owner, name)?;
            if *state == MachineState::Paused
                && !matches!(m.state, MachineState::Running | MachineState::Paused)
            {
                return Err(AppError::Invalid(format!(
                    "{name} is {}; only a running machine can be paused",
                    m.state.as_str()
                )));
            }
            if *state == MachineState::Suspended && m.state == MachineState::Stopped {
                return Err(AppError::Invalid(format!(
                    "{name} is stopped: it has nothing in memory to suspend"
                )));
            }
            if active(*state) && !active(m.state) {
                resume_room(tx, owner, &m)?;
            }
            if *state == m.state {
                return Ok(Applied::Machine(m));
            }
            exec(
                tx,
                "UPDATE machines SET state = ?2, state_since_ms = ?3 WHERE name = ?1",
                params![name, state.as_str(), now],
            )
            .map_err(sql)?;
            Ok(Applied::Machine(need_machine(tx, owner, name)?))
        }
        Command::DeleteMachine { owner, name } => {
            need_machine(tx, owner, name)?;
            exec(tx, "DELETE FROM allocations WHERE machine = ?1", [name]).map_err(sql)?;
            exec(tx, "DELETE FROM machines WHERE name = ?1", [name]).map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::Expose { owner, name, port } | Command::Unexpose { owner, name, port } => {
            let mut m = need_machine(tx, owner, name)?;
            if *port == 0 {
                return Err(AppError::Invalid(
                    "port 0 cannot be exposed; use 1-65535".into(),
                ));
            }
            let expose = matches!(req.cmd, Command::Expose { .. });
            match (expose, m.ports.contains(port)) {
                (true, true) | (false, false) => {}
                (true, false) => {
                    if m.ports.len() >= MAX_PORTS {
                        return Err(AppError::QuotaExceeded(format!(
                            "{name} already exposes {MAX_PORTS} ports; unexpose one first"
                        )));
                    }
                    m.ports.push(*port);
                    m.ports.sort_unstable();
                }
                (false, true) => m.ports.retain(|p| p != port),
            }
            let ports = serde_json::to_string(&m.ports).expect("ports serialise");
            exec(
                tx,
                "UPDATE machines SET ports = ?2 WHERE name = ?1",
                params![name, ports],
            )
            .map_err(sql)?;
            Ok(Applied::Machine(m))
        }
        Command::SetWeb { owner, name, mode } => {
            need_machine(tx, owner, name)?;
            exec(
                tx,
                "UPDATE machines SET web = ?2 WHERE name = ?1",
                params![name, mode.as_str()],
            )
            .map_err(sql)?;
            Ok(Applied::Machine(need_machine(tx, owner, name)?))
        }
        Command::AddDomain {
            owner,
            name,
            domain,
        } => {
            let m = need_machine(tx, owner, name)?;
            let d = domain.trim_end_matches('.').to_ascii_lowercase();
            if d.len() > 253 || d.split('.').count() < 2 || !d.split('.').all(valid_label) {
                return Err(AppError::Invalid(format!(
                    "{domain:?} is not a domain name (labels of a-z, 0-9 and '-', at least two)"
                )));
            }
            let zone: Option<String> = row1(
                tx,
                "SELECT value FROM settings WHERE key = 'zone'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
            if let Some(z) = zone.filter(|z| !z.is_empty())
                && (d == z || d.ends_with(&format!(".{z}")))
            {
                return Err(AppError::Invalid(format!(
                    "{d} is in the zone {z}, whose names are automatic; add a domain of your own"
                )));
            }
            let holder: Option<String> = row1(
                tx,
                "SELECT machine FROM domains WHERE domain = ?1",
                [&d],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
            match holder {
                Some(h) if h == *name => return Ok(Applied::Machine(m)),
                Some(_) => {
                    return Err(AppError::AlreadyExists(format!(
                        "{d} already belongs to another machine"
                    )));
                }
                None => {}
            }
            if m.domains.len() >= MAX_DOMAINS {
                return Err(AppError::QuotaExceeded(format!(
                    "{name} already has {MAX_DOMAINS} domains; remove one first"
                )));
            }
            // Each domain may cost an ACME order on the cluster's account: bounded per
            // owner too, not only per machine.
            let owned: u64 = row1(
                tx,
                "SELECT COUNT(*) FROM domains d JOIN machines m ON m.name = d.machine WHERE m.owner = ?1",
                [owner],
                |r| r.get(0),
            )
            .map_err(sql)?;
            if owned >= MAX_DOMAINS_PER_OWNER {
                return Err(AppError::QuotaExceeded(format!(
                    "you already have {MAX_DOMAINS_PER_OWNER} domains; remove one first"
                )));
            }
            exec(
                tx,
                "INSERT INTO domains (domain, machine) VALUES (?1, ?2)",
                params![d, name],
            )
            .map_err(sql)?;
            Ok(Applied::Machine(need_machine(tx, owner, name)?))
        }
        Command::RemoveDomain {
            owner,
            name,
            domain,
        } => {
            need_machine(tx, owner, name)?;
            let d = domain.trim_end_matches('.').to_ascii_lowercase();
            let n = tx
                .execute(
                    "DELETE FROM domains WHERE domain = ?1 AND machine = ?2",
                    params![d, name],
                )
                .map_err(sql)?;
            if n == 0 {
                return Err(AppError::NotFound(format!("{name} has no domain {d}")));
            }
            Ok(Applied::Machine(need_machine(tx, owner, name)?))
        }
        Command::PutCertificate {
            name,
            cert_pem,
            key_pem,
            not_after_ms,
            issuer,
        } => {
            let pem = |s: &str| s.contains("-----BEGIN ") && s.len() <= 32 * 1024;
            if name.is_empty() || name.len() > 253 || !pem(cert_pem) || !pem(key_pem) {
                return Err(AppError::Invalid(
                    "a certificate needs a name (at most 253 bytes) and PEM certificate and key (at most 32 KiB each)".into(),
                ));
            }
            if !matches!(issuer.as_str(), "internal" | "acme") {
                return Err(AppError::Invalid(format!(
                    "issuer {issuer:?}: use \"internal\" or \"acme\""
                )));
            }
            exec(
                tx,
                "INSERT OR REPLACE INTO certificates (name, cert_pem, key_pem, not_after_ms, issuer, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![name, cert_pem, key_pem, not_after_ms, issuer, now],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::PutAcmeChallenge {
            kind,
            name,
            value,
            expires_ms,
        } => {
            check_challenge(kind, name, value)?;
            if *expires_ms <= now || *expires_ms > now + MAX_CHALLENGE_MS {
                return Err(AppError::Invalid(format!(
                    "a challenge must expire within {} minutes",
                    MAX_CHALLENGE_MS / 60_000
                )));
            }
            // Expired ones go first, so abandoned orders cannot pile up.
            exec(
                tx,
                "DELETE FROM acme_challenges WHERE expires_ms < ?1",
                params![now],
            )
            .map_err(sql)?;
            let live: u64 =
                row1(tx, "SELECT COUNT(*) FROM acme_challenges", [], |r| r.get(0)).map_err(sql)?;
            if live >= MAX_CHALLENGES {
                return Err(AppError::QuotaExceeded(format!(
                    "{MAX_CHALLENGES} ACME challenges are pending; wait for them to finish or expire"
                )));
            }
            exec(
                tx,
                "INSERT OR REPLACE INTO acme_challenges (kind, name, value, expires_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![kind, name, value, expires_ms],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::RemoveAcmeChallenge { kind, name, value } => {
            check_challenge(kind, name, value)?;
            exec(
                tx,
                "DELETE FROM acme_challenges WHERE kind = ?1 AND name = ?2 AND value = ?3",
                params![kind, name, value],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::PutAcmeAccount {
            directory,
            credentials,
        } => {
            if directory.is_empty() || directory.len() > 2048 || credentials.len() > 16 * 1024 {
                return Err(AppError::Invalid(
                    "an ACME account needs its directory URL (at most 2048 bytes) and credentials (at most 16 KiB)".into(),
                ));
            }
            exec(
                tx,
                "INSERT OR REPLACE INTO acme_accounts (directory, credentials, updated_ms)
                 VALUES (?1, ?2, ?3)",
                params![directory, credentials, now],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::CreateJoinToken { hash, expires_ms } => {
            exec(tx,
                "INSERT OR IGNORE INTO join_tokens (hash, expires_ms, used_by) VALUES (?1, ?2, NULL)",
                params![hash, expires_ms],
            )
            .map_err(sql)?;
            // Spent and expired tokens are forgotten after a day.
            exec(
                tx,
                "DELETE FROM join_tokens WHERE expires_ms < ?1",
                params![now.saturating_sub(DEDUP_WINDOW_MS)],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
        Command::ConsumeJoinToken { hash, addr, role } => {
            let row: Option<(u64, Option<u64>)> = row1(
                tx,
                "SELECT expires_ms, used_by FROM join_tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
            match row {
                None => {
                    return Err(AppError::TokenRejected(
                        "unknown join token; create one with `boxd cluster token`".into(),
                    ));
                }
                Some((_, Some(by))) => {
                    return Err(AppError::TokenRejected(format!(
                        "join token already used (by node {by}); tokens are one-time: create another"
                    )));
                }
                Some((exp, None)) if exp < now => {
                    return Err(AppError::TokenRejected(
                        "join token expired; create another with `boxd cluster token`".into(),
                    ));
                }
                Some(_) => {}
            }
            let id: u64 = row1(tx, "SELECT MAX(COALESCE((SELECT MAX(id) FROM nodes), 0), COALESCE((SELECT MAX(id) FROM revoked), 0)) + 1", [], |r| r.get(0))
                .map_err(sql)?;
            exec(
                tx,
                "UPDATE join_tokens SET used_by = ?2 WHERE hash = ?1",
                params![hash, id],
            )
            .map_err(sql)?;
            exec(tx,
                "INSERT INTO nodes (id, addr, role, cpus, memory_mib, healthy) VALUES (?1, ?2, ?3, 0, 0, 1)",
                params![id, addr, role.as_str()],
            )
            .map_err(sql)?;
            Ok(Applied::Node { id })
        }
        Command::SetClusterCa { cert_pem } => {
            if exists(tx, "SELECT 1 FROM secrets WHERE name = 'ca_cert'", [])? {
                return Err(AppError::AlreadyExists(
                    "the cluster CA is set once, at init".into(),
                ));
            }
            exec(
                tx,
                "INSERT INTO secrets (name, value) VALUES ('ca_cert', ?1)",
                params![cert_pem],
            )
            .map_err(sql)?;
            Ok(Applied::Done)
        }
    }
}

fn create_user(
    tx: &Connection,
    fingerprint: &str,
    name: &str,
    public_key: &str,
    now: u64,
) -> Res<()> {
    if !valid_label(name) {
        return Err(AppError::Invalid(format!(
            "user name {name:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
        )));
    }
    if exists(
        tx,
        "SELECT 1 FROM users WHERE fingerprint = ?1",
        [fingerprint],
    )? {
        return Err(AppError::AlreadyExists(format!(
            "a user with key {fingerprint} exists"
        )));
    }
    if exists(tx, "SELECT 1 FROM users WHERE name = ?1", [name])? {
        return Err(AppError::AlreadyExists(format!(
            "user name {name:?} is taken; pick another"
        )));
    }
    if exists(
        tx,
        "SELECT 1 FROM keys WHERE fingerprint = ?1",
        [fingerprint],
    )? {
        return Err(AppError::AlreadyExists(format!(
            "key {fingerprint} belongs to another user"
        )));
    }
    // New accounts get the `machine_quota` setting, when the operator set one.
    let quota: u32 = row1(
        tx,
        "SELECT value FROM settings WHERE key = 'machine_quota'",
        [],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map_err(sql)?
    .and_then(|v| v.parse().ok())
    .unwrap_or(DEFAULT_MACHINE_QUOTA);
    exec(
        tx,
        "INSERT INTO users (fingerprint, name, created_ms, machine_quota) VALUES (?1, ?2, ?3, ?4)",
        params![fingerprint, name, now, quota],
    )
    .map_err(sql)?;
    exec(
        tx,
        "INSERT INTO keys (fingerprint, user, public_key) VALUES (?1, ?1, ?2)",
        params![fingerprint, public_key],
    )
    .map_err(sql)?;
    Ok(())
}

/// A user name from what the client offered (the SSH user name, say): a DNS label,
/// made unique with a numeric suffix.
fn user_name(tx: &Connection, hint: &str) -> Res<String> {
    let mut base: String = hint
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    base = base
        .trim_matches('-')
        .chars()
        .take(40)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string();
    if base.is_empty() {
        base = "user".into();
    }
    for n in 1..=1000u32 {
        let name = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if !exists(tx, "SELECT 1 FROM users WHERE name = ?1", [&name])? {
            return Ok(name);
        }
    }
    Err(AppError::AlreadyExists(format!(
        "no free user name near {base:?}; offer another"
    )))
}

/// An unknown key's first connection: an account, if the registration policy (setting
/// `registration`: open (default), invite or allowlist) lets it in.
fn register(
    tx: &Connection,
    fingerprint: &str,
    public_key: &str,
    hint: &str,
    invite: Option<&str>,
    now: u64,
) -> Res<Applied> {
    if let Some(name) = row1(
        tx,
        "SELECT user FROM keys WHERE fingerprint = ?1",
        [fingerprint],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map_err(sql)?
    {
        return Err(AppError::AlreadyExists(format!(
            "key {fingerprint} is already registered (user {name})"
        )));
    }
    let policy: String = row1(
        tx,
        "SELECT value FROM settings WHERE key = 'registration'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql)?
    .unwrap_or_else(|| "open".into());
    match policy.as_str() {
        "open" => {}
        "invite" => {
            let Some(hash) = invite else {
                return Err(AppError::Forbidden(
                    "registration here needs an invite; ask the operator for one".into(),
                ));
            };
            let n = exec(
                tx,
                "UPDATE invites SET used_by = ?2 WHERE hash = ?1 AND used_by IS NULL AND expires_ms >= ?3",
                params![hash, fingerprint, now],
            )
            .map_err(sql)?;
            if n == 0 {
                return Err(AppError::TokenRejected(
                    "invite unknown, already used or expired; ask the operator for another".into(),
                ));
            }
        }
        "allowlist" => {
            if !exists(
                tx,
                "SELECT 1 FROM allowlist WHERE fingerprint = ?1",
                [fingerprint],
            )? {
                return Err(AppError::Forbidden(format!(
                    "key {fingerprint} is not on this server's allow-list; ask the operator to add it"
                )));
            }
        }
        other => {
            return Err(AppError::Invalid(format!(
                "registration policy {other:?} is unknown (open, invite or allowlist)"
            )));
        }
    }
    let name = user_name(tx, hint)?;
    create_user(tx, fingerprint, &name, public_key, now)?;
    Ok(Applied::User { name })
}

fn exists(tx: &Connection, q: &str, p: impl rusqlite::Params) -> Res<bool> {
    row1(tx, q, p, |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(sql)
}

fn need_user(tx: &Connection, user: &str) -> Res<()> {
    if exists(tx, "SELECT 1 FROM users WHERE fingerprint = ?1", [user])? {
        Ok(())
    } else {
        Err(AppError::NotFound(format!("no user {user}")))
    }
}

fn need_machine(tx: &Connection, owner: &str, name: &str) -> Res<Machine> {
    match machine(tx, name).map_err(sql)? {
        Some(m) if m.owner == owner => Ok(m),
        // Someone else's machine is reported exactly like a missing one.
        _ => Err(AppError::NotFound(format!(
            "no machine named {name:?}; `ls` lists yours"
        ))),
    }
}

fn create_machine(
    tx: &Connection,
    owner: &str,
    name: &str,
    spec: &MachineSpec,
    parent: &Option<String>,
    now: u64,
) -> Res<Applied> {
    if !valid_label(name) {
        return Err(AppError::Invalid(format!(
            "machine name {name:?} is not a DNS label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        )));
    }
    if !(1..=64).contains(&spec.cpus)
        || !(256..=262_144).contains(&spec.memory_mib)
        || !(1..=4096).contains(&spec.disk_gib)
    {
        return Err(AppError::Invalid(format!(
            "size {}x{} MiB/{} GiB is out of range: cpus 1-64, memory 256 MiB-256 GiB, disk 1-4096 GiB",
            spec.cpus, spec.memory_mib, spec.disk_gib
        )));
    }
    let quota: Option<u32> = row1(
        tx,
        "SELECT machine_quota FROM users WHERE fingerprint = ?1",
        [owner],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql)?;
    let quota = quota.ok_or_else(|| AppError::NotFound(format!("no user {owner}")))?;
    if machine(tx, name).map_err(sql)?.is_some() {
        return Err(AppError::AlreadyExists(format!(
            "a machine named {name:?} already exists; pick another name"
        )));
    }
    if let Some(p) = parent {
        need_machine(tx, owner, p)?;
    }
    let have: u32 = row1(
        tx,
        "SELECT COUNT(*) FROM machines WHERE owner = ?1",
        [owner],
        |r| r.get(0),
    )
    .map_err(sql)?;
    if have >= quota {
        return Err(AppError::QuotaExceeded(format!(
            "you have {have} machines, your quota is {quota}; `rm` one first"
        )));
    }
    team_room(tx, owner, spec)?;
    let node = schedule(tx, spec)?;
    let (pool, ip) = allocate(tx)?;
    exec(
        tx,
        "INSERT INTO allocations (ipv4, pool, machine) VALUES (?1, ?2, ?3)",
        params![ip, pool, name],
    )
    .map_err(sql)?;
    let zone: Option<String> = row1(
        tx,
        "SELECT value FROM settings WHERE key = 'zone'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql)?;
    let domain = zone
        .filter(|z| !z.is_empty())
        .map(|z| format!("{name}.{z}"));
    // Machine ids are never reused: the data path's counters and ports are keyed by them.
    let vid: u64 = row1(tx, "SELECT v FROM meta WHERE k = 'next_vid'", [], |r| {
        r.get::<_, String>(0)
    })
    .optional()
    .map_err(sql)?
    .and_then(|v| v.parse().ok())
    .unwrap_or(1);
    exec(
        tx,
        "INSERT OR REPLACE INTO meta (k, v) VALUES ('next_vid', ?1)",
        [(vid + 1).to_string()],
    )
    .map_err(sql)?;
    exec(tx,
        "INSERT INTO machines (name, vid, owner, cpus, memory_mib, disk_gib, state, node, ipv4, domain, ports, parent, created_ms, state_since_ms)
         VALUES (?1, ?11, ?2, ?3, ?4, ?5, 'creating', ?6, ?7, ?8, '[]', ?9, ?10, ?10)",
        params![name, owner, spec.cpus, spec.memory_mib, spec.disk_gib, node, ip, domain, parent, now, vid],
    )
    .map_err(sql)?;
    Ok(Applied::Machine(
        machine(tx, name).map_err(sql)?.expect("just inserted"),
    ))
}

/// Whether the machine holds a node's vCPUs and memory in this state.
fn active(s: MachineState) -> bool {
    matches!(
        s,
        MachineState::Creating | MachineState::Running | MachineState::Paused
    )
}

/// Room for a stopped or suspended machine to run again: in its team's pool, and on the
/// node where its disk (and snapshot) is.
fn resume_room(tx: &Connection, owner: &str, m: &Machine) -> Res<()> {
    team_room(tx, owner, &m.spec)?;
    let node = node_usage(tx, m.node)?;
    if node.used_cpus + m.spec.cpus > node.cpus
        || node.used_memory_mib + m.spec.memory_mib > node.memory_mib
    {
        return Err(AppError::NoCapacity(format!(
            "node {} (where {}'s disk is) has no room to resume it; stop another machine there",
            m.node, m.name
        )));
    }
    Ok(())
}

/// A team shares a pool of vCPUs and memory: the machines of all its members that are
/// not suspended or stopped, plus `spec`, must fit in it.
fn team_room(tx: &Connection, owner: &str, spec: &MachineSpec) -> Res<()> {
    let team: Option<(String, u32, u64)> = row1(
        tx,
        "SELECT t.name, t.cpus, t.memory_mib FROM users u JOIN teams t ON t.name = u.team
             WHERE u.fingerprint = ?1",
        [owner],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(sql)?;
    let Some((team, cpus, memory)) = team else {
        return Ok(());
    };
    let (used_cpus, used_mem): (u32, u64) = row1(
        tx,
        "SELECT COALESCE(SUM(m.cpus), 0), COALESCE(SUM(m.memory_mib), 0) FROM machines m
             JOIN users u ON u.fingerprint = m.owner
             WHERE u.team = ?1 AND m.state IN ('creating', 'running', 'paused')",
        [&team],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .map_err(sql)?;
    if used_cpus + spec.cpus > cpus || used_mem + spec.memory_mib > memory {
        return Err(AppError::QuotaExceeded(format!(
            "team {team} uses {used_cpus}/{cpus} vCPUs and {used_mem}/{memory} MiB; {} vCPUs and {} MiB more \
             do not fit: stop or suspend a machine, or ask for a bigger pool",
            spec.cpus, spec.memory_mib
        )));
    }
    Ok(())
}

/// Placement: the healthy node that runs machines with the most free memory that fits
/// (then most free vCPUs, then the lowest id). Suspended and stopped machines keep their
/// node but use none of its vCPUs or memory.
fn schedule(tx: &Connection, spec: &MachineSpec) -> Res<NodeId> {
    let nodes = nodes(tx).map_err(sql)?;
    let best = nodes
        .iter()
        .filter(|n| n.role.runs_machines() && n.healthy)
        .filter(|n| {
            n.used_cpus + spec.cpus <= n.cpus && n.used_memory_mib + spec.memory_mib <= n.memory_mib
        })
        .max_by_key(|n| {
            (
                n.memory_mib - n.used_memory_mib,
                n.cpus - n.used_cpus,
                std::cmp::Reverse(n.id),
            )
        });
    match best {
        Some(n) => Ok(n.id),
        None => Err(AppError::NoCapacity(format!(
            "no node has {} vCPUs and {} MiB free ({} nodes can run machines); add a worker or stop machines",
            spec.cpus,
            spec.memory_mib,
            nodes
                .iter()
                .filter(|n| n.role.runs_machines() && n.healthy)
                .count()
        ))),
    }
}

/// Address pools by name: (name, network, prefix length).
fn pools(tx: &Connection) -> Res<Vec<(String, u32, u8)>> {
    tx.prepare_cached("SELECT name, network, prefix FROM pools ORDER BY name")
        .map_err(sql)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)
}

/// The lowest free address of the first pool (by name) that has one.
fn allocate(tx: &Connection) -> Res<(String, u32)> {
    let pools = pools(tx)?;
    if pools.is_empty() {
        return Err(AppError::PoolExhausted(
            "no address pool is configured; add one (`AddPool`)".into(),
        ));
    }
    let mut total = 0u64;
    for (name, network, prefix) in pools {
        let (lo, hi) = pool_range(network, prefix);
        total += u64::from(hi - lo) + 1;
        let mut used = tx
            .prepare_cached(
                "SELECT ipv4 FROM allocations WHERE ipv4 BETWEEN ?1 AND ?2 ORDER BY ipv4",
            )
            .map_err(sql)?;
        let mut next = lo;
        let mut rows = used.query(params![lo, hi]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let ip: u32 = r.get(0).map_err(sql)?;
            if ip != next {
                break;
            }
            if next == hi {
                next = 0;
                break;
            }
            next += 1;
        }
        if next != 0 && next <= hi {
            return Ok((name, next));
        }
    }
    Err(AppError::PoolExhausted(format!(
        "all {total} public addresses are allocated; add a pool or remove machines"
    )))
}

fn machine_from_row(r: &rusqlite::Row) -> rusqlite::Result<Machine> {
    let ports: String = r.get(9)?;
    Ok(Machine {
        id: r.get(12)?,
        name: r.get(0)?,
        owner: r.get(1)?,
        spec: MachineSpec {
            cpus: r.get(2)?,
            memory_mib: r.get(3)?,
            disk_gib: r.get(4)?,
        },
        state: MachineState::parse(&r.get::<_, String>(5)?).unwrap_or(MachineState::Stopped),
        node: r.get(6)?,
        ipv4: std::net::Ipv4Addr::from(r.get::<_, u32>(7)?).to_string(),
        domain: r.get(8)?,
        ports: serde_json::from_str(&ports).unwrap_or_default(),
        parent: r.get(10)?,
        created_ms: r.get(11)?,
        web: WebMode::parse(&r.get::<_, String>(13)?).unwrap_or_default(),
        domains: serde_json::from_str(&r.get::<_, String>(14)?).unwrap_or_default(),
        state_since_ms: r.get(15)?,
    })
}

const MACHINE_COLS: &str = "name, owner, cpus, memory_mib, disk_gib, state, node, ipv4, domain, ports, parent, created_ms, vid, web, \
     (SELECT COALESCE(json_group_array(d.domain), '[]') FROM (SELECT domain FROM domains WHERE machine = machines.name ORDER BY domain) d), \
     state_since_ms";

fn machine(db: &Connection, name: &str) -> rusqlite::Result<Option<Machine>> {
    row1(
        db,
        &format!("SELECT {MACHINE_COLS} FROM machines WHERE name = ?1"),
        [name],
        machine_from_row,
    )
    .optional()
}

fn node_usage(tx: &Connection, id: NodeId) -> Res<NodeRow> {
    nodes(tx)
        .map_err(sql)?
        .into_iter()
        .find(|n| n.id == id)
        .ok_or_else(|| AppError::NotFound(format!("no node {id}")))
}

fn nodes(db: &Connection) -> rusqlite::Result<Vec<NodeRow>> {
    let mut stmt = db.prepare_cached(
        "SELECT n.id, n.addr, n.role, n.cpus, n.memory_mib, n.healthy,
                COALESCE(SUM(CASE WHEN m.state IN ('creating','running','paused') THEN m.cpus END), 0),
                COALESCE(SUM(CASE WHEN m.state IN ('creating','running','paused') THEN m.memory_mib END), 0),
                COUNT(m.name)
         FROM nodes n LEFT JOIN machines m ON m.node = n.id GROUP BY n.id ORDER BY n.id",
    )?;
    stmt.query_map([], |r| {
        Ok(NodeRow {
            id: r.get(0)?,
            addr: r.get(1)?,
            role: NodeRole::parse(&r.get::<_, String>(2)?).unwrap_or(NodeRole::Worker),
            cpus: r.get(3)?,
            memory_mib: r.get(4)?,
            healthy: r.get(5)?,
            used_cpus: r.get(6)?,
            used_memory_mib: r.get(7)?,
            machines: r.get(8)?,
        })
    })?
    .collect()
}

/// The account `key` (a key fingerprint, or the account's id) belongs to, with all its keys.
fn user_by_key(db: &Connection, key: &str) -> rusqlite::Result<Option<UserInfo>> {
    let Some(mut user) = row1(
        db,
        "SELECT u.fingerprint, u.name, u.created_ms, u.machine_quota, u.team,
                (SELECT COUNT(*) FROM machines m WHERE m.owner = u.fingerprint)
           FROM users u
          WHERE u.fingerprint = (SELECT user FROM keys WHERE fingerprint = ?1)
             OR u.fingerprint = ?1
          LIMIT 1",
        [key],
        |r| {
            Ok(UserInfo {
                id: r.get(0)?,
                name: r.get(1)?,
                created_ms: r.get(2)?,
                machine_quota: r.get(3)?,
                team: r.get(4)?,
                machines: r.get(5)?,
                keys: Vec::new(),
            })
        },
    )
    .optional()?
    else {
        return Ok(None);
    };
    let mut stmt = db.prepare_cached(
        "SELECT fingerprint, public_key FROM keys WHERE user = ?1 ORDER BY rowid",
    )?;
    user.keys = stmt
        .query_map([&user.id], |r| {
            Ok(KeyRow {
                fingerprint: r.get(0)?,
                public_key: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(user))
}

/// Answers a read.
pub fn query(db: &Connection, q: &Query) -> rusqlite::Result<QueryReply> {
    Ok(match q {
        Query::Setting { key } => QueryReply::Setting {
            value: row1(
                db,
                "SELECT value FROM settings WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?,
        },
        Query::JoinToken { hash, now_ms } => QueryReply::JoinToken {
            valid: row1(
                db,
                "SELECT 1 FROM join_tokens WHERE hash = ?1 AND used_by IS NULL AND expires_ms >= ?2",
                params![hash, now_ms],
                |_| Ok(()),
            )
            .optional()?
            .is_some(),
        },
        Query::Machine { owner, name } => QueryReply::Machine {
            machine: machine(db, name)?.filter(|m| &m.owner == owner),
        },
        Query::Machines { owner } => {
            let mut stmt = db.prepare_cached(&format!(
                "SELECT {MACHINE_COLS} FROM machines WHERE ?1 IS NULL OR owner = ?1 ORDER BY name"
            ))?;
            let machines = stmt
                .query_map([owner], machine_from_row)?
                .collect::<Result<_, _>>()?;
            QueryReply::Machines { machines }
        }
        Query::Nodes => QueryReply::Nodes { nodes: nodes(db)? },
        Query::Audit { actor, limit } => {
            let mut stmt = db.prepare_cached(
                "SELECT idx, at_ms, actor, op, args, result FROM audit
                 WHERE ?1 IS NULL OR actor = ?1 OR substr(actor, 1, length(?1) + 1) = ?1 || '@'
                 ORDER BY seq DESC LIMIT ?2",
            )?;
            let entries = stmt
                .query_map(params![actor, (*limit).min(10_000)], |r| {
                    Ok(AuditRow {
                        index: r.get(0)?,
                        at_ms: r.get(1)?,
                        actor: r.get(2)?,
                        op: r.get(3)?,
                        args: r.get(4)?,
                        result: r.get(5)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            QueryReply::Audit { entries }
        }
        Query::UserByKey { key } => QueryReply::User {
            user: user_by_key(db, key)?,
        },
        Query::Certificates => {
            let mut st = db.prepare(
                "SELECT name, cert_pem, key_pem, not_after_ms, issuer, updated_ms
                 FROM certificates ORDER BY name",
            )?;
            let certs = st
                .query_map([], |r| {
                    Ok(crate::types::CertRow {
                        name: r.get(0)?,
                        cert_pem: r.get(1)?,
                        key_pem: r.get(2)?,
                        not_after_ms: r.get(3)?,
                        issuer: r.get(4)?,
                        updated_ms: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            QueryReply::Certificates { certs }
        }
        Query::AcmeChallenges => {
            let mut st = db.prepare(
                "SELECT kind, name, value, expires_ms FROM acme_challenges ORDER BY kind, name, value",
            )?;
            let challenges = st
                .query_map([], |r| {
                    Ok(crate::types::ChallengeRow {
                        kind: r.get(0)?,
                        name: r.get(1)?,
                        value: r.get(2)?,
                        expires_ms: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            QueryReply::AcmeChallenges { challenges }
        }
        Query::AcmeAccount { directory } => QueryReply::AcmeAccount {
            credentials: row1(
                db,
                "SELECT credentials FROM acme_accounts WHERE directory = ?1",
                [directory],
                |r| r.get(0),
            )
            .optional()?,
        },
        Query::Counts => {
            let applied = read_applied(db)?.map(|l| l.index).unwrap_or(0);
            let mut tables = Vec::new();
            for t in [
                "settings",
                "teams",
                "users",
                "keys",
                "nodes",
                "pools",
                "machines",
                "allocations",
                "certificates",
                "acme_challenges",
                "acme_accounts",
                "domains",
                "audit",
                "requests",
            ] {
                let n: u64 = row1(db, &format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?;
                tables.push((t.to_string(), n));
            }
            QueryReply::Counts { applied, tables }
        }
    })
}

/// Custom domains one machine, and one owner, may have.
const MAX_DOMAINS: usize = 10;
const MAX_DOMAINS_PER_OWNER: u64 = 20;

/// How long an ACME challenge may be published for, and how many at once.
const MAX_CHALLENGE_MS: u64 = 60 * 60 * 1000;
const MAX_CHALLENGES: u64 = 1000;

fn check_challenge(kind: &str, name: &str, value: &str) -> Res<()> {
    if !matches!(kind, "dns-01" | "http-01") {
        return Err(AppError::Invalid(format!(
            "challenge kind {kind:?}: use \"dns-01\" or \"http-01\""
        )));
    }
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if name.is_empty() || name.len() > 253 || !printable(name) {
        return Err(AppError::Invalid(
            "a challenge's name is a DNS name or token of 1-253 printable characters".into(),
        ));
    }
    if value.is_empty() || value.len() > 255 || !printable(value) {
        return Err(AppError::Invalid(
            "a challenge's value is 1-255 printable characters".into(),
        ));
    }
    Ok(())
}

/// An apply failure that is this node's, not the command's (stops the apply).
fn internal(msg: String) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::other(msg)))
}

/// Applies one entry's request: deduplicated by request id, audited, in a savepoint.
fn apply_request(tx: &mut Transaction, req: &Request, index: u64) -> rusqlite::Result<Reply> {
    if !req.id.is_empty() {
        let seen: Option<String> = row1(
            tx,
            "SELECT reply FROM requests WHERE id = ?1",
            [&req.id],
            |r| r.get(0),
        )
        .optional()?;
        if let Some(s) = seen {
            return serde_json::from_str::<Reply>(&s)
                .map_err(|e| internal(format!("stored reply of request {}: {e}", req.id)));
        }
    }
    let sp = tx.savepoint()?;
    let result = apply_cmd(&sp, req);
    if let Err(AppError::Internal(e)) = &result {
        return Err(internal(format!(
            "applying {} (request {}): {e}",
            req.cmd.name(),
            req.id
        )));
    }
    if result.is_ok() {
        sp.commit()?;
    } else {
        drop(sp); // rolls back everything the refused command wrote
    }
    let reply = Reply { result, index };
    let outcome = match &reply.result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("{}: {e}", e.code()),
    };
    exec(
        tx,
        "INSERT INTO audit (idx, at_ms, actor, op, args, result) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            index,
            req.at_ms,
            req.actor,
            req.cmd.name(),
            req.cmd.summary(),
            outcome
        ],
    )?;
    if !req.id.is_empty() {
        let s = serde_json::to_string(&reply).expect("replies serialise");
        exec(
            tx,
            "INSERT INTO requests (id, at_ms, reply) VALUES (?1, ?2, ?3)",
            params![req.id, req.at_ms, s],
        )?;
        if index.is_multiple_of(1024) {
            exec(
                tx,
                "DELETE FROM requests WHERE at_ms < ?1",
                [req.at_ms.saturating_sub(DEDUP_WINDOW_MS)],
            )?;
        }
    }
    Ok(reply)
}

impl openraft::storage::RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let applied = read_applied(&db).map_err(|e| self.storage_err(e))?;
        let membership = read_membership(&db).map_err(|e| self.storage_err(e))?;
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Reply>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let last = {
            let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            let mut tx = db.transaction().map_err(|e| self.storage_err(e))?;
            let mut last = None;
            let mut removed_node = false;
            for entry in entries {
                let index = entry.log_id.index;
                let reply = match entry.payload {
                    openraft::EntryPayload::Blank => Vec::new(),
                    openraft::EntryPayload::Normal(ref p) => {
                        removed_node |= p
                            .requests
                            .iter()
                            .any(|r| matches!(r.cmd, Command::RemoveNode { .. }));
                        p.requests
                            .iter()
                            .map(|req| apply_request(&mut tx, req, index))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| self.storage_err(e))?
                    }
                    openraft::EntryPayload::Membership(ref m) => {
                        let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                        set_meta(&tx, "membership", &sm).map_err(|e| self.storage_err(e))?;
                        Vec::new()
                    }
                };
                last = Some(entry.log_id);
                replies.push(reply);
            }
            if let Some(l) = last {
                set_meta(&tx, "applied", &l).map_err(|e| self.storage_err(e))?;
            }
            tx.commit().map_err(|e| self.storage_err(e))?;
            if removed_node {
                self.reload_revoked(&db)?;
            }
            last
        };
        if let Some(l) = last {
            self.applied.send_replace(l.index);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        blocking(|| self.install_blocking(meta, snapshot.into_inner()))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let s = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        Ok(s.as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}

impl openraft::RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        blocking(|| self.build_blocking())
    }
}

/// Runs file-heavy work (copying or replacing the whole database) without stalling the
/// runtime's other tasks (heartbeats): on a multi-threaded runtime the thread is handed
/// over to blocking work for the duration.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl StateMachine {
    fn install_blocking(&self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StorageError> {
        let incoming = self.path.with_extension("incoming");
        let bad = |e: String| -> StorageError {
            let io =
                std::io::Error::other(format!("installing snapshot {}: {e}", meta.snapshot_id));
            openraft::StorageIOError::read_snapshot(Some(meta.signature()), &io).into()
        };
        // Leftovers of an install a crash interrupted must not be replayed into this one.
        for ext in ["incoming", "incoming-wal", "incoming-shm"] {
            let _ = std::fs::remove_file(self.path.with_extension(ext));
        }
        std::fs::write(&incoming, &bytes).map_err(|e| bad(e.to_string()))?;
        {
            // Validate before replacing anything: a bad snapshot leaves the state as it was.
            let check = open_db(&incoming).map_err(|e| bad(e.to_string()))?;
            let applied = read_applied(&check).map_err(|e| bad(e.to_string()))?;
            if applied != meta.last_log_id {
                return Err(bad(format!(
                    "file says applied {applied:?}, meta says {:?}",
                    meta.last_log_id
                )));
            }
            check
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .map_err(|e| bad(e.to_string()))?;
        }
        std::fs::File::open(&incoming)
            .and_then(|f| f.sync_all())
            .map_err(|e| bad(e.to_string()))?;
        {
            let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            // Close the current database (checkpointing its WAL) before the rename.
            let old = std::mem::replace(
                &mut *db,
                Connection::open_in_memory().map_err(|e| bad(e.to_string()))?,
            );
            drop(old);
            for ext in ["db-wal", "db-shm"] {
                let _ = std::fs::remove_file(self.path.with_extension(ext));
            }
            std::fs::rename(&incoming, &self.path).map_err(|e| bad(e.to_string()))?;
            // The rename itself must survive a crash: the log may be purged up to this
            // snapshot next.
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| bad(e.to_string()))?;
            }
            for ext in ["incoming-wal", "incoming-shm"] {
                let _ = std::fs::remove_file(self.path.with_extension(ext));
            }
            *db = open_db(&self.path).map_err(|e| bad(e.to_string()))?;
            self.reload_revoked(&db)?;
        }
        self.keep_snapshot(meta.clone(), bytes);
        if let Some(l) = meta.last_log_id {
            self.applied.send_replace(l.index);
        }
        Ok(())
    }

    /// Remembers `meta`'s snapshot as the current one unless a newer one is kept already
    /// (a build that started before an install finishes after it).
    fn keep_snapshot(&self, meta: SnapshotMeta, bytes: Vec<u8>) {
        let mut cur = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        if cur
            .as_ref()
            .is_none_or(|(m, _)| m.last_log_id <= meta.last_log_id)
        {
            *cur = Some((meta, bytes));
        }
    }

    fn build_blocking(&self) -> Result<Snapshot, StorageError> {
        let tmp = self
            .path
            .with_extension(format!("snap-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let (applied, membership) = {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            // A consistent copy of the whole database at this applied index.
            db.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])
                .map_err(|e| self.storage_err(e))?;
            (
                read_applied(&db).map_err(|e| self.storage_err(e))?,
                read_membership(&db).map_err(|e| self.storage_err(e))?,
            )
        };
        let bytes = std::fs::read(&tmp).map_err(|e| self.storage_err(e))?;
        let _ = std::fs::remove_file(&tmp);
        let seq = self
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{seq}",
                applied.map(|l| l.to_string()).unwrap_or_default()
            ),
        };
        self.keep_snapshot(meta.clone(), bytes.clone());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::storage::RaftStateMachine;

    /// An empty directory of this test process's own.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("boxd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry(index: u64, cmd: Command) -> Entry {
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(Proposal {
                requests: vec![Request {
                    actor: "test".into(),
                    id: format!("r{index}"),
                    at_ms: 1000 + index,
                    cmd,
                }],
            }),
        }
    }

    /// Applies `cmds` as entries 1, 2, ... (one request each); every reply in order.
    async fn apply_all(sm: &mut StateMachine, cmds: Vec<Command>) -> Vec<Reply> {
        apply_at(sm, 1, cmds).await
    }

    /// Applies `cmds` as log entries `first`, `first + 1`, ...
    async fn apply_at(sm: &mut StateMachine, first: u64, cmds: Vec<Command>) -> Vec<Reply> {
        let entries: Vec<Entry> = cmds
            .into_iter()
            .enumerate()
            .map(|(i, c)| entry(i as u64 + first, c))
            .collect();
        sm.apply(entries)
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect()
    }

    /// "ok", or the refusal's code, per reply.
    fn codes(replies: &[Reply]) -> Vec<&str> {
        replies
            .iter()
            .map(|r| r.result.as_ref().map(|_| "ok").unwrap_or_else(|e| e.code()))
            .collect()
    }

    #[tokio::test]
    async fn commands_apply_refuse_cleanly_and_snapshot() {
        let dir = scratch("state");
        let mut sm = StateMachine::open(&dir.join("state.db")).unwrap();
        let spec = MachineSpec {
            cpus: 1,
            memory_mib: 512,
            disk_gib: 10,
        };
        let mk = |name: &str| Command::CreateMachine {
            owner: "fp".into(),
            name: name.into(),
            spec,
            parent: None,
        };
        let cmds = vec![
            Command::CreateUser {
                fingerprint: "fp".into(),
                name: "alice".into(),
                public_key: "ssh-ed25519 AAA".into(),
            },
            Command::RegisterNode {
                id: 1,
                addr: "127.0.0.1:1".into(),
                role: NodeRole::Server,
                cpus: 4,
                memory_mib: 4096,
            },
            mk("a"), // no pool yet
            Command::AddPool {
                name: "p".into(),
                cidr: "203.0.113.0/30".into(),
            },
            Command::AddPool {
                name: "q".into(),
                cidr: "203.0.113.2/31".into(),
            }, // overlaps
            mk("a"),
            mk("a"), // duplicate
            mk("Bad_Name"),
            mk("b"),
            mk("c"), // the /30 has 2 addresses
            Command::SetQuota {
                user: "fp".into(),
                machines: 2,
            },
            Command::DeleteMachine {
                owner: "fp".into(),
                name: "b".into(),
            },
            mk("c"),
            Command::AddPool {
                name: "r".into(),
                cidr: "198.51.100.0/24".into(),
            },
            mk("d"), // quota 2
        ];
        let entries: Vec<Entry> = cmds
            .into_iter()
            .enumerate()
            .map(|(i, c)| entry(i as u64 + 1, c))
            .collect();
        let replies: Vec<Reply> = sm
            .apply(entries.clone())
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        let codes = codes(&replies);
        assert_eq!(
            codes,
            [
                "ok",
                "ok",
                "pool_exhausted",
                "ok",
                "already_exists",
                "ok",
                "already_exists",
                "invalid",
                "ok",
                "pool_exhausted",
                "ok",
                "ok",
                "ok",
                "ok",
                "quota_exceeded"
            ]
        );
        let Ok(Applied::Machine(a)) = &replies[5].result else {
            panic!()
        };
        assert_eq!((a.ipv4.as_str(), a.node), ("203.0.113.1", 1));
        // The freed address is reused.
        let Ok(Applied::Machine(c)) = &replies[12].result else {
            panic!()
        };
        assert_eq!(c.ipv4, "203.0.113.2");
        // Replaying the same entries (same request ids) changes nothing.
        let again: Vec<Reply> = sm
            .apply(entries)
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(again, replies);
        let counts = sm.query(&Query::Counts).unwrap();
        let QueryReply::Counts { applied, tables } = counts else {
            panic!()
        };
        assert_eq!(applied, 15);
        let get = |t: &str| tables.iter().find(|(n, _)| n == t).unwrap().1;
        assert_eq!(
            (get("machines"), get("allocations"), get("audit")),
            (2, 2, 15)
        );
        // A snapshot installed elsewhere reproduces the same state.
        let snap = openraft::RaftSnapshotBuilder::build_snapshot(&mut sm)
            .await
            .unwrap();
        let mut other = StateMachine::open(&dir.join("other.db")).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(
            other.query(&Query::Machines { owner: None }).unwrap(),
            sm.query(&Query::Machines { owner: None }).unwrap()
        );
        assert_eq!(
            other.applied_state().await.unwrap().0.map(|l| l.index),
            Some(15)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn teams_share_a_pool_of_vcpus_and_memory() {
        let dir = scratch("teams");
        let mut sm = StateMachine::open(&dir.join("state.db")).unwrap();
        let spec = MachineSpec {
            cpus: 2,
            memory_mib: 1024,
            disk_gib: 10,
        };
        let mk = |owner: &str, name: &str| Command::CreateMachine {
            owner: owner.into(),
            name: name.into(),
            spec,
            parent: None,
        };
        let set = |owner: &str, name: &str, state| Command::SetMachineState {
            owner: owner.into(),
            name: name.into(),
            state,
        };
        let user = |fp: &str| Command::CreateUser {
            fingerprint: fp.into(),
            name: fp.into(),
            public_key: "k".into(),
        };
        let cmds = vec![
            Command::RegisterNode {
                id: 1,
                addr: "a:1".into(),
                role: NodeRole::Worker,
                cpus: 64,
                memory_mib: 65536,
            },
            Command::AddPool {
                name: "p".into(),
                cidr: "198.51.100.0/24".into(),
            },
            user("ann"),
            user("bob"),
            Command::SetTeam {
                name: "t".into(),
                cpus: 4,
                memory_mib: 4096,
            },
            Command::SetUserTeam {
                user: "ann".into(),
                team: Some("t".into()),
            },
            Command::SetUserTeam {
                user: "bob".into(),
                team: Some("t".into()),
            },
            Command::SetUserTeam {
                user: "bob".into(),
                team: Some("nope".into()),
            },
            mk("ann", "a1"),
            mk("bob", "b1"),
            mk("bob", "b2"),                           // 6 vCPUs > 4
            set("ann", "a1", MachineState::Suspended), // frees 2
            mk("bob", "b2"),
            set("ann", "a1", MachineState::Running), // no room to resume
            Command::SetTeam {
                name: "t".into(),
                cpus: 6,
                memory_mib: 8192,
            },
            set("ann", "a1", MachineState::Running),
        ];
        let replies = apply_all(&mut sm, cmds).await;
        let codes = codes(&replies);
        assert_eq!(
            codes,
            [
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "not_found",
                "ok",
                "ok",
                "quota_exceeded",
                "ok",
                "ok",
                "quota_exceeded",
                "ok",
                "ok"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn unknown_keys_register_by_policy() {
        let dir = scratch("register");
        let mut sm = StateMachine::open(&dir.join("state.db")).unwrap();
        let reg = |fp: &str, hint: &str, invite: Option<&str>| Command::Register {
            fingerprint: fp.into(),
            public_key: format!("ssh-ed25519 {fp}"),
            name_hint: hint.into(),
            invite: invite.map(String::from),
        };
        let policy = |p: &str| Command::SetSetting {
            key: "registration".into(),
            value: p.into(),
        };
        let cmds = vec![
            reg("SHA256:a", "Alice.Smith", None), // open by default: alice-smith
            reg("SHA256:b", "alice.smith", None), // taken: alice-smith-2
            reg("SHA256:a", "again", None),       // a key registers once
            reg("SHA256:c", "---", None),         // nothing usable: user
            policy("invite"),
            reg("SHA256:d", "dan", None),
            Command::CreateInvite {
                hash: "h1".into(),
                expires_ms: 5000,
            },
            reg("SHA256:d", "dan", Some("h9")),
            reg("SHA256:d", "dan", Some("h1")),
            reg("SHA256:e", "eve", Some("h1")), // spent
            policy("allowlist"),
            reg("SHA256:f", "fay", None),
            Command::AllowKey {
                fingerprint: "SHA256:f".into(),
                allowed: true,
            },
            reg("SHA256:f", "fay", None),
            policy("closed"),
            reg("SHA256:g", "gus", None),
        ];
        let replies = apply_all(&mut sm, cmds).await;
        let got: Vec<String> = replies
            .iter()
            .map(|r| match &r.result {
                Ok(Applied::User { name }) => name.clone(),
                Ok(_) => "ok".into(),
                Err(e) => e.code().into(),
            })
            .collect();
        assert_eq!(
            got,
            [
                "alice-smith",
                "alice-smith-2",
                "already_exists",
                "user",
                "ok",
                "forbidden",
                "ok",
                "token_rejected",
                "dan",
                "token_rejected",
                "ok",
                "forbidden",
                "ok",
                "fay",
                "ok",
                "invalid"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn web_modes_and_domains() {
        let dir = scratch("domains");
        let mut sm = StateMachine::open(&dir.join("state.db")).unwrap();
        let spec = MachineSpec {
            cpus: 1,
            memory_mib: 512,
            disk_gib: 10,
        };
        let mk = |owner: &str, name: &str| Command::CreateMachine {
            owner: owner.into(),
            name: name.into(),
            spec,
            parent: None,
        };
        let add = |owner: &str, name: &str, d: &str| Command::AddDomain {
            owner: owner.into(),
            name: name.into(),
            domain: d.into(),
        };
        let user = |fp: &str| Command::CreateUser {
            fingerprint: fp.into(),
            name: fp.into(),
            public_key: "k".into(),
        };
        let cmds = vec![
            user("ann"),
            user("bob"),
            Command::RegisterNode {
                id: 1,
                addr: "a:1".into(),
                role: NodeRole::Server,
                cpus: 16,
                memory_mib: 16384,
            },
            Command::AddPool {
                name: "p".into(),
                cidr: "198.51.100.0/24".into(),
            },
            Command::SetSetting {
                key: "zone".into(),
                value: "boxd.test".into(),
            },
            mk("ann", "a1"),
            mk("bob", "b1"),
            add("ann", "a1", "WWW.Example.com."), // stored lower-case, no dot
            add("ann", "a1", "www.example.com"),  // again: a no-op
            add("bob", "b1", "www.example.com"),  // taken
            add("bob", "a1", "b.example.com"),    // not bob's machine
            add("ann", "a1", "x.boxd.test"),      // the zone's own names
            add("ann", "a1", "boxd.test"),
            add("ann", "a1", "nodots"),
            add("ann", "a1", "bad_label.com"),
            Command::SetWeb {
                owner: "ann".into(),
                name: "a1".into(),
                mode: WebMode::Passthrough,
            },
        ];
        let first = cmds.len();
        let replies = apply_all(&mut sm, cmds).await;
        assert_eq!(
            codes(&replies),
            [
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "already_exists",
                "not_found",
                "invalid",
                "invalid",
                "invalid",
                "invalid",
                "ok"
            ]
        );
        let machine = |sm: &StateMachine, name: &str| {
            let Ok(QueryReply::Machines { machines }) = sm.query(&Query::Machines { owner: None })
            else {
                panic!("machines")
            };
            machines.into_iter().find(|m| m.name == name)
        };
        assert_eq!(machine(&sm, "a1").unwrap().web, WebMode::Passthrough);
        assert_eq!(machine(&sm, "a1").unwrap().domains, ["www.example.com"]);
        let mut at = first as u64 + 1;
        let mut step = async |sm: &mut StateMachine, cmd: Command| {
            let r = apply_at(sm, at, vec![cmd]).await;
            at += 1;
            codes(&r)[0].to_string()
        };
        let state = |owner: &str, name: &str, s: MachineState| Command::SetMachineState {
            owner: owner.into(),
            name: name.into(),
            state: s,
        };
        let wake = || Command::WakeMachine {
            owner: "bob".into(),
            name: "b1".into(),
        };
        let del = Command::DeleteMachine {
            owner: "ann".into(),
            name: "a1".into(),
        };
        assert_eq!(step(&mut sm, del).await, "ok");
        assert!(machine(&sm, "a1").is_none());
        // Free again: deleted with a1.
        assert_eq!(
            step(&mut sm, add("bob", "b1", "www.example.com")).await,
            "ok"
        );
        let rm = Command::RemoveDomain {
            owner: "bob".into(),
            name: "b1".into(),
            domain: "nope.example.com".into(),
        };
        assert_eq!(step(&mut sm, rm).await, "not_found");
        // Only a running machine pauses; a wake moves only a paused one.
        let b1 = |sm: &StateMachine| machine(sm, "b1").unwrap().state;
        assert_eq!(b1(&sm), MachineState::Creating);
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Paused)).await,
            "invalid"
        );
        assert_eq!(step(&mut sm, wake()).await, "ok");
        assert_eq!(
            b1(&sm),
            MachineState::Creating,
            "a wake moved a machine that was not paused"
        );
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Running)).await,
            "ok"
        );
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Paused)).await,
            "ok"
        );
        assert_eq!(b1(&sm), MachineState::Paused);
        assert_eq!(step(&mut sm, wake()).await, "ok");
        assert_eq!(b1(&sm), MachineState::Running, "the wake left it paused");
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Stopped)).await,
            "ok"
        );
        assert_eq!(step(&mut sm, wake()).await, "ok");
        // The wake found it stopped and left it so.
        assert_eq!(b1(&sm), MachineState::Stopped);
        // A stopped machine cannot be suspended; a suspended one wakes to running,
        // and each change records since when.
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Suspended)).await,
            "invalid"
        );
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Running)).await,
            "ok"
        );
        let since = machine(&sm, "b1").unwrap().state_since_ms;
        assert_eq!(
            step(&mut sm, state("bob", "b1", MachineState::Suspended)).await,
            "ok"
        );
        assert_eq!(b1(&sm), MachineState::Suspended);
        assert!(machine(&sm, "b1").unwrap().state_since_ms > since);
        assert_eq!(step(&mut sm, wake()).await, "ok");
        assert_eq!(
            b1(&sm),
            MachineState::Running,
            "traffic wakes a suspended machine"
        );
        let m = machine(&sm, "b1").unwrap();
        assert_eq!(m.domains, ["www.example.com"]);
        assert_eq!(m.web, WebMode::Public);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn acme_challenges_and_accounts() {
        let dir = scratch("acme");
        let mut sm = StateMachine::open(&dir.join("state.db")).unwrap();
        let put =
            |kind: &str, name: &str, value: &str, expires_ms: u64| Command::PutAcmeChallenge {
                kind: kind.into(),
                name: name.into(),
                value: value.into(),
                expires_ms,
            };
        // Entry i is applied at 1000 + i ms (see `entry`).
        let cmds = vec![
            put("dns-01", "_acme-challenge.z", "v1", 60_000),
            put("dns-01", "_acme-challenge.z", "v2", 60_000), // a second value, same name
            put("http-01", "tok", "tok.thumb", 4_000),
            put("tls-alpn-01", "x", "y", 60_000), // unknown kind
            put("dns-01", "a b", "v", 60_000),    // not printable
            put("dns-01", "n", &"v".repeat(256), 60_000), // too long
            put("dns-01", "n", "v", 1),           // already expired
            put("dns-01", "n", "v", 100_000_000), // more than an hour
            Command::RemoveAcmeChallenge {
                kind: "dns-01".into(),
                name: "_acme-challenge.z".into(),
                value: "v1".into(),
            },
            Command::PutAcmeAccount {
                directory: "https://ca/dir".into(),
                credentials: "{\"id\":\"1\"}".into(),
            },
            Command::PutAcmeAccount {
                directory: String::new(),
                credentials: "{}".into(),
            },
            put("dns-01", "later", "v3", 60_000), // at 1012 ms: "tok" (4000) still live
        ];
        let replies = apply_all(&mut sm, cmds).await;
        let codes = codes(&replies);
        assert_eq!(
            codes,
            [
                "ok", "ok", "ok", "invalid", "invalid", "invalid", "invalid", "invalid", "ok",
                "ok", "invalid", "ok"
            ]
        );
        let Ok(QueryReply::AcmeChallenges { challenges }) = sm.query(&Query::AcmeChallenges) else {
            panic!("challenges query")
        };
        let got: Vec<(&str, &str, &str)> = challenges
            .iter()
            .map(|c| (c.kind.as_str(), c.name.as_str(), c.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("dns-01", "_acme-challenge.z", "v2"),
                ("dns-01", "later", "v3"),
                ("http-01", "tok", "tok.thumb")
            ]
        );
        let acct = |d: &str| match sm.query(&Query::AcmeAccount {
            directory: d.into(),
        }) {
            Ok(QueryReply::AcmeAccount { credentials }) => credentials,
            other => panic!("{other:?}"),
        };
        assert_eq!(acct("https://ca/dir").as_deref(), Some("{\"id\":\"1\"}"));
        assert_eq!(acct("https://other/dir"), None);
        // The account's key never reaches the audit log.
        let Ok(QueryReply::Audit { entries }) = sm.query(&Query::Audit {
            actor: None,
            limit: 100,
        }) else {
            panic!("audit")
        };
        let acct_entry = entries
            .iter()
            .find(|e| e.op == "put_acme_account" && e.result == "ok")
            .expect("audited");
        assert_eq!(acct_entry.args, "directory=https://ca/dir");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_older_schema_is_migrated_and_a_newer_one_refused() {
        let dir = scratch("migrate");
        let path = dir.join("state.db");
        {
            // A database as the first schema left it.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!("{}; PRAGMA user_version = 1;", MIGRATIONS[0]))
                .unwrap();
        }
        let c = open_db(&path).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        c.execute("INSERT INTO allowlist (fingerprint) VALUES ('x')", [])
            .unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        let err = open_db(&path).expect_err("newer schema").to_string();
        assert!(
            err.contains("newer") && err.contains("do not delete"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_database_is_refused_with_the_way_out() {
        let dir = scratch("corrupt");
        let path = dir.join("state.db");
        drop(open_db(&path).unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        for b in bytes.iter_mut().skip(100).take(4000) {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = open_db(&path)
            .expect_err("corruption is detected")
            .to_string();
        assert!(
            err.contains("corrupt") && err.contains("boxd cluster remove"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
