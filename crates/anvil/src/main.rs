//! `anvil` command line: `anvil daemon start|reload|doctor`, `anvil openapi`.

use anvil::{doctor, load_config, server};
use anvil_core::config::LogFormat;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "anvil",
    version,
    about = "Per-host sandbox daemon: isolated sandboxes (bubblewrap, Firecracker) over an HTTP API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run and manage the daemon.
    Daemon {
        #[command(subcommand)]
        cmd: DaemonCmd,
    },
    /// Print the OpenAPI 3 document of the HTTP API.
    Openapi,
}

#[derive(Subcommand)]
enum DaemonCmd {
    /// Start the daemon in the foreground.
    Start {
        /// Config file (see examples/config.toml; examples/dev.toml runs from a checkout).
        #[arg(
            long,
            short,
            env = "ANVIL_CONFIG",
            default_value = "/etc/anvil/config.toml"
        )]
        config: PathBuf,
    },
    /// Ask the running daemon to reload its policies; fails naming the bad file.
    Reload {
        #[arg(
            long,
            short,
            env = "ANVIL_CONFIG",
            default_value = "/etc/anvil/config.toml"
        )]
        config: PathBuf,
    },
    /// Check config, policies, socket, backends, cgroups and KVM; exit non-zero naming problems.
    Doctor {
        #[arg(
            long,
            short,
            env = "ANVIL_CONFIG",
            default_value = "/etc/anvil/config.toml"
        )]
        config: PathBuf,
    },
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ANVIL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},hyper=warn,h2=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// Loads the config, or says why not (file and key) and gives the exit code 2.
fn config_or_exit(path: &std::path::Path) -> Result<anvil_core::config::Config, ExitCode> {
    load_config(path).map_err(|e| {
        eprintln!("anvil: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anvil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Openapi => {
            println!("{}", anvil::api::openapi::document());
            ExitCode::SUCCESS
        }
        Cmd::Daemon {
            cmd: DaemonCmd::Start { config },
        } => {
            let cfg = match config_or_exit(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.daemon.log_level.as_str(), cfg.daemon.log_format);
            tracing::info!(config = %config.display(), version = env!("CARGO_PKG_VERSION"), "starting anvil");
            match rt.block_on(server::run(cfg, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("anvil: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Daemon {
            cmd: DaemonCmd::Reload { config },
        } => {
            let cfg = match config_or_exit(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match rt.block_on(anvil::client::request(
                &cfg.daemon.socket,
                "POST",
                "/v1/admin/reload",
                None,
            )) {
                Ok((200, body)) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Ok((status, body)) => {
                    eprintln!("anvil: reload failed ({status}): {body}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("anvil: reload failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Daemon {
            cmd: DaemonCmd::Doctor { config },
        } => {
            if rt.block_on(doctor::run(&config)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
