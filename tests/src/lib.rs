//! Shared helpers for Kluis's cross-crate integration tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::arithmetic_side_effects,
    clippy::panic,
    clippy::indexing_slicing,
    missing_debug_implementations
)]

pub mod forge;
pub mod world;

use std::path::PathBuf;

/// The real-vector folder (`../shared/vectors/nitro-real` from the workspace),
/// or `None` when it is absent — callers print a skip message then.
pub fn nitro_real_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("KLUIS_NITRO_VECTORS") {
        let p = PathBuf::from(dir);
        return p.is_dir().then_some(p);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidate = workspace.join("../shared/vectors/nitro-real");
    candidate.is_dir().then_some(candidate)
}

/// Parse an RFC 3339 time to Unix milliseconds.
pub fn rfc3339_ms(s: &str) -> u64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("bad time {s}: {e}"));
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// One entry of the real-vector manifest.
#[derive(Debug, Clone)]
pub struct RealVector {
    /// File name.
    pub file: String,
    /// The raw COSE bytes.
    pub bytes: Vec<u8>,
    /// `accept` or `reject`.
    pub expect_accept: bool,
    /// The document's own time, Unix ms.
    pub at_ms: u64,
    /// End of the leaf's validity, Unix ms.
    pub valid_until_ms: u64,
    /// The manifest entry as JSON.
    pub entry: serde_json::Value,
}

/// Load every vector the manifest lists, or `None` (with a message on stderr)
/// when the folder is absent.
pub fn load_real_vectors(test: &str) -> Option<Vec<RealVector>> {
    let Some(dir) = nitro_real_dir() else {
        eprintln!(
            "SKIPPED {test}: ../shared/vectors/nitro-real is absent (set KLUIS_NITRO_VECTORS)"
        );
        return None;
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for entry in manifest.as_array().unwrap() {
        let file = entry["file"].as_str().unwrap().to_owned();
        out.push(RealVector {
            bytes: std::fs::read(dir.join(&file)).unwrap(),
            expect_accept: entry["expect"] == "accept",
            at_ms: rfc3339_ms(entry["at"].as_str().unwrap()),
            valid_until_ms: rfc3339_ms(entry["valid_window"][1].as_str().unwrap()),
            file,
            entry: entry.clone(),
        });
    }
    assert!(!out.is_empty(), "manifest lists no vectors");
    Some(out)
}
