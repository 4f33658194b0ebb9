//! Command-line interface: clap definitions and one module per command.

mod messaging;
mod register;
mod serve;
mod whoami;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switchboard::client::Home;
use tracing_subscriber::EnvFilter;

/// Switchboard: a self-hosted messaging node and its command-line client.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Cli {
    /// The client's home directory (device key and state).
    #[arg(long, env = "SWITCHBOARD_HOME", global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node.
    Serve(serve::Args),
    /// Register a phone number on a node, proving it with a code.
    Register(register::Args),
    /// Ask the node who this device is.
    Whoami,
    /// Send an end-to-end encrypted message.
    Send(messaging::SendArgs),
    /// Print the messages waiting for this device, oldest first.
    Recv(messaging::RecvArgs),
    /// Show the safety number with a contact, to compare in person.
    Safety(messaging::SafetyArgs),
}

/// Logs go to stderr: info for the node, warnings only for client commands, unless
/// RUST_LOG says otherwise.
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Register(args) => register::run(Home::new(cli.home)?, args).await,
        Command::Whoami => whoami::run(Home::new(cli.home)?).await,
        Command::Send(args) => messaging::send(Home::new(cli.home)?, args).await,
        Command::Recv(args) => messaging::recv(Home::new(cli.home)?, args).await,
        Command::Safety(args) => messaging::safety(Home::new(cli.home)?, args).await,
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
