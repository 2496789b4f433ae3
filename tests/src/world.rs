//! A whole Kluis deployment in one process, for end-to-end job tests and
//! benchmarks: the controller's key store and broker serving on loopback
//! TCP, an enclave service on the simulated NSM, and the parent's relay with
//! a frame hook between them.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attestation_verifier::broker::Broker;
use attestation_verifier::keys::{KeyName, WrappedDataKey};
use attestation_verifier::service::{self, ServiceConfig};
use kluis_enclave::EnclaveContext;
use kluis_envelope::{DataKey, EnvelopeHeader, EnvelopeWriter, WrappedKey};
use kluis_nsm::sim::{SimConfig, SimulatedNsm};
use kluis_parent::hook::{Channel, Direction, FrameHook, PassThrough};
use kluis_parent::job::{run_job, JobReport, JobRun, RunError};
use kluis_parent::relay::{VerifierTarget, Verifiers};
use kluis_proto::job::{JobSpec, WorkloadSpec, WrappedSecret};
use kluis_testkit::BrokerWorld;
use kluis_transport::{Address, Listener};
use std::io::Write;
use tokio::sync::Notify;

/// The input master key.
pub const INPUT_KEY: &str = "agency/benefits/prod";
/// The output master key.
pub const OUTPUT_KEY: &str = "agency/research/prod";
/// The workload-secret master key.
pub const SECRET_KEY: &str = "agency/pseudonym/prod";
/// What the admitted enclave image "is" (the simulator measures it).
pub const GOOD_IMAGE: &[u8] = b"kluis test enclave image v1";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A running service that stops when told.
pub struct Running {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    /// Where it listens.
    pub address: Address,
}

impl Running {
    /// Stop it and wait until it has.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }

    /// Abort it at once (a crash: connections drop mid-stream).
    pub fn kill(self) {
        self.task.abort();
    }
}

/// The controller's side ([`BrokerWorld`], which it dereferences to: store,
/// broker, keys, the simulated NSM root) with the three master keys of a job
/// and policies admitting [`GOOD_IMAGE`], and what a job test needs around it.
pub struct World {
    controller: BrokerWorld,
}

impl std::ops::Deref for World {
    type Target = BrokerWorld;
    fn deref(&self) -> &BrokerWorld {
        &self.controller
    }
}

fn policy_text(image: &[u8], operations: &[&str]) -> String {
    let pcrs = kluis_testkit::image_pcrs(image);
    format!(
        "operations = [{}]\nmax_document_age_seconds = 300\n[[measurements]]\nname = \"enclave\"\npcr0 = \"{}\"\npcr1 = \"{}\"\npcr2 = \"{}\"\n",
        operations.iter().map(|o| format!("\"{o}\"")).collect::<Vec<_>>().join(", "),
        hex::encode(pcrs[0]),
        hex::encode(pcrs[1]),
        hex::encode(pcrs[2]),
    )
}

impl World {
    /// A store with the three master keys, policies admitting [`GOOD_IMAGE`].
    pub fn new() -> World {
        let controller = BrokerWorld::builder(now_ms())
            .key(INPUT_KEY)
            .key(OUTPUT_KEY)
            .key(SECRET_KEY)
            .build();
        for (key, ops) in [
            (INPUT_KEY, &["decrypt"][..]),
            (SECRET_KEY, &["decrypt"][..]),
            (OUTPUT_KEY, &["generate"][..]),
        ] {
            controller.set_policy(key, &policy_text(GOOD_IMAGE, ops));
        }
        World { controller }
    }

    /// The verifier identity's private scalar (48 bytes, from its PKCS#8
    /// ECPrivateKey: version 1, then an OCTET STRING of 48 bytes), to prove
    /// it never leaks.
    pub fn identity_private_scalar(&self) -> Vec<u8> {
        let pkcs8 = self.identity().to_pkcs8_der().unwrap();
        let marker = [0x02, 0x01, 0x01, 0x04, 0x30];
        let at = memchr::memmem::find(&pkcs8, &marker).expect("an EC private key");
        pkcs8[at + marker.len()..at + marker.len() + 48].to_vec()
    }

