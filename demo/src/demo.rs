//! The demonstration: the whole system on one machine, on the simulated NSM.
//!
//! The controller's side (verifier store, keys, policy, encryption and
//! decryption, the audit check) runs the verifier's real command line; the
//! verifier service and the enclave run as child processes of this binary
//! (its hidden `verifier` and `enclave` commands), exactly as the separate
//! programs would; the parent's relay and job runner run here, recording
//! every byte they carry so the demo can show that the parent saw only
//! ciphertext. Child processes are stopped on success, on failure and on
//! Ctrl-C.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use kluis_parent::hook::{Channel, Recorder};
use kluis_parent::job::{run_job, JobRun, RunError};
use kluis_proto::job::{FailureKind, JobSpec, WorkloadSpec, WrappedSecret};
use kluis_transport::{Address, Listener};
use serde_json::Value;

const INPUT_KEY: &str = "ssi/benefits/prod";
const OUTPUT_KEY: &str = "ssi/research/prod";
const SECRET_KEY: &str = "ssi/pseudonym/prod";

/// Child processes, stopped when dropped (and by the Ctrl-C handler).
#[derive(Clone, Default)]
struct Children(Arc<Mutex<Vec<(String, Child)>>>);

impl Children {
    fn add(&self, name: &str, child: Child) {
        if let Ok(mut list) = self.0.lock() {
            list.push((name.to_owned(), child));
        }
    }

    fn stop_all(&self) {
        let Ok(mut list) = self.0.lock() else { return };
        for (_, child) in list.iter_mut() {
            terminate(child);
        }
        list.clear();
    }

    /// Whether `name` is still running (as far as this list knows).
    fn has(&self, name: &str) -> bool {
        self.0
            .lock()
            .map(|list| list.iter().any(|(n, _)| n == name))
            .unwrap_or(false)
    }

    /// SIGKILL, no warning: as a machine dies.
    fn kill(&self, name: &str) {
        let Ok(mut list) = self.0.lock() else { return };
        for (n, child) in list.iter_mut() {
            if n == name {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        list.retain(|(n, _)| n != name);
    }

    fn stop(&self, name: &str) {
        let Ok(mut list) = self.0.lock() else { return };
        for (n, child) in list.iter_mut() {
            if n == name {
                terminate(child);
            }
        }
        list.retain(|(n, _)| n != name);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // The last handle stops whatever is still running.
        if Arc::strong_count(&self.0) == 1 {
            self.stop_all();
        }
    }
}

/// SIGTERM (the programs shut down gracefully), then SIGKILL after 5 s.
fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for _ in 0..50 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Demo {
    exe: PathBuf,
    dir: PathBuf,
    store: PathBuf,
    /// The store in a PostgreSQL database (its URL) instead of `store`.
    database: Option<String>,
    /// Verifier replicas to serve (more than one needs `database`).
    replicas: usize,
    /// The verifier replicas the relay fails over between, once started.
    verifiers: Option<kluis_parent::relay::Verifiers>,
    /// How every verifier command opens the store: the root key file, or
    /// the HSM PIN file.
    secret_args: [String; 2],
    /// `--hsm-module PATH --hsm-token LABEL` for `init` in HSM mode.
    hsm_init: Vec<String>,
    creds: PathBuf,
    children: Children,
    step: u32,
}

/// Set once standard output could not be written (a closed pipe, as in
/// `kluis-demo | head`, or a full disk behind a redirect).
static STDOUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One line of the demo's narration on standard output. A write that fails
/// is remembered, not a panic (as `println!` would); the demo stops at the
/// end of the phase under way ([`still_heard`]), stopping what it started.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        STDOUT_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An error once the narration could not be written: nobody reads the
/// demo any more, so it stops (and cleans up) instead of going on.
fn still_heard() -> Result<()> {
    if STDOUT_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("standard output could not be written (closed or full); the demo stopped");
    }
    Ok(())
}

fn detail(text: impl AsRef<str>) {
    say(format_args!("      {}", text.as_ref()));
}

impl Demo {
    /// A file in the demo's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn step(&mut self, who: &str, what: &str) {
        self.step = self.step.saturating_add(1);
        say(format_args!("[{:>2}] {who:<10} {what}", self.step));
    }

    /// Run `attestation-verifier ARGS` as the controller would, as `role`;
    /// returns its JSON output.
    fn verifier(&self, role: Option<&str>, args: &[&str]) -> Result<Value> {
        let lines = self.verifier_lines(role, args)?;
        Ok(lines.into_iter().last().unwrap_or(Value::Null))
    }

