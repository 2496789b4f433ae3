//! The record model, its canonical hashing and its JSON form.

#[allow(unused_imports)]
use super::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};
use std::collections::BTreeMap;
use std::fmt;

/// Length of a record hash (SHA-384).
pub const HASH_LEN: usize = 48;
/// Longest line read or written, newline excluded. A record with the largest
/// allowed attestation document and reason fits well within it.
pub const MAX_LINE_LEN: usize = 256 * 1024;
/// Longest `operation`, admin `name`/`role` and enclave `module_id`, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest `key_id`, in bytes.
pub const MAX_KEY_ID_LEN: usize = 1024;
/// Longest `reason`, in bytes.
pub const MAX_REASON_LEN: usize = 16 * 1024;
/// Largest attestation document kept in a record.
pub const MAX_ATTESTATION_DOCUMENT_LEN: usize = kluis_attestation::MAX_DOCUMENT_LEN;

/// The domain-separation label that starts the hashed encoding.
pub(super) const DOMAIN: &[u8] = b"kluis-audit-v1";
/// The tag before a record's job context in the hashed encoding.
pub(super) const JOB_TAG: u8 = 0x4a;
/// How far back `open` looks for the start of the last line, per read.
pub(super) const TAIL_CHUNK: usize = 64 * 1024;
/// The PCRs an enclave actor records (those a policy can pin).
pub(super) const ACTOR_PCRS: [u8; 6] = [0, 1, 2, 3, 4, 8];

/// The end of the chain: the sequence number and hash of the last record.
/// `seq` 0 with a zero hash is the empty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditHead {
    /// Sequence number of the last record (0 for an empty log).
    pub seq: u64,
    /// Its hash (48 zero bytes for an empty log).
    #[serde(with = "hex48")]
    pub hash: [u8; HASH_LEN],
}

impl AuditHead {
    /// The head of an empty log.
    pub const GENESIS: AuditHead = AuditHead {
        seq: 0,
        hash: [0; HASH_LEN],
    };
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {} (hash {})", self.seq, hex::encode(self.hash))
    }
}

/// A head anchored outside the log (in the key store): the head, and the
/// length of the file up to the end of its line, so that a later reader can
/// check in one read that the file still holds that record where it was.
/// `len` is absent in anchors written by older versions; they are checked
/// by reading the chain from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditAnchor {
    /// Sequence number of the anchored record (0 for an empty log).
    pub seq: u64,
    /// Its hash (48 zero bytes for an empty log).
    #[serde(with = "hex48")]
    pub hash: [u8; HASH_LEN],
    /// Bytes of the file up to and including the record's newline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

impl AuditAnchor {
    /// The empty log.
    pub const GENESIS: AuditAnchor = AuditAnchor {
        seq: 0,
        hash: [0; HASH_LEN],
        len: Some(0),
    };

    /// The anchored head.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

impl fmt::Display for AuditAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.head().fmt(f)
    }
}

/// Unix milliseconds as RFC 3339 UTC (the number itself when out of range),
/// for messages and records.
pub fn rfc3339_millis(ms: u64) -> String {
    format_millis(ms).unwrap_or_else(|| format!("{ms} (Unix ms)"))
}

/// Unix milliseconds as RFC 3339 UTC, if the time can be represented.
pub(crate) fn format_millis(ms: u64) -> Option<String> {
    let nanos = i128::from(ms).saturating_mul(1_000_000);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

/// The outcome a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The action was allowed.
    Allowed,
    /// The action was refused.
    Refused,
}

