//! Key policy: which attested enclaves may use a customer master key, for
//! which operations.
//!
//! A [`KeyPolicy`] is written by the application administrator as TOML (or
//! JSON) and parsed strictly: unknown fields are errors, and every value is
//! checked before a `KeyPolicy` exists ([`KeyPolicy::from_toml_str`],
//! [`KeyPolicy::from_json_str`], or any serde deserialiser — the `Deserialize`
//! implementation validates too). So a `KeyPolicy` value is always valid.
//!
//! ```toml
//! operations = ["generate", "decrypt"]   # allowed operations for this key
//! max_document_age_seconds = 300         # required, 1..=3600
//! dangerous_allow_debug = false          # optional, default false
//! require_authorisation = false          # optional, default false: see below
//!
//! [[measurements]]                       # one or more allowed sets, tried in order
//! name = "enclave-v1"
//! pcr0 = "…96 hex digits…"               # each PCR optional: 48 bytes (SHA-384), any case
//! pcr1 = "…"
//! pcr2 = "…"
//! pcr8 = "…"                             # also pcr3 (role) and pcr4 (instance)
//! ```
//!
//! Rules checked when parsing:
//! - `max_document_age_seconds` is 1..=3600;
//! - every PCR value is 96 hex digits (48 bytes, SHA-384), upper or lower case;
//! - every set pins PCR0 or PCR8 to a value that identifies an image or a
//!   signer: a set that pins neither would admit any image. An all-zero PCR8
//!   (an unsigned image) never counts; an all-zero PCR0 (which only a debug
//!   enclave reports) counts only with `dangerous_allow_debug = true`;
//! - set names are non-empty, unique, at most [`MAX_SET_NAME_LEN`] bytes,
//!   without control characters; at most [`MAX_MEASUREMENT_SETS`] sets;
//! - operations are not repeated. `operations` and `measurements` must be
//!   present, but may be empty: such a policy allows nothing (a way to freeze
//!   a key without deleting its policy).
//!
//! [`KeyPolicy::evaluate`] fails closed and checks, in this order: the
//! operation is allowed; a debug-mode enclave (PCR0, PCR1 and PCR2 all zero)
//! is refused unless `dangerous_allow_debug`; the document is at most
//! `max_document_age_seconds` old (and not dated more than
//! [`MAX_CLOCK_SKEW_MS`] in the future); then the measurement sets in order,
//! the first whose every pinned PCR equals the document's wins. Several sets
//! let a new enclave version roll out while the old one still runs.
//!
//! With `require_authorisation = true` the key is released only to a key
//! request made under a controller-signed job authorisation
//! (`attestation-verifier job authorise`) that names it; the broker checks
//! that (the policy only says it is required). A request made under an
//! authorisation is held to it whatever the policies say.
//!
//! A [`Refusal`] names the rule that failed ([`RefusalRule::as_str`] is
//! stable) and a detail for the operator (which PCR of which set differed,
//! expected and found). It is for the audit log and the operator only: the
//! enclave gets a coarse answer.

use kluis_attestation::{UnixMillis, VerifiedAttestation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

/// Length of a PCR value the policy pins: SHA-384.
pub const PCR_LEN: usize = 48;
/// Largest policy file or string accepted.
pub const MAX_POLICY_LEN: usize = 64 * 1024;
/// Most measurement sets a policy may list.
pub const MAX_MEASUREMENT_SETS: usize = 16;
/// Longest measurement-set name, in bytes.
pub const MAX_SET_NAME_LEN: usize = 128;
/// Smallest `max_document_age_seconds`.
pub const MIN_DOCUMENT_AGE_SECONDS: u64 = 1;
/// Largest `max_document_age_seconds` (one hour).
pub const MAX_DOCUMENT_AGE_SECONDS: u64 = 3600;
/// How far in the future a document's timestamp may be (clock skew between
/// the Nitro hypervisor and the verifier) before it is refused.
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// The PCRs a measurement set may pin, in the order they are compared.
const PINNABLE: [u8; 6] = [0, 1, 2, 3, 4, 8];
const ZERO_PCR: [u8; PCR_LEN] = [0; PCR_LEN];

/// An operation a key policy may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Generate a data key under the CMK (`generate`).
    Generate,
    /// Unwrap a data key wrapped under the CMK (`decrypt`).
    Decrypt,
    /// Derive a per-key secret, e.g. for pseudonymisation (`derive-secret`).
    DeriveSecret,
}

