//! JSON renderings of documents and errors (the CLI's output contract).

use kluis_attestation::{AttestationDocument, CertificateSummary, VerifyError};
use serde_json::{json, Map, Value};

/// RFC 3339 UTC for Unix seconds; the number itself when out of range.
pub(crate) fn rfc3339_seconds(secs: i64) -> Value {
    match time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        }) {
        Some(s) => Value::String(s),
        None => Value::from(secs),
    }
}

/// RFC 3339 UTC with milliseconds for Unix milliseconds.
pub(crate) fn rfc3339_millis(ms: u64) -> Value {
    match crate::audit::format_millis(ms) {
        Some(s) => Value::String(s),
        None => Value::from(ms),
    }
}

fn optional_hex(field: &Option<Vec<u8>>) -> Value {
    match field {
        None => Value::Null,
        Some(b) => Value::String(hex::encode(b)),
    }
}

/// The document's fields, as both `verify` and `inspect` print them.
pub(crate) fn document_fields(doc: &AttestationDocument) -> Map<String, Value> {
    let pcrs: Map<String, Value> = doc
        .pcrs
        .iter()
        .map(|(i, v)| (i.to_string(), Value::String(hex::encode(v))))
        .collect();
    let mut out = Map::new();
    out.insert("module_id".into(), json!(doc.module_id));
    out.insert("timestamp".into(), json!(doc.timestamp_ms));
    out.insert("timestamp_rfc3339".into(), rfc3339_millis(doc.timestamp_ms));
    out.insert("digest".into(), json!(doc.digest));
    out.insert("pcrs".into(), Value::Object(pcrs));
    out.insert("debug_mode".into(), json!(doc.is_debug_mode()));
    out.insert("public_key".into(), optional_hex(&doc.public_key));
    out.insert("user_data".into(), optional_hex(&doc.user_data));
    out.insert("nonce".into(), optional_hex(&doc.nonce));
    out
}

/// One certificate's facts.
pub(crate) fn certificate(summary: &CertificateSummary) -> Value {
    json!({
        "subject": summary.subject,
        "issuer": summary.issuer,
        "serial": summary.serial,
        "not_before": rfc3339_seconds(summary.not_before),
        "not_after": rfc3339_seconds(summary.not_after),
        "is_ca": summary.is_ca,
        "path_len": summary.path_len,
    })
}

/// `{"error": {"kind", "message"}}` for a rejection.
pub(crate) fn rejection(err: &VerifyError) -> Value {
    error_object(err.kind(), &err.to_string())
}

/// `{"error": {"kind", "message"}}`.
pub(crate) fn error_object(kind: &str, message: &str) -> Value {
    json!({ "error": { "kind": kind, "message": message } })
}
