//! The key-release decision: challenge nonces, attestation, request binding,
//! policy, audit, and the sealed answer. No sockets here: [`crate::service`]
//! carries frames to and from [`Broker::handle`].
//!
//! A release is all or nothing: every operation of a request must be allowed
//! by its key's policy and state, or nothing is released. Every decision —
//! allowed or refused, and for a refusal the precise rule — is written to the
//! audit log before the answer leaves; the enclave only ever learns a coarse
//! [`ErrorCode`].
//!
//! Unauthenticated noise — a request whose attestation document does not
//! verify, or whose verified document is not fresh (nonce unknown, expired
//! or already used: a replay) — is refused before any key is considered.
//! Anyone who can reach the service can send it, so it is not written as
//! one fsync'd record per request: it is counted, and a summary record
//! (`key.release.unauthenticated`: counts by rule, the time span, the first
//! detail) is written at most once per
//! [`BrokerConfig::noise_summary_interval`] and at shutdown. Every decision
//! about a key — an allowed release, or a refusal by request binding,
//! policy or key state — is still one record per request, written before
//! the answer.
//!
//! The broker stops (answers `unavailable` to everything) once the audit
//! anchor cannot move along the log's chain, e.g. after the log was
//! truncated or replaced while it ran ([`Broker::anchor_audit_head`]).

use crate::audit::{Actor, AuditLog, Decision, JobContext, NewRecord};
use crate::keys::{KeyError, KeyName, WrappedDataKey};
use crate::kms::{Kms, RunRefusal};
use crate::nonce::{NonceError, NonceStore, NONCE_LEN};
use crate::nonce_db::DbNonces;
use crate::policy::{KeyPolicy, Operation};
use kluis_attestation::{UnixMillis, VerifiedAttestation, Verifier, VerifyOptions};
use kluis_proto::{
    check_released_keys, request_hash, seal_keys, seal_keys_delegated, AuthorisationId,
    DelegatedKey, ErrorCode, KeyOperation, KeyRequest, PlaintextKey, ReleasedKey, Request,
    Response, SignedAuthorisation, VerifierIdentity,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Settings of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Upper bound on document age, whatever a policy says.
    pub max_document_age: Duration,
    /// How long a challenge nonce lives.
    pub nonce_lifetime: Duration,
    /// How many challenges may be outstanding.
    pub nonce_capacity: usize,
    /// At most one summary record of unauthenticated noise per interval.
    pub noise_summary_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_document_age: Duration::from_secs(300),
            nonce_lifetime: Duration::from_secs(60),
            nonce_capacity: 65_536,
            noise_summary_interval: Duration::from_secs(10),
        }
    }
}

/// The key broker.
pub struct Broker {
    kms: Kms,
    verifier: Verifier,
    identity: VerifierIdentity,
    audit: Arc<AuditLog>,
    nonces: Mutex<NonceStore>,
    /// With a store in a database: the nonce table every replica shares,
    /// which decides redemption (`nonces` then only bounds what this
    /// replica has outstanding).
    shared_nonces: Option<DbNonces>,
    config: BrokerConfig,
    /// Why the broker stopped, once it has.
    halted: Mutex<Option<String>>,
    noise: Mutex<Noise>,
    /// With an identity held by an HSM: the current release key it
    /// certified (see [`kluis_proto::DelegatedKey`]).
    release_key: Mutex<Option<Arc<DelegatedKey>>>,
}

/// The rule of the refusal that withdraws a release already recorded as
/// allowed (something it was decided on changed while it was recorded; no
/// key was sent). Its record (`key.release`, refused, reason
/// `changed_during_release: …`) carries the same attestation document as
/// the allowed records it withdraws: that document's nonce was spent by
/// this one request, so the document names the request.
pub const WITHDRAWAL_RULE: &str = "changed_during_release";

/// The start of an allowed key-release record's reason.
const RELEASE_REASON_PREFIX: &str = "measurement set ";

/// The reason of an allowed key-release record: the measurement set that
/// matched and the SHA-256 (lowercase hex) of the policy that decided,
/// `measurement set NAME; policy sha256 HEX`.
pub fn release_reason(set_name: &str, policy_sha256: &str) -> String {
    format!(
        "{RELEASE_REASON_PREFIX}{set_name}; {}{policy_sha256}",
        crate::kms::POLICY_REASON_PREFIX
    )
}

