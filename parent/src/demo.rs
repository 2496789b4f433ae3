//! The local demonstration: every step of attestation the real deployment does,
//! on the simulated NSM, with the verification core the verifier uses.

use anyhow::{bail, ensure, Context, Result};
use aws_lc_rs::agreement::{PrivateKey, ECDH_P384};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use kluis_attestation::{sha384, TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use kluis_nsm::sim::{SimConfig, SimRoot, SimulatedNsm, SystemClock};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What the demo enclave image "is"; the simulator measures it into PCR0/1/2.
const DEMO_IMAGE: &[u8] = b"kluis demo enclave image";

fn step(n: u32, who: &str, what: &str) {
    println!("[{n}] {who:<9} {what}");
}

fn detail(text: impl AsRef<str>) {
    println!("              {}", text.as_ref());
}

fn now_ms() -> Result<u64> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?;
    u64::try_from(d.as_millis()).context("system clock out of range")
}

pub(crate) fn run(keep: Option<&Path>) -> Result<()> {
    let temp;
    let dir = match keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.to_path_buf()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    println!("Kluis local demo: attestation on the SIMULATED Nitro Secure Module");
    println!("(a real deployment uses /dev/nsm inside a Nitro Enclave and the AWS root)\n");

    // 1. The simulated NSM's root, persisted once, trusted only explicitly.
    let (root, _) = SimRoot::load_or_create(&dir.join("nsm-sim"), &SystemClock)
        .context("creating the simulated NSM root")?;
    let root = Arc::new(root);
    step(
        1,
        "verifier",
        "pins the simulated NSM root (explicitly; the default is AWS Nitro root G1)",
    );
    detail(format!("root SHA-256 {}", root.fingerprint_hex()));
    let verifier = Verifier::new(
        TrustAnchor::dangerous_from_der(root.root_der()).context("loading the simulated root")?,
    );

    // 2. The verifier's challenge.
    let rng = SystemRandom::new();
    let mut nonce = [0u8; 32];
    rng.fill(&mut nonce)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    step(2, "verifier", "issues a single-use nonce");
    detail(format!("nonce {}", hex::encode(nonce)));

    // 3. The enclave: an ephemeral key, a request hash, a document from the NSM.
    let nsm = SimulatedNsm::new(
        SimConfig::default()
            .with_root(root.clone())
            .with_image(DEMO_IMAGE.to_vec(), None),
    )
    .context("starting the simulated NSM")?;
    let ephemeral =
        PrivateKey::generate(&ECDH_P384).map_err(|_| anyhow::anyhow!("key generation failed"))?;
    let public_key = ephemeral
        .compute_public_key()
        .map_err(|_| anyhow::anyhow!("public key derivation failed"))?;
    let request = b"generate-data-key agency-a/app-x/prod";
    let request_hash = sha384(request);
    let doc = kluis_nsm::attest(
        &nsm,
        Some(&request_hash),
        Some(&nonce),
        Some(public_key.as_ref()),
    )
    .context("asking the NSM for an attestation document")?;
    step(
        3,
        "enclave",
        "makes an ephemeral P-384 key and asks the NSM to attest it",
    );
    detail(format!(
        "public_key = ephemeral key ({} bytes), nonce = challenge, user_data = SHA-384(request)",
        public_key.as_ref().len()
    ));
    detail(format!(
        "document: {} bytes of COSE_Sign1, ES384",
        doc.len()
    ));
    let doc_path = dir.join("document.cbor");
    std::fs::write(&doc_path, &doc).context("writing the document")?;
    let root_path = dir.join("nsm-sim-root.pem");
    std::fs::write(&root_path, root.root_pem()).context("writing the root")?;

    // 4. The verifier checks everything.
    let options = VerifyOptions::at(UnixMillis(now_ms()?))
        .expect_nonce(nonce.to_vec())
        .max_age(Duration::from_secs(300));
    let verified = verifier
        .verify(&doc, &options)
        .context("the verifier rejected a genuine document")?;
    let d = verified.document();
    ensure!(
        d.user_data.as_deref() == Some(request_hash.as_slice()),
        "request hash not bound"
    );
    ensure!(
        d.public_key.as_deref() == Some(public_key.as_ref()),
        "ephemeral key not bound"
    );
    step(
        4,
        "verifier",
        "ACCEPTS: signature, chain to the pinned root, payload rules, nonce, age",
    );
    detail(format!("module_id {}", d.module_id));
    detail(format!(
        "PCR0 {}",
        d.pcr(0).map(hex::encode).unwrap_or_default()
    ));
    detail(format!(
        "leaf {} (valid {}..{})",
        verified.leaf().subject,
        verified.leaf().not_before,
        verified.leaf().not_after
    ));
    detail(format!(
        "document SHA-384 {}",
        hex::encode(verified.document_sha384())
    ));

    // 5. What it refuses.
    step(
        5,
        "verifier",
        "REFUSES what an attacker on the host could try:",
    );
    let expect_refusal =
        |label: &str, result: Result<_, kluis_attestation::VerifyError>| -> Result<()> {
            match result {
                Ok(_) => bail!("{label}: accepted, must be refused"),
                Err(e) => {
                    detail(format!("{label:<38} -> {} ", e.kind()));
                    Ok(())
                }
            }
        };
    let aws = Verifier::new(TrustAnchor::aws_nitro_root_g1().context("built-in AWS root")?);
    expect_refusal(
        "simulated document vs the AWS root",
        aws.verify(&doc, &options),
    )?;
    expect_refusal(
        "replay against a new challenge",
        verifier.verify(&doc, &options.clone().expect_nonce(vec![0u8; 32])),
    )?;
    let mut tampered = doc.clone();
    if let Some(byte) = tampered.iter_mut().rev().nth(200) {
        *byte ^= 0x01;
    }
    expect_refusal("one byte changed", verifier.verify(&tampered, &options))?;
    let later = VerifyOptions::at(UnixMillis(now_ms()?.saturating_add(3_600_000)))
        .expect_nonce(nonce.to_vec())
        .max_age(Duration::from_secs(300));
    expect_refusal(
        "the same document an hour later",
        verifier.verify(&doc, &later),
    )?;

    println!("\nSame check with the verifier's command line:");
    println!(
        "  attestation-verifier verify --root {} --nonce {} --max-age 300 {}",
        root_path.display(),
        hex::encode(nonce),
        doc_path.display()
    );
    if keep.is_none() {
        println!("  (files removed at exit; pass --keep DIR to keep them)");
    }
    println!("\ndemo OK");
    Ok(())
}