impl Decision {
    fn tag(self) -> u8 {
        match self {
            Decision::Allowed => 1,
            Decision::Refused => 2,
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Actor {
    /// An authenticated administrator.
    Admin {
        /// The administrator's name.
        name: String,
        /// The role they acted in (key or application administrator).
        role: String,
    },
    /// An attested enclave.
    Enclave {
        /// The NSM module id from the attestation document.
        module_id: String,
        /// PCR values from the document, by index.
        #[serde(with = "pcr_map")]
        pcrs: BTreeMap<u8, Vec<u8>>,
        /// SHA-384 of the COSE bytes of the attestation document.
        #[serde(with = "hex48")]
        document_sha384: [u8; HASH_LEN],
    },
    /// The service itself (start-up, recovery, scheduled rotation).
    System,
}

impl Actor {
    /// The enclave that `attestation` proves: its module id, PCRs 0, 1, 2, 3,
    /// 4 and 8 (those a policy can pin; the full document can be kept in the
    /// record's `attestation_document`) and the document hash.
    pub fn enclave(attestation: &kluis_attestation::VerifiedAttestation) -> Actor {
        let document = attestation.document();
        let pcrs = ACTOR_PCRS
            .iter()
            .filter_map(|&i| document.pcr(i).map(|v| (i, v.to_vec())))
            .collect();
        Actor::Enclave {
            module_id: document.module_id.clone(),
            pcrs,
            document_sha384: *attestation.document_sha384(),
        }
    }

    /// What kind of actor this is.
    pub fn kind(&self) -> ActorKind {
        match self {
            Actor::Admin { .. } => ActorKind::Admin,
            Actor::Enclave { .. } => ActorKind::Enclave,
            Actor::System => ActorKind::System,
        }
    }
}

/// The kind of an [`Actor`], for filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// [`Actor::Admin`].
    Admin,
    /// [`Actor::Enclave`].
    Enclave,
    /// [`Actor::System`].
    System,
}

/// A record to append: everything but the chain fields, which the log fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// When, in Unix milliseconds (from the caller's clock).
    pub time_ms: u64,
    /// Who.
    pub actor: Actor,
    /// What, e.g. `key.generate`, `key.rotate`, `policy.set` (1..=256 bytes).
    pub operation: String,
    /// The customer master key concerned, if any.
    pub key_id: Option<String>,
    /// Its version, if one is concerned.
    pub key_version: Option<u32>,
    /// Allowed or refused.
    pub decision: Decision,
    /// Why (for a refusal: the rule that failed and its detail).
    pub reason: Option<String>,
    /// The COSE bytes of the enclave's attestation document, kept so a third
    /// party can re-verify it; its SHA-384 must equal the enclave actor's
    /// `document_sha384`.
    pub attestation_document: Option<Vec<u8>>,
}

/// The job authorisation a key request was made under: recorded in every
/// audit record of the job (allowed or refused), so the log says for which
/// purpose and case each key was used.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobContext {
    /// The authorisation's id: lowercase hex SHA-256 of the signed
    /// authorisation (the id it is stored under).
    pub authorisation: String,
    /// Its purpose.
    pub purpose: String,
    /// Its case reference.
    pub case: String,
}

/// Longest `job.purpose`, in bytes.
pub const MAX_JOB_PURPOSE_LEN: usize = 1024;

/// One record of the log, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Sequence number, from 1, equal to the record's line number.
    pub seq: u64,
    /// When, in Unix milliseconds.
    pub time_ms: u64,
    /// Who.
    pub actor: Actor,
    /// What.
    pub operation: String,
    /// The customer master key concerned, if any.
    pub key_id: Option<String>,
    /// Its version, if one is concerned.
    pub key_version: Option<u32>,
    /// Allowed or refused.
    pub decision: Decision,
    /// Why.
    pub reason: Option<String>,
    /// The COSE bytes of the attestation document (base64 in the file).
    #[serde(with = "opt_base64")]
    pub attestation_document: Option<Vec<u8>>,
    /// The job authorisation the request was made under, if any. Unlike the
    /// other optional fields it is left out of the line (and of the hash)
    /// when absent, so every log written before it existed still verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobContext>,
    /// The previous record's hash (zeros for the first record).
    #[serde(with = "hex48")]
    pub prev_hash: [u8; HASH_LEN],
    /// SHA-384 of the canonical encoding (see the [module documentation](crate::audit)).
    #[serde(with = "hex48")]
    pub hash: [u8; HASH_LEN],
}

impl AuditRecord {
    pub(super) fn seal(
        new: NewRecord,
        job: Option<JobContext>,
        seq: u64,
        prev_hash: [u8; HASH_LEN],
    ) -> AuditRecord {
        let mut record = AuditRecord {
            seq,
            time_ms: new.time_ms,
            actor: new.actor,
            operation: new.operation,
            key_id: new.key_id,
            key_version: new.key_version,
            decision: new.decision,
            reason: new.reason,
            attestation_document: new.attestation_document,
            job,
            prev_hash,
            hash: [0; HASH_LEN],
        };
        record.hash = record.compute_hash();
        record
    }