impl Operation {
    /// The name used in policy files and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Generate => "generate",
            Operation::Decrypt => "decrypt",
            Operation::DeriveSecret => "derive-secret",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One allowed set of measurements: an enclave matches when every PCR the set
/// pins equals the document's. PCRs left `None` are not compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementSet {
    /// The set's name, reported on a match (e.g. `enclave-v1`).
    pub name: String,
    /// PCR0: the enclave image file.
    pub pcr0: Option<[u8; PCR_LEN]>,
    /// PCR1: the Linux kernel and bootstrap.
    pub pcr1: Option<[u8; PCR_LEN]>,
    /// PCR2: the application.
    pub pcr2: Option<[u8; PCR_LEN]>,
    /// PCR3: the IAM role of the parent instance.
    pub pcr3: Option<[u8; PCR_LEN]>,
    /// PCR4: the parent instance id.
    pub pcr4: Option<[u8; PCR_LEN]>,
    /// PCR8: the certificate the enclave image was signed with.
    pub pcr8: Option<[u8; PCR_LEN]>,
}

impl MeasurementSet {
    /// A set named `name` that pins nothing yet (not valid until PCR0 or
    /// PCR8 is pinned).
    pub fn new(name: impl Into<String>) -> Self {
        MeasurementSet {
            name: name.into(),
            pcr0: None,
            pcr1: None,
            pcr2: None,
            pcr3: None,
            pcr4: None,
            pcr8: None,
        }
    }

    /// The pinned value of PCR `index`, if any (only 0, 1, 2, 3, 4 and 8 can
    /// be pinned).
    pub fn pcr(&self, index: u8) -> Option<&[u8; PCR_LEN]> {
        match index {
            0 => self.pcr0.as_ref(),
            1 => self.pcr1.as_ref(),
            2 => self.pcr2.as_ref(),
            3 => self.pcr3.as_ref(),
            4 => self.pcr4.as_ref(),
            8 => self.pcr8.as_ref(),
            _ => None,
        }
    }

    /// The first pinned PCR that differs from the document's, described as
    /// `PCR<i> expected <hex> found <hex|absent>`; `None` when the set matches.
    fn first_mismatch<'a>(&self, document_pcr: impl Fn(u8) -> Option<&'a [u8]>) -> Option<String> {
        PINNABLE.iter().find_map(|&index| {
            let expected = self.pcr(index)?;
            let found = document_pcr(index);
            (found != Some(expected.as_slice())).then(|| {
                format!(
                    "PCR{index} expected {} found {}",
                    hex::encode(expected),
                    found.map_or_else(|| "absent".to_owned(), hex::encode)
                )
            })
        })
    }
}

/// A validated key policy. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicy", into = "RawPolicy")]
pub struct KeyPolicy {
    operations: Vec<Operation>,
    max_document_age_seconds: u64,
    dangerous_allow_debug: bool,
    measurements: Vec<MeasurementSet>,
    require_authorisation: bool,
}

/// A successful evaluation: which allowed set the enclave matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMatch {
    /// The name of the first measurement set that matched.
    pub set_name: String,
}

/// The rule a [`Refusal`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalRule {
    /// There is no policy for the key.
    NoPolicy,
    /// The policy does not allow the requested operation.
    OperationNotAllowed,
    /// The enclave runs in debug mode and the policy does not allow it.
    DebugEnclave,
    /// The attestation document is older than the policy allows (or dated
    /// too far in the future).
    DocumentTooOld,
    /// No measurement set of the policy matches the enclave.
    MeasurementsNotAllowed,
}

impl RefusalRule {
    /// A stable name, for the audit log and for operators' tooling.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalRule::NoPolicy => "no_policy",
            RefusalRule::OperationNotAllowed => "operation_not_allowed",
            RefusalRule::DebugEnclave => "debug_enclave",
            RefusalRule::DocumentTooOld => "document_too_old",
            RefusalRule::MeasurementsNotAllowed => "measurements_not_allowed",
        }
    }
}

impl fmt::Display for RefusalRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a policy refused a request: the rule and a detail for the operator.
/// Never send this to the enclave; it gets a coarse `denied`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy refused ({rule}): {detail}")]
pub struct Refusal {
    /// The rule that failed.
    pub rule: RefusalRule,
    /// What was expected and what was found.
    pub detail: String,
}