    /// As [`Demo::verifier`], for commands that print JSON lines.
    fn verifier_lines(&self, role: Option<&str>, args: &[&str]) -> Result<Vec<Value>> {
        let mut cmd = self.command();
        cmd.arg("verifier")
            .args(self.store_args())
            .args(&self.secret_args);
        if let Some(role) = role {
            cmd.arg("--credential")
                .arg(self.creds.join(format!("{role}.credential")));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running the verifier's command line")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "`attestation-verifier {}` failed ({}): {} {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).context("verifier output"))
            .collect()
    }

    /// This program as a child: without the operator's `KLUIS_*` settings
    /// of where a store is (the demo names its own on every command line,
    /// and a store given by the environment too would conflict with it).
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        for var in [
            "KLUIS_STORE",
            "KLUIS_DATABASE_URL",
            "KLUIS_DATABASE_CA_FILE",
            "KLUIS_ROOT_KEY_FILE",
            "KLUIS_CREDENTIAL_FILE",
            "KLUIS_HSM_PIN_FILE",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Where every verifier command finds the store: `--store DIR` or
    /// `--database URL`.
    fn store_args(&self) -> [String; 2] {
        match &self.database {
            Some(url) => ["--database".to_owned(), url.clone()],
            None => ["--store".to_owned(), arg(&self.store)],
        }
    }

    /// Start `kluis-demo SUBCOMMAND ARGS` as a child and read its first stdout
    /// line (a JSON announcement).
    fn spawn(&self, name: &str, args: &[&str]) -> Result<Value> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .context("creating a log file")?;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take();
        self.children.add(name, child);
        let mut line = String::new();
        let mut reader = BufReader::new(stdout.ok_or_else(|| anyhow!("no stdout"))?);
        reader
            .read_line(&mut line)
            .with_context(|| format!("reading the {name}'s announcement"))?;
        if line.trim().is_empty() {
            bail!(
                "the {name} exited at start; see {}",
                self.dir.join(format!("{name}.log")).display()
            );
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        serde_json::from_str(line.trim()).with_context(|| format!("the {name}'s announcement"))
    }
}

/// A valid Belgian national register number for a birth date and serial.
// Small bounded values (a date, a serial below 1000): no overflow.
#[allow(clippy::arithmetic_side_effects)]
fn national_number(year: u32, month: u32, day: u32, serial: u32) -> String {
    let base = u64::from(year % 100) * 10_000_000
        + u64::from(month) * 100_000
        + u64::from(day) * 1000
        + u64::from(serial % 1000);
    let check = if year >= 2000 {
        97 - (2_000_000_000 + base) % 97
    } else {
        97 - base % 97
    };
    format!("{base:09}{check:02}")
}

/// A synthetic benefits dataset: `nrn,municipality,benefit_cents`, with
/// some people appearing more than once.
// Bounded arithmetic on a xorshift generator's output, for test data only.
#[allow(clippy::arithmetic_side_effects)]
fn sample_dataset(records: u32) -> (String, Vec<String>) {
    const TOWNS: [&str; 8] = [
        "Antwerpen",
        "Gent",
        "Charleroi",
        "Liège",
        "Brussel",
        "Brugge",
        "Namur",
        "Leuven",
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let people: Vec<String> = (0..records.div_ceil(2).max(1))
        .map(|i| {
            let r = next();
            let year = 1940 + u32::try_from(r % 80).unwrap_or(0);
            let month = 1 + u32::try_from((r >> 8) % 12).unwrap_or(0);
            let day = 1 + u32::try_from((r >> 16) % 28).unwrap_or(0);
            national_number(year, month, day, i.wrapping_mul(7))
        })
        .collect();
    let mut text = String::from("nrn,municipality,benefit_cents\n");
    let mut used = BTreeSet::new();
    for i in 0..records {
        let r = next();
        let person = people
            .get(usize::try_from(r % u64::try_from(people.len()).unwrap_or(1)).unwrap_or(0))
            .cloned()
            .unwrap_or_default();
        let town = TOWNS
            .get(usize::try_from((r >> 20) % 8).unwrap_or(0))
            .copied()
            .unwrap_or("Gent");
        let cents = 50_000 + (r >> 32) % 200_000;
        text.push_str(&format!("{person},{town},{cents}\n"));
        used.insert(person);
        let _ = i;
    }
    (text, used.into_iter().collect())
}

fn policy(pcrs: &Value, operations: &[&str]) -> String {
    let pcr = |i: &str| pcrs.get(i).and_then(Value::as_str).unwrap_or("").to_owned();
    format!(
        "operations = [{}]\nmax_document_age_seconds = 300\n\n[[measurements]]\nname = \"kluis-demo-enclave\"\npcr0 = \"{}\"\npcr1 = \"{}\"\npcr2 = \"{}\"\n",
        operations
            .iter()
            .map(|o| format!("\"{o}\""))
            .collect::<Vec<_>>()
            .join(", "),
        pcr("0"),
        pcr("1"),
        pcr("2"),
    )
}

/// Run `job` on the file `input`: it must fail with `kind` and leave no
/// output at `output`.
fn expect_refused(
    runtime: &tokio::runtime::Runtime,
    job: &JobRun,
    input: &Path,
    output: &Path,
    kind: FailureKind,
    what: &str,
) -> Result<()> {
    let outcome = runtime.block_on(async {
        let input = std::fs::File::open(input)?;
        Ok::<_, anyhow::Error>(run_job(job, input, output, |_| {}).await)
    })?;
    match outcome {
        Err(RunError::Failed { kind: found, .. }) if found == kind => {}
        Err(e) => bail!("{what} failed otherwise than refused ({kind}): {e}"),
        Ok(_) => bail!("{what} ran: it must have been refused ({kind})"),
    }
    ensure!(
        !output.exists(),
        "an output appeared for {what}, which was refused"
    );
    Ok(())
}

/// Where the demo's verifier keeps its state, and how many replicas serve.
pub(crate) struct Deployment<'a> {
    /// A PKCS#11 module for the master keys (SoftHSM2), if any.
    pub hsm_module: Option<&'a Path>,
    /// A PostgreSQL server (URL) on which the demo makes a database of its
    /// own for the store, the audit log and the nonces.
    pub database: Option<&'a str>,
    /// Verifier replicas (several need `database`).
    pub replicas: usize,
}

pub(crate) fn run(keep: Option<&Path>, records: u32, deployment: &Deployment<'_>) -> Result<()> {
    let hsm_module = deployment.hsm_module;
    if deployment.replicas == 0 || deployment.replicas > 8 {
        bail!("--replicas takes 1 to 8");
    }
    if deployment.replicas > 1 && deployment.database.is_none() {
        bail!("several replicas share their state in PostgreSQL: pass --database URL too");
    }
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
    // A throw-away SoftHSM2 token, made before any thread starts (it sets
    // SOFTHSM2_CONF, which the verifier's child processes inherit).
    let (secret_args, hsm_init) = match hsm_module {
        None => (
            [
                "--root-key-file".to_owned(),
                dir.join("root.key").display().to_string(),
            ],
            Vec::new(),
        ),
        Some(module) => {
            let label = "kluis-demo";
            kluis_hsm::softhsm::use_private_token_dir(&dir.join("softhsm"))
                .context("preparing a SoftHSM2 token directory")?;
            kluis_hsm::softhsm::init_token(module, label, "demo-so-pin", "demo-user-pin")
                .with_context(|| format!("making a throw-away token with {}", module.display()))?;
            let pin = dir.join("hsm.pin");
            write_private(&pin, "demo-user-pin\n")?;
            (
                ["--hsm-pin-file".to_owned(), pin.display().to_string()],
                vec![
                    "--hsm-module".to_owned(),
                    module.display().to_string(),
                    "--hsm-token".to_owned(),
                    label.to_owned(),
                ],
            )
        }
    };
    let children = Children::default();
    {
        // Ctrl-C: stop the children, remove the temporary directory (it holds
        // a root key, credentials and plaintext), then leave.
        let children = children.clone();
        let remove = keep.is_none().then(|| dir.clone());
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
                to_stderr!("\ninterrupted: stopping the verifier and the enclave");
                children.stop_all();
                if let Some(dir) = remove {
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(130);
            }
        });
    }
    // A database of the demo's own on the server, dropped at the end (kept,
    // with its name printed, under --keep).
    let scratch = match deployment.database {
        Some(server) => Some(
            kluis_keystore::pg::scratch::ScratchDatabase::create(server)
                .map_err(|e| anyhow!("making the demo's database: {e}"))?,
        ),
        None => None,
    };
    let mut demo = Demo {
        exe: std::env::current_exe().context("finding this program")?,
        store: dir.join("verifier-store"),
        database: scratch.as_ref().map(|db| db.url().to_owned()),
        replicas: deployment.replicas,
        verifiers: None,
        secret_args,
        hsm_init,
        creds: dir.join("credentials"),
        dir: dir.clone(),
        children: children.clone(),
        step: 0,
    };
    let result = run_steps(&mut demo, records);
    children.stop_all();
    if let (Some(db), Some(_)) = (&scratch, keep) {
        say(format_args!("(the demo's database {} is kept)", db.name()));
        std::mem::forget(scratch);
    }
    result
}