    /// Issue and store a job authorisation signed by this world's verifier
    /// (as `attestation-verifier job authorise` does): for `workload` on
    /// input under [`INPUT_KEY`] to [`OUTPUT_KEY`], with `secret_keys`,
    /// expiring at `expires_at_ms`, for at most `max_runs` runs. Returns the
    /// signed bytes (the AUTH file).
    pub fn authorise(
        &self,
        workload: WorkloadSpec,
        secret_keys: &[&str],
        expires_at_ms: u64,
        max_runs: Option<u64>,
    ) -> Vec<u8> {
        let signed = self.sign_authorisation(workload, secret_keys, expires_at_ms, max_runs);
        self.broker
            .kms()
            .store_authorisation(&signed, "test".into())
            .unwrap();
        signed.bytes().to_vec()
    }

    /// [`World::authorise`] without storing it: signed by this verifier's
    /// key, but not one it issued.
    pub fn sign_authorisation(
        &self,
        workload: WorkloadSpec,
        secret_keys: &[&str],
        expires_at_ms: u64,
        max_runs: Option<u64>,
    ) -> kluis_proto::SignedAuthorisation {
        let mut nonce = [0u8; kluis_proto::authorisation::AUTHORISATION_NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).unwrap();
        let authorisation = kluis_proto::JobAuthorisation {
            version: kluis_proto::authorisation::AUTHORISATION_VERSION,
            nonce,
            issuer: "app-admin".into(),
            issued_at_ms: now_ms().min(expires_at_ms.saturating_sub(1)),
            expires_at_ms,
            workload,
            input_key: INPUT_KEY.into(),
            output_key: OUTPUT_KEY.into(),
            secret_keys: secret_keys.iter().map(|k| (*k).to_owned()).collect(),
            purpose: "benefit entitlement check".into(),
            case: format!("CASE-{}", hex::encode(&nonce[..4])),
            max_runs,
        };
        authorisation.sign(&self.identity()).unwrap()
    }

    /// Start the key-release service on `address` (a fresh port if `None`).
    pub async fn start_verifier(&self, address: Option<&Address>) -> Running {
        Self::serve_broker(Arc::clone(&self.broker), address).await
    }

    /// Serve any broker (an impostor's, say).
    pub async fn serve_broker(broker: Arc<Broker>, address: Option<&Address>) -> Running {
        let bind = match address {
            Some(Address::Tcp(a)) => a.clone(),
            _ => "127.0.0.1:0".to_owned(),
        };
        // A restarted verifier may need its old port back at once.
        let listener = {
            let mut tries = 0;
            loop {
                match tokio::net::TcpListener::bind(&bind).await {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("binding {bind}: {e}"),
                }
            }
        };
        let address = Address::Tcp(listener.local_addr().unwrap().to_string());
        let stop = Arc::new(Notify::new());
        let stopped = Arc::clone(&stop);
        let config = ServiceConfig {
            shutdown_grace: Duration::from_millis(500),
            ..ServiceConfig::default()
        };
        let task = tokio::spawn(async move {
            let _ = service::run(listener, broker, config, None, async move {
                stopped.notified().await
            })
            .await;
        });
        Running {
            stop,
            task,
            address,
        }
    }

    /// The context of an enclave measuring `image` on this world's simulated
    /// NSM, pinning this world's verifier and reaching it at `relay`, with
    /// short timeouts (tests adjust it, then [`start_enclave_with`]).
    pub fn enclave_context(&self, image: &[u8], relay: &Address) -> EnclaveContext {
        let nsm = SimulatedNsm::new(
            SimConfig::default()
                .with_root(Arc::clone(&self.root))
                .with_image(image.to_vec(), None),
        )
        .unwrap();
        let mut ctx = EnclaveContext::new(Arc::new(nsm), relay.clone(), self.pinned);
        ctx.idle_timeout = Duration::from_secs(10);
        ctx.key_release_timeout = Duration::from_secs(3);
        // The tests choose data-dependent workloads without an allowed-jobs
        // list (the default refuses them; `an_image_runs_only_its_allowed_jobs`
        // checks that).
        ctx.unlisted_jobs = kluis_enclave::UnlistedJobs::Any;
        ctx
    }

    /// Start an enclave measuring `image`, reaching the verifier at `relay`.
    pub async fn start_enclave(&self, image: &[u8], relay: &Address) -> Running {
        start_enclave_with(self.enclave_context(image, relay)).await
    }

    /// Encrypt `plaintext` under a fresh data key of `key` with `segment_size`.
    pub fn encrypt(&self, key: &str, plaintext: &[u8], segment_size: u32) -> Vec<u8> {
        let name = KeyName::parse(key).unwrap();
        let (dk, wrapped) = self
            .broker
            .kms()
            .generate_data_key(&name, now_ms())
            .unwrap();
        let header = WrappedKey::new(key, wrapped.version, wrapped.to_bytes()).unwrap();
        let mut w =
            EnvelopeWriter::with_segment_size(Vec::new(), &dk, header, segment_size).unwrap();
        w.write_all(plaintext).unwrap();
        w.finish().unwrap()
    }