impl Refusal {
    fn new(rule: RefusalRule, detail: String) -> Self {
        Refusal { rule, detail }
    }
}

/// A policy that could not be parsed or is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The policy text is larger than [`MAX_POLICY_LEN`].
    #[error("the policy is {found} bytes long, at most {max} are allowed")]
    TooLarge {
        /// Its length.
        found: u64,
        /// [`MAX_POLICY_LEN`].
        max: usize,
    },
    /// The policy file could not be read.
    #[error("cannot read the policy file {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file name ends in neither `.toml` nor `.json`.
    #[error("the policy file {path} must end in .toml or .json")]
    UnknownFormat {
        /// The file.
        path: String,
    },
    /// TOML or JSON syntax error, an unknown or missing field, a wrong type.
    #[error("the policy does not parse: {0}")]
    Syntax(String),
    /// `max_document_age_seconds` outside 1..=3600.
    #[error("max_document_age_seconds is {found}, it must be {MIN_DOCUMENT_AGE_SECONDS}..={MAX_DOCUMENT_AGE_SECONDS}")]
    MaxAgeOutOfRange {
        /// The value found.
        found: u64,
    },
    /// An operation is listed twice.
    #[error("operation {0} is listed more than once")]
    DuplicateOperation(Operation),
    /// More than [`MAX_MEASUREMENT_SETS`] measurement sets.
    #[error(
        "the policy lists {found} measurement sets, at most {MAX_MEASUREMENT_SETS} are allowed"
    )]
    TooManySets {
        /// How many sets.
        found: usize,
    },
    /// A set name is empty, too long or has control characters.
    #[error("measurement set #{position} has an invalid name: {reason}")]
    BadSetName {
        /// 1-based position of the set in the policy.
        position: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Two sets have the same name.
    #[error("two measurement sets are named {name:?}")]
    DuplicateSetName {
        /// The name.
        name: String,
    },
    /// A PCR value is not hex.
    #[error("set {set:?}: pcr{pcr} is not hexadecimal ({reason})")]
    BadHex {
        /// The set.
        set: String,
        /// The PCR index.
        pcr: u8,
        /// What the hex decoder said.
        reason: String,
    },
    /// A PCR value is not 48 bytes.
    #[error(
        "set {set:?}: pcr{pcr} is {found} bytes, a PCR is {PCR_LEN} bytes (SHA-384, 96 hex digits)"
    )]
    BadPcrLength {
        /// The set.
        set: String,
        /// The PCR index.
        pcr: u8,
        /// Its length in bytes.
        found: usize,
    },
    /// A set pins neither PCR0 nor PCR8 to a value that identifies an image
    /// or a signer, so it would admit any enclave.
    #[error("set {set:?} pins neither PCR0 nor PCR8 ({reason}); it would admit any enclave image")]
    PinsNoImage {
        /// The set.
        set: String,
        /// What it pins instead.
        reason: String,
    },
}

impl PolicyError {
    /// A stable short name of the error, for tests and tooling.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::TooLarge { .. } => "too_large",
            PolicyError::Io { .. } => "io",
            PolicyError::UnknownFormat { .. } => "unknown_format",
            PolicyError::Syntax(_) => "syntax",
            PolicyError::MaxAgeOutOfRange { .. } => "max_age_out_of_range",
            PolicyError::DuplicateOperation(_) => "duplicate_operation",
            PolicyError::TooManySets { .. } => "too_many_sets",
            PolicyError::BadSetName { .. } => "bad_set_name",
            PolicyError::DuplicateSetName { .. } => "duplicate_set_name",
            PolicyError::BadHex { .. } => "bad_hex",
            PolicyError::BadPcrLength { .. } => "bad_pcr_length",
            PolicyError::PinsNoImage { .. } => "pins_no_image",
        }
    }
}

