//! The `tss-callback-gateway` command line (CONTRACT.md section 3). Parsing only; the work is
//! in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tss_callback_gateway::config::Config;
use tss_callback_gateway::generation::Generation;
use tss_callback_gateway::inbound::listener;
use tss_callback_gateway::ops::traces;
use tss_callback_gateway::protocol::keys::{self, Signer, Verifier};
use tss_callback_gateway::protocol::RequestType;
use tss_callback_gateway::tools::probe::{self, Payload, Probe};
use tss_callback_gateway::tools::{demo, reconcile, replay, verify};

#[derive(Parser)]
#[command(
    name = "tss-callback-gateway",
    version,
    about = "One Cobo TSS Node callback server in front of many: approves only if every risk-control server does"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TSS Node callbacks until SIGTERM/SIGINT; reload on SIGHUP or file change.
    Run {
        /// The gateway's YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Log lines as text (colour only on a terminal) or as one JSON object each.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Parse, validate and load every key of a config; print a summary and warnings (exit 0
    /// valid, 2 with one line naming the field or file).
    CheckConfig {
        /// The gateway's YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write an RSA-2048 key pair: DIR/NAME-pri.pem (PKCS#8, 0600) and DIR/NAME-pub.key (SPKI);
    /// never overwrites (exit 0 written, 2 on error or when a file exists).
    Keygen {
        /// The folder to write the two files into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The files' name stem: 1-64 characters of [A-Za-z0-9_-].
        #[arg(long, value_name = "NAME")]
        name: String,
    },
    /// Act as a TSS Node once and print the verified CallbackResponse (exit 0 approved, 1 not, 2 error).
    Probe {
        /// The callback server's address, e.g. http://127.0.0.1:11020/v2/check.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The TSS Node's private key (PEM).
        #[arg(long, value_name = "TSS_PRI")]
        key: PathBuf,
        /// The callback server's public key (PEM).
        #[arg(long, value_name = "PUB")]
        server_pub: PathBuf,
        /// Send the embedded sample of this type under a fresh request_id: ping, key_gen,
        /// key_sign, key_reshare, key_share_sign, or its code (0, 1, 2, 3, 5) [default: ping].
        #[arg(long = "type", value_name = "T", conflicts_with = "fixture")]
        kind: Option<String>,
        /// Send this CallbackRequest JSON file's exact bytes.
        #[arg(long, value_name = "FILE")]
        fixture: Option<PathBuf>,
        /// Give up after this long (e.g. 500ms, 10s).
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run keys, sample downstreams, the gateway and a simulated TSS Node in one process.
    Demo,
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Re-decide recorded requests under a candidate config, calling nobody (exit 0 none would
    /// change, 1 some would, 2 error).
    Replay {
        /// The candidate config.
        #[arg(short, long, value_name = "CANDIDATE")]
        config: PathBuf,
        /// Audit files recorded with `audit_payloads: true`, oldest first (each file once).
        #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
        audit: Vec<PathBuf>,
    },
    /// List executed requests (request.*.succeeded events) with no APPROVE record, across the
    /// audit files of every replica (exit 0 every execution was approved, 1 some were not, 2
    /// error).
    Reconcile {
        /// Audit files of every replica, rotated ones included, in any order.
        #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
        audit: Vec<PathBuf>,
        /// Approvals older than this with no succeeded/failed event are listed (for information).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that audit files, oldest first (rotated ones included), form one unbroken hash
    /// chain, signed by the pinned keys and holding every witnessed checkpoint (exit 0 intact,
    /// 1 naming the first bad file:line or the lowest missing witnessed seq, 2 unreadable).
    Verify {
        /// Audit files, oldest first (rotated ones included).
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Accept only checkpoints signed by this gateway public key (PEM), or by a key that a
        /// key_rotated record signed by it names as its predecessor (before that record);
        /// repeatable: old and new keys across a rotation made while the gateway was stopped.
        #[arg(long, value_name = "PUB")]
        key: Vec<PathBuf>,
        /// Accept checkpoints signed by this config's gateway_private_key (with any --key).
        #[arg(short, long, value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// The gateway's own log (its stderr; repeatable): every checkpoint it witnesses must be
        /// in the files, so a file cut at an earlier checkpoint is caught.
        #[arg(long, value_name = "LOG")]
        witness: Vec<PathBuf>,
        /// The last file is still being written: accept records after its last checkpoint.
        #[arg(long)]
        live: bool,
        /// The first file continues a chain whose older files were removed (retention).
        #[arg(long)]
        mid_chain: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat, default_level: &str, traces: Option<&traces::Exporter>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // The spans made for traces are never log lines (nor a prefix of them), whatever RUST_LOG says.
    let filter = match format!("{}=off", traces::TARGET).parse() {
        Ok(off) => filter.add_directive(off),
        Err(_) => filter,
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match format {
        // Colour codes are for a terminal; in a file or a log pipeline they are noise.
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(traces.map(|t| t.layer()))
        .init();
}

/// What a subcommand ends with: its exit code, or an error printed as `error: ...` (exit 2).
type Exit = Result<ExitCode, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let exit = match cli.command {
        Command::Run { config, log_format } => run(&config, log_format),
        Command::CheckConfig { config } => Ok(check_config(&config)),
        Command::Keygen { out, name } => keygen(&out, &name),
        Command::Probe {
            url,
            key,
            server_pub,
            kind,
            fixture,
            timeout,
        } => {
            let payload = match (fixture, kind) {
                (Some(path), _) => PayloadArg::File(path),
                (None, Some(t)) => PayloadArg::Type(t),
                (None, None) => PayloadArg::Ping,
            };
            probe(url, key, server_pub, payload, timeout)
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    key,
                    config,
                    witness,
                    live,
                    mid_chain,
                },
        } => audit_verify(
            &files,
            &key,
            config,
            verify::Options {
                witness,
                live,
                mid_chain,
                ..verify::Options::default()
            },
        ),
        Command::Replay { config, audit } => replay(&config, &audit),
        Command::Reconcile { audit, grace } => reconcile(&audit, grace),
        Command::Demo => demo(),
    };
    exit.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// The tokio runtime the async subcommands run on.
fn async_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// `run`: serve until SIGTERM/SIGINT; exit 0 after a clean shutdown.
fn run(config: &Path, log_format: LogFormat) -> Exit {
    let runtime = async_runtime()?;
    // The exporter is part of the log subscriber, so it starts before the config is served; a
    // config that does not load is refused by `listener::run` below, with the usual message.
    let exporter = match Config::load(config) {
        Ok(c) => match &c.tracing {
            Some(t) => Some(
                traces::Exporter::start(t, &c.service_name, runtime.handle().clone())
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        },
        Err(_) => None,
    };
    init_logs(log_format, "info", exporter.as_ref());
    let served = runtime.block_on(listener::run(config)).map_err(|e| {
        tracing::error!("{e}");
        e.to_string()
    });
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// `check-config`: the summary and warnings, or the refusal as it is (exit 2).
fn check_config(config: &Path) -> ExitCode {
    match Generation::load(config, 1) {
        Ok(g) => {
            print!("{}", g.summary());
            for w in &g.warnings {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn keygen(out: &Path, name: &str) -> Exit {
    let files = keys::generate(out, name).map_err(|e| e.to_string())?;
    println!(
        "wrote {} (private, PKCS#8, mode 0600)",
        files.private.display()
    );
    println!("wrote {} (public, SPKI)", files.public.display());
    Ok(ExitCode::SUCCESS)
}

/// What `probe` was asked to send, before the `--type` name is checked.
enum PayloadArg {
    File(PathBuf),
    Type(String),
    Ping,
}

/// `probe`: exit 0 approved, 1 any other verified answer, 2 no verified answer.
fn probe(
    url: String,
    node_key: PathBuf,
    server_pub: PathBuf,
    payload: PayloadArg,
    timeout: Duration,
) -> Exit {
    init_logs(LogFormat::Text, "warn", None);
    let payload = match payload {
        PayloadArg::File(path) => Payload::File(path),
        PayloadArg::Type(t) => Payload::Sample(probe::parse_type(&t).map_err(|e| e.to_string())?),
        PayloadArg::Ping => Payload::Sample(RequestType::Ping),
    };
    let probe = Probe {
        url,
        node_key,
        server_pub,
        payload,
        timeout,
    };
    let answer = async_runtime()?
        .block_on(probe::run(&probe))
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(exit_if(answer.is_approval()))
}

/// `demo`: keys, sample downstreams, the gateway and a TSS Node in one process.
fn demo() -> Exit {
    // The forged-token row is the demo's point, not a warning: its decision line stays out of
    // the table.
    init_logs(
        LogFormat::Text,
        "warn,tss_callback_gateway::inbound::check=error",
        None,
    );
    async_runtime()?
        .block_on(demo::run())
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// `audit verify`: exit 0 intact, 1 a finding (said on stdout), 2 unreadable. `opts` come
/// without the pinned keys, which are loaded here from `keys` and `config`.
fn audit_verify(
    files: &[PathBuf],
    keys: &[PathBuf],
    config: Option<PathBuf>,
    mut opts: verify::Options,
) -> Exit {
    for k in keys {
        opts.pinned
            .push(Verifier::load(k).map_err(|e| e.to_string())?);
    }
    if let Some(c) = config {
        let c = Config::load(&c).map_err(|e| e.to_string())?;
        let signer = Signer::load(&c.gateway_private_key).map_err(|e| e.to_string())?;
        opts.pinned.push(signer.verifier());
    }
    match verify::verify(files, &opts, |warning| println!("{warning}")) {
        Ok(summary) => {
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) if failure.exit_code() == 1 => {
            println!("{failure}");
            Ok(ExitCode::from(1))
        }
        Err(failure) => Err(failure.to_string()),
    }
}

/// `replay`: exit 0 if no decision would change, 1 if some would, 2 on error.
fn replay(config: &Path, files: &[PathBuf]) -> Exit {
    let candidate = Config::load(config).map_err(|e| e.to_string())?;
    let report = replay::replay(&candidate, files, |change| println!("{change}"))
        .map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(exit_if(report.changed() == 0))
}

/// `reconcile`: exit 0 if every execution was approved, 1 if some were not, 2 on error.
fn reconcile(files: &[PathBuf], grace: Duration) -> Exit {
    let report = reconcile::reconcile(files, grace).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(exit_if(report.clean()))
}

/// Exit 0 when `ok`, else 1.
fn exit_if(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
