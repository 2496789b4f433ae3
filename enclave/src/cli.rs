//! The `enclave` command line: `run` (the enclave service) and `nsm-sim`
//! (the simulated NSM, for tests and local runs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand};
use kluis_transport::{Address, Listener};
use serde::Deserialize;

#[cfg(feature = "simulator")]
use crate::nsm_sim;
use crate::EnclaveContext;

/// Exit code for every failure (bad input, unusable paths, ...), as for usage errors.
const EXIT_FAILURE: u8 = 2;

/// Largest configuration file read.
const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// The Kluis enclave application.
#[derive(Debug, Parser)]
#[command(name = "enclave", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the enclave service: take jobs from the parent, fetch keys from the
    /// verifier through the parent, process data only inside.
    Run(RunArgs),
    /// Check a configuration file as `run` reads it, without starting
    /// anything: exit 0 when `run` would accept it, 1 (with the reason) when
    /// not. The image build runs it on the configuration it assembles.
    #[command(name = "check-config")]
    CheckConfig(CheckConfigArgs),
    /// A SIMULATED Nitro Secure Module, for tests and local runs only.
    ///
    /// Its documents chain to a local simulated root, never to AWS's.
    #[cfg(feature = "simulator")]
    #[command(name = "nsm-sim", subcommand)]
    NsmSim(nsm_sim::NsmSimCommand),
}

/// The configuration built into the enclave image (TOML). Command-line
/// options override it, for local runs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    listen: Option<String>,
    verifier: Option<String>,
    verifier_public_key: Option<String>,
    exec_dir: Option<PathBuf>,
    max_jobs: Option<usize>,
    exec_timeout_seconds: Option<u64>,
    job_timeout_seconds: Option<u64>,
    start_timeout_seconds: Option<u64>,
    /// Without `allowed_jobs`: `"data_independent"` (default) or `"any"`.
    unlisted_jobs: Option<UnlistedJobsConfig>,
    allowed_jobs: Option<Vec<AllowedJobConfig>>,
    /// Run only jobs that come with a controller-signed authorisation.
    #[serde(default)]
    require_authorisation: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum UnlistedJobsConfig {
    DataIndependent,
    Any,
}

/// One `[[allowed_jobs]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowedJobConfig {
    /// The workload in `parent run --job` syntax, parameters included.
    workload: String,
    output_key: String,
    #[serde(default)]
    secret_keys: Vec<String>,
    #[serde(default)]
    input_keys: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The configuration file built into the image.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where to take jobs: vsock:any:PORT in an enclave; tcp:HOST:PORT or
    /// unix:PATH in simulation.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Where the verifier is reached through the parent: vsock:3:PORT in an
    /// enclave.
    #[arg(long, value_name = "ADDR")]
    verifier: Option<String>,
    /// The verifier's public identity key (hex SEC1, from
    /// `attestation-verifier identity`).
    #[arg(long, value_name = "HEX")]
    verifier_key: Option<String>,
    /// Directory of programs `exec` jobs may run.
    #[arg(long, value_name = "DIR")]
    exec_dir: Option<PathBuf>,
    /// Most jobs at once.
    #[arg(long, value_name = "N")]
    max_jobs: Option<usize>,
    /// Use a SIMULATED NSM instead of /dev/nsm (tests and local runs only).
    #[arg(long)]
    simulate_nsm: bool,
    /// The simulator's state directory (its root key).
    #[arg(long, value_name = "DIR", requires = "simulate_nsm")]
    sim_state: Option<PathBuf>,
    /// The file the simulator measures as the enclave image [default: this program].
    #[arg(long, value_name = "FILE", requires = "simulate_nsm")]
    sim_image: Option<PathBuf>,
    /// Simulate a debug-mode enclave (PCR0-2 read as zeros).
    #[arg(long, requires = "simulate_nsm")]
    sim_debug: bool,
}