fn run_steps(demo: &mut Demo, records: u32) -> Result<()> {
    say(format_args!(
        "Kluis local demo: confidential processing end to end on the SIMULATED Nitro Secure Module"
    ));
    say(format_args!("(in production the enclave runs in a Nitro Enclave with /dev/nsm, and the verifier trusts only the AWS root)\n"));
    still_heard()?;
    let keys = controller_setup(demo)?;
    still_heard()?;
    let (stage, relay_listener) = start_relay(demo)?;
    let enclave = start_enclave(demo, &stage, &keys)?;
    still_heard()?;
    let root_pem = set_policies(demo, &enclave)?;
    start_verifier(demo, &stage, relay_listener, &root_pem)?;
    still_heard()?;
    let dataset = encrypt_dataset(demo, records)?;
    let authorisation = authorise_job(demo)?;
    still_heard()?;
    let ran = run_pseudonymisation(demo, &stage, &enclave, &dataset, &authorisation)?;
    still_heard()?;
    if demo.replicas > 1 {
        let victim = replica_name(demo.replicas, 1);
        if demo.children.has(&victim) {
            bail!("{victim} should have been killed after the first key release");
        }
        detail(format!(
            "{victim} was killed with SIGKILL right after the first key release; the job completed"
        ));
    }
    let output = check_result(demo, &dataset, &ran)?;
    parent_view(demo, &stage, &dataset, &output)?;
    still_heard()?;
    attacks(demo, &stage, &keys, &enclave, &dataset, &ran.job)?;
    still_heard()?;
    let shown = audit_summary(demo, &stage, &authorisation)?;
    let dir = demo.dir.clone();
    let path = |name: &str| dir.join(name);
    evidence_steps(demo, &shown, &keys.verifier_key, &root_pem, &path)?;
    replica_report(demo)?;
    say(format_args!("\ndemo OK: data was readable only inside the attested enclave; the parent carried ciphertext only"));
    // The last line too must have been written for the demo to say OK.
    still_heard()
}

/// A path as a command-line argument.
fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// What the controller's set-up hands on: the verifier's identity key.
struct Keys {
    verifier_key: String,
}

/// What the phases share once the parent's relay is bound: the runtime, the
/// recorder of every byte the parent carries, and the relay's address.
struct Stage {
    runtime: tokio::runtime::Runtime,
    recorder: Arc<Recorder>,
    relay_address: Address,
    /// Stops the relay (which starts with the verifier).
    stop_relay: Arc<tokio::sync::Notify>,
}

/// The admitted enclave: where it listens, its measurements, and what a
/// modified enclave needs to start the same way.
struct Enclave {
    address: Address,
    pcrs: Value,
    config: PathBuf,
    sim_state: PathBuf,
}

/// The sample dataset: its plaintext, the people in it, and the encrypted
/// input and wrapped secret the job takes.
struct Dataset {
    plaintext: String,
    people: Vec<String>,
    encrypted: PathBuf,
    secret_file: PathBuf,
}

/// The controller's authorisation of the job: its file and its id.
struct Authorisation {
    file: PathBuf,
    id: String,
}

/// The job as run, and where its (encrypted) output is.
struct Ran {
    job: JobRun,
    output: PathBuf,
}

/// Controller: the verifier's store, its identity key and the master keys.
fn controller_setup(demo: &mut Demo) -> Result<Keys> {
    let mut init_args = vec!["init".to_owned()];
    if demo.hsm_init.is_empty() {
        demo.step(
            "controller",
            "creates the verifier's key store (root key file, identity key, two administrators)",
        );
        init_args.push("--generate-root-key".to_owned());
    } else {
        demo.step(
            "controller",
            "creates the verifier's key store in a PKCS#11 token (SoftHSM2): master keys, store root and identity key generated in the token, two administrators",
        );
        init_args.extend(demo.hsm_init.iter().cloned());
    }
    init_args.push("--credentials-out".to_owned());
    init_args.push(arg(&demo.creds));
    let init = demo.verifier(
        None,
        &init_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    detail(format!(
        "key backend: {}",
        init.get("key_backend")
            .and_then(Value::as_str)
            .unwrap_or("?")
    ));
    let verifier_key = init
        .get("verifier_public_key")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("init did not print the verifier key"))?
        .to_owned();
    detail(format!(
        "verifier identity key {}…",
        verifier_key.get(..24).unwrap_or("")
    ));
    demo.step("controller", "key administrator creates three master keys");
    for key in [INPUT_KEY, SECRET_KEY, OUTPUT_KEY] {
        let created = demo.verifier(Some("key-admin"), &["key", "create", key])?;
        detail(format!(
            "{key} version {}",
            created
                .get("current_version")
                .or_else(|| created.get("version"))
                .cloned()
                .unwrap_or(Value::from(1))
        ));
    }
    Ok(Keys { verifier_key })
}

