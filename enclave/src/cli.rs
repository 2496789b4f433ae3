//! The `enclave` command line: `run` (the enclave service) and `nsm-sim`
//! (the simulated NSM, for tests and local runs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand};
use kluis_transport::{Address, Listener};
use serde::Deserialize;

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
    /// A SIMULATED Nitro Secure Module, for tests and local runs only.
    ///
    /// Its documents chain to a local simulated root, never to AWS's.
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
    allowed_jobs: Option<Vec<AllowedJobConfig>>,
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
    Ok(key)
}

fn open_nsm(args: &RunArgs) -> anyhow::Result<Arc<dyn kluis_nsm::Nsm>> {
    if !args.simulate_nsm {
        #[cfg(feature = "device")]
        {
            let device = kluis_nsm::NsmDevice::open().context("opening /dev/nsm")?;
            return Ok(Arc::new(device));
        }
        #[cfg(not(feature = "device"))]
        bail!("built without /dev/nsm support; pass --simulate-nsm for a local run");
    }
    eprintln!("{}", nsm_sim::WARNING);
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
    let listen: Address = args
        .listen
        .clone()
        .or(config.listen)
        .ok_or_else(|| anyhow!("no listen address: --listen or `listen` in the configuration"))?
        .parse()?;
    let verifier: Address = args
        .verifier
        .clone()
        .or(config.verifier)
        .ok_or_else(|| {
            anyhow!("no verifier address: --verifier or `verifier` in the configuration")
        })?
        .parse()?;
    let key = parse_key(
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
    let nsm = open_nsm(args)?;
    let pcrs = (0u16..3)
        .map(|i| kluis_nsm::describe_pcr(&*nsm, i).map(|d| hex::encode(d.value)))
        .collect::<Result<Vec<_>, _>>()
        .context("reading PCR0-2")?;
    let allowed_jobs = match config.allowed_jobs {
        None => {
            tracing::warn!(
                "no allowed_jobs in the configuration: this enclave runs any job the parent asks for"
            );
            None
        }
        Some(list) => Some(
            list.into_iter()
                .map(|a| {
                    Ok(crate::AllowedJob {
                        workload: kluis_proto::job::parse_workload(&a.workload)
                            .with_context(|| format!("allowed_jobs: {:?}", a.workload))?,
                        output_key: a.output_key,
                        secret_keys: a.secret_keys,
                        input_keys: a.input_keys,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
    };
    let mut ctx = EnclaveContext::new(nsm, verifier, key);
    ctx.exec_dir = args.exec_dir.clone().or(config.exec_dir);
    ctx.allowed_jobs = allowed_jobs;
    if let Some(secs) = config.job_timeout_seconds {
        ctx.job_timeout = std::time::Duration::from_secs(secs.max(1));
    }
    if let Some(secs) = config.exec_timeout_seconds {
        ctx.exec_timeout = std::time::Duration::from_secs(secs.max(1));
    }
    let max_jobs = args.max_jobs.or(config.max_jobs).unwrap_or(4);

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
        println!("{line}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tracing::info!(listen = %bound, "enclave service started");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
        };
        crate::server::serve(listener, Arc::new(ctx), max_jobs, shutdown).await;
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
        Command::NsmSim(command) => nsm_sim::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its causes, joined.
            let message = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {message}");
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
        // Unknown fields are refused.
        assert!(toml::from_str::<Config>(
            "[[allowed_jobs]]\nworkload = \"identity\"\noutput_key = \"a/b/c\"\nextra = 1\n"
        )
        .is_err());
    }
}