#[derive(Debug, Args)]
struct CheckConfigArgs {
    /// The configuration file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The image's root directory, when checking a tree that is not yet the
    /// running image: `exec_dir` is looked up under it, and every program an
    /// allowed `exec` job names must be there [default: /].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// Everything `run` takes from the configuration and the command line,
/// checked: what `check-config` validates.
#[derive(Debug)]
struct Settings {
    listen: Address,
    verifier: Address,
    verifier_key: [u8; 97],
    exec_dir: Option<PathBuf>,
    allowed_jobs: Option<Vec<crate::AllowedJob>>,
    job_timeout: Option<std::time::Duration>,
    exec_timeout: Option<std::time::Duration>,
    start_timeout: Option<std::time::Duration>,
    unlisted_jobs: crate::UnlistedJobs,
    max_jobs: usize,
    require_authorisation: bool,
}

/// Most jobs at once when neither the configuration nor `--max-jobs` says.
const DEFAULT_MAX_JOBS: usize = 4;

fn check_key_id(what: &str, id: &str) -> anyhow::Result<()> {
    let max = kluis_proto::message::MAX_KEY_ID_LEN;
    if id.is_empty() || id.len() > max || id.chars().any(char::is_control) {
        bail!("{what} {id:?} is not a key id (1 to {max} bytes of printable text)");
    }
    Ok(())
}

fn allowed_job(
    index: usize,
    a: AllowedJobConfig,
    exec_dir: bool,
) -> anyhow::Result<crate::AllowedJob> {
    let context = || format!("allowed_jobs[{index}] ({:?})", a.workload);
    let workload = kluis_proto::job::parse_workload(&a.workload).with_context(context)?;
    crate::workload::check_spec(&workload, a.secret_keys.len()).with_context(context)?;
    if matches!(workload, kluis_proto::job::WorkloadSpec::Exec { .. }) && !exec_dir {
        return Err(anyhow!("an exec job is allowed but there is no exec_dir"))
            .with_context(context);
    }
    check_key_id("output_key", &a.output_key).with_context(context)?;
    for id in a.secret_keys.iter().chain(&a.input_keys) {
        check_key_id("key", id).with_context(context)?;
    }
    Ok(crate::AllowedJob {
        workload,
        output_key: a.output_key,
        secret_keys: a.secret_keys,
        input_keys: a.input_keys,
    })
}

/// Resolves and checks the configuration and command line together; no
/// device, socket or file beyond what was already read is touched.
fn settings(config: Config, args: &RunArgs) -> anyhow::Result<Settings> {
    let listen: Address = args
        .listen
        .clone()
        .or(config.listen)
        .ok_or_else(|| anyhow!("no listen address: --listen or `listen` in the configuration"))?
        .parse()
        .context("listen")?;
    let verifier: Address = args
        .verifier
        .clone()
        .or(config.verifier)
        .ok_or_else(|| {
            anyhow!("no verifier address: --verifier or `verifier` in the configuration")
        })?
        .parse()
        .context("verifier")?;
    let verifier_key = parse_key(
        &args
            .verifier_key
            .clone()
            .or(config.verifier_public_key)
            .ok_or_else(|| {
                anyhow!(
                    "no verifier key: --verifier-key or `verifier_public_key` in the configuration"
                )
            })?,
    )?;
    let exec_dir = args.exec_dir.clone().or(config.exec_dir);
    let allowed_jobs = match config.allowed_jobs {
        None => None,
        Some(list) if list.is_empty() => {
            bail!("allowed_jobs is empty: this enclave would refuse every job (leave it out to allow any)")
        }
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, a)| allowed_job(i, a, exec_dir.is_some()))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
    };
    let max_jobs = args
        .max_jobs
        .or(config.max_jobs)
        .unwrap_or(DEFAULT_MAX_JOBS);
    if max_jobs == 0 {
        bail!("max_jobs must be at least 1");
    }
    let seconds = |s: u64| std::time::Duration::from_secs(s.max(1));
    let unlisted_jobs = match config.unlisted_jobs {
        None | Some(UnlistedJobsConfig::DataIndependent) => crate::UnlistedJobs::DataIndependent,
        Some(UnlistedJobsConfig::Any) => crate::UnlistedJobs::Any,
    };
    Ok(Settings {
        listen,
        verifier,
        verifier_key,
        exec_dir,
        allowed_jobs,
        job_timeout: config.job_timeout_seconds.map(seconds),
        exec_timeout: config.exec_timeout_seconds.map(seconds),
        start_timeout: config.start_timeout_seconds.map(seconds),
        unlisted_jobs,
        max_jobs,
        require_authorisation: config.require_authorisation,
    })
}