/// The measurement set and, if named, the policy hash of an allowed
/// key-release record's reason ([`release_reason`]; records written before
/// the hash was named say `measurement set NAME` only). The hash is the
/// reason's last part and exactly 64 lowercase hex digits, so it is read
/// from the end: a set name that holds `; policy sha256 …` itself is part of
/// the name, not a second hash.
pub fn parse_release_reason(reason: &str) -> Option<(&str, Option<&str>)> {
    let rest = reason.strip_prefix(RELEASE_REASON_PREFIX)?;
    let marker = format!("; {}", crate::kms::POLICY_REASON_PREFIX);
    match rest.rsplit_once(marker.as_str()) {
        Some((name, hash)) if is_sha256_hex(hash) => Some((name, Some(hash))),
        _ => Some((rest, None)),
    }
}

/// Exactly 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How long a release key certified by an HSM-held identity is valid.
pub const RELEASE_KEY_VALIDITY: Duration = Duration::from_secs(3600);
/// A release key with less than this left is replaced before use.
const RELEASE_KEY_RENEW_BEFORE: Duration = Duration::from_secs(600);

/// Unauthenticated refusals not yet summarised in the audit log.
#[derive(Debug, Default)]
struct Noise {
    count: u64,
    first_ms: u64,
    last_ms: u64,
    by_rule: BTreeMap<&'static str, u64>,
    first_detail: Option<String>,
    last_summary_ms: u64,
    /// When a summary of some of these refusals failed to be written: such
    /// a write may still have been committed, so the next summary says so.
    failed_summary_ms: Option<u64>,
}

impl Noise {
    /// Puts back refusals whose summary could not be written, in front of
    /// those counted since. Their summary is due again an interval after
    /// the failed one (not at once: while the log is down, every
    /// unauthenticated request would try it again).
    fn restore(&mut self, earlier: Noise, failed_at_ms: u64) {
        self.failed_summary_ms = Some(earlier.failed_summary_ms.unwrap_or(failed_at_ms));
        if self.count == 0 {
            self.last_ms = earlier.last_ms;
        }
        self.count = self.count.saturating_add(earlier.count);
        self.first_ms = earlier.first_ms;
        if earlier.first_detail.is_some() {
            self.first_detail = earlier.first_detail;
        }
        for (rule, n) in earlier.by_rule {
            let total = self.by_rule.entry(rule).or_insert(0);
            *total = total.saturating_add(n);
        }
    }

    /// The summary record's reason.
    fn summary(&self) -> String {
        let counts = self
            .by_rule
            .iter()
            .map(|(rule, n)| format!("{rule}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut reason = format!(
            "{} requests refused before any key was considered, from {} to {} ({counts}); first: {}",
            self.count,
            crate::audit::rfc3339_millis(self.first_ms),
            crate::audit::rfc3339_millis(self.last_ms),
            self.first_detail.as_deref().unwrap_or("-"),
        );
        if let Some(failed) = self.failed_summary_ms {
            reason.push_str(&format!(
                "; includes refusals whose summary at {} failed to be written and may have been \
                 recorded all the same",
                crate::audit::rfc3339_millis(failed)
            ));
        }
        reason
    }
}

/// Longest detail kept in a noise summary.
const MAX_NOISE_DETAIL: usize = 1024;

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("kms", &self.kms)
            .field("root", &self.verifier.anchor().subject())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A refusal, for the audit log: rule name and operator detail.
struct Refused {
    rule: &'static str,
    detail: String,
    code: ErrorCode,
    /// Refused before any key was considered (a stale or replayed
    /// document): summarised, not recorded one by one.
    noise: bool,
}

impl Refused {
    /// A refusal because reading the store failed: `unavailable` when that
    /// is an outage (see [`KeyError::is_outage`]), `denied` otherwise.
    fn store(rule: &'static str, e: &KeyError) -> Self {
        Refused {
            code: if e.is_outage() {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Denied
            },
            ..Refused::denied(rule, e.to_string())
        }
    }

