//! Certificates from an ACME CA (RFC 8555: Let's Encrypt, or any other) for public zones.
//!
//! What is wanted follows from the replicated state: with `dns-01`, one certificate for
//! the zone and `*.<zone>`, proved by TXT records this node's DNS server answers; with
//! `http-01`, one per machine (`<name>.<zone>`), proved through the proxy's plain-HTTP
//! port. The challenge answers are Raft writes (`PutAcmeChallenge`), so whichever node
//! the CA asks answers; so is the account (`PutAcmeAccount`) and every certificate
//! (`PutCertificate`, issuer `acme`), which every proxy then serves in place of the
//! internal CA's. A certificate is renewed `renew_before_days` before it expires; a
//! failed order is retried after 1 minute, then 2, 4, ... up to 6 hours (per name, so
//! one bad name does not hold up the others, and a CA's rate limits are respected).
//! Only the Raft leader orders, so two nodes never race for the same certificate.

use crate::certs;
use crate::dns::Authority;
use crate::proxy::Challenges;
use crate::server::config;
use anyhow::{Context, Result, anyhow, bail};
use boxd_control::node::Node;
use boxd_control::reconcile::Reconciler;
use boxd_control::state::StateMachine;
use boxd_control::types::{Command, NodeId, Query, QueryReply};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One certificate to keep: stored under `name`, covering `names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub names: Vec<String>,
    /// How to prove them (custom domains always by HTTP-01: their DNS is not ours).
    pub kind: ChallengeKind,
    /// When the stored ACME certificate expires (None: there is none).
    pub not_after_ms: Option<u64>,
}

/// How long the CA may take to validate, and then to issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one whole order may take (account, challenges, validation, issuance).
const ORDER_LIMIT: Duration = Duration::from_secs(5 * 60);
/// How long a published challenge answer may take to reach this node's DNS or proxy.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Orders at most this many certificates per pass (the rest wait for the next one).
const PER_PASS: usize = 20;

/// Retry delays after failures, per name: 1 min doubling to 6 h.
#[derive(Debug, Default)]
pub struct Backoff {
    failed: HashMap<String, (u32, Instant)>,
    /// Quick retries spent per name since its last success (see `transient`).
    quick: HashMap<String, u32>,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(60);
    pub const MAX: Duration = Duration::from_secs(6 * 3600);

    pub fn delay(failures: u32) -> Duration {
        let d = Self::FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        d.min(Self::MAX)
    }

    /// Whether `name` may be tried at `now`.
    pub fn ready(&self, name: &str, now: Instant) -> bool {
        self.failed.get(name).is_none_or(|(_, next)| now >= *next)
    }

    /// Records a failure; returns the delay before the next try.
    pub fn failed(&mut self, name: &str, now: Instant) -> Duration {
        let n = self.failed.get(name).map_or(0, |(n, _)| *n) + 1;
        let d = Self::delay(n);
        self.failed.insert(name.to_string(), (n, now + d));
        d
    }

    /// Records a failure the CA says to simply retry (RFC 8555 6.5: a rejected
    /// anti-replay nonce): retried within seconds, a few times, before it counts as a
    /// failure. Returns the delay before the next try.
    pub fn transient(&mut self, name: &str, now: Instant) -> Duration {
        let quick = self.quick.entry(name.to_string()).or_default();
        if *quick >= Self::QUICK_RETRIES {
            return self.failed(name, now);
        }
        *quick += 1;
        let n = self.failed.get(name).map_or(0, |(n, _)| *n);
        self.failed.insert(name.to_string(), (n, now + Self::QUICK));
        Self::QUICK
    }

    /// How long until the first name held back is due again.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        self.failed
            .values()
            .map(|(_, at)| at.saturating_duration_since(now))
            .min()
    }

    pub const QUICK: Duration = Duration::from_secs(2);
    pub const QUICK_RETRIES: u32 = 3;

    pub fn succeeded(&mut self, name: &str) {
        self.failed.remove(name);
        self.quick.remove(name);
    }

    /// Forgets names no longer wanted (deleted machines, removed domains).
    pub fn keep(&mut self, wanted: &[Want]) {
        self.failed
            .retain(|name, _| wanted.iter().any(|w| w.name == *name));
        self.quick
            .retain(|name, _| wanted.iter().any(|w| w.name == *name));
    }
}

/// Computes the wanted certificates on every state change and hands them to [`run`].
pub struct WantReconciler {
    pub challenge: ChallengeKind,
    /// The proxy serves plain HTTP (HTTP-01 possible, so custom domains get certificates).
    pub http: bool,
    pub tx: watch::Sender<(NodeId, Vec<Want>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Dns01,
    Http01,
}

impl ChallengeKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "dns-01" => Ok(Self::Dns01),
            "http-01" => Ok(Self::Http01),
            other => bail!("ACME challenge {other:?}: use dns-01 or http-01"),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Dns01 => "dns-01",
            Self::Http01 => "http-01",
        }
    }

    fn acme(self) -> ChallengeType {
        match self {
            Self::Dns01 => ChallengeType::Dns01,
            Self::Http01 => ChallengeType::Http01,
        }
    }
}

/// The certificates `state` calls for (see the module docs); with `http`, also one per
/// custom domain of a public machine.
pub fn wanted(state: &StateMachine, kind: ChallengeKind, http: bool) -> Result<Vec<Want>, String> {
    let zone = match state.query(&Query::Setting { key: "zone".into() }) {
        Ok(QueryReply::Setting { value: Some(z) }) if !z.is_empty() => z,
        Ok(_) => return Ok(Vec::new()),
        Err(e) => return Err(format!("read the zone: {e}")),
    };
    let stored: HashMap<String, u64> = match state.query(&Query::Certificates) {
        Ok(QueryReply::Certificates { certs }) => certs
            .into_iter()
            .filter(|c| c.issuer == "acme")
            .map(|c| (c.name, c.not_after_ms))
            .collect(),
        Ok(other) => return Err(format!("unexpected reply: {other:?}")),
        Err(e) => return Err(format!("read certificates: {e}")),
    };
    let want = |name: String, names: Vec<String>, kind| Want {
        not_after_ms: stored.get(&name).copied(),
        name,
        names,
        kind,
    };
    let machines = match state.query(&Query::Machines { owner: None }) {
        Ok(QueryReply::Machines { machines }) => machines,
        Ok(other) => return Err(format!("unexpected reply: {other:?}")),
        Err(e) => return Err(format!("read machines: {e}")),
    };
    let mut out = Vec::new();
    if kind == ChallengeKind::Dns01 {
        let wildcard = format!("*.{zone}");
        out.push(want(wildcard.clone(), vec![zone.clone(), wildcard], kind));
    }
    for m in machines {
        // Passthrough and private machines: the proxy terminates no TLS for them.
        if m.web != boxd_control::types::WebMode::Public {
            continue;
        }
        if kind == ChallengeKind::Http01 {
            let host = format!("{}.{zone}", m.name);
            out.push(want(host.clone(), vec![host], kind));
        }
        if http {
            for d in m.domains {
                out.push(want(d.clone(), vec![d], ChallengeKind::Http01));
            }
        }
    }
    Ok(out)
}

impl Reconciler for WantReconciler {
    fn name(&self) -> &'static str {
        "acme"
    }

    fn reconcile(&mut self, state: &StateMachine, me: NodeId) -> Result<usize, String> {
        let w = wanted(state, self.challenge, self.http)?;
        self.tx.send_if_modified(|cur| {
            let changed = cur.1 != w;
            *cur = (me, w);
            changed
        });
        Ok(0)
    }
}

/// The ACME client of one node.
pub struct Manager {
    pub node: Arc<Node>,
    pub cfg: config::Acme,
    /// This node's DNS answers and proxy challenge table, to see a published answer
    /// arrive before the CA is told to look.
    pub authority: Option<Arc<Authority>>,
    pub challenges: Arc<Challenges>,
    pub account: Option<Account>,
    pub backoff: Backoff,
}

fn now_ms() -> u64 {
    boxd_control::node::now_ms()
}

impl Manager {
    /// Orders what is due, forever: on every change of what is wanted, and every minute.
    pub async fn run(mut self, mut rx: watch::Receiver<(NodeId, Vec<Want>)>) {
        let renew_ms = u64::from(self.cfg.renew_before_days) * 86_400_000;
        // What the last pass found (wanted, due), logged when it changes.
        let mut checked = None;
        loop {
            let (me, wants) = rx.borrow_and_update().clone();
            self.backoff.keep(&wants);
            let leader = self.node.status().leader == Some(me);
            let now = Instant::now();
            let wanted = wants.len();
            let due: Vec<Want> = wants
                .into_iter()
                .filter(|w| w.not_after_ms.is_none_or(|t| t <= now_ms() + renew_ms))
                .filter(|w| self.backoff.ready(&w.name, now))
                .take(PER_PASS)
                .collect();
            if leader && checked != Some((wanted, due.len())) {
                checked = Some((wanted, due.len()));
                tracing::info!(wanted, due = due.len(), "ACME certificates checked");
            }
            if leader {
                for w in due {
                    // Leadership can move during a pass: two nodes never order at once.
                    if self.node.status().leader != Some(me) {
                        break;
                    }
                    let started = Instant::now();
                    let mut published = Vec::new();
                    let res = tokio::time::timeout(ORDER_LIMIT, self.obtain(&w, &mut published))
                        .await
                        .unwrap_or_else(|_| {
                            Err(anyhow!(
                                "the order did not finish within {} minutes",
                                ORDER_LIMIT.as_secs() / 60
                            ))
                        });
                    // Answers published for the order are withdrawn whatever became of
                    // it (they would expire within the hour anyway).
                    for (name, value) in published {
                        let cmd = Command::RemoveAcmeChallenge {
                            kind: w.kind.as_str().into(),
                            name,
                            value,
                        };
                        if let Err(e) = self.write(cmd).await {
                            tracing::debug!("remove a spent challenge: {e:#}");
                        }
                    }
                    match res {
                        Ok(not_after_ms) => {
                            self.backoff.succeeded(&w.name);
                            tracing::info!(
                                name = w.name,
                                took_ms = started.elapsed().as_millis() as u64,
                                expires_in_days =
                                    (not_after_ms.saturating_sub(now_ms())) / 86_400_000,
                                "ACME certificate issued"
                            );
                        }
                        Err(e) => {
                            // instant-acme already retried the request twice with fresh
                            // nonces; the order as a whole goes again shortly.
                            let d = if format!("{e:#}")
                                .contains("urn:ietf:params:acme:error:badNonce")
                            {
                                self.backoff.transient(&w.name, Instant::now())
                            } else {
                                self.backoff.failed(&w.name, Instant::now())
                            };
                            tracing::warn!(
                                name = w.name,
                                retry_in_s = d.as_secs(),
                                "ACME certificate not issued (the internal CA's is served meanwhile): {e:#}"
                            );
                        }
                    }
                }
            }
            // A follower looks again soon: when it becomes the leader (a restart, a
            // failover) it should order what is due within seconds, not a minute.
            let mut next = Duration::from_secs(if leader { 60 } else { 2 });
            if let Some(due) = self.backoff.next_due(Instant::now()) {
                next = next.min(due.max(Backoff::QUICK));
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(next) => {}
            }
        }
    }

    async fn account(&mut self) -> Result<Account> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let dir = self.cfg.directory.clone();
        let builder = || -> Result<_> {
            Ok(match &self.cfg.ca_root {
                Some(p) => Account::builder_with_root(p)
                    .with_context(|| format!("[acme] ca_root {}", p.display()))?,
                None => Account::builder().context("the system's root certificates")?,
            })
        };
        let stored = match self
            .node
            .read(
                Query::AcmeAccount {
                    directory: dir.clone(),
                },
                true,
            )
            .await
        {
            Ok(QueryReply::AcmeAccount { credentials }) => credentials,
            Ok(other) => bail!("unexpected reply: {other:?}"),
            Err(e) => bail!("read the ACME account: {e}"),
        };
        let account = match stored {
            Some(c) => {
                let creds: AccountCredentials =
                    serde_json::from_str(&c).context("the stored ACME account is unreadable")?;
                builder()?
                    .from_credentials(creds)
                    .await
                    .with_context(|| format!("reach the ACME directory {dir}"))?
            }
            None => {
                let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
                let (account, creds) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        dir.clone(),
                        None,
                    )
                    .await
                    .with_context(|| format!("create an account at {dir}"))?;
                let credentials = serde_json::to_string(&creds)?;
                self.write(Command::PutAcmeAccount {
                    directory: dir.clone(),
                    credentials,
                })
                .await
                .context("store the ACME account")?;
                tracing::info!(directory = dir, id = account.id(), "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    async fn write(&self, cmd: Command) -> Result<()> {
        let what = cmd.name();
        match self.node.write(self.node.request("acme", cmd)).await {
            Ok(r) => r.result.map(|_| ()).map_err(|e| anyhow!("{what}: {e}")),
            Err(e) => Err(anyhow!("{what}: {e}")),
        }
    }

    /// Whether this node serves the answer yet.
    fn served(&self, kind: ChallengeKind, name: &str, value: &str) -> bool {
        match kind {
            ChallengeKind::Http01 => self.challenges.get(name).as_deref() == Some(value),
            ChallengeKind::Dns01 => {
                use hickory_proto::rr::{DNSClass, LowerName, Name, RData, RecordType};
                let Some(zone) = self.authority.as_ref().and_then(|a| a.get()) else {
                    return false;
                };
                let Ok(n) = Name::from_ascii(format!("{name}.")) else {
                    return false;
                };
                let a = zone.answer(&LowerName::from(n), RecordType::TXT, DNSClass::IN);
                a.answers.iter().any(|r| match &r.data {
                    RData::TXT(t) => t.txt_data.iter().any(|d| **d == *value.as_bytes()),
                    _ => false,
                })
            }
        }
    }

    /// Runs one order to the end; stores the certificate; returns its expiry.
    async fn obtain(&mut self, w: &Want, published: &mut Vec<(String, String)>) -> Result<u64> {
        let account = self.account().await?;
        let ids: Vec<Identifier> = w.names.iter().cloned().map(Identifier::Dns).collect();
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .with_context(|| format!("order a certificate for {}", w.names.join(", ")))?;
        let (chain, key_pem) = self.prove_and_finish(&mut order, w, published).await?;
        let not_after_ms = certs::not_after_ms(&chain)?;
        certs::certified_key(&w.name, &chain, &key_pem)?;
        self.write(Command::PutCertificate {
            name: w.name.clone(),
            cert_pem: chain,
            key_pem,
            not_after_ms,
            issuer: "acme".into(),
        })
        .await?;
        Ok(not_after_ms)
    }

    async fn prove_and_finish(
        &self,
        order: &mut instant_acme::Order,
        w: &Want,
        published: &mut Vec<(String, String)>,
    ) -> Result<(String, String)> {
        let kind = w.kind;
        let mut auths = order.authorizations();
        let mut n = 0;
        while let Some(a) = auths.next().await {
            n += 1;
            if n > 100 {
                bail!("the CA sent over 100 authorizations for one order");
            }
            let mut a = a.context("fetch an authorization")?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => bail!("an authorization is {other:?}, not pending"),
            }
            let mut ch = a.challenge(kind.acme()).ok_or_else(|| {
                anyhow!(
                    "the CA offers no {} challenge; set [acme] challenge to the other kind",
                    kind.as_str()
                )
            })?;
            let ka = ch.key_authorization();
            let domain = match ch.identifier().identifier {
                Identifier::Dns(d) => d.clone(),
                other => bail!("the CA asks about {other:?}, not a DNS name"),
            };
            let (name, value) = match kind {
                ChallengeKind::Dns01 => (format!("_acme-challenge.{domain}"), ka.dns_value()),
                ChallengeKind::Http01 => (ch.token.clone(), ka.as_str().to_string()),
            };
            self.write(Command::PutAcmeChallenge {
                kind: kind.as_str().into(),
                name: name.clone(),
                value: value.clone(),
                expires_ms: now_ms() + 3_600_000,
            })
            .await?;
            published.push((name.clone(), value.clone()));
            let deadline = Instant::now() + PUBLISH_TIMEOUT;
            while !self.served(kind, &name, &value) {
                if Instant::now() > deadline {
                    bail!(
                        "the challenge for {domain} was not served here within {PUBLISH_TIMEOUT:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ch.set_ready()
                .await
                .with_context(|| format!("tell the CA the challenge for {domain} is ready"))?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(ORDER_TIMEOUT);
        let status = order
            .poll_ready(&retry)
            .await
            .context("wait for the CA to validate")?;
        if status != OrderStatus::Ready {
            bail!("validation failed: {}", problems(order).await);
        }
        let (csr, key_pem) = certs::csr(&w.names)?;
        order
            .finalize_csr(&csr)
            .await
            .context("finalize the order")?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .context("download the certificate")?;
        Ok((chain, key_pem))
    }
}

/// What the CA said went wrong with an order's challenges.
async fn problems(order: &mut instant_acme::Order) -> String {
    let mut out = Vec::new();
    if let Some(p) = &order.state().error {
        out.push(p.to_string());
    }
    let mut auths = order.authorizations();
    while let Some(Ok(mut a)) = auths.next().await {
        if let Ok(s) = a.refresh().await {
            for c in &s.challenges {
                if let Some(p) = &c.error {
                    out.push(format!("{}: {p}", s.identifier()));
                }
            }
        }
        if out.len() > 10 {
            break;
        }
    }
    if out.is_empty() {
        "the CA gave no reason".into()
    } else {
        out.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_six_hours_per_name() {
        assert_eq!(Backoff::delay(1), Duration::from_secs(60));
        assert_eq!(Backoff::delay(2), Duration::from_secs(120));
        assert_eq!(Backoff::delay(5), Duration::from_secs(960));
        assert_eq!(Backoff::delay(9), Duration::from_secs(15_360));
        assert_eq!(Backoff::delay(10), Backoff::MAX);
        assert_eq!(Backoff::delay(1000), Backoff::MAX);
        let mut q = Backoff::default();
        let t0 = Instant::now();
        for _ in 0..Backoff::QUICK_RETRIES {
            assert_eq!(q.transient("a", t0), Backoff::QUICK);
        }
        assert_eq!(q.next_due(t0), Some(Backoff::QUICK));
        assert_eq!(
            q.transient("a", t0),
            Backoff::FIRST,
            "quick retries are bounded"
        );
        q.succeeded("a");
        assert_eq!(
            q.transient("a", t0),
            Backoff::QUICK,
            "a success restores them"
        );
        let mut b = Backoff::default();
        let t = Instant::now();
        assert!(b.ready("a", t));
        assert_eq!(b.failed("a", t), Duration::from_secs(60));
        assert!(!b.ready("a", t + Duration::from_secs(59)));
        assert!(b.ready("a", t + Duration::from_secs(60)));
        assert!(b.ready("b", t), "one name's failure holds up no other");
        assert_eq!(b.failed("a", t), Duration::from_secs(120));
        b.succeeded("a");
        assert!(b.ready("a", t));
        b.failed("gone", t);
        b.keep(&[]);
        assert!(b.ready("gone", t), "a name no longer wanted is forgotten");
    }
}
