//! Controller-signed job authorisations in the store: record kind
//! `authorisation`, id = lowercase hex SHA-256 of the signed authorisation
//! (its [`AuthorisationId`]), with the signed bytes, the run count and the
//! revocation state.
//!
//! Issuing and revoking are changes like any other: audited first
//! ([`Kms::put_audited`]). A run is counted under the store lock, after the
//! checks that admit it ([`admit_run`]) and before any key of the run is
//! released: two requests racing for the last run cannot both get it, and a
//! run whose release fails after it was counted is used up (never the
//! other way round).

use super::{Change, Kms};
use crate::keys::KeyError;
use base64::Engine as _;
use kluis_proto::{AuthorisationId, SignedAuthorisation};

/// The record kind of job authorisations.
pub const KIND_AUTHORISATION: &str = "authorisation";

/// How far in the future an authorisation's issue time may be before it is
/// refused (clock skew between replicas).
const MAX_ISSUE_SKEW_MS: u64 = 60_000;

/// A job authorisation as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorisationRecord {
    /// The signed authorisation, standard base64.
    pub signed: String,
    /// How many runs (key requests of the job) were admitted.
    pub runs: u64,
    /// When it was last used, Unix ms.
    pub last_run_ms: Option<u64>,
    /// Set once it is revoked.
    pub revoked: Option<Revocation>,
}

/// Who revoked an authorisation, when and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// The administrator.
    pub by: String,
    /// When, Unix ms.
    pub time_ms: u64,
    /// Why.
    pub reason: String,
}

impl AuthorisationRecord {
    /// The signed bytes.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, KeyError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.signed)
            .map_err(|e| KeyError::CorruptRecord {
                name: KIND_AUTHORISATION.to_owned(),
                detail: e.to_string(),
            })
    }
}

/// Why a run was not admitted. [`AuthorisationRefusal::rule`] is stable
/// (audit log, operators' tooling).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorisationRefusal {
    /// No authorisation with that id was issued here.
    #[error("no authorisation {0} was issued by this verifier")]
    Unknown(String),
    /// It was revoked.
    #[error("authorisation {id} was revoked by {by} at {at}: {reason}")]
    Revoked {
        /// Its id.
        id: String,
        /// Who.
        by: String,
        /// When (RFC 3339).
        at: String,
        /// Why.
        reason: String,
    },
    /// It expired.
    #[error("authorisation {id} expired at {at}")]
    Expired {
        /// Its id.
        id: String,
        /// When (RFC 3339).
        at: String,
    },
    /// Its issue time is in the future.
    #[error("authorisation {id} is issued in the future ({at})")]
    NotYetValid {
        /// Its id.
        id: String,
        /// When (RFC 3339).
        at: String,
    },
    /// All its runs were used.
    #[error("authorisation {id} allows {max} run(s), all used")]
    Exhausted {
        /// Its id.
        id: String,
        /// The limit.
        max: u64,
    },
    /// The stored record is unusable, or the store failed.
    #[error("authorisation {id}: {detail}")]
    Store {
        /// Its id.
        id: String,
        /// What failed.
        detail: String,
    },
    /// The store could not be reached (see [`KeyError::is_outage`]).
    #[error("authorisation {id}: the store is unavailable: {detail}")]
    Unavailable {
        /// Its id.
        id: String,
        /// What failed.
        detail: String,
    },
}

impl AuthorisationRefusal {
    /// The stable rule name.
    pub fn rule(&self) -> &'static str {
        match self {
            AuthorisationRefusal::Unknown(_) => "authorisation_unknown",
            AuthorisationRefusal::Revoked { .. } => "authorisation_revoked",
            AuthorisationRefusal::Expired { .. } => "authorisation_expired",
            AuthorisationRefusal::NotYetValid { .. } => "authorisation_not_yet_valid",
            AuthorisationRefusal::Exhausted { .. } => "authorisation_exhausted",
            AuthorisationRefusal::Store { .. } => "authorisation_store_error",
            AuthorisationRefusal::Unavailable { .. } => "authorisation_store_unavailable",
        }
    }
}

/// Whether one more run of `signed` (stored as `record`) is admitted at
/// `now_ms`: not revoked, issued, not expired, runs left. Pure.
pub fn admit_run(
    signed: &SignedAuthorisation,
    record: &AuthorisationRecord,
    now_ms: u64,
) -> Result<(), AuthorisationRefusal> {
    let id = signed.id().to_hex();
    let a = signed.authorisation();
    if let Some(r) = &record.revoked {
        return Err(AuthorisationRefusal::Revoked {
            id,
            by: r.by.clone(),
            at: crate::audit::rfc3339_millis(r.time_ms),
            reason: r.reason.clone(),
        });
    }
    if now_ms >= a.expires_at_ms {
        return Err(AuthorisationRefusal::Expired {
            id,
            at: crate::audit::rfc3339_millis(a.expires_at_ms),
        });
    }
    if a.issued_at_ms > now_ms.saturating_add(MAX_ISSUE_SKEW_MS) {
        return Err(AuthorisationRefusal::NotYetValid {
            id,
            at: crate::audit::rfc3339_millis(a.issued_at_ms),
        });
    }
    if let Some(max) = a.max_runs {
        if record.runs >= max {
            return Err(AuthorisationRefusal::Exhausted { id, max });
        }
    }
    Ok(())
}

/// The audit `job` field of a record about authorisation `id`.
fn job_context(id: &str, signed: &SignedAuthorisation) -> crate::audit::JobContext {
    crate::audit::JobContext {
        authorisation: id.to_owned(),
        purpose: signed.authorisation().purpose.clone(),
        case: signed.authorisation().case.clone(),
    }
}

