//! Helpers shared by this crate's integration tests: the document forger and
//! the real-vector loader. They run on whichever crypto backend the crate is
//! built with (`.ci/run` runs them on both).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    missing_debug_implementations
)]

pub mod forge;

use std::path::PathBuf;

/// The real-vector folder: `KLUIS_NITRO_VECTORS`, or
/// `../shared/vectors/nitro-real` beside the workspace.
///
/// Tests that call this are `#[cfg_attr(kluis_vectors_absent, ignore)]`: the
/// build script compiles them ignored (cargo test says so, with the reason)
/// when the folder is absent, unless `KLUIS_REQUIRE_VECTORS=1`. So reaching
/// this without the folder is a failure, never a silent pass.
pub fn nitro_real_dir() -> PathBuf {
    let dir = match std::env::var_os("KLUIS_NITRO_VECTORS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors/nitro-real")
        }
    };
    assert!(
        dir.join("manifest.json").is_file(),
        "real Nitro vectors required (KLUIS_REQUIRE_VECTORS=1, or present at build time) \
         but {} has no manifest.json",
        dir.display()
    );
    dir
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

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every vector the manifest lists; panics (fails the test) when the folder,
/// the manifest or a listed file cannot be read.
pub fn load_real_vectors() -> Vec<RealVector> {
    let dir = nitro_real_dir();
    let manifest: serde_json::Value = serde_json::from_slice(&read(&dir.join("manifest.json")))
        .unwrap_or_else(|e| panic!("{}/manifest.json: {e}", dir.display()));
    let mut out = Vec::new();
    for entry in manifest.as_array().expect("manifest is an array") {
        let file = entry["file"].as_str().expect("entry has a file").to_owned();
        out.push(RealVector {
            bytes: read(&dir.join(&file)),
            expect_accept: entry["expect"] == "accept",
            at_ms: rfc3339_ms(entry["at"].as_str().expect("entry has at")),
            valid_until_ms: rfc3339_ms(entry["valid_window"][1].as_str().expect("valid_window")),
            file,
            entry: entry.clone(),
        });
    }
    assert!(!out.is_empty(), "manifest lists no vectors");
    out
}
