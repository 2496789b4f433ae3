//! `parent run` and `parent relay`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Args;
use kluis_parent::connect::connect_patiently;
use kluis_parent::failover::run_job_failing_over;
use kluis_parent::hook::PassThrough;
use kluis_parent::job::{run_job_on, JobRun, Progress};
use kluis_parent::limit::OutputLimits;
use kluis_parent::relay::Verifiers;
use kluis_proto::job::{JobSpec, WrappedSecret};
use kluis_transport::{Address, Listener};

/// Arguments of `parent run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Where the enclave takes jobs (vsock:CID:PORT; tcp:/unix: in simulation).
    #[arg(long, value_name = "ADDR")]
    pub enclave: String,
    /// The controller's verifier (host:port). With it, the relay for the
    /// enclave's key request runs for the job's duration; without it, a
    /// `parent relay` service must be running. Several replicas: repeat the
    /// flag or separate addresses with commas; they are tried in order, and
    /// the job runs again on the next one only when a replica failed before
    /// any key request reached it.
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    pub verifier: Vec<String>,
    /// Where the relay listens for the enclave.
    #[arg(long, value_name = "ADDR", default_value = "vsock:any:8001")]
    pub relay_listen: String,
    #[command(flatten)]
    pub tls: VerifierTls,
    /// The encrypted input (an envelope from `attestation-verifier data encrypt`).
    #[arg(long, value_name = "PATH")]
    pub input: PathBuf,
    /// Where the encrypted output goes (written only when the job completes).
    /// An existing file there is refused unless --replace is given.
    #[arg(long, value_name = "PATH")]
    pub output: PathBuf,
    /// Replace an existing --output (in one rename, once the job has
    /// completed; a failed job leaves it as it was). Without it, a file
    /// at --output when the job starts is refused (one made there while the
    /// job runs is replaced at its end).
    #[arg(long)]
    pub replace: bool,
    /// The workload, in the `--job` syntax of the README.
    #[arg(
        long,
        value_name = "SPEC",
        default_value = "identity",
        help = "The workload: identity, reencrypt, pseudonymise:column=N[,header][,check=nrn], \
                aggregate:by=N[,sum=M], exec:PROGRAM[,arg=V]..."
    )]
    pub job: String,
    /// The master key the output is encrypted under.
    #[arg(long, value_name = "NAME")]
    pub output_key: String,
    /// A wrapped secret for the workload (e.g. the pseudonymisation key from
    /// `attestation-verifier data new-secret`); repeatable.
    #[arg(long, value_name = "FILE")]
    pub secret: Vec<PathBuf>,
    /// The controller-signed job authorisation (`attestation-verifier job
    /// authorise --out AUTH`) to run the job under. The enclave runs the job
    /// only if it is exactly the authorised one (give the same --job,
    /// --output-key and secrets), and the verifier releases only its keys.
    #[arg(long, value_name = "AUTH")]
    pub authorisation: Option<PathBuf>,
    /// A name for the job in logs and the audit trail.
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Fail when the enclave says nothing for this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub idle_timeout: u64,
    /// Fail when the whole job (key release and data) takes longer than
    /// this, however often the enclave reports progress. The default is an
    /// hour past the enclave's own default deadline (24 h). 0: no limit.
    #[arg(long, value_name = "SECONDS", default_value_t = 25 * 3600)]
    pub job_timeout: u64,
    /// Keep trying to connect to the enclave this long: `nitro-cli
    /// run-enclave` returns before the enclave program listens. 0: try once.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub enclave_wait: u64,
    /// Stop the job (no output written) when its output would pass this
    /// size: bytes, or with a suffix K, M, G or T (powers of 1024).
    /// [default: no cap]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_output: Option<u64>,
    /// Stop the job (no output written) when the output's file system has
    /// less than this free, read every 16 MiB of output: a hostile or
    /// runaway workload cannot fill the host's disk. Same units as
    /// --max-output; 0: not checked.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1G")]
    pub keep_free: u64,
}

/// A size given on the command line: a number of bytes, or one followed by
/// K, M, G or T (KiB, MiB, GiB, TiB).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{text:?}: the unit must be K, M, G or T")),
            };
            (text.get(..at).unwrap_or_default(), shift)
        }
        _ => (text, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (bytes, or a number with K, M, G or T)"))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Arguments of `parent relay`.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Where to listen for the enclave.
    #[arg(long, value_name = "ADDR", default_value = "vsock:any:8001")]
    pub listen: String,
    /// The controller's verifier (host:port). Several replicas: repeat the
    /// flag or separate addresses with commas; each exchange goes to the
    /// first that answers, starting with the last one that did.
    #[arg(long, value_name = "ADDR", value_delimiter = ',', required = true)]
    pub verifier: Vec<String>,
    #[command(flatten)]
    pub tls: VerifierTls,
}