/// Parent: the runtime and the relay's listener, for the enclave's key
/// requests (the relay itself starts with the verifier).
fn start_relay(demo: &mut Demo) -> Result<(Stage, Listener)> {
    demo.step(
        "parent",
        "starts its relay for the enclave's key requests (recording every byte it carries)",
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let recorder = Arc::new(if demo.replicas > 1 {
        Recorder::wrapping(Arc::new(KillAfterFirstRelease {
            children: demo.children.clone(),
            victim: replica_name(demo.replicas, 1),
            done: std::sync::atomic::AtomicBool::new(false),
        }))
    } else {
        Recorder::new()
    });
    let relay_listener = runtime.block_on(Listener::bind(&Address::Tcp("127.0.0.1:0".into())))?;
    let relay_address = relay_listener.local_address()?;
    detail(format!("relay at {relay_address}"));
    let stage = Stage {
        runtime,
        recorder,
        relay_address,
        stop_relay: Arc::new(tokio::sync::Notify::new()),
    };
    Ok((stage, relay_listener))
}

/// The enclave, on the simulated NSM, with the verifier key and its allowed
/// jobs in its configuration.
fn start_enclave(demo: &mut Demo, stage: &Stage, keys: &Keys) -> Result<Enclave> {
    demo.step(
        "enclave",
        "starts on the SIMULATED NSM with the verifier key and its allowed jobs built in",
    );
    let sim_state = demo.path("nsm-sim");
    // The enclave's configuration: in a real image it is built in and
    // measured with the binary (here the simulator measures the binary only).
    let config = demo.path("enclave.toml");
    let relay_address = &stage.relay_address;
    let verifier_key = &keys.verifier_key;
    std::fs::write(
        &config,
        format!(
            "listen = \"tcp:127.0.0.1:0\"\nverifier = \"{relay_address}\"\nverifier_public_key = \"{verifier_key}\"\n\n\
             [[allowed_jobs]]\nworkload = \"pseudonymise:column=0,header,check=nrn\"\n\
             output_key = \"{OUTPUT_KEY}\"\nsecret_keys = [\"{SECRET_KEY}\"]\ninput_keys = [\"{INPUT_KEY}\"]\n"
        ),
    )?;
    detail(
        "allowed jobs: pseudonymise:column=0,header,check=nrn, output under ".to_owned()
            + OUTPUT_KEY,
    );
    let enclave = demo.spawn(
        "enclave",
        &[
            "enclave",
            "run",
            "--config",
            &arg(&config),
            "--simulate-nsm",
            "--sim-state",
            &arg(&sim_state),
        ],
    )?;
    let address: Address = enclave
        .get("listening")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the enclave did not say where it listens"))?
        .parse()?;
    let pcrs = enclave.get("pcrs").cloned().unwrap_or(Value::Null);
    detail(format!("listening at {address}"));
    for i in ["0", "1", "2"] {
        detail(format!(
            "PCR{i} {}",
            pcrs.get(i).and_then(Value::as_str).unwrap_or("?")
        ));
    }
    Ok(Enclave {
        address,
        pcrs,
        config,
        sim_state,
    })
}

/// Policies: exactly this enclave's measurements. Returns the simulated
/// NSM root (PEM) the verifier is to trust.
fn set_policies(demo: &mut Demo, enclave: &Enclave) -> Result<PathBuf> {
    demo.step(
        "controller",
        "application administrator sets policies admitting exactly these PCRs",
    );
    let root_pem = demo.path("nsm-sim-root.pem");
    let out = Command::new(&demo.exe)
        .args([
            "enclave",
            "nsm-sim",
            "export-root",
            "--state",
            &arg(&enclave.sim_state),
            "--out",
            &arg(&root_pem),
        ])
        .output()
        .context("exporting the simulated root")?;
    ensure!(out.status.success(), "exporting the simulated root failed");
    for (key, ops) in [
        (INPUT_KEY, &["decrypt"][..]),
        (SECRET_KEY, &["decrypt"][..]),
        (OUTPUT_KEY, &["generate"][..]),
    ] {
        let file = demo.path(&format!("policy-{}.toml", key.replace('/', "_")));
        // The personal data is released only to jobs the controller
        // authorised.
        let require = if key == INPUT_KEY {
            "require_authorisation = true\n"
        } else {
            ""
        };
        std::fs::write(&file, format!("{require}{}", policy(&enclave.pcrs, ops)))?;
        demo.verifier(Some("app-admin"), &["policy", "set", key, &arg(&file)])?;
        detail(format!(
            "{key}: {} for PCR0/1/2 of the demo enclave{}",
            ops.join(", "),
            if require.is_empty() {
                ""
            } else {
                ", only under a job authorisation"
            }
        ));
    }
    Ok(root_pem)
}

/// The verifier's key-release service, and the parent's relay to it.
fn start_verifier(
    demo: &mut Demo,
    stage: &Stage,
    relay_listener: Listener,
    root_pem: &Path,
) -> Result<()> {
    demo.step(
        "verifier",
        "starts its key-release service (trusting the simulated NSM root, explicitly)",
    );
    let [store_flag, store_value] = demo.store_args();
    let serve_args: Vec<String> = vec![
        "verifier".into(),
        store_flag,
        store_value,
        demo.secret_args[0].clone(),
        demo.secret_args[1].clone(),
        "--credential".into(),
        arg(&demo.creds.join("app-admin.credential")),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--dangerous-nsm-root".into(),
        arg(root_pem),
    ];
    let mut targets = Vec::new();
    for n in 1..=demo.replicas {
        let name = replica_name(demo.replicas, n);
        let served = demo.spawn(
            &name,
            &serve_args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let address: Address = served
            .get("listening")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the {name} did not say where it listens"))?
            .parse()?;
        detail(format!("{name} listening at {address}"));
        targets.push(kluis_parent::relay::VerifierTarget::plain(address));
    }
    let verifiers = kluis_parent::relay::Verifiers::new(targets)
        .map_err(|e| anyhow!("{e}"))?
        .with_connect_timeout(Duration::from_secs(2));
    if demo.replicas > 1 {
        detail(format!(
            "{} replicas on one PostgreSQL database; the relay fails over between them in order",
            demo.replicas
        ));
    }
    demo.verifiers = Some(verifiers.clone());
    let stop = Arc::clone(&stage.stop_relay);
    let hook: Arc<dyn kluis_parent::hook::FrameHook> = stage.recorder.clone();
    stage.runtime.spawn(async move {
        kluis_parent::relay::serve(relay_listener, verifiers, hook, async move {
            stop.notified().await
        })
        .await;
    });
    Ok(())
}

/// With several replicas: what each served, as the parent's relay counted.
fn replica_report(demo: &mut Demo) -> Result<()> {
    let Some(verifiers) = &demo.verifiers else {
        return Ok(());
    };
    if demo.replicas < 2 {
        return Ok(());
    }
    let stats = verifiers.stats();
    demo.step(
        "parent",
        "counts what each verifier replica served (its relay's figures)",
    );
    let mut served_after_kill = 0u64;
    for (n, s) in stats.iter().enumerate() {
        let name = replica_name(demo.replicas, n.saturating_add(1));
        detail(format!(
            "{name}: {} key request(s), {} exchange(s) answered, {} connection(s) refused",
            s.key_requests, s.answered, s.connect_failures
        ));
        if n > 0 {
            served_after_kill = served_after_kill.saturating_add(s.key_requests);
        }
    }
    let first = stats.first().copied().unwrap_or_default();
    if first.key_requests == 0 {
        bail!("the first replica served no key request before it was killed");
    }
    if served_after_kill == 0 {
        bail!("no other replica served a key request after the first was killed");
    }
    detail("one audit chain across the replicas, verified above from the shared database");
    Ok(())
}

/// The name of replica `n` of `count` (just "verifier" when there is one).
fn replica_name(count: usize, n: usize) -> String {
    if count > 1 {
        format!("verifier-{n}")
    } else {
        "verifier".to_owned()
    }
}

/// With several replicas: the inner hook of the parent's recorder, which
/// kills the first replica with SIGKILL as soon as the first key release
/// has passed through the relay on its way to the enclave. The frame is
/// already read from that replica, so the job goes on; everything after it
/// is served by the replicas left.
struct KillAfterFirstRelease {
    children: Children,
    victim: String,
    done: std::sync::atomic::AtomicBool,
}

impl kluis_parent::hook::FrameHook for KillAfterFirstRelease {
    fn on_frame(
        &self,
        channel: kluis_parent::hook::Channel,
        direction: kluis_parent::hook::Direction,
        frame: Vec<u8>,
    ) -> Vec<Vec<u8>> {
        use std::sync::atomic::Ordering;
        if channel == kluis_parent::hook::Channel::Verifier
            && direction == kluis_parent::hook::Direction::ToEnclave
            && !self.done.load(Ordering::SeqCst)
        {
            let response = kluis_proto::message::read_message_sync::<
                kluis_proto::message::Response,
                _,
            >(&mut frame.as_slice(), frame.len());
            if matches!(response, Ok(kluis_proto::message::Response::KeyRelease(_)))
                && !self.done.swap(true, Ordering::SeqCst)
            {
                self.children.kill(&self.victim);
            }
        }
        vec![frame]
    }
}

/// Controller: the sample dataset, encrypted, and a wrapped
/// pseudonymisation secret.
fn encrypt_dataset(demo: &mut Demo, records: u32) -> Result<Dataset> {
    demo.step(
        "controller",
        &format!("encrypts a sample dataset of {records} benefit records"),
    );
    let (plaintext, people) = sample_dataset(records);
    let plain_in = demo.path("benefits.csv");
    std::fs::write(&plain_in, &plaintext)?;
    let encrypted = demo.path("benefits.kenv");
    demo.verifier(
        Some("app-admin"),
        &[
            "data",
            "encrypt",
            "--key",
            INPUT_KEY,
            &arg(&plain_in),
            &arg(&encrypted),
        ],
    )?;
    detail(format!(
        "{} bytes of plaintext -> {} bytes of envelope under {INPUT_KEY}",
        plaintext.len(),
        std::fs::metadata(&encrypted)?.len()
    ));
    let secret_file = demo.path("pseudonym.secret.wrapped");
    demo.verifier(
        Some("app-admin"),
        &[
            "data",
            "new-secret",
            "--key",
            SECRET_KEY,
            &arg(&secret_file),
        ],
    )?;
    detail(format!("a pseudonymisation secret, wrapped under {SECRET_KEY} (nobody outside an admitted enclave ever sees it)"));
    Ok(Dataset {
        plaintext,
        people,
        encrypted,
        secret_file,
    })
}

/// The controller authorises the job.
fn authorise_job(demo: &mut Demo) -> Result<Authorisation> {
    demo.step(
        "controller",
        "application administrator authorises the pseudonymisation job, once",
    );
    let file = demo.path("pseudonymise.auth");
    let authorised = demo.verifier(
        Some("app-admin"),
        &[
            "job",
            "authorise",
            "--workload",
            "pseudonymise:column=0,header,check=nrn",
            "--input-key",
            INPUT_KEY,
            "--output-key",
            OUTPUT_KEY,
            "--secret-key",
            SECRET_KEY,
            "--purpose",
            "research extract: pseudonymised benefit records",
            "--case",
            "DEMO-2026-001",
            "--expires",
            "1h",
            "--max-runs",
            "1",
            "--out",
            &arg(&file),
        ],
    )?;
    let id = authorised
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    detail(format!(
        "authorisation {}… signed by the verifier identity: purpose, case DEMO-2026-001, 1 run, expires in an hour",
        id.get(..16).unwrap_or(&id)
    ));
    Ok(Authorisation { file, id })
}

/// The job: the parent runs it under the authorisation.
fn run_pseudonymisation(
    demo: &mut Demo,
    stage: &Stage,
    enclave: &Enclave,
    dataset: &Dataset,
    authorisation: &Authorisation,
) -> Result<Ran> {
    demo.step(
        "parent",
        "runs the pseudonymisation job under it: streams ciphertext in, takes ciphertext out",
    );
    let job = JobRun {
        enclave: enclave.address.clone(),
        spec: JobSpec {
            job_id: "demo-pseudonymise".into(),
            workload: WorkloadSpec::Pseudonymise {
                column: 0,
                delimiter: b',',
                secret: 0,
                header: true,
                check_national_number: true,
            },
            output_key: OUTPUT_KEY.into(),
            secrets: vec![WrappedSecret(std::fs::read(&dataset.secret_file)?)],
            authorisation: Some(std::fs::read(&authorisation.file)?),
        },
        hook: stage.recorder.clone(),
        idle_timeout: Duration::from_secs(60),
        output_limits: kluis_parent::limit::OutputLimits::default(),
    };
    let output = demo.path("pseudonymised.kenv");
    let report = stage.runtime.block_on(async {
        let input = std::fs::File::open(&dataset.encrypted)?;
        run_job(&job, input, &output, |_| {})
            .await
            .map_err(anyhow::Error::from)
    })?;
    detail(format!(
        "enclave: attested, keys released, {} records in, {} out; output under {}",
        report.counts.records_in,
        report.counts.records_out,
        report
            .output_key
            .as_ref()
            .map(|(k, v)| format!("{k} v{v}"))
            .unwrap_or_default()
    ));
    detail(format!(
        "{} bytes in, {} bytes out, {:.0} ms",
        report.input_bytes,
        report.output_bytes,
        report.elapsed.as_secs_f64() * 1000.0
    ));
    Ok(Ran { job, output })
}

/// Controller: decrypts the result and checks it. Returns the plaintext
/// output.
fn check_result(demo: &mut Demo, dataset: &Dataset, ran: &Ran) -> Result<String> {
    demo.step("controller", "decrypts the result and checks it");
    let plain_out = demo.path("pseudonymised.csv");
    demo.verifier(
        Some("app-admin"),
        &["data", "decrypt", &arg(&ran.output), &arg(&plain_out)],
    )?;
    let output = std::fs::read_to_string(&plain_out)?;
    let dataset = &dataset.plaintext;
    check_output(dataset, &output)?;
    let distinct: BTreeSet<&str> = output
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    detail(format!(
        "{} records; national register numbers replaced by keyed hashes ({} distinct people, {} distinct pseudonyms); other columns unchanged",
        output.lines().count().saturating_sub(1),
        dataset.lines().skip(1).filter_map(|l| l.split(',').next()).collect::<BTreeSet<_>>().len(),
        distinct.len()
    ));
    if let Some(line) = output.lines().nth(1) {
        detail(format!("e.g. {}…", line.get(..40).unwrap_or(line)));
    }
    Ok(output)
}

/// What the parent saw: no national register number, input record or
/// output pseudonym in the clear.
fn parent_view(demo: &mut Demo, stage: &Stage, dataset: &Dataset, output: &str) -> Result<()> {
    demo.step("parent", "what it saw: ciphertext only");
    let job_bytes = stage.recorder.bytes(Channel::Job);
    let relay_bytes = stage.recorder.bytes(Channel::Verifier);
    let seen: Vec<u8> = job_bytes
        .iter()
        .chain(relay_bytes.iter())
        .copied()
        .collect();
    let nrns: Vec<&[u8]> = dataset.people.iter().map(|p| p.as_bytes()).collect();
    let found = occurring(&seen, &nrns).len();
    ensure!(
        found == 0,
        "{found} national register numbers crossed the parent in the clear"
    );
    let records: Vec<&[u8]> = dataset
        .plaintext
        .lines()
        .skip(1)
        .take(50)
        .map(str::as_bytes)
        .collect();
    ensure!(
        occurring(&seen, &records).is_empty(),
        "a plaintext record crossed the parent"
    );
    let pseudonyms: Vec<&[u8]> = output
        .lines()
        .skip(1)
        .take(50)
        .map(|line| line.split(',').next().unwrap_or(line).as_bytes())
        .collect();
    ensure!(
        occurring(&seen, &pseudonyms).is_empty(),
        "a pseudonym crossed the parent in the clear"
    );
    detail(format!(
        "{} frames: {} bytes of job traffic and {} bytes of key-release traffic",
        stage.recorder.frames(),
        job_bytes.len(),
        relay_bytes.len()
    ));
    detail(format!(
        "none of the {} people's national register numbers, no input record and no output pseudonym appears in it",
        dataset.people.len()
    ));
    Ok(())
}

/// The attacker's attempts: each must be refused.
fn attacks(
    demo: &mut Demo,
    stage: &Stage,
    keys: &Keys,
    enclave: &Enclave,
    dataset: &Dataset,
    job: &JobRun,
) -> Result<()> {
    // The parent runs the authorised job again.
    demo.step(
        "attacker",
        "runs the authorised job a second time (the authorisation allows one run)",
    );
    expect_refused(
        &stage.runtime,
        job,
        &dataset.encrypted,
        &demo.path("again.kenv"),
        FailureKind::KeyReleaseRefused,
        "the second run",
    )?;
    detail("refused: the verifier released no key (authorisation_exhausted, in the audit log)");

    // The parent asks the admitted enclave for another job.
    demo.step(
        "attacker",
        "asks the same enclave for `identity` (the raw records) instead of pseudonymisation",
    );
    let identity_job = JobRun {
        spec: JobSpec {
            workload: WorkloadSpec::Identity,
            secrets: vec![],
            ..job.spec.clone()
        },
        ..job.clone()
    };
    expect_refused(
        &stage.runtime,
        &identity_job,
        &dataset.encrypted,
        &demo.path("raw.kenv"),
        FailureKind::JobNotAllowed,
        "the identity job",
    )?;
    detail("refused by the enclave itself, before it asked for any key (job_not_allowed)");
    rogue_enclave(demo, stage, keys, enclave, dataset, job)
}

/// An enclave the policy does not admit asks for the same job.
fn rogue_enclave(
    demo: &mut Demo,
    stage: &Stage,
    keys: &Keys,
    enclave: &Enclave,
    dataset: &Dataset,
    job: &JobRun,
) -> Result<()> {
    demo.step(
        "attacker",
        "starts a modified enclave (other measurements) and asks for the same job",
    );
    let other_image = demo.path("modified-enclave.img");
    std::fs::write(&other_image, b"a modified enclave image")?;
    let rogue = demo.spawn(
        "rogue-enclave",
        &[
            "enclave",
            "run",
            // The same configuration (allowed jobs); other code.
            "--config",
            &arg(&enclave.config),
            "--simulate-nsm",
            "--sim-state",
            &arg(&enclave.sim_state),
            "--sim-image",
            &arg(&other_image),
            "--listen",
            "tcp:127.0.0.1:0",
            "--verifier",
            &stage.relay_address.to_string(),
            "--verifier-key",
            &keys.verifier_key,
        ],
    )?;
    let rogue_address: Address = rogue
        .get("listening")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the rogue enclave did not say where it listens"))?
        .parse()?;
    let rogue_job = JobRun {
        enclave: rogue_address,
        ..job.clone()
    };
    expect_refused(
        &stage.runtime,
        &rogue_job,
        &dataset.encrypted,
        &demo.path("rogue.kenv"),
        FailureKind::KeyReleaseRefused,
        "the modified enclave's job",
    )?;
    detail("refused: the verifier released no key (the reason is in the audit log, not told to the enclave)");
    demo.children.stop("rogue-enclave");
    Ok(())
}

/// Stop the service, verify the audit log and summarise it. Returns the
/// audit records, for the evidence steps.
fn audit_summary(
    demo: &mut Demo,
    stage: &Stage,
    authorisation: &Authorisation,
) -> Result<Vec<Value>> {
    stage.stop_relay.notify_waiters();
    demo.children.stop("verifier");
    demo.children.stop("enclave");
    demo.step(
        "controller",
        "verifies the audit log (hash chain and anchored head)",
    );
    let verified = demo.verifier(Some("app-admin"), &["audit", "verify"])?;
    ensure!(
        verified.get("status").and_then(Value::as_str) == Some("intact"),
        "the audit log does not verify: {verified}"
    );
    let shown = demo.verifier_lines(Some("app-admin"), &["audit", "show", "--json"])?;
    let ops = operation_counts(&shown);
    let refusals: Vec<String> = shown
        .iter()
        .filter(|r| r.get("decision").and_then(Value::as_str) == Some("refused"))
        .filter_map(|r| r.get("reason").and_then(Value::as_str).map(str::to_owned))
        .collect();
    detail(format!(
        "intact: {} records, head {}",
        verified
            .get("records")
            .map(Value::to_string)
            .unwrap_or_default(),
        verified.get("head").and_then(Value::as_str).unwrap_or("?")
    ));
    for (op, n) in &ops {
        detail(format!("{n:>3} × {op}"));
    }
    ensure!(
        !refusals.is_empty(),
        "the modified enclave's refusal is not in the audit log"
    );
    for reason in refusals.iter().take(3) {
        detail(format!("refusal recorded for the operator: {reason}"));
    }
    let under_authorisation = shown
        .iter()
        .filter(|r| {
            r.get("job")
                .and_then(|j| j.get("case"))
                .and_then(Value::as_str)
                == Some("DEMO-2026-001")
        })
        .count();
    ensure!(
        under_authorisation >= 4,
        "the job's records do not name its authorisation ({under_authorisation})"
    );
    ensure!(
        refusals
            .iter()
            .any(|r| r.starts_with("authorisation_exhausted")),
        "the second run's refusal is not in the audit log"
    );
    let id = &authorisation.id;
    detail(format!(
        "{under_authorisation} records name authorisation {}… (purpose and case DEMO-2026-001)",
        id.get(..16).unwrap_or(id)
    ));
    Ok(shown)
}

/// How many audit records there are of each operation and decision.
fn operation_counts(shown: &[Value]) -> BTreeMap<String, usize> {
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    for r in shown {
        let op = r.get("operation").and_then(Value::as_str).unwrap_or("?");
        let decision = r.get("decision").and_then(Value::as_str).unwrap_or("?");
        let n = ops.entry(format!("{op} {decision}")).or_default();
        *n = n.saturating_add(1);
    }
    ops
}

/// Evidence a supervisor checks offline (`docs/evidence.md`): the bundle of
/// one key release, and the receipt of a destroyed key, each verified with
/// nothing but the verifier's public key (and the simulated root).
fn evidence_steps(
    demo: &mut Demo,
    shown: &[Value],
    verifier_key: &str,
    root_pem: &Path,
    path: &dyn Fn(&str) -> PathBuf,
) -> Result<()> {
    let p = |p: &Path| p.display().to_string();
    demo.step(
        "supervisor",
        "verifies the evidence bundle of one key release offline",
    );
    let seq = shown
        .iter()
        .find(|r| {
            r.get("operation")
                .and_then(Value::as_str)
                .is_some_and(|o| o.starts_with("key.release."))
                && r.get("decision").and_then(Value::as_str) == Some("allowed")
        })
        .and_then(|r| r.get("seq").and_then(Value::as_u64))
        .ok_or_else(|| anyhow!("no allowed key release in the audit log"))?
        .to_string();
    let bundle = path("release.evidence.json");
    demo.verifier(
        Some("app-admin"),
        &["audit", "evidence", "--seq", &seq, "--out", &p(&bundle)],
    )?;
    let report = demo.verifier(
        None,
        &[
            "evidence",
            "verify",
            "--identity",
            verifier_key,
            "--root",
            &p(root_pem),
            &p(&bundle),
        ],
    )?;
    let field = |name: &str| report.get(name).and_then(Value::as_str).unwrap_or("?");
    detail(format!(
        "record {seq} valid offline: {} {} for module {}, policy sha256 {}…, document of {}",
        field("decision"),
        field("key"),
        field("module_id"),
        field("policy_sha256").get(..12).unwrap_or("?"),
        field("document_time"),
    ));

    demo.step(
        "controller",
        "destroys a retired key with a shredding receipt; the supervisor verifies it",
    );
    let retired = "agency-a/app-x/retired";
    demo.verifier(Some("key-admin"), &["key", "create", retired])?;
    backdate_deletion(demo, retired)?;
    let receipt = path("retired.receipt.json");
    demo.verifier(
        Some("key-admin"),
        &["key", "destroy", retired, "--receipt", &p(&receipt)],
    )?;
    let report = demo.verifier(
        None,
        &[
            "evidence",
            "verify",
            "--identity",
            verifier_key,
            &p(&receipt),
        ],
    )?;
    let field = |name: &str| report.get(name).and_then(Value::as_str).unwrap_or("?");
    detail(format!(
        "receipt valid offline: {} destroyed at {} (record {}, versions {})",
        field("key"),
        field("destroyed_at"),
        report.get("seq").map(Value::to_string).unwrap_or_default(),
        report
            .get("versions_destroyed")
            .map(Value::to_string)
            .unwrap_or_default(),
    ));
    Ok(())
}

/// Schedules `key`'s deletion as if it had been scheduled eight days ago
/// (through the library, audited as the system), so the demo need not wait
/// out the seven-day minimum before `key destroy`.
fn backdate_deletion(demo: &Demo, key: &str) -> Result<()> {
    use attestation_verifier::audit::{Actor, AuditLog};
    use attestation_verifier::keys::KeyName;
    use attestation_verifier::kms::Kms;
    const EIGHT_DAYS_MS: u64 = 8 * 86_400_000;
    let [how, file] = &demo.secret_args;
    let mut kms = if let Some(url) = &demo.database {
        let db = kluis_keystore::Database::connect(url)?;
        if how == "--hsm-pin-file" {
            let pin = kluis_keystore::Zeroizing::new(std::fs::read_to_string(file)?);
            Kms::open_hsm_database(
                db,
                kluis_keystore::Zeroizing::new(pin.trim_end().to_owned()),
            )?
        } else {
            let secret = kluis_keystore::RootSecret::from_key_file(Path::new(file))?;
            Kms::open_database(db, secret)?
        }
    } else if how == "--hsm-pin-file" {
        let pin = kluis_keystore::Zeroizing::new(std::fs::read_to_string(file)?);
        Kms::open_hsm(
            &demo.store,
            kluis_keystore::Zeroizing::new(pin.trim_end().to_owned()),
        )?
    } else {
        let secret = kluis_keystore::RootSecret::from_key_file(Path::new(file))?;
        Kms::open(&demo.store, secret)?
    };
    let anchor = kms.audit_anchor()?;
    let log = match kms.store().database() {
        Some(_) => AuditLog::open_database(kms.store(), anchor.as_ref())?,
        None => AuditLog::open_anchored(demo.store.join("audit.log"), anchor.as_ref())?,
    };
    kms.bind_audit(Arc::new(log), Actor::System);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let then = u64::try_from(now)?.saturating_sub(EIGHT_DAYS_MS);
    kms.schedule_deletion(&KeyName::parse(key)?, 7, then)?;
    Ok(())
}

/// Which of `needles` occur in `haystack`, in one pass over it: windows as
/// long as the shortest needle are looked up by that prefix, and candidates
/// compared in full. Linear in the haystack (times the shortest needle's
/// length) however many needles there are; the search that took each
/// needle in turn made `demo --records 20000` take most of a minute.
fn occurring<'a>(haystack: &[u8], needles: &[&'a [u8]]) -> BTreeSet<&'a [u8]> {
    let mut found = BTreeSet::new();
    let Some(k) = needles.iter().map(|n| n.len()).filter(|&l| l > 0).min() else {
        return found;
    };
    let mut by_prefix: HashMap<&[u8], Vec<&'a [u8]>> = HashMap::new();
    for needle in needles {
        if let Some(prefix) = needle.get(..k) {
            by_prefix.entry(prefix).or_default().push(needle);
        }
    }
    for (i, window) in haystack.windows(k).enumerate() {
        if let Some(candidates) = by_prefix.get(window) {
            for candidate in candidates {
                if haystack.get(i..i.saturating_add(candidate.len())) == Some(*candidate) {
                    found.insert(*candidate);
                }
            }
        }
    }
    found
}

