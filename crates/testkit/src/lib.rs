//! The controller's side of a Kluis deployment, in one process, for tests:
//! a key store in a temporary directory (or its keys in a SoftHSM2 token),
//! master keys, a verifier identity, a simulated NSM root that the verifier
//! trusts, the audit log and the key broker over them.
//!
//! The verifier's own tests (the policy matrix, evidence bundles) and the
//! cross-crate job tests (`tests/`, which add an enclave and the parent's
//! relay) all build their broker here, so that what "a broker under test" is
//! is written once.
//!
//! Nothing in production depends on this crate: it links the NSM simulator.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    missing_debug_implementations
)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use attestation_verifier::audit::{Actor, AuditLog};
use attestation_verifier::broker::{Broker, BrokerConfig};
use attestation_verifier::keys::KeyName;
use attestation_verifier::kms::{Kms, StoredPolicy};
use attestation_verifier::policy::KeyPolicy;
use kluis_attestation::{TrustAnchor, Verifier};
use kluis_keystore::RootSecret;
use kluis_nsm::sim::{FixedClock, SimConfig, SimRoot, SimulatedNsm};
use kluis_proto::{
    request_hash, EphemeralKeyPair, KeyOperation, KeyRequest, Request, Response, VerifierIdentity,
};

/// A fixed "now" for tests that do not need the real clock: 2026-01-01T00:00Z.
pub const T0: u64 = 1_767_225_600_000;
/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

/// Where the master keys, the store's root key and the identity live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// In the store, under a root key from a file.
    Store,
    /// In a throw-away SoftHSM2 token.
    Token,
}

/// PCR0, PCR1 and PCR2 of an enclave booted from `image` on the simulator.
pub fn image_pcrs(image: &[u8]) -> [[u8; 48]; 3] {
    let pcrs = SimConfig::default()
        .with_image(image.to_vec(), None)
        .boot_pcr_values();
    [pcrs[0], pcrs[1], pcrs[2]]
}

/// Chooses what a [`BrokerWorld`] holds; [`BrokerWorld::builder`] starts one.
#[derive(Debug, Clone)]
pub struct Builder {
    at_ms: u64,
    keys: Vec<String>,
    audit_first: bool,
    noise_summary_interval: Option<Duration>,
}

impl Builder {
    /// Create master key `name` (valid 365 days from the world's time).
    pub fn key(mut self, name: &str) -> Self {
        self.keys.push(name.to_owned());
        self
    }

    /// Bind the key store to the audit log, as `serve` does: every change is
    /// audited before it is made, and the log's anchor is kept.
    pub fn audit_first(mut self) -> Self {
        self.audit_first = true;
        self
    }

    /// How often unauthenticated refusals are summarised (the broker's
    /// default unless set; zero gives one summary per refusal).
    pub fn noise_summary_interval(mut self, interval: Duration) -> Self {
        self.noise_summary_interval = Some(interval);
        self
    }

    /// The world, with its keys in the store.
    pub fn build(self) -> BrokerWorld {
        let dir = tempfile::tempdir().unwrap();
        let kms = Kms::init(
            &dir.path().join("store"),
            RootSecret::from_key_bytes(zeroize::Zeroizing::new([7u8; 32])),
        )
        .unwrap();
        let identity = VerifierIdentity::generate().unwrap();
        kms.set_identity_pkcs8(&identity.to_pkcs8_der().unwrap())
            .unwrap();
        self.assemble(dir, kms, identity)
    }

    /// The world on `backend`; `None` (after SoftHSM2's loud `SKIPPED`) when
    /// that is a token and SoftHSM2 is absent and not required.
    pub fn build_on(self, backend: Backend) -> Option<BrokerWorld> {
        match backend {
            Backend::Store => Some(self.build()),
            Backend::Token => {
                let config = kluis_hsm::softhsm::throwaway_token("broker").unwrap()?;
                let token = kluis_hsm::Token::open(
                    &config,
                    zeroize::Zeroizing::new(kluis_hsm::softhsm::THROWAWAY_PIN.to_owned()),
                )
                .unwrap();
                let dir = tempfile::tempdir().unwrap();
                let kms = Kms::init_hsm(&dir.path().join("store"), Arc::new(token)).unwrap();
                assert_eq!(kms.backend_name(), "pkcs11");
                kms.record_token_identity().unwrap();
                let identity = kms.identity().unwrap().unwrap();
                assert!(identity.is_external());
                Some(self.assemble(dir, kms, identity))
            }
        }
    }

    fn assemble(
        self,
        dir: tempfile::TempDir,
        mut kms: Kms,
        identity: VerifierIdentity,
    ) -> BrokerWorld {
        for key in &self.keys {
            kms.create_key(&KeyName::parse(key).unwrap(), 365, self.at_ms)
                .unwrap();
        }
        let pinned = identity.public_key_sec1();
        let root = Arc::new(SimRoot::generate_at(self.at_ms - DAY_MS).unwrap());
        std::fs::write(dir.path().join("root.pem"), root.root_pem()).unwrap();
        let verifier = Verifier::new(TrustAnchor::dangerous_from_der(root.root_der()).unwrap());
        let audit = Arc::new(AuditLog::open(dir.path().join("audit.log")).unwrap());
        if self.audit_first {
            kms.bind_audit(Arc::clone(&audit), Actor::System);
        }
        let mut config = BrokerConfig::default();
        if let Some(interval) = self.noise_summary_interval {
            config.noise_summary_interval = interval;
        }
        let broker = Arc::new(Broker::new(kms, verifier, identity, audit, config));
        BrokerWorld {
            dir,
            at_ms: self.at_ms,
            broker,
            root,
            pinned,
            nonce_counter: AtomicU8::new(0),
        }
    }
}

