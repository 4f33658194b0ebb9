//! `switchboard admin`: operator commands. They talk to the running node over its
//! admin socket (`DATA_DIR/admin.sock`); when no node runs on the data dir, they open
//! the database themselves (sled lets one process open it at a time). A node on a
//! cluster answers from the cluster; with no node running, a cluster node's data
//! dir (its `cluster-node` mark) or config is refused rather than its own database
//! read.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use switchboard::admin::{AdminClient, AdminError, AdminReply, AdminRequest, NodeStats};
use switchboard::config::Config;
use switchboard::store::backup::{self, BackupSummary};
use switchboard::store::{AccountSummary, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's data dir (default: `server.data_dir` of --config, else
    /// ./switchboard-data).
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// The node's config file, to find its data dir.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Accounts, devices, queued messages, data dir size, uptime.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Every account, with its devices and queues.
    Accounts {
        #[arg(long)]
        json: bool,
    },
    /// One account in detail.
    Account {
        /// The phone number (E.164, e.g. +14155550100).
        number: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an account: its devices, keys, queued messages, registration lock and
    /// discovery index entry. Its live connections are closed.
    Delete {
        number: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Write a consistent snapshot of the node's data (database and self-signed
    /// certificate) to FILE, while the node runs. The file holds the node's secrets:
    /// keep it as safe as the data dir.
    Backup { file: PathBuf },
    /// Rebuild a data dir from a backup FILE. The data dir must not exist or be empty,
    /// and no node may run on it.
    Restore { file: PathBuf },
    /// Re-key the contact-discovery index: a new OPRF key, the index rebuilt under it.
    /// Clients notice the new key version and run discovery again.
    RotateDiscoveryKey,
    /// Move this node's data into a cluster (see README, "Cluster mode"): accounts,
    /// devices, keys, groups, profiles, undelivered messages and attachments. The
    /// node must be stopped, and the cluster empty (or holding this node's export
    /// that broke off: run again, it goes on). Its nodes should use this node's
    /// certificate, so that clients keep their pin.
    ExportToCluster {
        /// The cluster nodes' config file: its `[cluster] nats`, `replicas`,
        /// `[messages]` TTL and `server.tls_cert`/`tls_key` are used.
        #[arg(long = "to", value_name = "CLUSTER_CONFIG")]
        to: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config.as_deref().map(Config::load).transpose()?;
    let data = match (args.data, &config) {
        (Some(d), _) => d,
        (None, Some(c)) => c.server.data_dir.clone(),
        (None, None) => Config::default().server.data_dir,
    };
    let exporting = matches!(args.command, Command::ExportToCluster { .. });
    if config.as_ref().is_some_and(|c| c.cluster.enabled())
        && !exporting
        && matches!(
            AdminClient::connect(&data).await,
            Err(AdminError::NotRunning(_))
        )
    {
        bail!(
            "this node runs on a NATS cluster (`[cluster] nats` in its config): admin commands \
             ask a running node of the cluster, and none runs on {}",
            data.display()
        );
    }
    match args.command {
        Command::Stats { json } => {
            let stats = match ask(&data, AdminRequest::Stats).await? {
                Some(AdminReply::Stats(s)) => s,
                Some(other) => bail!("unexpected answer: {other:?}"),
                None => offline(&data, |store| {
                    Ok(NodeStats {
                        store: store.counts()?,
                        online_devices: None,
                        connections: None,
                        data_dir_bytes: switchboard::admin::dir_size(&data),
                        uptime_secs: None,
                        schema_version: store.schema_version(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    })
                })?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(())
        }
        Command::Accounts { json } => {
            let accounts = match ask(&data, AdminRequest::Accounts).await? {
                Some(AdminReply::Accounts(a)) => a,
                Some(other) => bail!("unexpected answer: {other:?}"),
                None => offline(&data, |store| Ok(store.accounts()?))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&accounts)?);
            } else {
                print_accounts(&accounts);
            }
            Ok(())
        }
        Command::Account { number, json } => {
            let number = e164(&number)?;
            let account = account(&data, &number).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&account)?);
            } else {
                print_account(&account);
            }
            Ok(())
        }
        Command::Delete { number, yes } => delete(&data, &e164(&number)?, yes).await,
        Command::Backup { file } => backup_to(&data, &file).await,
        Command::Restore { file } => restore_from(&data, &file).await,
        Command::ExportToCluster { to, json } => {
            export_to_cluster(&data, args.config.as_deref(), &to, json).await
        }
        Command::RotateDiscoveryKey => {
            let (version, accounts) = match ask(&data, AdminRequest::RotateDiscoveryKey).await? {
                Some(AdminReply::Rotated { version, accounts }) => (version, accounts),
                Some(other) => bail!("unexpected answer: {other:?}"),
                None => offline(&data, |store| {
                    let accounts = store.account_count() as u64;
                    Ok((store.rotate_discovery_key()?, accounts))
                })?,
            };
            println!(
                "discovery key rotated to version {version}; the index of {accounts} accounts \
                 was rebuilt under it"
            );
            Ok(())
        }
    }
}