    fn denied(rule: &'static str, detail: impl Into<String>) -> Self {
        Refused {
            rule,
            detail: detail.into(),
            code: ErrorCode::Denied,
            noise: false,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Broker {
    /// A broker over `kms`, trusting documents that `verifier` accepts and
    /// signing answers with `identity`.
    pub fn new(
        kms: Kms,
        verifier: Verifier,
        identity: VerifierIdentity,
        audit: impl Into<Arc<AuditLog>>,
        config: BrokerConfig,
    ) -> Self {
        let nonces = Mutex::new(NonceStore::new(
            millis(config.nonce_lifetime),
            config.nonce_capacity,
        ));
        let shared_nonces = kms.store().database().cloned().map(DbNonces::new);
        Broker {
            kms,
            verifier,
            identity,
            audit: audit.into(),
            nonces,
            shared_nonces,
            config,
            halted: Mutex::new(None),
            noise: Mutex::new(Noise::default()),
            release_key: Mutex::new(None),
        }
    }

    /// The key that signs answers: `None` for the identity itself (a key
    /// in this process), or a release key the identity certified when the
    /// identity is in an HSM (one token signature an hour instead of one per
    /// release). A new release key is audited (`identity.delegate`) before
    /// it signs anything. Validity is by the real clock, as the enclave
    /// checks it by its own.
    fn release_key(&self) -> Result<Option<Arc<DelegatedKey>>, Refused> {
        if !self.identity.is_external() {
            return Ok(None);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(millis)
            .unwrap_or(0);
        let mut current = self
            .release_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(key) = current.as_ref() {
            if key.not_after_ms() > now.saturating_add(millis(RELEASE_KEY_RENEW_BEFORE)) {
                return Ok(Some(Arc::clone(key)));
            }
        }
        let unavailable = |detail: String| Refused {
            rule: "signing_unavailable",
            detail,
            code: ErrorCode::Unavailable,
            noise: false,
        };
        let key = DelegatedKey::issue(
            &self.identity,
            now.saturating_add(millis(RELEASE_KEY_VALIDITY)),
        )
        .map_err(|e| unavailable(format!("certifying a release key: {e}")))?;
        let fingerprint = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(key.delegation().public_key))
        };
        self.record(NewRecord {
            time_ms: now,
            actor: Actor::System,
            operation: "identity.delegate".to_owned(),
            key_id: None,
            key_version: None,
            decision: Decision::Allowed,
            reason: Some(format!(
                "release key sha256 {fingerprint} certified by the HSM-held identity until {}",
                crate::audit::rfc3339_millis(key.not_after_ms())
            )),
            attestation_document: None,
        })
        .map_err(|_| unavailable("could not audit the new release key".to_owned()))?;
        let key = Arc::new(key);
        *current = Some(Arc::clone(&key));
        Ok(Some(key))
    }

    /// Why the broker stopped serving, if it has.
    pub fn halted(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn halt(&self, reason: String) {
        let mut halted = self
            .halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if halted.is_none() {
            tracing::error!("key releases stopped: {reason}");
            *halted = Some(reason);
        }
    }

    /// Count an unauthenticated refusal; write the summary when it is due.
    fn note_noise(&self, rule: &'static str, detail: impl FnOnce() -> String, now_ms: u64) {
        {
            let mut noise = self
                .noise
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if noise.count == 0 {
                noise.first_ms = now_ms;
                let mut d = detail();
                if d.len() > MAX_NOISE_DETAIL {
                    let mut cut = MAX_NOISE_DETAIL;
                    while !d.is_char_boundary(cut) {
                        cut = cut.saturating_sub(1);
                    }
                    d.truncate(cut);
                }
                noise.first_detail = Some(d);
            }
            noise.count = noise.count.saturating_add(1);
            noise.last_ms = now_ms;
            let n = noise.by_rule.entry(rule).or_insert(0);
            *n = n.saturating_add(1);
        }
        self.flush_noise(now_ms, false);
    }

    /// Write the summary of unauthenticated refusals if there are any and
    /// one is due (or `force`, at shutdown). The service calls this once a
    /// second.
    pub fn flush_noise(&self, now_ms: u64, force: bool) {
        let interval = millis(self.config.noise_summary_interval);
        let record = {
            let mut noise = self
                .noise
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if noise.count == 0
                || (!force && now_ms.saturating_sub(noise.last_summary_ms) < interval)
            {
                return;
            }
            let reason = noise.summary();
            let summarised = std::mem::replace(
                &mut *noise,
                Noise {
                    last_summary_ms: now_ms,
                    ..Noise::default()
                },
            );
            let record = NewRecord {
                time_ms: now_ms,
                actor: Actor::System,
                operation: "key.release.unauthenticated".to_owned(),
                key_id: None,
                key_version: None,
                decision: Decision::Refused,
                reason: Some(reason),
                attestation_document: None,
            };
            (record, summarised)
        };
        let (record, summarised) = record;
        if self.record(record).is_err() {
            // Not written (logged by `record`): the refusals stay counted,
            // and are summarised again at the next flush.
            self.noise
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .restore(summarised, now_ms);
        }
    }

    /// Keep in `nonces` only the challenges still open (issued, unused,
    /// unexpired) at `now_ms`: a connection's challenge slot is freed only
    /// when its own nonce is used or expires.
    pub fn retain_open_challenges(&self, nonces: &mut Vec<[u8; NONCE_LEN]>, now_ms: u64) {
        if let Ok(store) = self.nonces.lock() {
            nonces.retain(|n| store.is_open(n, now_ms));
        }
    }

    /// The key hierarchy.
    pub fn kms(&self) -> &Kms {
        &self.kms
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Answer one request at `now_ms`, with `random` a source of nonces.
    pub fn handle(
        &self,
        request: Request,
        now_ms: u64,
        random: &dyn Fn() -> Option<[u8; NONCE_LEN]>,
    ) -> Response {
        if self.halted().is_some() {
            return Response::Error {
                code: ErrorCode::Unavailable,
            };
        }
        match request {
            Request::Challenge => self.challenge(now_ms, random),
            Request::KeyRelease {
                attestation_document,
                request,
            } => self.release(&attestation_document, &request, now_ms),
            _ => Response::Error {
                code: ErrorCode::BadRequest,
            },
        }
    }

    fn challenge(&self, now_ms: u64, random: &dyn Fn() -> Option<[u8; NONCE_LEN]>) -> Response {
        let Some(nonce) = random() else {
            return Response::Error {
                code: ErrorCode::Internal,
            };
        };
        let issued = match self.nonces.lock() {
            Ok(mut nonces) => nonces.issue(nonce, now_ms),
            Err(_) => {
                return Response::Error {
                    code: ErrorCode::Internal,
                }
            }
        };
        let issued = match (issued, &self.shared_nonces) {
            (Ok(expires_at_ms), Some(shared)) => {
                match shared.issue(&nonce, expires_at_ms, now_ms) {
                    Ok(()) => Ok(expires_at_ms),
                    Err(e) => {
                        self.withdraw_local(&[nonce]);
                        Err(e)
                    }
                }
            }
            (issued, _) => issued,
        };
        match issued {
            Ok(expires_at_ms) => Response::Challenge {
                nonce,
                expires_at_ms,
            },
            Err(_) => Response::Error {
                code: ErrorCode::Unavailable,
            },
        }
    }

    fn record(&self, record: NewRecord) -> Result<(), ErrorCode> {
        self.record_job(record, None)
    }

    /// [`Broker::record`] for a record of a job run under an authorisation.
    fn record_job(&self, record: NewRecord, job: Option<&JobContext>) -> Result<(), ErrorCode> {
        // The log serialises appends across handles and processes itself, and
        // concurrent appends share one fsync.
        self.audit
            .append_job(record, job.cloned())
            .map(|_| ())
            .map_err(|e| {
                tracing::error!(error = %e, "audit append failed; refusing the request");
                // A database that cannot be reached is a passing outage
                // (the client may retry, or fail over); anything else is
                // this verifier's fault.
                if matches!(e, crate::audit::AuditError::Unavailable { .. }) {
                    ErrorCode::Unavailable
                } else {
                    ErrorCode::Internal
                }
            })
    }

    /// Withdraw challenges that were issued but never used (their
    /// connection closed), freeing their room in the nonce store.
    ///
    /// Blocking (with a store in a database, it deletes their rows): call
    /// it off the async runtime's threads, as [`Broker::handle`].
    pub fn withdraw_challenges(&self, nonces: &[[u8; NONCE_LEN]]) {
        let now = crate::service::now_ms();
        let still_open: Vec<[u8; NONCE_LEN]> = match self.nonces.lock() {
            Ok(store) => nonces
                .iter()
                .filter(|n| store.is_open(n, now))
                .copied()
                .collect(),
            Err(_) => Vec::new(),
        };
        self.withdraw_local(&still_open);
        if let Some(shared) = &self.shared_nonces {
            shared.withdraw(&still_open);
        }
    }

    fn withdraw_local(&self, nonces: &[[u8; NONCE_LEN]]) {
        if let Ok(mut store) = self.nonces.lock() {
            for nonce in nonces {
                store.withdraw(nonce);
            }
        }
    }

    /// Anchor the audit log's current head in the store, so that truncating
    /// the log's tail is detected. The service calls this periodically and at
    /// exit rather than per request, to keep one fsync'd write per release.
    /// Only a head that is on disk is anchored; if an fsync is pending, the
    /// next call anchors it. When the log no longer continues from the
    /// anchored head (records removed, the file replaced), the broker stops:
    /// no key is released into a log whose history has a gap.
    pub fn anchor_audit_head(&self) {
        match self.kms.anchor_audit(&self.audit) {
            Ok(()) => {}
            Err(e @ KeyError::Audit(_)) => self.halt(e.to_string()),
            Err(e) => tracing::error!(error = %e, "could not anchor the audit head"),
        }
    }

    /// The key-release exchange. See the module documentation.
    pub fn release(&self, document: &[u8], request: &KeyRequest, now_ms: u64) -> Response {
        let options = VerifyOptions::at(UnixMillis(now_ms)).max_age(self.config.max_document_age);
        let attestation = match self.verifier.verify(document, &options) {
            Ok(a) => a,
            Err(e) => {
                let rule = e.kind();
                // Unverified bytes are not kept (anyone can send them):
                // their hash and length identify them.
                self.note_noise(
                    rule,
                    || {
                        format!(
                            "attestation_rejected: {rule}: {e} (document SHA-384 {}, {} bytes)",
                            hex::encode(kluis_attestation::sha384(document)),
                            document.len()
                        )
                    },
                    now_ms,
                );
                tracing::debug!(kind = rule, "attestation rejected: {e}");
                return Response::Error {
                    code: ErrorCode::Denied,
                };
            }
        };
        let mut job = None;
        match self.release_attested(&attestation, document, request, now_ms, &mut job) {
            Ok(response) => response,
            Err(refused) if refused.noise => {
                tracing::debug!(
                    rule = refused.rule,
                    "key release refused: {}",
                    refused.detail
                );
                self.note_noise(
                    refused.rule,
                    || {
                        format!(
                            "{}: {} (module {}, document SHA-384 {})",
                            refused.rule,
                            refused.detail,
                            attestation.document().module_id,
                            hex::encode(attestation.document_sha384())
                        )
                    },
                    now_ms,
                );
                Response::Error { code: refused.code }
            }
            Err(refused) => {
                tracing::warn!(
                    rule = refused.rule,
                    "key release refused: {}",
                    refused.detail
                );
                let recorded = self.record_job(
                    NewRecord {
                        time_ms: now_ms,
                        actor: Actor::enclave(&attestation),
                        operation: "key.release".to_owned(),
                        key_id: None,
                        key_version: None,
                        decision: Decision::Refused,
                        reason: Some(format!("{}: {}", refused.rule, refused.detail)),
                        attestation_document: Some(document.to_vec()),
                    },
                    job.as_ref(),
                );
                // A refusal the log could not take is answered as the log's
                // failure (`unavailable` for an outage): the client retries
                // or fails over, and the replica that answers records it.
                match recorded {
                    Ok(()) => Response::Error { code: refused.code },
                    Err(code) => Response::Error { code },
                }
            }
        }
    }

    fn release_attested(
        &self,
        attestation: &VerifiedAttestation,
        document: &[u8],
        request: &KeyRequest,
        now_ms: u64,
        job: &mut Option<JobContext>,
    ) -> Result<Response, Refused> {
        let doc = attestation.document();
        let mut local = self
            .nonces
            .lock()
            .map_err(|_| Refused::denied("internal", "nonce store poisoned"))?;
        let redeemed = match &self.shared_nonces {
            Some(shared) => {
                // The database decides; the local slot (if this replica
                // issued it) is only freed.
                let _ = local.consume(doc.nonce.as_deref(), now_ms);
                drop(local);
                shared.consume(doc.nonce.as_deref(), now_ms)
            }
            None => local.consume(doc.nonce.as_deref(), now_ms),
        };
        redeemed.map_err(|e| match e {
            NonceError::Unavailable => Refused {
                code: ErrorCode::Unavailable,
                ..Refused::denied(e.as_str(), e.to_string())
            },
            e => Refused {
                noise: true,
                ..Refused::denied(e.as_str(), e.to_string())
            },
        })?;

        let hash = request_hash(request);
        if doc.user_data.as_deref() != Some(hash.as_slice()) {
            return Err(Refused::denied(
                "request_hash_mismatch",
                "user_data is not the SHA-384 request hash of the request sent",
            ));
        }
        let Some(public_key) = doc.public_key.as_deref() else {
            return Err(Refused::denied(
                "no_public_key",
                "the document carries no ephemeral public key",
            ));
        };
        // Check the recipient key's shape before generating anything; the
        // seal checks the point itself.
        if public_key.len() != 97 || public_key.first() != Some(&0x04) {
            return Err(Refused::denied(
                "bad_public_key",
                format!(
                    "public_key must be a 97-byte uncompressed P-384 point, found {} bytes",
                    public_key.len()
                ),
            ));
        }

        // The authorisation the request is made under, if any: from here
        // on every record of the request names its purpose and case.
        if let Some(id) = request.authorisation() {
            *job = Some(self.job_context(id)?);
        }

        // Decide every operation before releasing anything.
        let mut plan = Vec::with_capacity(request.operations().len());
        for op in request.operations() {
            plan.push(self.authorise(attestation, op, now_ms)?);
        }
        match request.authorisation() {
            None => {
                if let Some(step) = plan.iter().find(|s| s.requires_authorisation) {
                    return Err(Refused::denied(
                        "authorisation_required",
                        format!(
                            "{}: the policy requires a job authorisation and the request has none",
                            step.key
                        ),
                    ));
                }
            }
            // Last, once everything else admits the request: a run is
            // counted only for a request that gets its keys (or fails
            // after this point, which uses the run up).
            Some(id) => {
                self.count_run(id, &plan, now_ms)?;
            }
        }

        let mut released = Vec::with_capacity(plan.len());
        for step in &plan {
            released.push(self.perform(step, now_ms)?);
        }
        check_released_keys(request, &released).map_err(|e| {
            Refused::denied(
                "internal",
                format!("response does not match request: {e:?}"),
            )
        })?;

        // Seal before recording anything as allowed: a release that cannot be
        // sealed is a refusal.
        let sealed = match self.release_key()? {
            None => seal_keys(
                public_key,
                attestation.document_sha384(),
                &hash,
                &released,
                &self.identity,
            ),
            Some(key) => seal_keys_delegated(
                public_key,
                attestation.document_sha384(),
                &hash,
                &released,
                &key,
            ),
        }
        .map_err(|e| match e {
            kluis_proto::SealError::Sign(_) => Refused {
                rule: "signing_unavailable",
                detail: e.to_string(),
                code: ErrorCode::Unavailable,
                noise: false,
            },
            e => Refused::denied("seal_failed", e.to_string()),
        })?;

        // Any failure once one of the request's allowed records may have
        // been written withdraws the release under one rule, so that the
        // log (and an evidence bundle) says that none of its keys was sent.
        // That includes the first record: an append that fails may still
        // have been committed (a database whose commit reply was lost).
        for (step, key) in plan.iter().zip(&released) {
            self.record_job(
                NewRecord {
                    time_ms: now_ms,
                    actor: Actor::enclave(attestation),
                    operation: format!("key.release.{}", step.operation.as_str()),
                    key_id: Some(step.key.to_string()),
                    key_version: Some(key.version),
                    decision: Decision::Allowed,
                    reason: Some(release_reason(&step.matched_set, &step.policy_sha256)),
                    attestation_document: Some(document.to_vec()),
                },
                job.as_ref(),
            )
            .map_err(|code| Refused {
                rule: WITHDRAWAL_RULE,
                detail: format!(
                    "{}: could not write its audit record; any release of the request \
                     recorded as allowed is withdrawn, no key was sent",
                    step.key
                ),
                code,
                noise: false,
            })?;
        }
        // What the release was decided on may have changed since it was read
        // (an administrator's change, in this process or another replica):
        // if a change is in the log before these records, the keys stay
        // here, and the refusal recorded next says that the release above
        // was withdrawn.
        let authorisation = request.authorisation();
        for (step, key) in plan.iter().zip(&released) {
            let decrypted = step.wrapped.as_ref().map(|_| key.version);
            match self.kms.release_withdrawn(
                &step.key,
                decrypted,
                &step.policy_sha256,
                authorisation,
            ) {
                Ok(None) => {}
                Ok(Some(why)) => {
                    return Err(Refused::denied(
                        WITHDRAWAL_RULE,
                        format!(
                            "{}: {why}; the release recorded as allowed is withdrawn, \
                             no key was sent",
                            step.key
                        ),
                    ))
                }
                Err(e) => {
                    return Err(Refused {
                        detail: format!(
                            "{}: the re-check could not read the store ({}); the release \
                             recorded as allowed is withdrawn, no key was sent",
                            step.key, e
                        ),
                        ..Refused::store(WITHDRAWAL_RULE, &e)
                    })
                }
            }
        }

        Ok(Response::KeyRelease(Box::new(sealed)))
    }

    fn authorise(
        &self,
        attestation: &VerifiedAttestation,
        op: &KeyOperation,
        now_ms: u64,
    ) -> Result<Step, Refused> {
        let (key, operation, wrapped) = match op {
            KeyOperation::GenerateDataKey { key_id } => {
                (parse_key(key_id)?, Operation::Generate, None)
            }
            KeyOperation::DecryptDataKey { wrapped } => {
                let w = WrappedDataKey::from_bytes(wrapped)
                    .map_err(|e| Refused::denied("bad_wrapped_key", e.to_string()))?;
                (w.key.clone(), Operation::Decrypt, Some(w))
            }
            _ => {
                return Err(Refused {
                    rule: "operation_not_supported",
                    detail: "derived secrets are released as data keys (decrypt a wrapped key)"
                        .to_owned(),
                    code: ErrorCode::BadRequest,
                    noise: false,
                })
            }
        };
        let stored = self
            .kms
            .policy(&key)
            .map_err(|e| Refused::store("store_error", &e))?;
        // Named in the record: the evidence bundle proves which policy decided.
        let policy_sha256 = stored
            .as_ref()
            .map(|s| crate::kms::policy_sha256(&s.text))
            .unwrap_or_default();
        let policy = match stored {
            None => None,
            Some(s) => Some(
                KeyPolicy::from_json_str(&s.text)
                    .or_else(|_| KeyPolicy::from_toml_str(&s.text))
                    .map_err(|e| Refused::denied("policy_invalid", format!("{key}: {e}")))?,
            ),
        };
        let matched = KeyPolicy::evaluate_optional(
            policy.as_ref(),
            attestation,
            operation,
            UnixMillis(now_ms),
        )
        .map_err(|r| Refused::denied(r.rule.as_str(), format!("{key}: {}", r.detail)))?;
        Ok(Step {
            key,
            operation,
            wrapped,
            matched_set: matched.set_name,
            requires_authorisation: policy
                .as_ref()
                .is_some_and(KeyPolicy::require_authorisation),
            policy_sha256,
        })
    }

    /// The purpose and case of the authorisation `id` (issued here, intact),
    /// for the audit records of the request.
    fn job_context(&self, id: &AuthorisationId) -> Result<JobContext, Refused> {
        let record = self
            .kms
            .authorisation(id)
            .map_err(|e| Refused::store("authorisation_store_error", &e))?
            .ok_or_else(|| {
                Refused::denied(
                    "authorisation_unknown",
                    format!("no authorisation {id} was issued by this verifier"),
                )
            })?;
        let signed = record
            .signed_bytes()
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                SignedAuthorisation::verify(&bytes, &self.identity.public_key_sec1())
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| Refused::denied("authorisation_store_error", format!("{id}: {e}")))?;
        Ok(JobContext {
            authorisation: id.to_hex(),
            purpose: signed.authorisation().purpose.clone(),
            case: signed.authorisation().case.clone(),
        })
    }

    /// Admit and count one run of the authorisation `id` for `plan`, under
    /// the store lock (see [`Kms::count_authorisation_run`]).
    fn count_run(&self, id: &AuthorisationId, plan: &[Step], now_ms: u64) -> Result<(), Refused> {
        let counted = self.kms.count_authorisation_run(
            id,
            &self.identity.public_key_sec1(),
            now_ms,
            |signed| check_plan(signed, plan),
        );
        match counted {
            Ok((_, run)) => {
                tracing::debug!(authorisation = %id, run, "authorised run admitted");
                Ok(())
            }
            Err(RunRefusal::Authorisation(
                r @ crate::kms::AuthorisationRefusal::Unavailable { .. },
            )) => Err(Refused {
                code: ErrorCode::Unavailable,
                ..Refused::denied(r.rule(), r.to_string())
            }),
            Err(RunRefusal::Authorisation(r)) => Err(Refused::denied(r.rule(), r.to_string())),
            Err(RunRefusal::Job(detail)) => {
                Err(Refused::denied("authorisation_keys_mismatch", detail))
            }
        }
    }

    fn perform(&self, step: &Step, now_ms: u64) -> Result<ReleasedKey, Refused> {
        let key_refusal = |e: KeyError| {
            if e.is_outage() {
                // The token or the database failed (a lost session, a lost
                // object, an outage): not a decision about this enclave;
                // fail closed as unavailable.
                Refused {
                    rule: "key_backend_unavailable",
                    detail: format!("{}: {e}", step.key),
                    code: ErrorCode::Unavailable,
                    noise: false,
                }
            } else {
                Refused::denied("key_unusable", format!("{}: {e}", step.key))
            }
        };
        let (plain, wrapped) = match &step.wrapped {
            None => self
                .kms
                .generate_data_key(&step.key, now_ms)
                .map_err(key_refusal)?,
            Some(w) => (
                self.kms.decrypt_data_key(w).map_err(key_refusal)?,
                w.clone(),
            ),
        };
        Ok(ReleasedKey {
            key_id: step.key.to_string(),
            version: wrapped.version,
            wrapped: wrapped.to_bytes(),
            plaintext: PlaintextKey::from_bytes(plain.expose_secret()),
        })
    }
}

struct Step {
    key: KeyName,
    operation: Operation,
    wrapped: Option<WrappedDataKey>,
    matched_set: String,
    /// The key's policy says `require_authorisation`.
    requires_authorisation: bool,
    /// SHA-256 of the policy text that decided (recorded in the audit).
    policy_sha256: String,
}

/// Whether `plan` asks for exactly the keys `signed` names, each in its
/// role, in the job's order: the input's data key (decrypt under
/// `input_key`), then one data key per secret (decrypt under
/// `secret_keys`, in order), then the output's fresh data key (generate
/// under `output_key`).
fn check_plan(signed: &SignedAuthorisation, plan: &[Step]) -> Result<(), String> {
    let a = signed.authorisation();
    let mut expected = Vec::with_capacity(a.secret_keys.len().saturating_add(2));
    expected.push((Operation::Decrypt, a.input_key.as_str(), "input"));
    for key in &a.secret_keys {
        expected.push((Operation::Decrypt, key.as_str(), "secret"));
    }
    expected.push((Operation::Generate, a.output_key.as_str(), "output"));
    let asked: Vec<(Operation, &str)> =
        plan.iter().map(|s| (s.operation, s.key.as_str())).collect();
    let named: Vec<(Operation, &str)> = expected.iter().map(|(o, k, _)| (*o, *k)).collect();
    if asked == named {
        return Ok(());
    }
    let show = |v: &[(Operation, &str)]| {
        v.iter()
            .map(|(o, k)| format!("{o} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "the request asks for [{}]; authorisation {} names [{}] (input, secrets, output)",
        show(&asked),
        signed.id(),
        show(&named)
    ))
}

fn parse_key(key_id: &str) -> Result<KeyName, Refused> {
    KeyName::parse(key_id).map_err(|e| Refused {
        rule: "bad_key_id",
        detail: e.to_string(),
        code: ErrorCode::BadRequest,
        noise: false,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refusals_whose_summary_was_not_written_are_summarised_again() {
        let earlier = Noise {
            count: 3,
            first_ms: 100,
            last_ms: 300,
            by_rule: [("bad_frame", 2), ("no_challenge", 1)]
                .into_iter()
                .collect(),
            first_detail: Some("the first".to_owned()),
            last_summary_ms: 50,
            failed_summary_ms: None,
        };
        // Two more came while the summary was being written.
        let mut now = Noise {
            count: 2,
            first_ms: 400,
            last_ms: 500,
            by_rule: [("bad_frame", 2)].into_iter().collect(),
            first_detail: Some("a later one".to_owned()),
            last_summary_ms: 350,
            failed_summary_ms: None,
        };
        assert!(!now.summary().contains("failed to be written"));
        now.restore(earlier, 360);
        assert_eq!(now.count, 5);
        assert_eq!((now.first_ms, now.last_ms), (100, 500));
        assert_eq!(now.by_rule.get("bad_frame"), Some(&4));
        assert_eq!(now.by_rule.get("no_challenge"), Some(&1));
        assert_eq!(now.first_detail.as_deref(), Some("the first"));
        assert_eq!(
            now.last_summary_ms, 350,
            "due again an interval after the failed one"
        );
        // The failed write may have been committed: the next summary says
        // these may be counted twice.
        assert!(
            now.summary().starts_with("5 requests refused")
                && now
                    .summary()
                    .contains("summary at 1970-01-01T00:00:00.36Z failed to be written"),
            "{}",
            now.summary()
        );

        // Nothing came since: the earlier refusals are all there is.
        let mut empty = Noise {
            last_summary_ms: 350,
            ..Noise::default()
        };
        empty.restore(
            Noise {
                count: 1,
                first_ms: 7,
                last_ms: 9,
                by_rule: [("bad_frame", 1)].into_iter().collect(),
                first_detail: None,
                last_summary_ms: 0,
                failed_summary_ms: None,
            },
            400,
        );
        assert_eq!((empty.count, empty.first_ms, empty.last_ms), (1, 7, 9));
    }
}
