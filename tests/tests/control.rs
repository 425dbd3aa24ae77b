//! The control plane under faults: real `boxd control run` processes in network
//! namespaces, a stream of writes and linearizable reads from concurrent clients through
//! the nodes' admin sockets, while leaders are killed with SIGKILL, minorities and
//! leaders are cut off, and nodes restart on their disks. Afterwards every node must
//! hold every acknowledged write exactly once, agree with every other node, and the
//! history must be linearizable (checked, see tests/src/linearizable.rs).

use anyhow::{Context, Result, bail, ensure};
use boxd_control::admin::{AdminRequest, Client};
use boxd_control::types::{AppError, Command, MachineSpec, Query, QueryReply, Request};
use boxd_tests::cluster::Cluster;
use boxd_tests::linearizable::{self, Kind, Op};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The release `boxd`, or why these tests cannot run here.
fn boxd() -> Result<PathBuf, String> {
    if !boxd_tests::is_root() {
        return Err("network namespaces need root".into());
    }
    boxd_tests::guest::boxd_binary().map_err(|e| panic!("{e}"))
}

const KEYS: u64 = 3;
const CLIENTS: usize = 4;

/// Concurrent clients writing unique values and reading registers, recording every
/// operation with its invocation and return times.
struct Workload {
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Op>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Operation times are nanoseconds since this instant.
    t0: Instant,
}

impl Workload {
    fn start(sockets: Vec<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let threads = (0..CLIENTS)
            .map(|c| {
                let (stop, history, sockets) = (stop.clone(), history.clone(), sockets.clone());
                std::thread::spawn(move || client(c, &sockets, &stop, &history, t0))
            })
            .collect();
        Self {
            stop,
            history,
            threads,
            t0,
        }
    }