/// How to reach the verifier replicas: TLS (when they run `serve
/// --tls-cert ...`) and the connect timeout.
#[derive(Debug, Args)]
pub(crate) struct VerifierTls {
    /// Connect to the verifier with TLS, trusting the CA certificate(s) in
    /// this PEM file.
    #[arg(long, value_name = "PEM")]
    pub verifier_ca: Option<PathBuf>,
    /// The name the verifier's certificate must carry [default: the host of
    /// --verifier].
    #[arg(long, value_name = "NAME", requires = "verifier_ca")]
    pub verifier_name: Option<String>,
    /// How long a connection to one verifier replica may take before the
    /// relay moves on to the next.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub verifier_connect_timeout: u64,
}

impl VerifierTls {
    /// The replicas named by `--verifier` (each address once, at most
    /// [`kluis_parent::relay::MAX_REPLICAS`]).
    fn verifiers(&self, addresses: &[String]) -> anyhow::Result<Verifiers> {
        let targets = addresses
            .iter()
            .map(|a| {
                let a = a.trim();
                if a.is_empty() {
                    return Err(anyhow!("an empty --verifier address"));
                }
                self.target(a).with_context(|| format!("--verifier {a}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Verifiers::new(targets)?
            .with_connect_timeout(Duration::from_secs(self.verifier_connect_timeout)))
    }

    fn target(&self, verifier: &str) -> anyhow::Result<kluis_parent::relay::VerifierTarget> {
        let address: Address = verifier.parse()?;
        let Some(ca) = &self.verifier_ca else {
            return Ok(kluis_parent::relay::VerifierTarget::plain(address));
        };
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let name = match &self.verifier_name {
            Some(n) => n.clone(),
            None => verifier
                .strip_prefix("tcp:")
                .unwrap_or(verifier)
                .rsplit_once(':')
                .map(|(host, _)| {
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned()
                })
                .ok_or_else(|| anyhow!("no host in {verifier}"))?,
        };
        kluis_parent::relay::VerifierTarget::tls(address, &pem, &name).map_err(|e| anyhow!(e))
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn read_secret(path: &PathBuf) -> anyhow::Result<WrappedSecret> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(4096)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.is_empty() || bytes.len() > kluis_proto::message::MAX_WRAPPED_KEY_LEN {
        return Err(anyhow!("{} is not a wrapped secret", path.display()));
    }
    Ok(WrappedSecret(bytes))
}

fn read_authorisation(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let max = kluis_proto::authorisation::MAX_AUTHORISATION_LEN;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.is_empty() || bytes.len() > max {
        return Err(anyhow!(
            "{} is not a job authorisation (1..={max} bytes)",
            path.display()
        ));
    }
    Ok(bytes)
}

/// A progress bar on a terminal, plain log lines otherwise.
pub(crate) struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
}

impl Reporter {
    pub(crate) fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter {
            bar,
            last_line: Instant::now(),
        }
    }

    fn line(p: &Progress) -> String {
        let secs = p.elapsed.as_secs_f64().max(0.001);
        #[allow(clippy::cast_precision_loss)]
        let rate = p.sent as f64 / secs / 1e6;
        // Record counts come only with `Done` (the enclave reports no finer
        // progress than how much input it has read).
        format!(
            "sent {} B, received {} B, enclave has read {} B, {:.1} MB/s",
            p.sent, p.received, p.counts.bytes_in, rate
        )
    }

    pub(crate) fn update(&mut self, p: &Progress) {
        match &self.bar {
            Some(bar) => bar.set_message(Self::line(p)),
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(2) {
                    self.last_line = Instant::now();
                    to_stderr!("progress: {}", Self::line(p));
                }
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What `run` can tell about its input and output before it connects to
/// anything: a job that could not be read from or written to at its end
/// must not run first (it may spend a run of its authorisation).
fn check_paths(input: &Path, output: &Path) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(input).with_context(|| format!("the input {}", input.display()))?;
    if meta.is_dir() {
        return Err(anyhow!(
            "the input {} is a directory, not an envelope from `attestation-verifier data encrypt`",
            input.display()
        ));
    }
    if std::fs::symlink_metadata(output).is_ok_and(|m| m.is_dir()) {
        return Err(anyhow!("the output {} is a directory", output.display()));
    }
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(anyhow!(
            "the output's directory {} does not exist",
            dir.display()
        ));
    }
    // The same file under two names (a link, `./x` and `x`): the output
    // would replace the input.
    let same = std::fs::canonicalize(input)
        .ok()
        .is_some_and(|i| std::fs::canonicalize(output).ok().is_some_and(|o| o == i));
    if same {
        return Err(anyhow!(
            "the output {} is the input: choose another --output",
            output.display()
        ));
    }
    Ok(())
}

pub(crate) fn run(args: &RunArgs) -> anyhow::Result<()> {
    // Checked before anything runs (an earlier job's output, or another
    // run's, is not replaced by mistake).
    if !args.replace && std::fs::symlink_metadata(&args.output).is_ok() {
        return Err(anyhow!(
            "{} already exists: remove it, choose another --output, or give --replace",
            args.output.display()
        ));
    }
    check_paths(&args.input, &args.output)?;
    let workload = kluis_parent::spec::parse(&args.job)?;
    let secrets = args
        .secret
        .iter()
        .map(read_secret)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let enclave: Address = args.enclave.parse()?;
    let job = JobRun {
        enclave,
        spec: JobSpec {
            job_id: args
                .job_id
                .clone()
                .unwrap_or_else(|| format!("job-{}", std::process::id())),
            workload,
            output_key: args.output_key.clone(),
            secrets,
            authorisation: args
                .authorisation
                .as_ref()
                .map(read_authorisation)
                .transpose()?,
        },
        hook: Arc::new(PassThrough),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        output_limits: OutputLimits {
            max_bytes: args.max_output,
            keep_free: args.keep_free,
        },
    };
    let relay = if args.verifier.is_empty() {
        None
    } else {
        Some((
            args.relay_listen.parse::<Address>()?,
            args.tls.verifiers(&args.verifier)?,
        ))
    };
    let verifiers = relay.as_ref().map(|(_, v)| v.clone());
    runtime()?.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        if let Some((listen, verifier)) = relay {
            let listener = Listener::bind(&listen)
                .await
                .with_context(|| format!("relay: listening on {listen}"))?;
            tokio::spawn(kluis_parent::relay::serve(
                listener,
                verifier,
                Arc::new(PassThrough),
                async {
                    let _ = stop_rx.await;
                },
            ));
        }
        let input = std::fs::File::open(&args.input)
            .with_context(|| format!("opening {}", args.input.display()))?;
        let patience = Duration::from_secs(args.enclave_wait);
        let mut last_notice: Option<Duration> = None;
        let stream = tokio::select! {
            r = connect_patiently(&job.enclave, patience, |error, waited| {
                // A line now and then, not one per attempt.
                if last_notice.is_none_or(|at| waited >= at.saturating_add(Duration::from_secs(5))) {
                    last_notice = Some(waited);
                    to_stderr!(
                        "waiting for the enclave at {} to listen ({:.0?} of {patience:?}): {error}",
                        job.enclave, waited
                    );
                }
            }) => r?,
            _ = tokio::signal::ctrl_c() => {
                let _ = stop_tx.send(());
                return Err(anyhow!("interrupted: no output written"));
            }
        };
        let mut reporter = Reporter::new();
        let run = async {
            match &verifiers {
                // The relay runs here: a job whose exchange a replica lost
                // before any key request reached it runs again.
                Some(verifiers) => {
                    let mut first_input = Some(input);
                    let path = args.input.clone();
                    let open = move || -> std::io::Result<std::fs::File> {
                        match first_input.take() {
                            Some(file) => Ok(file),
                            None => std::fs::File::open(&path),
                        }
                    };
                    run_job_failing_over(&job, verifiers, Some(stream), open, &args.output, |p| {
                        reporter.update(p);
                    })
                    .await
                }
                None => run_job_on(&job, stream, input, &args.output, |p| reporter.update(p)).await,
            }
        };
        let job_timeout = args.job_timeout;
        let deadline = async {
            if job_timeout == 0 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(job_timeout)).await;
        };
        let result = tokio::select! {
            r = run => r,
            () = deadline => {
                reporter.finish();
                let _ = stop_tx.send(());
                return Err(anyhow!(
                    "the job did not finish within {job_timeout} s (--job-timeout): no output written"
                ));
            }
            _ = tokio::signal::ctrl_c() => {
                reporter.finish();
                let _ = stop_tx.send(());
                return Err(anyhow!("interrupted: no output written"));
            }
        };
        reporter.finish();
        let _ = stop_tx.send(());
        let report = result?;
        let line = serde_json::json!({
            "output": report.output.display().to_string(),
            "records_in": report.counts.records_in,
            "records_out": report.counts.records_out,
            "input_bytes": report.input_bytes,
            "output_bytes": report.output_bytes,
            "output_key": report.output_key.as_ref().map(|(k, v)| format!("{k}#{v}")),
            "seconds": report.elapsed.as_secs_f64(),
        });
        // A closed or full standard output is an error, not a panic.
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), "{line}")
            .and_then(|()| std::io::stdout().flush())
            .context("writing the job's report to standard output")?;
        Ok(())
    })
}

pub(crate) fn relay(args: &RelayArgs) -> anyhow::Result<()> {
    let listen: Address = args.listen.parse()?;
    let verifier = args.tls.verifiers(&args.verifier)?;
    runtime()?.block_on(async {
        let listener = Listener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let replicas = verifier
            .addresses()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        to_stderr!("relaying {} -> {replicas}", listener.local_address()?);
        kluis_parent::relay::serve(listener, verifier, Arc::new(PassThrough), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::parse_size;

    #[test]
    fn sizes_are_bytes_or_powers_of_1024() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("1500").unwrap(), 1500);
        assert_eq!(parse_size("3k").unwrap(), 3 << 10);
        assert_eq!(parse_size("3M").unwrap(), 3 << 20);
        assert_eq!(parse_size(" 1G ").unwrap(), 1 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("16777215T").unwrap(), 16_777_215 << 40);
        for bad in ["", "K", "3X", "1.5G", "-1", "16777216T", "3 M", "GG"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