/// `check-config`: what `run --config FILE` would accept, plus, under
/// `root`, the workload directory and the programs of allowed exec jobs.
fn check_config(args: &CheckConfigArgs) -> anyhow::Result<String> {
    let config = read_config(&args.file)?;
    let none = RunArgs {
        config: None,
        listen: None,
        verifier: None,
        verifier_key: None,
        exec_dir: None,
        max_jobs: None,
        simulate_nsm: false,
        sim_state: None,
        sim_image: None,
        sim_debug: false,
    };
    let settings = settings(config, &none)?;
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let exec_dir = match &settings.exec_dir {
        None => None,
        Some(dir) => {
            let inside = root.join(dir.strip_prefix("/").unwrap_or(dir));
            if !inside.is_dir() {
                bail!(
                    "exec_dir {} is not a directory ({})",
                    dir.display(),
                    inside.display()
                );
            }
            Some(inside)
        }
    };
    let mut summary = format!(
        "listen {}, verifier {}, max_jobs {}",
        settings.listen, settings.verifier, settings.max_jobs
    );
    match &settings.allowed_jobs {
        None => summary.push_str(", ANY job the parent asks for (no allowed_jobs)"),
        Some(jobs) => {
            for (i, job) in jobs.iter().enumerate() {
                if let kluis_proto::job::WorkloadSpec::Exec { program, args } = &job.workload {
                    crate::exec::check_request(exec_dir.as_deref(), program, args)
                        .map_err(|e| anyhow!("allowed_jobs[{i}]: {}", e.message))?;
                }
            }
            summary.push_str(&format!(", {} allowed job(s)", jobs.len()));
        }
    }
    if settings.require_authorisation {
        summary.push_str(", only jobs with a job authorisation");
    }
    Ok(summary)
}

fn read_config(path: &Path) -> anyhow::Result<Config> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_LEN.saturating_add(1))
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_CONFIG_LEN {
        bail!("{} is larger than {MAX_CONFIG_LEN} bytes", path.display());
    }
    toml::from_str(&text).with_context(|| format!("{}", path.display()))
}

fn parse_key(hex_text: &str) -> anyhow::Result<[u8; 97]> {
    let bytes = hex::decode(hex_text.trim()).map_err(|_| anyhow!("the verifier key is not hex"))?;
    let key: [u8; 97] = bytes
        .try_into()
        .map_err(|_| anyhow!("the verifier key must be 97 bytes (uncompressed SEC1 P-384)"))?;
    if key.first() != Some(&0x04) {
        bail!("the verifier key must be an uncompressed SEC1 point (starting 04)");
    }
    use aws_lc_rs::agreement::{ParsedPublicKey, UnparsedPublicKey, ECDH_P384};
    if ParsedPublicKey::try_from(UnparsedPublicKey::new(&ECDH_P384, &key[..])).is_err() {
        bail!("the verifier key is not a point on the P-384 curve");
    }
    Ok(key)
}

fn open_nsm(args: &RunArgs) -> anyhow::Result<Arc<dyn kluis_nsm::Nsm>> {
    if args.simulate_nsm {
        open_simulator(args)
    } else {
        open_device()
    }
}

#[cfg(feature = "device")]
fn open_device() -> anyhow::Result<Arc<dyn kluis_nsm::Nsm>> {
    let device = kluis_nsm::NsmDevice::open().context("opening /dev/nsm")?;
    Ok(Arc::new(device))
}

#[cfg(not(feature = "device"))]
fn open_device() -> anyhow::Result<Arc<dyn kluis_nsm::Nsm>> {
    bail!("built without /dev/nsm support; pass --simulate-nsm for a local run")
}

#[cfg(not(feature = "simulator"))]
fn open_simulator(_: &RunArgs) -> anyhow::Result<Arc<dyn kluis_nsm::Nsm>> {
    bail!(
        "this enclave was built without the simulated NSM (a production build): \
         it runs only in a Nitro Enclave, on /dev/nsm"
    )
}