/// The output is the input with column 0 replaced by a 64-hex pseudonym,
/// one pseudonym per person.
fn check_output(input: &str, output: &str) -> Result<()> {
    let ins: Vec<&str> = input.lines().collect();
    let outs: Vec<&str> = output.lines().collect();
    ensure!(
        ins.len() == outs.len(),
        "{} records in, {} out",
        ins.len(),
        outs.len()
    );
    ensure!(ins.first() == outs.first(), "the header line changed");
    let mut mapping: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, o) in ins.iter().zip(&outs).skip(1) {
        let (nrn, rest_in) = i.split_once(',').ok_or_else(|| anyhow!("bad input line"))?;
        let (pseudonym, rest_out) = o
            .split_once(',')
            .ok_or_else(|| anyhow!("bad output line"))?;
        ensure!(
            rest_in == rest_out,
            "a column other than the pseudonymised one changed"
        );
        ensure!(
            pseudonym.len() == 64 && pseudonym.bytes().all(|b| b.is_ascii_hexdigit()),
            "a pseudonym is not 64 hex digits"
        );
        let previous = mapping.insert(nrn, pseudonym);
        ensure!(
            previous.is_none_or(|p| p == pseudonym),
            "one person got two pseudonyms"
        );
    }
    let distinct: BTreeSet<&&str> = mapping.values().collect();
    ensure!(
        distinct.len() == mapping.len(),
        "two people got one pseudonym"
    );
    let nrns: Vec<&[u8]> = mapping.keys().map(|n| n.as_bytes()).collect();
    ensure!(
        occurring(output.as_bytes(), &nrns).is_empty(),
        "a national register number survived"
    );
    Ok(())
}