    /// A new wrapped workload secret under [`SECRET_KEY`], and its plaintext.
    pub fn new_secret(&self) -> (WrappedSecret, DataKey) {
        let (dk, wrapped) = self
            .broker
            .kms()
            .generate_data_key(&KeyName::parse(SECRET_KEY).unwrap(), now_ms())
            .unwrap();
        (WrappedSecret(wrapped.to_bytes()), dk)
    }

    /// The data key an envelope names (as the controller unwraps it).
    pub fn data_key_of(&self, envelope: &[u8]) -> Result<DataKey, String> {
        let (header, _) = EnvelopeHeader::from_bytes(envelope).map_err(|e| e.to_string())?;
        let wrapped = WrappedDataKey::from_bytes(header.wrapped_key().wrapped_bytes())
            .map_err(|e| e.to_string())?;
        self.broker
            .kms()
            .decrypt_data_key(&wrapped)
            .map_err(|e| e.to_string())
    }

    /// Decrypt an envelope on the controller's side.
    pub fn decrypt(&self, envelope: &[u8]) -> Result<Vec<u8>, String> {
        let key = self.data_key_of(envelope)?;
        kluis_envelope::decrypt_to_vec(&key, envelope)
            .map(|z| z.to_vec())
            .map_err(|e| e.kind().to_owned())
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// Start an enclave service with `ctx` (4 jobs at once).
pub async fn start_enclave_with(ctx: EnclaveContext) -> Running {
    start_enclave_limited(ctx, 4).await
}

/// Start an enclave service with `ctx`, at most `max_jobs` jobs at once.
pub async fn start_enclave_limited(ctx: EnclaveContext, max_jobs: usize) -> Running {
    let listener = Listener::bind(&Address::Tcp("127.0.0.1:0".into()))
        .await
        .unwrap();
    let address = listener.local_address().unwrap();
    let stop = Arc::new(Notify::new());
    let stopped = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        kluis_enclave::server::serve(
            listener,
            Arc::new(ctx),
            kluis_enclave::server::Limits::for_jobs(max_jobs),
            async move { stopped.notified().await },
        )
        .await;
    });
    Running {
        stop,
        task,
        address,
    }
}

/// Start the parent's relay to `verifier` with `hook`.
pub async fn start_relay(verifier: &Address, hook: Arc<dyn FrameHook>) -> Running {
    start_relay_to(VerifierTarget::plain(verifier.clone()), hook).await
}

/// Start the parent's relay to `verifier` (plain or TLS, one replica or
/// several) with `hook`.
pub async fn start_relay_to(verifier: impl Into<Verifiers>, hook: Arc<dyn FrameHook>) -> Running {
    let listener = Listener::bind(&Address::Tcp("127.0.0.1:0".into()))
        .await
        .unwrap();
    let address = listener.local_address().unwrap();
    let stop = Arc::new(Notify::new());
    let stopped = Arc::clone(&stop);
    let verifier: Verifiers = verifier.into();
    let task =
        tokio::spawn(async move {
            kluis_parent::relay::serve(listener, verifier, hook, async move {
                stopped.notified().await
            })
            .await;
        });
    Running {
        stop,
        task,
        address,
    }
}

/// A job for `workload` under [`OUTPUT_KEY`].
pub fn job(enclave: &Address, workload: WorkloadSpec, secrets: Vec<WrappedSecret>) -> JobRun {
    JobRun {
        enclave: enclave.clone(),
        spec: JobSpec {
            job_id: "test-job".into(),
            workload,
            output_key: OUTPUT_KEY.into(),
            secrets,
            authorisation: None,
        },
        hook: Arc::new(PassThrough),
        idle_timeout: Duration::from_secs(20),
        output_limits: kluis_parent::limit::OutputLimits::default(),
    }
}

/// Run `job` on `input` to `output`, with the input in a file beside the
/// output as `parent run` has it (so a job whose frames are not hooked
/// sends it with `sendfile`).
pub async fn run(job: &JobRun, input: Vec<u8>, output: &Path) -> Result<JobReport, RunError> {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".input");
    let path = output.with_file_name(name);
    std::fs::write(&path, &input).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let report = run_job(job, file, output, |_| {}).await;
    std::fs::remove_file(&path).unwrap();
    report
}

