//! Command-line interface: clap definitions and one module per command.

mod admin;
mod chat;
mod check_config;
mod contacts;
mod conversation;
mod devices;
mod group;
mod lock;
mod messaging;
mod register;
mod serve;
mod whoami;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;

use clap::{Parser, Subcommand};
use switchboard::client::Home;
use switchboard::client::sealed::Passphrase;
use switchboard::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Switchboard: a self-hosted messaging node and its command-line client.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Cli {
    /// The client's home directory (device key and state).
    #[arg(long, env = "SWITCHBOARD_HOME", global = true)]
    home: Option<PathBuf>,
    /// A file whose first line is the passphrase that encrypts this home's keys
    /// (instead of the SWITCHBOARD_PASSPHRASE environment variable).
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
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
    /// The node addresses this device connects to, or (given a comma-separated
    /// list, tried in order) replace them: after the node moved, or into a cluster.
    Servers {
        /// host:port[,host:port...]
        list: Option<String>,
    },
    /// Send an end-to-end encrypted message.
    Send(messaging::SendArgs),
    /// Print the messages waiting for this device, oldest first.
    Recv(messaging::RecvArgs),
    /// Print a conversation from the local history, oldest first.
    History(messaging::HistoryArgs),
    /// Show the safety number with a contact, to compare in person.
    Safety(messaging::SafetyArgs),
    /// Your address book, and which of your contacts are on the node.
    #[command(subcommand)]
    Contacts(contacts::Command),
    /// Operator commands: on the running node over its admin socket, or on the data
    /// dir of a stopped node.
    Admin(admin::Args),
    /// Validate a config file and print the settings a node would run with.
    CheckConfig(check_config::Args),
    /// The registration lock: a PIN needed to register your number on another device.
    #[command(subcommand)]
    Lock(lock::Command),
    /// Your account's devices: link a new one, list them, unlink one.
    #[command(subcommand)]
    Devices(devices::Command),
    /// Groups: create one, add and remove members, list them.
    #[command(subcommand)]
    Group(group::Command),
    /// React to a message with an emoji (one per person; "" takes it back).
    React(conversation::ReactArgs),
    /// Change the text of a message you sent (within 15 minutes), for everyone.
    Edit(conversation::EditArgs),
    /// Delete a message you sent (within 15 minutes) for everyone.
    Delete(conversation::DeleteArgs),
    /// Disappearing messages in a conversation: off, 1d, 7d or 90d.
    Timer(conversation::TimerArgs),
    /// Tell a conversation you are typing (or stopped).
    Typing(conversation::TypingArgs),
    /// Your profile (name, about, photo), or a contact's.
    #[command(subcommand)]
    Profile(conversation::ProfileCommand),
    /// Chat in the terminal: your conversations, live.
    Chat(chat::ChatArgs),
    /// Attachments: download one again.
    #[command(subcommand)]
    Attachment(messaging::AttachmentCommand),
}

/// Logs go to stderr: warnings only for client commands, unless RUST_LOG says
/// otherwise. The node sets up its own logging once it has read its config
/// ([`init_node_logging`]).
pub fn init_logging(cli: &Cli) {
    if !matches!(cli.command, Command::Serve(_)) {
        init_node_logging(LogFormat::Text, "warn");
    }
}

/// Logs to stderr in `format`, at `default` level unless RUST_LOG says otherwise.
pub fn init_node_logging(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// The client home, with the passphrase from `--passphrase-file` or
/// `SWITCHBOARD_PASSPHRASE`, if either is given.
fn home(dir: Option<PathBuf>, passphrase_file: Option<&Path>) -> anyhow::Result<Home> {
    let passphrase = match passphrase_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the passphrase file {}", path.display()))?;
            Some(text.lines().next().unwrap_or("").to_string())
        }
        None => std::env::var("SWITCHBOARD_PASSPHRASE").ok(),
    };
    if passphrase.as_deref() == Some("") {
        anyhow::bail!("the passphrase is empty");
    }
    Ok(Home::new(dir)?.with_passphrase(passphrase.map(Passphrase::new)))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let pass = cli.passphrase_file.as_deref();
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Register(args) => register::run(home(cli.home, pass)?, args).await,
        Command::Whoami => whoami::run(home(cli.home, pass)?).await,
        Command::Servers { list } => whoami::servers(home(cli.home, pass)?, list),
        Command::Send(args) => messaging::send(home(cli.home, pass)?, args).await,
        Command::Recv(args) => messaging::recv(home(cli.home, pass)?, args).await,
        Command::History(args) => messaging::history(home(cli.home, pass)?, args).await,
        Command::Safety(args) => messaging::safety(home(cli.home, pass)?, args).await,
        Command::Contacts(command) => contacts::run(home(cli.home, pass)?, command).await,
        Command::Admin(args) => admin::run(args).await,
        Command::CheckConfig(args) => check_config::run(args),
        Command::Lock(command) => lock::run(home(cli.home, pass)?, command).await,
        Command::Devices(command) => devices::run(home(cli.home, pass)?, command).await,
        Command::Group(command) => group::run(home(cli.home, pass)?, command).await,
        Command::React(args) => conversation::react(home(cli.home, pass)?, args).await,
        Command::Edit(args) => conversation::edit(home(cli.home, pass)?, args).await,
        Command::Delete(args) => conversation::delete(home(cli.home, pass)?, args).await,
        Command::Timer(args) => conversation::timer(home(cli.home, pass)?, args).await,
        Command::Typing(args) => conversation::typing(home(cli.home, pass)?, args).await,
        Command::Profile(command) => conversation::profile(home(cli.home, pass)?, command).await,
        Command::Chat(args) => chat::run(home(cli.home, pass)?, args).await,
        Command::Attachment(command) => messaging::attachment(home(cli.home, pass)?, command).await,
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub fn interrupted() -> impl std::future::Future<Output = ()> {
    // The handlers are installed now, before the caller announces itself, so a signal
    // that comes at once is caught rather than killing the process.
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this");
                None
            }
        }
    };
    async move {
        #[cfg(unix)]
        if let Some((mut term, mut int)) = signals {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