    /// Now, on the clock the history's times are on.
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// Waits (bounded) until `n` writes invoked at or after `since` were acknowledged:
    /// the cluster takes writes again, not merely has processes running.
    fn wait_acked_since(&self, since: u64, n: usize, limit: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let acked = acked_in(&self.history.lock().unwrap(), since, u64::MAX);
            if acked >= n {
                eprintln!("{what}: {acked} writes acknowledged");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: only {acked} writes acknowledged within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn finish(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        Arc::try_unwrap(self.history)
            .expect("threads joined")
            .into_inner()
            .unwrap()
    }
}

fn client(c: usize, sockets: &[PathBuf], stop: &AtomicBool, history: &Mutex<Vec<Op>>, t0: Instant) {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let now = || t0.elapsed().as_nanos() as u64;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("k{}", next() % KEYS);
        let first = (next() % sockets.len() as u64) as usize;
        if next() % 3 == 0 {
            let call = now();
            let q = AdminRequest::Read {
                query: Query::Setting { key: key.clone() },
                linearizable: true,
            };
            let got = Client::connect(&sockets[first], Duration::from_secs(3))
                .and_then(|mut cl| cl.call::<QueryReply>(&q));
            if let Ok(QueryReply::Setting { value }) = got {
                history.lock().unwrap().push(Op {
                    key,
                    kind: Kind::Read(value),
                    call,
                    ret: Some(now()),
                });
            }
        } else {
            let value = format!("c{c}-{n}");
            let req = Request {
                actor: format!("client-{c}"),
                id: format!("w-{c}-{n}"),
                at_ms: 0,
                cmd: Command::SetSetting {
                    key: key.clone(),
                    value: value.clone(),
                },
            };
            let call = now();
            let mut ret = None;
            // A write whose answer was lost is retried with the same id on other nodes:
            // it must still apply once.
            for attempt in 0..3 {
                let sock = &sockets[(first + attempt) % sockets.len()];
                let got = Client::connect(sock, Duration::from_secs(3)).and_then(|mut cl| {
                    cl.call::<boxd_control::types::Reply>(&AdminRequest::Write(req.clone()))
                });
                if let Ok(reply) = got {
                    assert!(reply.result.is_ok(), "write refused: {reply:?}");
                    ret = Some(now());
                    break;
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            history.lock().unwrap().push(Op {
                key,
                kind: Kind::Write(value),
                call,
                ret,
            });
        }
        std::thread::sleep(Duration::from_millis(15));
    }
}

/// Waits until every node has applied the same index, then checks that they hold the
/// same state, that each acknowledged write is in every node's audit log exactly once,
/// and that the history is linearizable.
fn verify(cluster: &Cluster, history: &[Op]) -> Result<()> {
    let n = cluster.nodes.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let counts: Vec<QueryReply> = (0..n)
            .map(|i| -> Result<QueryReply> {
                Ok(cluster.client(i)?.call(&AdminRequest::Read {
                    query: Query::Counts,
                    linearizable: false,
                })?)
            })
            .collect::<Result<_>>()?;
        if counts.windows(2).all(|w| w[0] == w[1]) {
            break counts;
        }
        if Instant::now() > deadline {
            bail!("nodes did not converge: {counts:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("converged: {:?}", counts[0]);
    let mut audits = Vec::new();
    for i in 0..n {
        let q = Query::Audit {
            actor: None,
            limit: 10_000,
        };
        let QueryReply::Audit { entries } = cluster.client(i)?.call(&AdminRequest::Read {
            query: q,
            linearizable: false,
        })?
        else {
            bail!("unexpected reply")
        };
        ensure!(
            entries.len() < 10_000,
            "audit log too long to compare whole"
        );
        audits.push(entries);
    }
    ensure!(
        audits.windows(2).all(|w| w[0] == w[1]),
        "audit logs differ between nodes"
    );
    let mut applied: HashMap<String, usize> = HashMap::new();
    for e in audits[0].iter().filter(|e| e.op == "set_setting") {
        let v: serde_json::Value = serde_json::from_str(&e.args)?;
        *applied
            .entry(v["value"].as_str().context("value")?.to_string())
            .or_default() += 1;
    }
    let (mut acked, mut unknown) = (0, 0);
    for op in history {
        if let Kind::Write(v) = &op.kind {
            let times = applied.get(v).copied().unwrap_or(0);
            match op.ret {
                Some(_) => {
                    acked += 1;
                    ensure!(times == 1, "acknowledged write {v} applied {times} times");
                }
                None => {
                    unknown += 1;
                    ensure!(times <= 1, "unacknowledged write {v} applied {times} times");
                }
            }
        }
    }
    ensure!(
        applied.values().all(|&t| t == 1),
        "a write was applied twice"
    );
    let reads = history
        .iter()
        .filter(|o| matches!(o.kind, Kind::Read(_)))
        .count();
    eprintln!(
        "{acked} acknowledged writes, {unknown} without an answer, {reads} linearizable reads"
    );
    ensure!(
        acked > 50 && reads > 20,
        "too little traffic went through to mean anything"
    );
    let t = Instant::now();
    linearizable::check(history).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "history of {} operations is linearizable (checked in {:?})",
        history.len(),
        t.elapsed()
    );
    Ok(())
}

/// Writes acknowledged with their answer inside `[from, to)` (history times).
fn acked_in(history: &[Op], from: u64, to: u64) -> usize {
    history
        .iter()
        .filter(|o| matches!(o.kind, Kind::Write(_)) && o.call >= from)
        .filter(|o| o.ret.is_some_and(|r| r < to))
        .count()
}

/// Operations (writes and linearizable reads) answered inside `[from, to)`.
fn answered_in(history: &[Op], from: u64, to: u64) -> Vec<&Op> {
    history
        .iter()
        .filter(|o| o.ret.is_some_and(|r| r >= from && r < to))
        .collect()
}

fn pause(s: f64) {
    std::thread::sleep(Duration::from_secs_f64(s));
}

#[test]
fn three_voters_survive_kills_partitions_and_restarts() -> Result<()> {
    let boxd = match boxd() {
        Ok(b) => b,
        Err(why) => boxd_tests::skip!("{why}"),
    };
    let mut c = Cluster::netns(&boxd, "bxr3", 3, 77)?;
    let sockets = (0..3).map(|i| c.socket(i)).collect();
    let w = Workload::start(sockets);
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:5.1} s] {what}", t0.elapsed().as_secs_f64());
    pause(1.5);

    let l = c.leader(Duration::from_secs(10))?;
    step(&format!("kill -9 the leader (node {})", l + 1));
    c.kill9(l);
    pause(3.0);
    // The survivors elect a leader among themselves (the killed node cannot answer) and
    // take writes again.
    let l2 = c.leader(Duration::from_secs(10))?;
    let after_kill = w.now();
    w.wait_acked_since(
        after_kill,
        5,
        Duration::from_secs(15),
        "two of three voters",
    )?;
    wait_health(&c, l2, l as u64 + 1, false)?;
    c.start(l)?;
    wait_health(&c, l2, l as u64 + 1, true)?;
    pause(1.0);

    let l = c.leader(Duration::from_secs(10))?;
    let f = (l + 1) % 3;
    step(&format!("partition a follower (node {}) away", f + 1));
    c.set_connected(f, false)?;
    pause(3.0);
    c.set_connected(f, true)?;
    pause(1.5);

    let l = c.leader(Duration::from_secs(10))?;
    step(&format!("partition the leader (node {}) away", l + 1));
    c.set_connected(l, false)?;
    // The connected majority elects a leader of its own and takes writes while the old
    // leader is cut off.
    let cut = w.now();
    w.wait_acked_since(
        cut,
        5,
        Duration::from_secs(15),
        "the majority without its leader",
    )?;
    c.set_connected(l, true)?;
    pause(1.5);

    step("kill -9 every node, restart all on their disks");
    for i in 0..3 {
        c.kill9(i);
    }
    let restarted = w.now();
    for i in 0..3 {
        c.start(i)?;
    }
    c.leader(Duration::from_secs(15))?;
    w.wait_acked_since(
        restarted,
        10,
        Duration::from_secs(20),
        "after the full restart",
    )?;
    let history = w.finish();
    verify(&c, &history)
}

#[test]
fn five_voters_lose_quorum_and_recover_it() -> Result<()> {
    let boxd = match boxd() {
        Ok(b) => b,
        Err(why) => boxd_tests::skip!("{why}"),
    };
    let mut c = Cluster::netns(&boxd, "bxr5", 5, 78)?;
    let sockets = (0..5).map(|i| c.socket(i)).collect();
    let w = Workload::start(sockets);
    pause(1.5);
    let l = c.leader(Duration::from_secs(10))?;
    let (a, b) = ((l + 1) % 5, (l + 2) % 5);
    eprintln!("partition a minority (nodes {} and {})", a + 1, b + 1);
    c.set_connected(a, false)?;
    c.set_connected(b, false)?;
    pause(2.0);
    eprintln!(
        "kill -9 the leader (node {}): two of five left, no quorum",
        l + 1
    );
    c.kill9(l);
    // What was committed before the kill may still be answered for a moment.
    let no_quorum = w.now() + 500_000_000;
    pause(3.0);
    let quorum_back = w.now();
    eprintln!("restart the leader on its disk: quorum again");
    c.start(l)?;
    w.wait_acked_since(
        quorum_back,
        5,
        Duration::from_secs(20),
        "three of five again",
    )?;
    c.set_connected(a, true)?;
    c.set_connected(b, true)?;
    pause(1.5);
    let l = c.leader(Duration::from_secs(10))?;
    eprintln!(
        "partition the leader (node {}) and one follower away",
        l + 1
    );
    let f = (l + 3) % 5;
    c.set_connected(l, false)?;
    c.set_connected(f, false)?;
    pause(4.0);
    c.set_connected(l, true)?;
    c.set_connected(f, true)?;
    pause(2.0);
    let history = w.finish();
    // Nothing was answered while no majority could commit.
    let answered = answered_in(&history, no_quorum, quorum_back);
    ensure!(
        answered.is_empty(),
        "{} operations were answered without a quorum, e.g. {:?}",
        answered.len(),
        answered.first()
    );
    verify(&c, &history)?;

    // Removing a node: out of the membership, out of the nodes, its certificate refused.
    let l = c.leader(Duration::from_secs(10))?;
    let gone = (l + 1) % 5;
    c.client(l)?.call::<()>(&AdminRequest::Remove {
        id: gone as u64 + 1,
    })?;
    let s = c.status(l)?;
    ensure!(
        s.members.len() == 4 && s.members.iter().all(|m| m.id != gone as u64 + 1),
        "{s:?}"
    );
    ensure!(
        s.nodes.iter().all(|n| n.id != gone as u64 + 1),
        "{:?}",
        s.nodes
    );
    removed_node_is_refused(&c, gone, l)
}

/// The removed node's own certificate (from the right CA) no longer gets a call through.
fn removed_node_is_refused(c: &Cluster, gone: usize, to: usize) -> Result<()> {
    use boxd_control::net::{self, CallError, Peer, Rpc};
    use boxd_control::tls::{self, Identity};
    let identity = |i: usize| -> Result<Identity> {
        let dir = &c.nodes[i].dir;
        Ok(Identity {
            cert_pem: std::fs::read_to_string(dir.join("node.pem"))?,
            key_pem: std::fs::read_to_string(dir.join("node.key"))?,
        })
    };
    let me = identity(gone)?;
    // A member's certificate, from the same place: the call goes through, so what the
    // removed one meets is a refusal, not a network that does not reach.
    let member = identity((0..c.nodes.len()).find(|&i| i != gone && i != to).unwrap())?;
    let ca_pem = std::fs::read_to_string(c.nodes[0].dir.join("ca.pem"))?;
    let addr = c.nodes[to].addr.clone();
    // From where the removed node lives: its namespace is still on the cluster's network.
    c.run_as(gone, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
        let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
        let dial = |who: &Identity| -> Result<Peer> {
            let cfg = net::quic_client(tls::client_config(&ca_pem, who)?);
            Ok(Peer::new(endpoint.clone(), cfg, &addr, &tls::node_name(to as u64 + 1)))
        };
        let status = Rpc::Ping;
        let got = dial(&member)?
            .call::<serde_json::Value>(&status, Duration::from_secs(5))
            .await;
        ensure!(got.is_ok(), "a member's call from the same place: {got:?}");
        let peer = dial(&me)?;
        let write = Rpc::Write(Request {
            actor: "removed".into(),
            id: String::new(),
            at_ms: 0,
            cmd: Command::SetSetting {
                key: "k".into(),
                value: "from a removed node".into(),
            },
        });
        let got = peer
            .call::<serde_json::Value>(&write, Duration::from_secs(5))
            .await;
        ensure!(
            matches!(&got, Err(CallError::Refused(m)) if m.contains("removed from the cluster")),
            "a call with removed node {}'s certificate: {got:?}",
            gone + 1
        );
        anyhow::Ok(())
    })
    })
}