/// Run `job` on what `reader` gives (read as it comes, not from a file).
pub async fn run_reader(
    job: &JobRun,
    reader: impl std::io::Read + Send + 'static,
    output: &Path,
) -> Result<JobReport, RunError> {
    run_job(
        job,
        kluis_parent::job::JobInput::reader(reader),
        output,
        |_| {},
    )
    .await
}

/// What a hostile parent does to one frame.
#[derive(Debug, Clone)]
pub enum Tamper {
    /// Flip the bits of byte `offset` (from the end if negative).
    Flip(isize),
    /// Drop it.
    Drop,
    /// Send it twice.
    Duplicate,
    /// Hold it back and send it after the next frame.
    SwapWithNext,
    /// Send these bytes instead.
    Replace(Vec<u8>),
}

/// A parent that does `tamper` to frame number `index` on `channel` in
/// `direction` (0-based, counted over the hook's life), and passes all else.
pub struct Hostile {
    channel: Channel,
    direction: Direction,
    index: usize,
    tamper: Tamper,
    seen: AtomicUsize,
    held: Mutex<Option<Vec<u8>>>,
}

impl Hostile {
    /// A hostile parent.
    pub fn new(channel: Channel, direction: Direction, index: usize, tamper: Tamper) -> Self {
        Hostile {
            channel,
            direction,
            index,
            tamper,
            seen: AtomicUsize::new(0),
            held: Mutex::new(None),
        }
    }

    /// What it does (for probes).
    pub fn tamper_desc(&self) -> String {
        format!(
            "{:?} {:?} {} {:?}",
            self.channel, self.direction, self.index, self.tamper
        )
    }

    /// Whether it has acted.
    pub fn acted(&self) -> bool {
        self.seen.load(Ordering::SeqCst) > self.index
    }
}

impl FrameHook for Hostile {
    fn on_frame(&self, channel: Channel, direction: Direction, mut frame: Vec<u8>) -> Vec<Vec<u8>> {
        if channel != self.channel || direction != self.direction {
            return vec![frame];
        }
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        if let Some(held) = self.held.lock().unwrap().take() {
            return vec![frame, held];
        }
        if n != self.index {
            return vec![frame];
        }
        match &self.tamper {
            Tamper::Flip(offset) => {
                let at = if *offset < 0 {
                    frame.len() - offset.unsigned_abs()
                } else {
                    offset.unsigned_abs()
                };
                frame[at] ^= 0xFF;
                vec![frame]
            }
            Tamper::Drop => vec![],
            Tamper::Duplicate => vec![frame.clone(), frame],
            Tamper::SwapWithNext => {
                *self.held.lock().unwrap() = Some(frame);
                vec![]
            }
            Tamper::Replace(bytes) => vec![bytes.clone()],
        }
    }
}

/// Passes every frame on, and signals when the enclave tells the parent
/// `Started` (its keys were released and checked): an event to act on
/// mid-job instead of a guessed sleep.
#[derive(Default)]
pub struct StartedSignal {
    started: Notify,
}

impl StartedSignal {
    /// Wait until the enclave has said `Started` (at most `limit`).
    pub async fn wait(&self, limit: Duration) {
        tokio::time::timeout(limit, self.started.notified())
            .await
            .expect("the enclave said Started in time");
    }
}

impl FrameHook for StartedSignal {
    fn on_frame(&self, channel: Channel, direction: Direction, frame: Vec<u8>) -> Vec<Vec<u8>> {
        if channel == Channel::Job && direction == Direction::FromEnclave {
            if let Ok(kluis_proto::job::JobEvent::Started { .. }) =
                kluis_proto::job::decode_job_frame::<kluis_proto::job::JobEvent>(&frame)
            {
                // Stored if nobody waits yet.
                self.started.notify_one();
            }
        }
        vec![frame]
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// Newline-separated test records: `nrn,town,amount`.
pub fn records(n: usize) -> Vec<u8> {
    let towns = ["Gent", "Luik", "Aalst", "Namen"];
    let mut out = Vec::new();
    for i in 0..n {
        let base = 850_101_000u64 + i as u64 % 1000 + (i as u64 / 1000) * 100_000;
        let check = 97 - base % 97;
        out.extend_from_slice(
            format!("{base:09}{check:02},{},{}\n", towns[i % 4], i % 1000).as_bytes(),
        );
    }
    out
}