async fn export_to_cluster(
    data: &Path,
    node_config: Option<&Path>,
    to: &Path,
    json: bool,
) -> anyhow::Result<()> {
    if ask(data, AdminRequest::Stats).await?.is_some() {
        bail!(
            "a node runs on {}: stop it first (its clients then wait, and carry on \
             through the cluster once their server addresses name its nodes)",
            data.display()
        );
    }
    let cluster = Config::load(to)?;
    // The certificate clients pinned: the node's own, or the one its config named.
    let tls = match node_config
        .map(Config::load)
        .transpose()?
        .and_then(|c| c.server.tls)
    {
        Some(files) => (files.cert, files.key),
        None => (data.join("tls/cert.pem"), data.join("tls/key.pem")),
    };
    let node = switchboard::tls::Credentials::load_pem(&tls.0, &tls.1)
        .with_context(|| format!("the node's certificate {}", tls.0.display()))?;
    let quiet = json;
    let progress = move |what: &str| {
        if !quiet {
            eprintln!("exporting {what}...");
        }
    };
    let report = switchboard::node::export::export_to_cluster(data, &node, &cluster, &progress)
        .await
        .with_context(|| {
            format!(
                "exporting {} to the cluster of {}",
                data.display(),
                to.display()
            )
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "exported {} accounts ({} devices, {} one-time keys, {} removed keys), {} profiles, \
         {} groups, {} queued items ({} group messages; {} expired left behind, {} receipts \
         dropped at the queue limit), {} attachments ({}; {} unfinished or expired left \
         behind); {} numbers indexed for discovery",
        report.accounts,
        report.devices,
        report.one_time_keys,
        report.removed_keys,
        report.profiles,
        report.groups,
        report.queue_items,
        report.group_messages,
        report.expired_items,
        report.dropped_receipts,
        report.attachments,
        HumanBytes(report.attachment_bytes),
        report.attachments_left,
        report.indexed,
    );
    if report.certificate_changed() {
        println!(
            "warning: the cluster's certificate ({}) is not the node's ({}): every client must \
             pin the new one. Give the cluster's nodes the node's certificate and key to avoid it.",
            report.cluster_fingerprint, report.node_fingerprint
        );
    } else {
        println!(
            "the cluster's nodes use the node's certificate ({}): clients keep their pin",
            report.node_fingerprint
        );
    }
    Ok(())
}

fn e164(number: &str) -> anyhow::Result<String> {
    Ok(switchboard::phone::Number::parse_e164(number.trim())
        .with_context(|| format!("{number:?} is not a phone number in E.164 form (+14155550100)"))?
        .to_string())
}

/// Asks the running node; `None` when no node runs on `data`.
async fn ask(data: &Path, request: AdminRequest) -> anyhow::Result<Option<AdminReply>> {
    match AdminClient::connect(data).await {
        Ok(mut client) => Ok(Some(client.ask(&request).await?)),
        Err(AdminError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Runs `f` on the data dir's database, opened here because no node runs on it.
fn offline<T>(data: &Path, f: impl FnOnce(&Store) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let db = data.join("db");
    if !db.exists() {
        bail!("{} holds no node database", data.display());
    }
    if switchboard::admin::cluster_mark(data).exists() {
        bail!(
            "the node of {} runs on a NATS cluster: admin commands ask a running node of \
             the cluster (its own database here holds none of the cluster's accounts)",
            data.display()
        );
    }
    let store = Store::open(&db).with_context(|| {
        format!(
            "opening {} (a node seems to hold it, but its admin socket {} does not answer)",
            db.display(),
            switchboard::admin::socket_path(data).display()
        )
    })?;
    let result = f(&store)?;
    store.flush_blocking()?;
    Ok(result)
}

async fn account(data: &Path, number: &str) -> anyhow::Result<AccountSummary> {
    match ask(
        data,
        AdminRequest::Account {
            number: number.to_string(),
        },
    )
    .await?
    {
        Some(AdminReply::Account(a)) => Ok(a),
        Some(other) => bail!("unexpected answer: {other:?}"),
        None => offline(data, |store| {
            store
                .account_summary(number)?
                .with_context(|| format!("{number} has no account on this node"))
        }),
    }
}

async fn delete(data: &Path, number: &str, yes: bool) -> anyhow::Result<()> {
    let account = account(data, number).await?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("not deleting {number} without confirmation: give --yes when not at a terminal");
        }
        let queued: u64 = account.devices.iter().map(|d| d.queued).sum();
        eprint!(
            "Delete {number} (account {}), its {} device(s) and {queued} queued item(s)? \
             This cannot be undone. Type the number again to confirm: ",
            account.account_id,
            account.devices.len()
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if e164(&answer).ok().as_deref() != Some(number) {
            bail!("not confirmed; nothing was deleted");
        }
    }
    let request = AdminRequest::Delete {
        number: number.to_string(),
    };
    match ask(data, request).await? {
        Some(AdminReply::Deleted {
            number,
            devices,
            queued_items,
            connections_closed,
        }) => println!(
            "deleted {number}: {devices} device(s), {queued_items} queued item(s), \
             {connections_closed} connection(s) closed"
        ),
        Some(other) => bail!("unexpected answer: {other:?}"),
        None => {
            let deleted = offline(data, |store| {
                store
                    .delete_account(number)?
                    .with_context(|| format!("{number} has no account on this node"))
            })?;
            println!(
                "deleted {number}: {} device(s), {} queued item(s)",
                deleted.devices.len(),
                deleted.queued_items
            );
        }
    }
    Ok(())
}

fn entries_bar(estimate: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(estimate.max(1));
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} entries, {{elapsed}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// The file is written as FILE.partial and renamed when complete and checked.
async fn backup_to(data: &Path, file: &Path) -> anyhow::Result<()> {
    if file.exists() {
        bail!("{} exists; choose a new file name", file.display());
    }
    let partial = file.with_extension("partial");
    let result = async {
        let out = switchboard::fsutil::create_private(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let summary = match AdminClient::connect(data).await {
            Ok(mut client) => {
                let estimate = match client.ask(&AdminRequest::Backup).await? {
                    AdminReply::BackupStarting { entries_estimate } => entries_estimate,
                    other => bail!("unexpected answer: {other:?}"),
                };
                let stream = client.into_stream();
                // The bytes arrive on a socket; checking them as they are written is
                // blocking work, so it runs on a blocking thread over a sync bridge.
                let reader = tokio_util::io::SyncIoBridge::new(stream);
                tokio::task::spawn_blocking(move || receive_backup(reader, out, estimate)).await??
            }
            Err(AdminError::NotRunning(_)) => {
                let data = data.to_path_buf();
                let summary = tokio::task::spawn_blocking(move || {
                    offline(&data, |store| {
                        let bar = entries_bar(store.entry_estimate(), "backup");
                        let files = switchboard::admin::backup_files(&data);
                        let mut out = std::io::BufWriter::new(out);
                        let summary =
                            store.write_backup(&mut out, &files, |n| bar.set_position(n))?;
                        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                        bar.finish_and_clear();
                        Ok(summary)
                    })
                })
                .await??;
                // Read it back, as the online path checks what it receives.
                let written = std::fs::File::open(&partial)?;
                let (_, checked) =
                    backup::read_backup(std::io::BufReader::new(written), |_, _| Ok(()))?;
                if checked != summary {
                    bail!("the written backup does not read back as it was written");
                }
                summary
            }
            Err(e) => return Err(e.into()),
        };
        Ok(summary)
    }
    .await;
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context("backup failed; no backup file was written"));
        }
    };
    std::fs::rename(&partial, file)?;
    println!(
        "backup written to {}: {} entries in {} trees, {} file(s), {}; checksum verified",
        file.display(),
        summary.entries,
        summary.trees,
        summary.files,
        HumanBytes(summary.bytes)
    );
    // Attachments are files beside the database, not in it: say so, with what to copy.
    let blobs = data.join("blobs");
    let (count, bytes) = std::fs::read_dir(&blobs)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok().filter(std::fs::Metadata::is_file))
                .fold((0u64, 0u64), |(n, b), m| (n + 1, b + m.len()))
        })
        .unwrap_or((0, 0));
    println!(
        "attachments NOT included: {count} file(s), {} under {} (copy that directory beside the backup to keep them)",
        HumanBytes(bytes),
        blobs.display()
    );
    Ok(())
}