#[cfg(feature = "simulator")]
fn open_simulator(args: &RunArgs) -> anyhow::Result<Arc<dyn kluis_nsm::Nsm>> {
    to_stderr!("{}", nsm_sim::WARNING);
    tracing::warn!("SIMULATED NSM: attestation documents chain to a local root, not AWS");
    let dir = nsm_sim::state_dir(&nsm_sim::StateArgs {
        state: args.sim_state.clone(),
    })?;
    let (root, _) = nsm_sim::load_or_create(&dir, true)?;
    let image_path = match &args.sim_image {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this program")?,
    };
    let image = std::fs::read(&image_path)
        .with_context(|| format!("reading the image {}", image_path.display()))?;
    let config = kluis_nsm::sim::SimConfig::default()
        .with_root(root)
        .with_image(image, None)
        .with_debug(args.sim_debug);
    Ok(Arc::new(kluis_nsm::sim::SimulatedNsm::new(config)?))
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => read_config(path)?,
        None => Config::default(),
    };
    let settings = settings(config, args)?;
    match (&settings.allowed_jobs, settings.unlisted_jobs) {
        (Some(_), _) => {}
        (None, crate::UnlistedJobs::DataIndependent) => tracing::warn!(
            "no allowed_jobs in the configuration: this enclave runs only identity and reencrypt"
        ),
        (None, crate::UnlistedJobs::Any) => tracing::warn!(
            "no allowed_jobs and unlisted_jobs = \"any\": the parent chooses any job, \
             and workloads whose failure depends on the data become oracles"
        ),
    }
    let listen = settings.listen;
    let nsm = open_nsm(args)?;
    let pcrs = (0u16..3)
        .map(|i| kluis_nsm::describe_pcr(&*nsm, i).map(|d| hex::encode(d.value)))
        .collect::<Result<Vec<_>, _>>()
        .context("reading PCR0-2")?;
    let mut ctx = EnclaveContext::new(nsm, settings.verifier, settings.verifier_key);
    ctx.exec_dir = settings.exec_dir;
    ctx.allowed_jobs = settings.allowed_jobs;
    ctx.require_authorisation = settings.require_authorisation;
    if let Some(timeout) = settings.job_timeout {
        ctx.job_timeout = timeout;
    }
    if let Some(timeout) = settings.start_timeout {
        ctx.start_timeout = timeout;
    }
    ctx.unlisted_jobs = settings.unlisted_jobs;
    if let Some(timeout) = settings.exec_timeout {
        ctx.exec_timeout = timeout;
    }
    let max_jobs = settings.max_jobs;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async move {
        let listener = Listener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let bound = listener.local_address()?;
        let line = serde_json::json!({
            "listening": bound.to_string(),
            "verifier": ctx.verifier.to_string(),
            "nsm": if args.simulate_nsm { "simulated" } else { "device" },
            "pcrs": { "0": pcrs.first(), "1": pcrs.get(1), "2": pcrs.get(2) },
        });
        // The parent (or whoever started the enclave) reads this line; a
        // closed or full standard output is an error, not a panic.
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), "{line}")
            .and_then(|()| std::io::stdout().flush())
            .context("announcing the service on standard output")?;
        tracing::info!(listen = %bound, "enclave service started");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
        };
        crate::server::serve(
            listener,
            Arc::new(ctx),
            crate::server::Limits::for_jobs(max_jobs),
            shutdown,
        )
        .await;
        Ok(())
    });
    // Abandoned jobs' blocking threads must not hold the exit: their outputs
    // lack a final segment whatever happens to them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line standard error cannot take is lost, not reported
        // through `eprintln!` (which would panic on a closed stderr).
        .log_internal_errors(false)
        // Colours only for a terminal: never escape codes in a log file.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .try_init();
}