/// A new file of mode 0600 holding `contents`.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn occurring_finds_exactly_the_needles_present() {
        let haystack = b"xx12345678901yy123456789zz abcdef";
        let needles: Vec<&[u8]> = vec![b"12345678901", b"123456789", b"abcdefg", b"cdef", b"zz"];
        let found = occurring(haystack, &needles);
        let want: BTreeSet<&[u8]> = [&b"12345678901"[..], b"123456789", b"cdef", b"zz"]
            .into_iter()
            .collect();
        assert_eq!(found, want);
        assert!(occurring(b"", &needles).is_empty());
        assert!(occurring(haystack, &[]).is_empty());
        assert!(occurring(haystack, &[b""]).is_empty());
    }

    /// 20,000 needles over 2 MB in one pass (the search per needle took
    /// most of a minute on `demo --records 20000`).
    #[test]
    fn occurring_is_linear_in_the_haystack() {
        let people: Vec<String> = (0..20_000u64)
            .map(|i| format!("{:011}", 85_000_000_000 + i * 7))
            .collect();
        let needles: Vec<&[u8]> = people.iter().map(|p| p.as_bytes()).collect();
        let haystack: Vec<u8> = (0..2_000_000u32)
            .map(|i| b"0123456789abcdef"[(i.wrapping_mul(2_654_435_761) >> 28) as usize])
            .collect();
        let started = std::time::Instant::now();
        let mut with_one = haystack.clone();
        with_one.extend_from_slice(people[12_345].as_bytes());
        let found = occurring(&with_one, &needles);
        assert!(found.contains(people[12_345].as_bytes()));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