/// Waits until the leader's health checker records node `id` as `healthy`.
fn wait_health(c: &Cluster, leader: usize, id: u64, healthy: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = c.status(leader)?;
        if s.nodes.iter().any(|n| n.id == id && n.healthy == healthy) {
            eprintln!(
                "node {id} recorded {}",
                if healthy { "healthy" } else { "unhealthy" }
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "node {id} never recorded healthy={healthy}: {:?}",
            s.nodes
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write(cl: &mut Client, cmd: Command) -> Result<Result<boxd_control::types::Applied, AppError>> {
    let req = Request {
        actor: "test".into(),
        id: String::new(),
        at_ms: 0,
        cmd,
    };
    Ok(cl
        .call::<boxd_control::types::Reply>(&AdminRequest::Write(req))?
        .result)
}

#[test]
fn bad_input_is_refused_and_changes_nothing() -> Result<()> {
    let boxd = match boxd() {
        Ok(b) => b,
        Err(why) => boxd_tests::skip!("{why}"),
    };
    let mut c = Cluster::loopback(&boxd, "bad", 1, 7300)?;
    let mut cl = c.client(0)?;
    let counts = |cl: &mut Client| -> Result<QueryReply> {
        Ok(cl.call(&AdminRequest::Read {
            query: Query::Counts,
            linearizable: true,
        })?)
    };
    let strip = |q: QueryReply| match q {
        // The audit log records refusals too; everything else must stay as it was.
        QueryReply::Counts { tables, .. } => tables
            .into_iter()
            .filter(|(t, _)| t != "audit" && t != "requests")
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    // Capacity as an operator with overcommit would declare it (this host has 2 CPUs).
    let capacity = Command::RegisterNode {
        id: 1,
        addr: c.nodes[0].addr.clone(),
        role: boxd_control::types::NodeRole::Server,
        cpus: 64,
        memory_mib: 65536,
    };
    write(&mut cl, capacity)??;
    write(
        &mut cl,
        Command::CreateUser {
            fingerprint: "SHA256:u".into(),
            name: "u".into(),
            public_key: "k".into(),
        },
    )??;
    write(
        &mut cl,
        Command::AddPool {
            name: "p".into(),
            cidr: "192.0.2.0/30".into(),
        },
    )??;
    write(
        &mut cl,
        Command::SetQuota {
            user: "SHA256:u".into(),
            machines: 3,
        },
    )??;
    let spec = MachineSpec {
        cpus: 1,
        memory_mib: 256,
        disk_gib: 1,
    };
    let mk = |name: &str| Command::CreateMachine {
        owner: "SHA256:u".into(),
        name: name.into(),
        spec,
        parent: None,
    };
    write(&mut cl, mk("one"))??;
    let before = strip(counts(&mut cl)?);
    let refusals = [
        (mk("one"), "already_exists"),
        (mk("-bad"), "invalid"),
        (mk(&"x".repeat(64)), "invalid"),
        (
            Command::CreateMachine {
                owner: "SHA256:u".into(),
                name: "huge".into(),
                spec: MachineSpec { cpus: 1000, ..spec },
                parent: None,
            },
            "invalid",
        ),
        (
            Command::CreateMachine {
                owner: "SHA256:nobody".into(),
                name: "x".into(),
                spec,
                parent: None,
            },
            "not_found",
        ),
        (
            Command::AddPool {
                name: "bad".into(),
                cidr: "192.0.2.1/24".into(),
            },
            "invalid",
        ),
        (
            Command::AddPool {
                name: "over".into(),
                cidr: "192.0.2.0/29".into(),
            },
            "already_exists",
        ),
    ];
    for (cmd, code) in refusals {
        let got = write(&mut cl, cmd.clone())?;
        ensure!(
            got.as_ref().err().map(AppError::code) == Some(code),
            "{cmd:?} gave {got:?}, expected {code}"
        );
    }
    ensure!(
        strip(counts(&mut cl)?) == before,
        "a refused command changed the state"
    );
    write(&mut cl, mk("two"))??;
    // The /30 has two addresses: the third machine finds the pool exhausted...
    let got = write(&mut cl, mk("three"))?;
    ensure!(matches!(got, Err(AppError::PoolExhausted(_))), "{got:?}");
    write(
        &mut cl,
        Command::AddPool {
            name: "q".into(),
            cidr: "198.51.100.0/24".into(),
        },
    )??;
    write(&mut cl, mk("three"))??;
    // ...and the fourth runs into the quota of 3.
    let got = write(&mut cl, mk("four"))?;
    ensure!(matches!(got, Err(AppError::QuotaExceeded(_))), "{got:?}");

    // Joining: a forged secret, the wrong cluster's CA, a spent token.
    let token: String = cl.call(&AdminRequest::Token { ttl_s: 600 })?;
    let (head, secret) = token.rsplit_once('.').context("token format")?;
    let (addr_part, _fingerprint) = head.rsplit_once('.').context("token format")?;
    let forged = format!("{head}.{}", "0".repeat(64));
    let other_ca = format!("{addr_part}.{}.{secret}", "ab".repeat(32));
    let join = |t: &str, dir: &str| {
        std::process::Command::new(&boxd)
            .args([
                "cluster",
                "join",
                t,
                "--listen",
                "127.0.0.1:7399",
                "--data-dir",
            ])
            .arg(std::env::temp_dir().join(dir))
            .output()
            .unwrap()
    };
    let out = join(&forged, "boxd-forged");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unknown join token"),
        "forged token: {err}"
    );
    let out = join(&other_ca, "boxd-otherca");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("not the one in the join token"),
        "other CA: {err}"
    );
    for refused in ["boxd-forged", "boxd-otherca"] {
        ensure!(
            !std::env::temp_dir()
                .join(refused)
                .join("node.json")
                .exists(),
            "a refused join left a node directory ({refused})"
        );
    }
    let QueryReply::Nodes { nodes } = cl.call(&AdminRequest::Read {
        query: Query::Nodes,
        linearizable: true,
    })?
    else {
        bail!("nodes")
    };
    ensure!(
        nodes.len() == 1,
        "a refused join registered a node: {nodes:?}"
    );
    // The real token admits one node, once: used again, it is spent.
    for d in ["boxd-joined", "boxd-spent"] {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(d));
    }
    let out = join(&token, "boxd-joined");
    ensure!(
        out.status.success(),
        "joining with a fresh token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = join(&token, "boxd-spent");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unknown join token"),
        "a spent token: {:?} {err}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        !std::env::temp_dir().join("boxd-spent/node.json").exists(),
        "a refused join left a node directory (boxd-spent)"
    );
    for d in ["boxd-joined", "boxd-spent"] {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(d));
    }
    impostors(&c)?;

    // Corrupted files: the node refuses to start, names the file and the way out.
    drop(cl);
    c.stop(0)?;
    let dir = c.nodes[0].dir.clone();
    ensure!(
        !dir.join("state.db-wal").exists()
            || std::fs::metadata(dir.join("state.db-wal"))?.len() == 0,
        "a clean stop checkpoints the state database"
    );
    let db = dir.join("state.db");
    let saved = std::fs::read(&db)?;
    let mut bytes = saved.clone();
    for b in bytes.iter_mut().skip(100) {
        *b ^= 0xa5;
    }
    std::fs::write(&db, &bytes)?;
    let err = start_fails(&boxd, &dir)?;
    ensure!(
        err.contains("state.db") && err.contains("corrupt") && err.contains("boxd cluster remove"),
        "corrupt SQLite: {err}"
    );
    std::fs::write(&db, &saved)?;
    let mut damaged = 0;
    for f in std::fs::read_dir(dir.join("raft"))? {
        let p = f?.path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".log") || name.ends_with(".sst") {
            let mut b = std::fs::read(&p)?;
            let mid = b.len() / 2;
            for x in b.iter_mut().skip(mid).take(64) {
                *x ^= 0xff;
            }
            std::fs::write(&p, b)?;
            damaged += 1;
        }
    }
    ensure!(damaged > 0, "no RocksDB files to damage");
    let err = start_fails(&boxd, &dir)?;
    ensure!(
        err.contains("Raft log") && err.contains("boxd cluster remove"),
        "corrupt RocksDB: {err}"
    );
    Ok(())
}