    /// The record that follows `prev` (the head of the chain), and its
    /// line (compact JSON, without the newline): what every log appends.
    /// Refuses a line over [`MAX_LINE_LEN`] and an exhausted sequence.
    pub(super) fn next_line(
        new: NewRecord,
        job: Option<JobContext>,
        prev: AuditHead,
    ) -> Result<(AuditRecord, Vec<u8>), AuditError> {
        let seq = prev
            .seq
            .checked_add(1)
            .ok_or_else(|| AuditError::Failed("the sequence number is exhausted".to_owned()))?;
        let record = AuditRecord::seal(new, job, seq, prev.hash);
        let line = serde_json::to_vec(&record).map_err(|e| AuditError::InvalidRecord {
            field: "record",
            reason: e.to_string(),
        })?;
        if line.len() > MAX_LINE_LEN {
            return Err(AuditError::InvalidRecord {
                field: "record",
                reason: format!(
                    "its line would be {} bytes, at most {MAX_LINE_LEN} are allowed",
                    line.len()
                ),
            });
        }
        Ok((record, line))
    }

    /// The bytes `hash` is computed over (see the [module documentation](crate::audit)).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let document_len = self.attestation_document.as_ref().map_or(0, Vec::len);
        let reason_len = self.reason.as_ref().map_or(0, String::len);
        let mut e = Encoder(Vec::with_capacity(
            512_usize
                .saturating_add(document_len)
                .saturating_add(reason_len),
        ));
        e.bytes(DOMAIN);
        e.u64(self.seq);
        e.u64(self.time_ms);
        match &self.actor {
            Actor::Admin { name, role } => {
                e.u8(1);
                e.bytes(name.as_bytes());
                e.bytes(role.as_bytes());
            }
            Actor::Enclave {
                module_id,
                pcrs,
                document_sha384,
            } => {
                e.u8(2);
                e.bytes(module_id.as_bytes());
                e.u64(u64::try_from(pcrs.len()).unwrap_or(u64::MAX));
                for (index, value) in pcrs {
                    e.u8(*index);
                    e.bytes(value);
                }
                e.raw(document_sha384);
            }
            Actor::System => e.u8(3),
        }
        e.bytes(self.operation.as_bytes());
        e.opt(self.key_id.as_deref(), |e, v| e.bytes(v.as_bytes()));
        e.opt(self.key_version, |e, v| e.raw(&v.to_be_bytes()));
        e.u8(self.decision.tag());
        e.opt(self.reason.as_deref(), |e, v| e.bytes(v.as_bytes()));
        e.opt(self.attestation_document.as_deref(), |e, v| e.bytes(v));
        // Present only in records of authorised jobs; absent, nothing is
        // written (records from before the field hash as they always did).
        // Unambiguous: what follows the document is either exactly the
        // 48-byte prev_hash, or this tag and more.
        if let Some(job) = &self.job {
            e.u8(JOB_TAG);
            e.bytes(job.authorisation.as_bytes());
            e.bytes(job.purpose.as_bytes());
            e.bytes(job.case.as_bytes());
        }
        e.raw(&self.prev_hash);
        e.0
    }

    /// SHA-384 of [`AuditRecord::canonical_bytes`].
    pub fn compute_hash(&self) -> [u8; HASH_LEN] {
        Sha384::digest(self.canonical_bytes()).into()
    }

    /// This record as a chain head.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

pub(super) struct Encoder(Vec<u8>);

impl Encoder {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.raw(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(u64::try_from(b.len()).unwrap_or(u64::MAX));
        self.raw(b);
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }
}

/// Which records [`AuditLog::records`] returns; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records about this key.
    pub key_id: Option<String>,
    /// Only records of this operation.
    pub operation: Option<String>,
    /// Only records with this decision.
    pub decision: Option<Decision>,
    /// Only records with `time_ms >= since_ms`.
    pub since_ms: Option<u64>,
    /// Only records with `time_ms < until_ms`.
    pub until_ms: Option<u64>,
    /// Only records by this kind of actor.
    pub actor_kind: Option<ActorKind>,
}

impl AuditFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        self.key_id
            .as_ref()
            .is_none_or(|k| record.key_id.as_ref() == Some(k))
            && self
                .operation
                .as_ref()
                .is_none_or(|o| &record.operation == o)
            && self.decision.is_none_or(|d| record.decision == d)
            && self.since_ms.is_none_or(|t| record.time_ms >= t)
            && self.until_ms.is_none_or(|t| record.time_ms < t)
            && self.actor_kind.is_none_or(|k| record.actor.kind() == k)
    }
}