impl Kms {
    /// Store a newly issued authorisation, after its audit record
    /// (`job.authorise`, with `summary` as the reason).
    pub fn store_authorisation(
        &self,
        signed: &SignedAuthorisation,
        summary: String,
    ) -> Result<(), KeyError> {
        let guard = self.change_lock()?;
        let id = signed.id().to_hex();
        if self.store.get(KIND_AUTHORISATION, &id)?.is_some() {
            return Err(KeyError::InvalidArgument(format!(
                "authorisation {id} exists already"
            )));
        }
        let record = AuthorisationRecord {
            signed: base64::engine::general_purpose::STANDARD.encode(signed.bytes()),
            runs: 0,
            last_run_ms: None,
            revoked: None,
        };
        let change = Change {
            operation: "job.authorise",
            key: None,
            reason: Some(summary),
            job: Some(job_context(&id, signed)),
        };
        self.put_audited(&guard, KIND_AUTHORISATION, &id, &record, change)
    }

    /// The authorisation stored under `id`, if any.
    pub fn authorisation(
        &self,
        id: &AuthorisationId,
    ) -> Result<Option<AuthorisationRecord>, KeyError> {
        self.get_json(KIND_AUTHORISATION, &id.to_hex())
    }

    /// Every stored authorisation, by id.
    pub fn authorisations(&self) -> Result<Vec<(String, AuthorisationRecord)>, KeyError> {
        let mut out = Vec::new();
        let mut ids = self.store.list(KIND_AUTHORISATION)?;
        ids.sort();
        for id in ids {
            if let Some(record) = self.get_json(KIND_AUTHORISATION, &id)? {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    /// Revoke the authorisation `id` (audited first, `job.revoke`): no run
    /// is admitted after this.
    pub fn revoke_authorisation(
        &self,
        id: &AuthorisationId,
        by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<AuthorisationRecord, KeyError> {
        let guard = self.change_lock()?;
        let hex = id.to_hex();
        let mut record: AuthorisationRecord = self
            .get_json(KIND_AUTHORISATION, &hex)?
            .ok_or_else(|| KeyError::InvalidArgument(format!("no authorisation {hex}")))?;
        if record.revoked.is_some() {
            return Err(KeyError::InvalidArgument(format!(
                "authorisation {hex} is revoked already"
            )));
        }
        record.revoked = Some(Revocation {
            by: by.to_owned(),
            time_ms: now_ms,
            reason: reason.to_owned(),
        });
        // Its purpose and case go into the record, from the authorisation as
        // issued (checked under this verifier's identity).
        let public = self.identity()?.map(|identity| identity.public_key_sec1());
        let signed = match (record.signed_bytes(), public) {
            (Ok(bytes), Some(public)) => SignedAuthorisation::verify(&bytes, &public).ok(),
            _ => None,
        };
        let change = Change {
            operation: "job.revoke",
            key: None,
            reason: Some(format!("authorisation {hex}: {reason}")),
            job: signed.as_ref().map(|signed| job_context(&hex, signed)),
        };
        self.put_audited(&guard, KIND_AUTHORISATION, &hex, &record, change)?;
        Ok(record)
    }

    /// Admit and count one run of the authorisation `id`, atomically under
    /// the store lock: the stored authorisation must verify under
    /// `verifier_public_key` (this verifier's identity), and
    /// `check` (the job's keys against it) and [`admit_run`] must pass.
    /// Returns the authorisation and the run's number (from 1).
    pub fn count_authorisation_run<E>(
        &self,
        id: &AuthorisationId,
        verifier_public_key: &[u8],
        now_ms: u64,
        check: impl FnOnce(&SignedAuthorisation) -> Result<(), E>,
    ) -> Result<(SignedAuthorisation, u64), RunRefusal<E>> {
        let hex = id.to_hex();
        let store_error = |e: KeyError| {
            RunRefusal::Authorisation(if e.is_outage() {
                AuthorisationRefusal::Unavailable {
                    id: hex.clone(),
                    detail: e.to_string(),
                }
            } else {
                AuthorisationRefusal::Store {
                    id: hex.clone(),
                    detail: e.to_string(),
                }
            })
        };
        let guard = self.lock().map_err(store_error)?;
        let mut record: AuthorisationRecord = self
            .get_json(KIND_AUTHORISATION, &hex)
            .map_err(store_error)?
            .ok_or_else(|| RunRefusal::Authorisation(AuthorisationRefusal::Unknown(hex.clone())))?;
        let bytes = record.signed_bytes().map_err(store_error)?;
        let signed = SignedAuthorisation::verify(&bytes, verifier_public_key).map_err(|e| {
            RunRefusal::Authorisation(AuthorisationRefusal::Store {
                id: hex.clone(),
                detail: format!("the stored authorisation does not verify: {e}"),
            })
        })?;
        if signed.id() != *id {
            return Err(RunRefusal::Authorisation(AuthorisationRefusal::Store {
                id: hex,
                detail: "the stored authorisation has another id".to_owned(),
            }));
        }
        check(&signed).map_err(RunRefusal::Job)?;
        admit_run(&signed, &record, now_ms).map_err(RunRefusal::Authorisation)?;
        record.runs = record.runs.saturating_add(1);
        record.last_run_ms = Some(now_ms);
        self.put_json(&guard, KIND_AUTHORISATION, &hex, &record)
            .map_err(store_error)?;
        Ok((signed, record.runs))
    }
}

/// Why [`Kms::count_authorisation_run`] admitted no run.
#[derive(Debug)]
pub enum RunRefusal<E> {
    /// The authorisation's own state.
    Authorisation(AuthorisationRefusal),
    /// The caller's check of the job against it.
    Job(E),
}
