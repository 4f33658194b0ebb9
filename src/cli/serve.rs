//! `switchboard serve`: run a node.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use switchboard::config::{Config, LogFormat};
use switchboard::node::Node;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Config file (TOML); without it the embedded defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (overrides `server.data_dir`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// UDP address to listen on (overrides `server.listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(data) = args.data {
        config.server.data_dir = data;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    super::init_node_logging(config.log.format, "info");
    // Signal handlers first: a supervisor may send SIGTERM the moment the node says
    // it is listening.
    let shutdown = shutdown_signal(super::interrupted());
    let node = Node::bind(config).await?;
    let addr = node.local_addr().context("reading the bound address")?;
    {
        // Scripts read these two lines; logs go to stderr.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        writeln!(out, "fingerprint {}", node.fingerprint())?;
        if let Some(metrics) = node.metrics_addr() {
            writeln!(out, "metrics on http://{metrics}/metrics")?;
        }
        out.flush()?;
    }
    tracing::info!(%addr, fingerprint = %node.fingerprint(), "node started");
    node.run(shutdown).await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal(signal: impl std::future::Future<Output = ()>) {
    signal.await;
    tracing::info!("shutdown requested");
}