pub(super) fn validate_job(job: &JobContext) -> Result<(), AuditError> {
    let bad = |field: &'static str, reason: String| AuditError::InvalidRecord { field, reason };
    if job.authorisation.len() != 64
        || !job
            .authorisation
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(
            "job.authorisation",
            "64 lowercase hex digits (SHA-256)".to_owned(),
        ));
    }
    if job.purpose.len() > MAX_JOB_PURPOSE_LEN {
        return Err(bad(
            "job.purpose",
            format!("{} bytes, at most {MAX_JOB_PURPOSE_LEN}", job.purpose.len()),
        ));
    }
    if job.case.len() > MAX_NAME_LEN {
        return Err(bad(
            "job.case",
            format!("{} bytes, at most {MAX_NAME_LEN}", job.case.len()),
        ));
    }
    Ok(())
}

pub(super) fn validate_new(new: &NewRecord) -> Result<(), AuditError> {
    fn check(field: &'static str, len: usize, max: usize) -> Result<(), AuditError> {
        if len > max {
            return Err(AuditError::InvalidRecord {
                field,
                reason: format!("{len} bytes, at most {max} are allowed"),
            });
        }
        Ok(())
    }
    if new.operation.is_empty() {
        return Err(AuditError::InvalidRecord {
            field: "operation",
            reason: "empty".to_owned(),
        });
    }
    check("operation", new.operation.len(), MAX_NAME_LEN)?;
    if let Some(key_id) = &new.key_id {
        check("key_id", key_id.len(), MAX_KEY_ID_LEN)?;
    }
    if let Some(reason) = &new.reason {
        check("reason", reason.len(), MAX_REASON_LEN)?;
    }
    if let Some(document) = &new.attestation_document {
        check(
            "attestation_document",
            document.len(),
            MAX_ATTESTATION_DOCUMENT_LEN,
        )?;
    }
    match &new.actor {
        Actor::Admin { name, role } => {
            check("actor.name", name.len(), MAX_NAME_LEN)?;
            check("actor.role", role.len(), MAX_NAME_LEN)?;
        }
        Actor::Enclave {
            module_id,
            pcrs,
            document_sha384,
        } => {
            check("actor.module_id", module_id.len(), MAX_NAME_LEN)?;
            for (index, value) in pcrs {
                if *index >= kluis_attestation::PCR_COUNT || ![32, 48, 64].contains(&value.len()) {
                    return Err(AuditError::InvalidRecord {
                        field: "actor.pcrs",
                        reason: format!(
                            "PCR{index} of {} bytes: indices are 0..32, values 32, 48 or 64 bytes",
                            value.len()
                        ),
                    });
                }
            }
            if let Some(document) = &new.attestation_document {
                let digest: [u8; HASH_LEN] = Sha384::digest(document).into();
                if digest != *document_sha384 {
                    return Err(AuditError::InvalidRecord {
                        field: "attestation_document",
                        reason: format!(
                            "its SHA-384 is {}, the actor's document_sha384 is {}",
                            hex::encode(digest),
                            hex::encode(document_sha384)
                        ),
                    });
                }
            }
        }
        Actor::System => {}
    }
    Ok(())
}

pub(super) fn strict_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("hex must be lowercase 0-9a-f".to_owned());
    }
    hex::decode(text).map_err(|e| e.to_string())
}

pub(super) mod hex48 {
    use super::HASH_LEN;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; HASH_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; HASH_LEN], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = super::strict_hex(&text).map_err(D::Error::custom)?;
        <[u8; HASH_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
            D::Error::custom(format!("expected {HASH_LEN} bytes, found {}", bytes.len()))
        })
    }
}

pub(super) mod pcr_map {
    use serde::{de::Error as _, ser::SerializeMap, Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub(super) fn serialize<S: Serializer>(
        v: &BTreeMap<u8, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(v.len()))?;
        for (index, value) in v {
            map.serialize_entry(&index.to_string(), &hex::encode(value))?;
        }
        map.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, Vec<u8>>, D::Error> {
        // Keys are read as strings: inside the internally tagged `Actor`,
        // serde buffers the map and would not turn "0" into a number.
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (key, value) in raw {
            let index: u8 = key
                .parse()
                .ok()
                .filter(|i: &u8| i.to_string() == key)
                .ok_or_else(|| D::Error::custom(format!("bad PCR index {key:?}")))?;
            let bytes = super::strict_hex(&value).map_err(D::Error::custom)?;
            out.insert(index, bytes);
        }
        Ok(out)
    }
}

pub(super) mod opt_base64 {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| STANDARD.decode(text).map_err(D::Error::custom))
            .transpose()
    }
}
