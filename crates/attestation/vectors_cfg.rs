// Shared by the build scripts of the crates whose tests read the real Nitro
// documents (`include!`d, not a module: a build script is one file).
//
// Those tests are compiled `#[ignore]`d, with the reason in cargo test's
// output ("ignored, SKIPPED: ..."), when the vectors folder has no manifest,
// unless KLUIS_REQUIRE_VECTORS=1: then they run and fail on the missing folder.
// The folder is `../shared/vectors/nitro-real` beside the workspace, or
// KLUIS_NITRO_VECTORS.

fn emit_vectors_cfg(relative_to_manifest: &str) {
    println!("cargo::rustc-check-cfg=cfg(kluis_vectors_absent)");
    println!("cargo::rerun-if-env-changed=KLUIS_REQUIRE_VECTORS");
    println!("cargo::rerun-if-env-changed=KLUIS_NITRO_VECTORS");
    let dir = match std::env::var_os("KLUIS_NITRO_VECTORS") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
            .join(relative_to_manifest),
    };
    let manifest = dir.join("manifest.json");
    // A missing file makes cargo rerun this script on every build, which is
    // what notices the folder appearing.
    println!("cargo::rerun-if-changed={}", manifest.display());
    let required = std::env::var("KLUIS_REQUIRE_VECTORS").is_ok_and(|v| v == "1");
    if !required && !manifest.is_file() {
        println!("cargo::rustc-cfg=kluis_vectors_absent");
    }
}