/// Runs `boxd control run` on `dir`, expecting it to refuse to start; its stderr.
fn start_fails(boxd: &std::path::Path, dir: &std::path::Path) -> Result<String> {
    let mut child = std::process::Command::new(boxd)
        .args(["control", "run", "--data-dir"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err)?;
            ensure!(
                !status.success(),
                "boxd control run succeeded on damaged files: {err}"
            );
            return Ok(err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("boxd control run started on damaged files");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data-path reconciler: machines created, changed and removed through Raft show
/// up in the real eBPF maps of the node (and only what belongs there), and a restarted
/// node reconciles to the same maps.
#[test]
fn the_data_path_follows_the_replicated_state() -> Result<()> {
    use boxd_tests::bpf::{Datapath, run_ok, veth};
    use boxd_tests::net::Netns;
    let boxd = match boxd() {
        Ok(b) => b,
        Err(why) => boxd_tests::skip!("{why}"),
    };
    if let Some(why) = boxd_tests::bpf::tools_missing() {
        boxd_tests::skip!("{why}");
    }
    let id = format!("{}", std::process::id() % 100_000);
    let host = Netns::new(&format!("bxk{id}"))?;
    let peer = Netns::new(&format!("bxq{id}"))?;
    veth(&host.name, "up0", &peer.name, "c0")?;
    host.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    peer.ip(&["addr", "add", "198.51.100.9/24", "dev", "c0"])?;
    // Machine 1's host port; machine 3 never gets one.
    veth(&host.name, "bx1", &peer.name, "v1")?;
    let dp = Datapath::up(
        &host.name,
        &format!("rec{id}"),
        &["--uplink", "up0", "--node-id", "1"],
    )?;
    let dir = std::env::temp_dir().join(format!("boxd-reconcile-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    let in_host = |args: &[&str]| {
        let mut c = boxd_tests::bpf::in_ns(&host.name, boxd.to_str().unwrap(), args);
        c.arg("--data-dir").arg(&dir);
        c
    };
    run_ok(in_host(&["cluster", "init", "--listen", "127.0.0.1:7350"]))?;
    let start = || -> Result<std::process::Child> {
        let mut c = in_host(&["control", "run", "--bpf-pin-dir", dp.pin.to_str().unwrap()]);
        let child = c
            .env("BOXD_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        boxd_tests::cluster::wait_admin(&dir.join("admin.sock"), Duration::from_secs(20))?;
        Ok(child)
    };
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut node = Kill(start()?);
    let mut cl = Client::connect(&dir.join("admin.sock"), Duration::from_secs(15))?;
    use boxd_control::types::{MachineState, NodeRole};
    let reg = |id, addr: &str, role| Command::RegisterNode {
        id,
        addr: addr.into(),
        role,
        cpus: 64,
        memory_mib: 65536,
    };
    write(&mut cl, reg(1, "127.0.0.1:7350", NodeRole::Server))??;
    write(&mut cl, reg(2, "198.51.100.9:7946", NodeRole::Worker))??;
    write(
        &mut cl,
        Command::CreateUser {
            fingerprint: "SHA256:o".into(),
            name: "o".into(),
            public_key: "k".into(),
        },
    )??;
    write(
        &mut cl,
        Command::AddPool {
            name: "pub".into(),
            cidr: "203.0.113.0/24".into(),
        },
    )??;
    write(
        &mut cl,
        Command::SetSetting {
            key: "zone".into(),
            value: "boxd.test".into(),
        },
    )??;
    let spec = MachineSpec {
        cpus: 1,
        memory_mib: 512,
        disk_gib: 1,
    };
    let mk = |name: &str| Command::CreateMachine {
        owner: "SHA256:o".into(),
        name: name.into(),
        spec,
        parent: None,
    };
    write(&mut cl, mk("a"))??; // node 1 (lowest id of two equal nodes), id 1, port bx1
    write(
        &mut cl,
        Command::SetNodeHealth {
            id: 1,
            healthy: false,
        },
    )??;
    write(&mut cl, mk("b"))??; // node 2: node 1 is unhealthy
    write(
        &mut cl,
        Command::SetNodeHealth {
            id: 1,
            healthy: true,
        },
    )??;
    write(&mut cl, mk("c"))??; // node 1, no port yet: not in the maps

    let wait = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = dp.json(&["vms"])?;
            if ok(&v) {
                return Ok(v);
            }
            ensure!(Instant::now() < deadline, "{what}: maps hold {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let row = |v: &serde_json::Value, ip: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|r| r["public"] == ip).cloned())
    };
    let v = wait("machines a and b in the maps", &|v| {
        row(v, "203.0.113.1").is_some() && row(v, "203.0.113.2").is_some()
    })?;
    let a = row(&v, "203.0.113.1").unwrap();
    let b = row(&v, "203.0.113.2").unwrap();
    ensure!(
        a["state"] == "stopped" && a["node"] == 1 && a["port"] == "bx1" && a["vm_id"] == 1,
        "a: {a}"
    );
    ensure!(b["node"] == 2 && b["port"].is_null(), "b: {b}");
    ensure!(row(&v, "203.0.113.3").is_none(), "c has no port yet: {v}");
    let domains = dp.json(&["domains"])?;
    ensure!(
        domains.to_string().contains("a.boxd.test") && domains.to_string().contains("b.boxd.test"),
        "{domains}"
    );

    let set = |cl: &mut Client, name: &str, state| {
        write(
            cl,
            Command::SetMachineState {
                owner: "SHA256:o".into(),
                name: name.into(),
                state,
            },
        )
    };
    set(&mut cl, "a", MachineState::Running)??;
    wait("a running", &|v| {
        row(v, "203.0.113.1").is_some_and(|r| r["state"] == "running")
    })?;
    set(&mut cl, "a", MachineState::Suspended)??;
    wait("a suspended", &|v| {
        row(v, "203.0.113.1").is_some_and(|r| r["state"] == "suspended")
    })?;
    // The port appears later (as the worker would create it): the next resync adds c.
    veth(&host.name, "bx3", &peer.name, "v3")?;
    wait("c once its port exists", &|v| {
        row(v, "203.0.113.3").is_some()
    })?;
    write(
        &mut cl,
        Command::DeleteMachine {
            owner: "SHA256:o".into(),
            name: "b".into(),
        },
    )??;
    let before = wait("b removed", &|v| row(v, "203.0.113.2").is_none())?;

    // A restarted node reconciles to the same maps: while it is down the maps drift
    // (emptied behind its back), and the restarted node puts every entry back.
    drop(cl);
    drop(node);
    let strip = |v: &serde_json::Value| {
        let mut rows: Vec<(String, String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["public"].to_string(),
                    r["state"].to_string(),
                    r["port"].to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let want = strip(&before);
    ensure!(!want.is_empty(), "nothing in the maps to restore: {before}");
    dp.apply(&serde_json::json!({}))?;
    ensure!(
        strip(&dp.json(&["vms"])?).is_empty(),
        "the maps were not emptied while the node was down"
    );
    node = Kill(start()?);
    wait("the restarted node's maps", &|v| strip(v) == want)?;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Node RPC refuses callers without a certificate (except to join), a certificate from
/// another CA, a Raft message from a node speaking as another, and membership changes
/// from non-voters. (A removed node's certificate: five_voters_lose_quorum_and_recover_it.)
fn impostors(c: &Cluster) -> Result<()> {
    use boxd_control::net::{self, AdminOp, CallError, Peer, Rpc};
    use boxd_control::tls::{self, Identity};
    let dir = &c.nodes[0].dir;
    let ca = Identity {
        cert_pem: std::fs::read_to_string(dir.join("ca.pem"))?,
        key_pem: std::fs::read_to_string(dir.join("ca.key"))?,
    };
    let addr = c.nodes[0].addr.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let dial = |me: &Identity, ca_pem: &str| -> Result<Peer> {
            let cfg = net::quic_client(tls::client_config(ca_pem, me)?);
            Ok(Peer::new(endpoint.clone(), cfg, &addr, &tls::node_name(1)))
        };
        let t = Duration::from_secs(5);
        let write = Rpc::Write(Request {
            actor: "x".into(),
            id: String::new(),
            at_ms: 0,
            cmd: Command::SetSetting {
                key: "k".into(),
                value: "v".into(),
            },
        });
        // Node 9: a certificate from the right CA, for a node that never joined.
        let nine = tls::issue_node(&ca, 9)?;
        let peer = dial(&nine, &ca.cert_pem)?;
        let vote: boxd_control::net::Rpc = Rpc::Vote(openraft::raft::VoteRequest {
            vote: openraft::Vote::new(99, 1),
            last_log_id: None,
        });
        let got = peer.call::<serde_json::Value>(&vote, t).await;
        ensure!(
            matches!(&got, Err(CallError::Refused(m)) if m.contains("as node 1")),
            "a vote from node 9 speaking as node 1: {got:?}"
        );
        let got = peer
            .call::<()>(&Rpc::Admin(AdminOp::Remove { id: 1 }), t)
            .await;
        ensure!(
            matches!(&got, Err(CallError::Refused(m)) if m.contains("not a voter")),
            "a membership change from a non-voter: {got:?}"
        );
        // Another cluster's CA: the TLS handshake fails.
        let other = tls::new_ca()?;
        let stranger = tls::issue_node(&other, 2)?;
        let got = dial(&stranger, &ca.cert_pem)?
            .call::<serde_json::Value>(&write, t)
            .await;
        ensure!(
            matches!(got, Err(CallError::Unreachable(_))),
            "another CA's certificate: {got:?}"
        );
        // No certificate: only the join call.
        let anon = Peer::new(
            endpoint.clone(),
            net::quic_client(tls::join_client_config(&tls::ca_fingerprint(&ca.cert_pem))?),
            &addr,
            tls::CLUSTER_NAME,
        );
        let got = anon.call::<serde_json::Value>(&write, t).await;
        ensure!(
            matches!(&got, Err(CallError::Refused(m)) if m.contains("certificate is required")),
            "a write without a certificate: {got:?}"
        );
        anyhow::Ok(())
    })
}

/// The operator's CLI against a running node: tables, `--json` field by field, and
/// errors that say what to do.
#[test]
fn the_cluster_cli_prints_tables_json_and_clear_errors() -> Result<()> {
    let boxd = match boxd() {
        Ok(b) => b,
        Err(why) => boxd_tests::skip!("{why}"),
    };
    let c = Cluster::loopback(&boxd, "cli", 1, 7320)?;
    let dir = c.nodes[0].dir.clone();
    let cli = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(&boxd)
            .args(["cluster"])
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .output()?)
    };
    let out = cli(&["status", "--json"])?;
    ensure!(out.status.success(), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        s["id"] == 1 && s["state"] == "leader" && s["leader"] == 1,
        "{s}"
    );
    ensure!(
        s["members"][0]["voter"] == true && s["members"][0]["addr"] == c.nodes[0].addr.as_str(),
        "{s}"
    );
    ensure!(
        s["nodes"][0]["role"] == "server" && s["nodes"][0]["healthy"] == true,
        "{s}"
    );
    ensure!(s["nodes"][0]["cpus"].as_u64().unwrap_or(0) >= 1, "{s}");
    let out = cli(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("node 1 is leader") && text.contains("ID  ADDRESS"),
        "{text}"
    );
    let out = cli(&["token", "--json", "--ttl", "120"])?;
    let t: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        t["ttl_s"] == 120
            && t["token"]
                .as_str()
                .is_some_and(|s| s.starts_with("boxd1.127.0.0.1:7321.")),
        "{t}"
    );
    let out = cli(&["add-voter", "42"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("not in the cluster") && err.contains("join"),
        "{err}"
    );
    let out = cli(&["remove", "1"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("last voter"), "{err}");
    let out = cli(&["join", "not-a-token", "--listen", "127.0.0.1:7399"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("boxd1."), "{err}");
    let out = cli(&["init", "--listen", "127.0.0.1:7398"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("already holds a node"),
        "{err}"
    );
    // No node running on a directory: the error says what to start.
    let out = std::process::Command::new(&boxd)
        .args(["cluster", "status", "--data-dir", "/nonexistent/boxd"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("boxd control run"),
        "{err}"
    );
    Ok(())
}