/// Copies the backup stream into `out`, decoding it on the way: the progress comes
/// from the entries seen, and a stream cut short or damaged is an error.
fn receive_backup(
    reader: impl std::io::Read,
    out: std::fs::File,
    estimate: u64,
) -> anyhow::Result<BackupSummary> {
    struct Tee<R, W> {
        inner: R,
        copy: W,
    }
    impl<R: std::io::Read, W: Write> std::io::Read for Tee<R, W> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.copy.write_all(&buf[..n])?;
            Ok(n)
        }
    }
    let bar = entries_bar(estimate, "backup");
    let mut tee = Tee {
        inner: reader,
        copy: std::io::BufWriter::with_capacity(256 * 1024, out),
    };
    let mut seen = 0u64;
    let (_, summary) = backup::read_backup(std::io::BufReader::new(&mut tee), |_, record| {
        if let backup::Record::Entry(..) = record {
            seen += 1;
            if seen.is_multiple_of(1024) {
                bar.set_position(seen);
            }
        }
        Ok(())
    })
    .map_err(|e| match e {
        backup::BackupError::Invalid(why) if why.contains("truncated") => {
            anyhow::anyhow!("the node stopped sending the backup midway (see the node's log)")
        }
        e => e.into(),
    })?;
    bar.finish_and_clear();
    tee.copy
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(summary)
}