/// The controller's side: store, keys, identity, audit log and broker, and
/// the simulated NSM root its verifier trusts.
pub struct BrokerWorld {
    dir: tempfile::TempDir,
    at_ms: u64,
    /// The broker (an `Arc`, to share with a service).
    pub broker: Arc<Broker>,
    /// The simulated NSM root the broker's verifier trusts (its PEM is
    /// `root.pem` in [`BrokerWorld::dir`]).
    pub root: Arc<SimRoot>,
    /// The verifier's public key, as an enclave image pins it.
    pub pinned: [u8; 97],
    nonce_counter: AtomicU8,
}

/// One attested key request and what the client needs to open its answer.
pub struct Attempt {
    /// The broker's answer.
    pub response: Response,
    /// The enclave's ephemeral key the answer is sealed to.
    pub ephemeral: EphemeralKeyPair,
    /// The attestation document sent.
    pub document: Vec<u8>,
    /// The request it was bound to.
    pub request: KeyRequest,
}

impl BrokerWorld {
    /// A world whose time is `at_ms`: key creation, policy changes and the
    /// root's validity count from it.
    pub fn builder(at_ms: u64) -> Builder {
        Builder {
            at_ms,
            keys: Vec::new(),
            audit_first: false,
            noise_summary_interval: None,
        }
    }

    /// The temporary directory (store, `audit.log`, `root.pem`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path in [`BrokerWorld::dir`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The verifier's identity (in a token, a handle to it).
    pub fn identity(&self) -> VerifierIdentity {
        self.broker.kms().identity().unwrap().unwrap()
    }

    /// Set `key`'s policy to the TOML `text` (validated first), as set at the
    /// world's time.
    pub fn set_policy(&self, key: &str, text: &str) {
        KeyPolicy::from_toml_str(text).unwrap();
        self.broker
            .kms()
            .set_policy(
                &KeyName::parse(key).unwrap(),
                &StoredPolicy {
                    format: "toml".into(),
                    text: text.to_owned(),
                    set_by: "test".into(),
                    set_ms: self.at_ms,
                },
            )
            .unwrap();
    }

    /// Leave a change of `key` under way, as an administrator's command
    /// interrupted after its audit record and before the change: the
    /// change intent in the store, naming `operation` (`key.disable`, …) and
    /// the digest of the key's record as it was (`before`; by default, as
    /// it is now).
    pub fn pending_change(&self, key: &str, operation: &str, before: Option<&str>) {
        use sha2::Digest as _;
        let kms = self.broker.kms();
        let before = match before {
            Some(digest) => digest.to_owned(),
            None => {
                let bytes = kms.store().get("cmk", key).unwrap().unwrap();
                hex::encode(sha2::Sha256::digest(bytes.as_slice()))
            }
        };
        let intent = serde_json::json!({
            "operation": operation,
            "key_id": key,
            "key_version": null,
            "kind": "cmk",
            "id": key,
            "before": before,
            "time_ms": self.at_ms,
            "recorded": true,
        });
        let guard = kms.lock().unwrap();
        kms.store()
            .put(&guard, "system", "intent", intent.to_string().as_bytes())
            .unwrap();
    }

    /// A simulated NSM under this world's root, booted from `image`, whose
    /// clock reads `at_ms`.
    pub fn nsm(&self, image: &[u8], debug: bool, at_ms: u64) -> SimulatedNsm {
        SimulatedNsm::new(
            SimConfig::default()
                .with_root(Arc::clone(&self.root))
                .with_clock(Arc::new(FixedClock::new(at_ms)))
                .with_image(image.to_vec(), None)
                .with_debug(debug),
        )
        .unwrap()
    }

    /// A challenge issued at `now` (each call's nonce differs from the last
    /// 255).
    pub fn challenge(&self, now: u64) -> [u8; 32] {
        let n = self
            .nonce_counter
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        match self
            .broker
            .handle(Request::Challenge, now, &|| Some([n; 32]))
        {
            Response::Challenge { nonce, .. } => nonce,
            other => panic!("no challenge: {other:?}"),
        }
    }

    /// Ask for `ops` at `now` with a document from `nsm` carrying `nonce`
    /// and bound to the request (its hash altered when `tamper_hash`).
    pub fn attempt(
        &self,
        nsm: &SimulatedNsm,
        nonce: Option<[u8; 32]>,
        ops: Vec<KeyOperation>,
        now: u64,
        tamper_hash: bool,
    ) -> Attempt {
        let request = KeyRequest::new(ops).unwrap();
        let ephemeral = EphemeralKeyPair::generate().unwrap();
        let mut hash = request_hash(&request);
        if tamper_hash {
            hash[0] ^= 1;
        }
        let document = kluis_nsm::attest(
            nsm,
            Some(&hash),
            nonce.as_ref().map(|n| n.as_slice()),
            Some(&ephemeral.public_key_sec1()),
        )
        .unwrap();
        let response = self.broker.release(&document, &request, now);
        Attempt {
            response,
            ephemeral,
            document,
            request,
        }
    }

    /// The whole exchange an enclave booted from `image` makes at `now`: a
    /// challenge, a document (dated half a second earlier) and a request
    /// for `ops`.
    pub fn release(&self, image: &[u8], ops: Vec<KeyOperation>, now: u64) -> Attempt {
        let nonce = self.challenge(now - 600);
        let nsm = self.nsm(image, false, now - 500);
        self.attempt(&nsm, Some(nonce), ops, now, false)
    }
}