impl KeyPolicy {
    /// Builds and validates a policy.
    pub fn new(
        operations: Vec<Operation>,
        max_document_age_seconds: u64,
        dangerous_allow_debug: bool,
        measurements: Vec<MeasurementSet>,
    ) -> Result<Self, PolicyError> {
        let policy = KeyPolicy {
            operations,
            max_document_age_seconds,
            dangerous_allow_debug,
            measurements,
            require_authorisation: false,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// The same policy, requiring (or not) a job authorisation for every
    /// release of the key.
    pub fn with_require_authorisation(mut self, require: bool) -> Self {
        self.require_authorisation = require;
        self
    }

    /// Whether a release of the key needs a job authorisation that names it.
    pub fn require_authorisation(&self) -> bool {
        self.require_authorisation
    }

    /// Parses and validates a TOML policy.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        check_len(text.len())?;
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        KeyPolicy::try_from(raw)
    }

    /// Parses and validates a JSON policy.
    pub fn from_json_str(text: &str) -> Result<Self, PolicyError> {
        check_len(text.len())?;
        let raw: RawPolicy =
            serde_json::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        KeyPolicy::try_from(raw)
    }

    /// Reads (at most [`MAX_POLICY_LEN`] bytes), parses and validates a policy
    /// file; the format follows the extension, `.toml` or `.json`.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let io = |e: std::io::Error| PolicyError::Io {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let extension = path.extension().and_then(|e| e.to_str());
        let is_toml = match extension {
            Some("toml") => true,
            Some("json") => false,
            _ => return Err(PolicyError::UnknownFormat { path: shown }),
        };
        // A FIFO or device would block or never end: regular files only
        // (checked before opening, and of the file opened).
        let regular = |meta: std::fs::Metadata| {
            if meta.is_file() {
                Ok(())
            } else {
                Err(PolicyError::Io {
                    path: shown.clone(),
                    reason: "not a regular file".to_owned(),
                })
            }
        };
        regular(std::fs::metadata(path).map_err(io)?)?;
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let len = meta.len();
        regular(meta)?;
        // Its size, not the bytes a bounded read would have taken.
        if len > u64::try_from(MAX_POLICY_LEN).unwrap_or(u64::MAX) {
            return Err(PolicyError::TooLarge {
                found: len,
                max: MAX_POLICY_LEN,
            });
        }
        let mut text = String::new();
        let cap = u64::try_from(MAX_POLICY_LEN).unwrap_or(u64::MAX);
        file.take(cap.saturating_add(1))
            .read_to_string(&mut text)
            .map_err(io)?;
        if is_toml {
            KeyPolicy::from_toml_str(&text)
        } else {
            KeyPolicy::from_json_str(&text)
        }
    }