async fn restore_from(data: &Path, file: &Path) -> anyhow::Result<()> {
    if let Ok(mut client) = AdminClient::connect(data).await
        && client.ask(&AdminRequest::Stats).await.is_ok()
    {
        bail!(
            "a node is running on {}; stop it, and restore into a new or empty data dir",
            data.display()
        );
    }
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = input.metadata()?.len();
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("restore [{bar:30}] {bytes}/{total_bytes}, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let data2 = data.to_path_buf();
    let reader = std::io::BufReader::with_capacity(256 * 1024, bar.wrap_read(input));
    let summary =
        tokio::task::spawn_blocking(move || backup::restore(reader, &data2, |_| {})).await??;
    bar.finish_and_clear();
    println!(
        "restored {} entries in {} trees and {} file(s) into {}; start the node on it",
        summary.entries,
        summary.trees,
        summary.files,
        data.display()
    );
    Ok(())
}

fn when(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now()
        .duration_since(at)
        .map(|d| Duration::from_secs(d.as_secs()))
        .unwrap_or_default();
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_seconds(at),
        humantime::format_duration(ago)
    )
}

fn print_stats(s: &NodeStats) {
    let or_stopped =
        |v: Option<u64>| v.map_or("- (node not running)".to_string(), |n| n.to_string());
    println!("accounts          {}", s.store.accounts);
    println!("devices           {}", s.store.devices);
    println!("online devices    {}", or_stopped(s.online_devices));
    println!("connections       {}", or_stopped(s.connections));
    println!("queued messages   {}", s.store.queued_messages);
    println!("queued receipts   {}", s.store.queued_receipts);
    println!("queued bytes      {}", HumanBytes(s.store.queued_bytes));
    println!(
        "oldest queued     {}",
        s.store.oldest_queued_ms.map_or("-".to_string(), when)
    );
    println!("data dir          {}", HumanBytes(s.data_dir_bytes));
    println!(
        "uptime            {}",
        s.uptime_secs
            .map_or("- (node not running)".to_string(), |u| {
                humantime::format_duration(Duration::from_secs(u)).to_string()
            })
    );
    println!(
        "version           {} (schema {})",
        s.version, s.schema_version
    );
}

fn print_accounts(accounts: &[AccountSummary]) {
    println!(
        "{:<18} {:>8} {:>8} {:>8}  {:<6} last seen",
        "number", "account", "devices", "queued", "lock"
    );
    for a in accounts {
        let queued: u64 = a.devices.iter().map(|d| d.queued).sum();
        println!(
            "{:<18} {:>8} {:>8} {:>8}  {:<6} {}",
            a.number,
            a.account_id,
            a.devices.len(),
            queued,
            if a.registration_lock { "yes" } else { "no" },
            a.last_seen_ms.map_or("-".to_string(), when)
        );
    }
    println!("{} account(s)", accounts.len());
}

fn print_account(a: &AccountSummary) {
    println!("number            {}", a.number);
    println!("account           {}", a.account_id);
    println!("registered        {}", when(a.created_at_ms));
    println!(
        "last seen         {}",
        a.last_seen_ms.map_or("-".to_string(), when)
    );
    println!(
        "registration lock {}",
        if a.registration_lock { "set" } else { "none" }
    );
    for d in &a.devices {
        let role = match (&d.primary, &d.name) {
            (true, _) => "primary".to_string(),
            (false, Some(name)) => format!("linked \"{name}\""),
            (false, None) => "linked".to_string(),
        };
        println!(
            "device {:<4} {role}, key {}…, {} {}, last seen {}, {} queued ({}), keys {}, {} one-time keys",
            d.device_id,
            &d.key_id[..16.min(d.key_id.len())],
            if d.primary { "registered" } else { "linked" },
            when(d.created_at_ms),
            d.last_seen_ms.map_or("-".to_string(), when),
            d.queued,
            HumanBytes(d.queued_bytes),
            if d.keys_published {
                "published"
            } else {
                "not published"
            },
            d.one_time_keys
        );
    }
}
