//! The `tss-callback-gateway` command line (CONTRACT.md section 3). Parsing only; the work is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tss_callback_gateway::probe::{self, Payload, Probe};
use tss_callback_gateway::runtime::Runtime;

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
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Parse, validate and load every key of a config; print a summary.
    CheckConfig {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write an RSA-2048 key pair: DIR/NAME-pri.pem (PKCS#8, 0600) and DIR/NAME-pub.key (SPKI).
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Act as a TSS Node once and print the verified CallbackResponse (exit 0 approved, 1 not, 2 error).
    Probe {
        #[arg(long)]
        url: String,
        /// The TSS Node's private key (PEM).
        #[arg(long, value_name = "TSS_PRI")]
        key: PathBuf,
        /// The callback server's public key (PEM).
        #[arg(long, value_name = "PUB")]
        server_pub: PathBuf,
        /// Send the embedded sample of this type (ping, key_gen, key_sign, key_reshare, key_share_sign).
        #[arg(long = "type", value_name = "T", conflicts_with = "fixture")]
        kind: Option<String>,
        /// Send this CallbackRequest JSON file's exact bytes.
        #[arg(long, value_name = "FILE")]
        fixture: Option<PathBuf>,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
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
        /// Audit files recorded with `audit_payloads: true`, oldest first.
        #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
        audit: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that audit files, oldest first (rotated ones included), form one unbroken hash
    /// chain (exit 0 intact, 1 naming the first bad file:line, 2 unreadable).
    Verify {
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Accept only checkpoints signed by this gateway public key (PEM; several keys allowed).
        #[arg(long, value_name = "PUB", conflicts_with = "config")]
        key: Option<PathBuf>,
        /// Accept only checkpoints signed by this config's gateway_private_key.
        #[arg(short, long, value_name = "CONFIG")]
        config: Option<PathBuf>,
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

fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(2)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => {
            init_logs(log_format, "info");
            match runtime().block_on(tss_callback_gateway::serve::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match Runtime::load(&config, 1) {
            Ok(rt) => {
                print!("{}", rt.summary());
                for w in &rt.warnings {
                    eprintln!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Keygen { out, name } => match tss_callback_gateway::keys::generate(&out, &name) {
            Ok(files) => {
                println!(
                    "wrote {} (private, PKCS#8, mode 0600)",
                    files.private.display()
                );
                println!("wrote {} (public, SPKI)", files.public.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Probe {
            url,
            key,
            server_pub,
            kind,
            fixture,
            timeout,
        } => {
            init_logs(LogFormat::Text, "warn");
            let payload = match (fixture, kind) {
                (Some(path), _) => Payload::File(path),
                (None, Some(t)) => match probe::parse_type(&t) {
                    Ok(k) => Payload::Sample(k),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => Payload::Sample(tss_callback_gateway::protocol::RequestType::Ping),
            };
            let probe = Probe {
                url,
                node_key: key,
                server_pub,
                payload,
                timeout,
            };
            match runtime().block_on(probe::run(&probe)) {
                Ok(answer) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&answer).unwrap_or_default()
                    );
                    if answer.is_approval() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    key,
                    config,
                    live,
                    mid_chain,
                },
        } => audit_verify(&files, key, config, live, mid_chain),
        Command::Replay { config, audit } => replay(&config, &audit),
        Command::Demo => {
            init_logs(LogFormat::Text, "warn");
            match runtime().block_on(tss_callback_gateway::demo::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn audit_verify(
    files: &[PathBuf],
    key: Option<PathBuf>,
    config: Option<PathBuf>,
    live: bool,
    mid_chain: bool,
) -> ExitCode {
    use tss_callback_gateway::keys::{Signer, Verifier};
    let pinned = match (key, config) {
        (Some(k), _) => Verifier::load(&k).map(Some).map_err(|e| e.to_string()),
        (None, Some(c)) => tss_callback_gateway::config::Config::load(&c)
            .map_err(|e| e.to_string())
            .and_then(|c| Signer::load(&c.gateway_private_key).map_err(|e| e.to_string()))
            .map(|s| Some(s.verifier())),
        (None, None) => Ok(None),
    };
    let pinned = match pinned {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = tss_callback_gateway::verify::Options {
        pinned,
        live,
        mid_chain,
    };
    match tss_callback_gateway::verify::verify(files, &opts) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            if failure.exit_code() == 1 {
                println!("{failure}");
            } else {
                eprintln!("error: {failure}");
            }
            ExitCode::from(failure.exit_code())
        }
    }
}

fn replay(config: &std::path::Path, files: &[PathBuf]) -> ExitCode {
    let candidate = match tss_callback_gateway::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match tss_callback_gateway::replay::replay(&candidate, files, |change| println!("{change}")) {
        Ok(report) => {
            println!("{report}");
            if report.changed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