    /// Checks every rule of the [module documentation](self). Every
    /// `KeyPolicy` has already passed it (parsing and [`KeyPolicy::new`]
    /// validate); it is public so a caller can re-check explicitly.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(MIN_DOCUMENT_AGE_SECONDS..=MAX_DOCUMENT_AGE_SECONDS)
            .contains(&self.max_document_age_seconds)
        {
            return Err(PolicyError::MaxAgeOutOfRange {
                found: self.max_document_age_seconds,
            });
        }
        let mut seen = BTreeSet::new();
        for op in &self.operations {
            if !seen.insert(*op) {
                return Err(PolicyError::DuplicateOperation(*op));
            }
        }
        if self.measurements.len() > MAX_MEASUREMENT_SETS {
            return Err(PolicyError::TooManySets {
                found: self.measurements.len(),
            });
        }
        let mut names = BTreeSet::new();
        for (i, set) in self.measurements.iter().enumerate() {
            check_set_name(i.saturating_add(1), &set.name)?;
            if !names.insert(set.name.as_str()) {
                return Err(PolicyError::DuplicateSetName {
                    name: set.name.clone(),
                });
            }
            self.check_pins_image(set)?;
        }
        Ok(())
    }

    fn check_pins_image(&self, set: &MeasurementSet) -> Result<(), PolicyError> {
        let pcr0_counts = match &set.pcr0 {
            Some(v) if *v != ZERO_PCR => true,
            Some(_) => self.dangerous_allow_debug,
            None => false,
        };
        let pcr8_counts = set.pcr8.is_some_and(|v| v != ZERO_PCR);
        if pcr0_counts || pcr8_counts {
            return Ok(());
        }
        let mut reasons = Vec::new();
        if set.pcr0.is_some() {
            reasons.push(
                "its PCR0 is all zeros, which only debug enclaves report, \
                 and dangerous_allow_debug is false",
            );
        }
        if set.pcr8.is_some() {
            reasons.push("its PCR8 is all zeros, which every unsigned image reports");
        }
        if reasons.is_empty() {
            reasons.push("neither is set");
        }
        Err(PolicyError::PinsNoImage {
            set: set.name.clone(),
            reason: reasons.join("; "),
        })
    }

    /// The operations this policy allows.
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    /// The maximum age of an attestation document, in seconds.
    pub fn max_document_age_seconds(&self) -> u64 {
        self.max_document_age_seconds
    }

    /// Whether debug-mode enclaves may match.
    pub fn dangerous_allow_debug(&self) -> bool {
        self.dangerous_allow_debug
    }

    /// The allowed measurement sets, in evaluation order.
    pub fn measurements(&self) -> &[MeasurementSet] {
        &self.measurements
    }

    /// The refusal for a key that has no policy.
    pub fn evaluate_missing() -> Refusal {
        Refusal::new(
            RefusalRule::NoPolicy,
            "the key has no policy, so no enclave may use it".to_owned(),
        )
    }

    /// Evaluates `policy`, refusing when there is none.
    pub fn evaluate_optional(
        policy: Option<&KeyPolicy>,
        attestation: &VerifiedAttestation,
        op: Operation,
        now: UnixMillis,
    ) -> Result<PolicyMatch, Refusal> {
        match policy {
            Some(policy) => policy.evaluate(attestation, op, now),
            None => Err(KeyPolicy::evaluate_missing()),
        }
    }

    /// Decides whether the enclave that `attestation` proves may perform `op`
    /// at `now`. See the [module documentation](self) for the order of checks.
    pub fn evaluate(
        &self,
        attestation: &VerifiedAttestation,
        op: Operation,
        now: UnixMillis,
    ) -> Result<PolicyMatch, Refusal> {
        let document = attestation.document();
        if !self.operations.contains(&op) {
            let allowed = if self.operations.is_empty() {
                "none".to_owned()
            } else {
                self.operations
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Refusal::new(
                RefusalRule::OperationNotAllowed,
                format!("operation {op} is not allowed; the policy allows: {allowed}"),
            ));
        }
        if document.is_debug_mode() && !self.dangerous_allow_debug {
            return Err(Refusal::new(
                RefusalRule::DebugEnclave,
                format!(
                    "module {} runs in debug mode (PCR0, PCR1 and PCR2 are zero) and the \
                     policy does not set dangerous_allow_debug",
                    document.module_id
                ),
            ));
        }
        self.check_age(document.timestamp_ms, now)?;
        if self.measurements.is_empty() {
            return Err(Refusal::new(
                RefusalRule::MeasurementsNotAllowed,
                "the policy has no measurement sets, so no enclave may use the key".to_owned(),
            ));
        }
        let mut mismatches = Vec::with_capacity(self.measurements.len());
        for set in &self.measurements {
            match set.first_mismatch(|i| document.pcr(i)) {
                None => {
                    return Ok(PolicyMatch {
                        set_name: set.name.clone(),
                    })
                }
                Some(what) => mismatches.push(format!("set {:?}: {what}", set.name)),
            }
        }
        Err(Refusal::new(
            RefusalRule::MeasurementsNotAllowed,
            format!(
                "no measurement set matches module {}: {}",
                document.module_id,
                mismatches.join("; ")
            ),
        ))
    }

    fn check_age(&self, timestamp_ms: u64, now: UnixMillis) -> Result<(), Refusal> {
        let max_ms = self.max_document_age_seconds.saturating_mul(1000);
        match now.0.checked_sub(timestamp_ms) {
            Some(age_ms) if age_ms > max_ms => Err(Refusal::new(
                RefusalRule::DocumentTooOld,
                format!(
                    "the document is {age_ms} ms old (timestamp {}, now {}); \
                     the policy allows at most {} s",
                    crate::audit::rfc3339_millis(timestamp_ms),
                    crate::audit::rfc3339_millis(now.0),
                    self.max_document_age_seconds
                ),
            )),
            Some(_) => Ok(()),
            None => {
                let ahead_ms = timestamp_ms.saturating_sub(now.0);
                if ahead_ms > MAX_CLOCK_SKEW_MS {
                    Err(Refusal::new(
                        RefusalRule::DocumentTooOld,
                        format!(
                            "the document is dated {ahead_ms} ms after the verification time \
                             (timestamp {}, now {}); at most {MAX_CLOCK_SKEW_MS} ms \
                             of clock skew is allowed",
                            crate::audit::rfc3339_millis(timestamp_ms),
                            crate::audit::rfc3339_millis(now.0)
                        ),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn check_len(len: usize) -> Result<(), PolicyError> {
    if len > MAX_POLICY_LEN {
        return Err(PolicyError::TooLarge {
            found: u64::try_from(len).unwrap_or(u64::MAX),
            max: MAX_POLICY_LEN,
        });
    }
    Ok(())
}

fn check_set_name(position: usize, name: &str) -> Result<(), PolicyError> {
    let reason = if name.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > MAX_SET_NAME_LEN {
        format!(
            "it is {} bytes long, at most {MAX_SET_NAME_LEN} are allowed",
            name.len()
        )
    } else if name.chars().any(char::is_control) {
        "it contains control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(PolicyError::BadSetName { position, reason })
}

/// The policy as written: what serde reads and writes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    operations: Vec<Operation>,
    max_document_age_seconds: u64,
    #[serde(default)]
    dangerous_allow_debug: bool,
    measurements: Vec<RawSet>,
    /// Absent in policies written before it existed (false); written only
    /// when true, so older policies keep their stored text.
    #[serde(default, skip_serializing_if = "is_false")]
    require_authorisation: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr0: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pcr8: Option<String>,
}

fn decode_pcr(set: &str, pcr: u8, text: &str) -> Result<[u8; PCR_LEN], PolicyError> {
    let bytes = hex::decode(text).map_err(|e| PolicyError::BadHex {
        set: set.to_owned(),
        pcr,
        reason: e.to_string(),
    })?;
    <[u8; PCR_LEN]>::try_from(bytes.as_slice()).map_err(|_| PolicyError::BadPcrLength {
        set: set.to_owned(),
        pcr,
        found: bytes.len(),
    })
}

impl TryFrom<RawPolicy> for KeyPolicy {
    type Error = PolicyError;

    fn try_from(raw: RawPolicy) -> Result<Self, PolicyError> {
        if raw.measurements.len() > MAX_MEASUREMENT_SETS {
            return Err(PolicyError::TooManySets {
                found: raw.measurements.len(),
            });
        }
        let mut measurements = Vec::with_capacity(raw.measurements.len());
        for (i, raw_set) in raw.measurements.into_iter().enumerate() {
            check_set_name(i.saturating_add(1), &raw_set.name)?;
            let name = raw_set.name;
            let pin = |index: u8, text: Option<String>| {
                text.map(|t| decode_pcr(&name, index, &t)).transpose()
            };
            let pcr0 = pin(0, raw_set.pcr0)?;
            let pcr1 = pin(1, raw_set.pcr1)?;
            let pcr2 = pin(2, raw_set.pcr2)?;
            let pcr3 = pin(3, raw_set.pcr3)?;
            let pcr4 = pin(4, raw_set.pcr4)?;
            let pcr8 = pin(8, raw_set.pcr8)?;
            measurements.push(MeasurementSet {
                name,
                pcr0,
                pcr1,
                pcr2,
                pcr3,
                pcr4,
                pcr8,
            });
        }
        KeyPolicy::new(
            raw.operations,
            raw.max_document_age_seconds,
            raw.dangerous_allow_debug,
            measurements,
        )
        .map(|p| p.with_require_authorisation(raw.require_authorisation))
    }
}

impl From<KeyPolicy> for RawPolicy {
    fn from(policy: KeyPolicy) -> Self {
        let enc = |v: Option<[u8; PCR_LEN]>| v.map(hex::encode);
        RawPolicy {
            operations: policy.operations,
            max_document_age_seconds: policy.max_document_age_seconds,
            dangerous_allow_debug: policy.dangerous_allow_debug,
            require_authorisation: policy.require_authorisation,
            measurements: policy
                .measurements
                .into_iter()
                .map(|s| RawSet {
                    name: s.name,
                    pcr0: enc(s.pcr0),
                    pcr1: enc(s.pcr1),
                    pcr2: enc(s.pcr2),
                    pcr3: enc(s.pcr3),
                    pcr4: enc(s.pcr4),
                    pcr8: enc(s.pcr8),
                })
                .collect(),
        }
    }
}