/// Run the command line on `args` (the first item is the program name).
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_FAILURE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Run(args) => {
            init_logging();
            run(&args)
        }
        Command::CheckConfig(args) => {
            return match check_config(&args) {
                Ok(summary) => {
                    use std::io::Write as _;
                    let mut out = std::io::stdout().lock();
                    match writeln!(out, "{}: ok: {summary}", args.file.display())
                        .and_then(|()| out.flush())
                    {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            to_stderr!("error: writing to standard output: {e}");
                            ExitCode::from(2)
                        }
                    }
                }
                Err(err) => {
                    let message = kluis_proto::report::error_text(err.as_ref()).replace('\n', " ");
                    to_stderr!("error: {}: {message}", args.file.display());
                    ExitCode::from(1)
                }
            };
        }
        #[cfg(feature = "simulator")]
        Command::NsmSim(command) => nsm_sim::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its causes, joined.
            let message = kluis_proto::report::error_text(err.as_ref()).replace('\n', " ");
            to_stderr!("error: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn example(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The documented examples parse as the enclave reads them.
    #[test]
    fn the_deployment_examples_parse() {
        let config: Config = toml::from_str(&example("enclave.toml.example")).unwrap();
        assert_eq!(config.listen.as_deref(), Some("vsock:any:5000"));
        assert_eq!(config.verifier.as_deref(), Some("vsock:3:8001"));
        // The placeholder key is refused.
        assert!(parse_key(config.verifier_public_key.as_deref().unwrap()).is_err());
        let jobs: Config = toml::from_str(&example("allowed-jobs.toml.example")).unwrap();
        let jobs = jobs.allowed_jobs.unwrap();
        assert_eq!(jobs.len(), 2);
        for job in &jobs {
            kluis_proto::job::parse_workload(&job.workload).unwrap();
        }
        // The choice for images without a list, and nothing else.
        let any: Config = toml::from_str("unlisted_jobs = \"any\"\n").unwrap();
        assert!(matches!(any.unlisted_jobs, Some(UnlistedJobsConfig::Any)));
        let safe: Config = toml::from_str("unlisted_jobs = \"data_independent\"\n").unwrap();
        assert!(matches!(
            safe.unlisted_jobs,
            Some(UnlistedJobsConfig::DataIndependent)
        ));
        assert!(toml::from_str::<Config>("unlisted_jobs = \"all\"\n").is_err());
        // Unknown fields are refused.
        assert!(toml::from_str::<Config>(
            "[[allowed_jobs]]\nworkload = \"identity\"\noutput_key = \"a/b/c\"\nextra = 1\n"
        )
        .is_err());
    }

    /// A verifier key on the curve, in hex.
    fn real_key() -> String {
        hex::encode(
            kluis_proto::VerifierIdentity::generate()
                .unwrap()
                .public_key_sec1(),
        )
    }

    /// The shipped example with a real key, and the allowed-jobs example
    /// appended: what Dockerfile.enclave assembles.
    fn assembled() -> String {
        format!(
            "{}\n{}",
            example("enclave.toml.example").replace(
                "REPLACE-WITH-THE-OUTPUT-OF-attestation-verifier-identity",
                &real_key()
            ),
            example("allowed-jobs.toml.example")
        )
    }

    fn check(text: &str, root: Option<&Path>) -> anyhow::Result<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("enclave.toml");
        std::fs::write(&file, text).unwrap();
        check_config(&CheckConfigArgs {
            file,
            root: root.map(Path::to_path_buf),
        })
    }

    #[test]
    fn check_config_accepts_the_assembled_examples() {
        let summary = check(&assembled(), None).unwrap();
        assert!(summary.contains("listen vsock:any:5000"), "{summary}");
        assert!(summary.contains("2 allowed job(s)"), "{summary}");
        assert!(!summary.contains("authorisation"), "{summary}");
        let required = format!("require_authorisation = true\n{}", assembled());
        let summary = check(&required, None).unwrap();
        assert!(
            summary.contains("only jobs with a job authorisation"),
            "{summary}"
        );
        assert!(check(
            &format!("require_authorisation = \"yes\"\n{}", assembled()),
            None
        )
        .is_err());
        let open = assembled().replace("[[allowed_jobs]]", "# [[allowed_jobs]]");
        let open = open
            .lines()
            .filter(|l| !l.starts_with("workload") && !l.contains("_key"))
            .collect::<Vec<_>>()
            .join("\n");
        let summary = check(
            &format!("{open}\nverifier_public_key = \"{}\"\n", real_key()),
            None,
        )
        .unwrap();
        assert!(summary.contains("ANY job"), "{summary}");
    }

    /// Each broken setting is refused, with a message that names it.
    #[test]
    fn check_config_refuses_each_broken_setting() {
        let good = assembled();
        let key_line = good
            .lines()
            .find(|l| l.starts_with("verifier_public_key"))
            .unwrap()
            .to_owned();
        let off_curve = format!("verifier_public_key = \"04{}\"", "11".repeat(96));
        let cases: Vec<(&str, String, &str)> = vec![
            ("placeholder key", example("enclave.toml.example"), "not hex"),
            ("key off the curve", good.replace(&key_line, &off_curve), "not a point on the P-384 curve"),
            ("no listen", good.replace("listen = \"vsock:any:5000\"", ""), "no listen address"),
            ("bad listen", good.replace("vsock:any:5000", "vsock:any:port"), "listen"),
            ("bad verifier", good.replace("vsock:3:8001", "tcp:"), "verifier"),
            ("no key", good.replace(&key_line, ""), "no verifier key"),
            ("max_jobs 0", good.replace("max_jobs = 4", "max_jobs = 0"), "max_jobs must be at least 1"),
            ("unknown field", format!("{good}\nmax_job = 4\n"), "unknown field"),
            (
                "allowed_jobs empty",
                format!(
                    "listen = \"vsock:any:5000\"\nverifier = \"vsock:3:8001\"\n{key_line}\nallowed_jobs = []\n"
                ),
                "allowed_jobs is empty",
            ),
            (
                "unknown workload",
                good.replace("workload = \"reencrypt\"", "workload = \"reencrypt2\""),
                "allowed_jobs[1]",
            ),
            (
                "pseudonymise without its secret key",
                good.replace("secret_keys = [\"agency-a/pseudonym/prod\"]", "secret_keys = []"),
                "secret 0 named, 0 given",
            ),
            (
                "empty output key",
                good.replace("output_key = \"agency-a/research/prod\"", "output_key = \"\""),
                "output_key",
            ),
            (
                "exec job without exec_dir",
                format!("{good}\n[[allowed_jobs]]\nworkload = \"exec:tool\"\noutput_key = \"a/b/c\"\n"),
                "no exec_dir",
            ),
        ];
        for (name, text, expected) in cases {
            let err = check(&text, None).expect_err(name);
            let message = format!("{err:#}");
            assert!(message.contains(expected), "{name}: {message}");
        }
    }

    /// Under --root, exec_dir must exist in the tree and every allowed exec
    /// program must be a file in it.
    #[test]
    fn check_config_finds_exec_programs_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\nexec_dir = \"/opt/kluis/workloads\"\n[[allowed_jobs]]\nworkload = \"exec:tool\"\noutput_key = \"a/b/c\"\n",
            assembled()
        );
        // The top-level key must come before the tables.
        let text = format!(
            "exec_dir = \"/opt/kluis/workloads\"\n{}",
            text.replace("\nexec_dir = \"/opt/kluis/workloads\"\n", "\n")
        );
        let err = check(&text, Some(root.path())).unwrap_err();
        assert!(
            format!("{err:#}").contains("exec_dir /opt/kluis/workloads is not a directory"),
            "{err:#}"
        );
        let dir = root.path().join("opt/kluis/workloads");
        std::fs::create_dir_all(&dir).unwrap();
        let err = check(&text, Some(root.path())).unwrap_err();
        assert!(
            format!("{err:#}").contains("no program \"tool\""),
            "{err:#}"
        );
        std::fs::write(dir.join("tool"), b"\x7fELF").unwrap();
        let summary = check(&text, Some(root.path())).unwrap();
        assert!(summary.contains("3 allowed job(s)"), "{summary}");
    }

    #[test]
    fn check_config_refuses_unreadable_and_oversized_files() {
        let err = check_config(&CheckConfigArgs {
            file: PathBuf::from("/nonexistent/enclave.toml"),
            root: None,
        })
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("opening /nonexistent/enclave.toml"),
            "{err:#}"
        );
        let big = format!("# {}\n", "x".repeat(70 * 1024));
        let err = check(&big, None).unwrap_err();
        assert!(
            format!("{err:#}").contains("larger than 65536 bytes"),
            "{err:#}"
        );
    }
}
