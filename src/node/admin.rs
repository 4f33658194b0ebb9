//! The admin socket: `DATA_DIR/admin.sock`, owner-only, one request per connection
//! (the protocol is in `crate::admin`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Shared, cluster_admin};
use crate::admin::{self, AdminReply, AdminRequest, NodeStats};
use crate::proto::codes;

/// Binds the socket in `data_dir`, replacing a stale one (the store's lock already
/// proves no other node runs on this data dir), readable and writable by the owner
/// only.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    remove_stale_backups(data_dir);
    let path = admin::socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the socket until `stop`, then removes it.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let owner = std::fs::metadata(&shared.config.server.data_dir).map(|m| m.uid());
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The socket's mode already keeps other users out; this also refuses a peer
        // that got a descriptor some other way.
        let peer = stream.peer_cred().map(|c| c.uid());
        match (&owner, peer) {
            (Ok(owner), Ok(peer)) if *owner == peer || peer == 0 => {}
            (_, peer) => {
                tracing::warn!(
                    ?peer,
                    "admin socket: refused a peer that is not the data dir's owner"
                );
                continue;
            }
        }
        let shared = shared.clone();
        tracker.spawn(async move {
            if let Err(e) = handle(stream, &shared).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    let _ = std::fs::remove_file(admin::socket_path(&shared.config.server.data_dir));
}

async fn reply(stream: &mut UnixStream, reply: &AdminReply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(stream: UnixStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        (&mut reader)
            .take(admin::MAX_REQUEST_BYTES as u64)
            .read_until(b'\n', &mut line),
    )
    .await
    .map_err(|_| std::io::Error::other("no request in time"))??;
    let mut stream = reader.into_inner();
    if n == 0 {
        return Ok(());
    }
    let request = match serde_json::from_slice::<AdminRequest>(&line) {
        Ok(r) => r,
        Err(e) => {
            let message = if line.last() != Some(&b'\n') {
                format!("request line over {} bytes", admin::MAX_REQUEST_BYTES)
            } else {
                format!("bad request: {e}")
            };
            return reply(&mut stream, &AdminReply::Error { message }).await;
        }
    };
    tracing::info!(?request, "admin request");
    if let Some(c) = &shared.cluster {
        let answer = on_cluster(shared, c, request).await;
        return reply(&mut stream, &answer).await;
    }
    let answer = match request {
        AdminRequest::Backup => return backup(stream, shared).await,
        AdminRequest::Stats => stats(shared).await,
        AdminRequest::Accounts => {
            let store = shared.store.clone();
            blocking(move || store.accounts().map(AdminReply::Accounts)).await
        }
        AdminRequest::Account { number } => {
            let store = shared.store.clone();
            blocking(move || {
                Ok(match store.account_summary(&number)? {
                    Some(a) => AdminReply::Account(a),
                    None => AdminReply::Error {
                        message: format!("{number} has no account on this node"),
                    },
                })
            })
            .await
        }
        AdminRequest::Delete { number } => delete(shared, number).await,
        AdminRequest::RotateDiscoveryKey => {
            let store = shared.store.clone();
            let answer = blocking(move || {
                let accounts = store.account_count() as u64;
                let version = store.rotate_discovery_key()?;
                Ok(AdminReply::Rotated { version, accounts })
            })
            .await;
            shared.discovery.mark_dirty();
            if let Err(e) = shared.discovery.refresh(&shared.store).await {
                tracing::error!(error = %e, "rebuilding the discovery filter after rotation failed");
            }
            answer
        }
    };
    reply(&mut stream, &answer).await
}

/// The answer of a node on a cluster, from the cluster (`cluster_admin`). Backups and
/// rotating the discovery key are refused: the cluster is backed up with NATS's
/// own tools, and its discovery key is derived from the shared TLS key.
async fn on_cluster(
    shared: &Arc<Shared>,
    c: &super::engine::ClusterEngine,
    request: AdminRequest,
) -> AdminReply {
    let answer = match request {
        AdminRequest::Stats => match cluster_admin::counts(c).await {
            // The data dir's size is read off the async threads.
            Ok(counts) => {
                let shared = shared.clone();
                return blocking(move || Ok(AdminReply::Stats(node_stats(&shared, counts)))).await;
            }
            Err(e) => Err(e),
        },
        AdminRequest::Accounts => cluster_admin::accounts(c).await.map(AdminReply::Accounts),
        AdminRequest::Account { number } => {
            cluster_admin::account(c, number.clone())
                .await
                .map(|found| match found {
                    Some(a) => AdminReply::Account(a),
                    None => AdminReply::Error {
                        message: format!("{number} has no account on this cluster"),
                    },
                })
        }
        AdminRequest::Backup => Ok(AdminReply::Error {
            message: "this node runs on a NATS cluster: back the cluster up with NATS's own \
                      tools (`nats stream backup`, see README, \"Cluster mode\")"
                .into(),
        }),
        AdminRequest::RotateDiscoveryKey => Ok(AdminReply::Error {
            message: "this node runs on a NATS cluster: rotate-discovery-key works on a \
                      single node only (a cluster's discovery key is derived from the nodes' \
                      shared TLS key)"
                .into(),
        }),
        AdminRequest::Delete { number } => return delete(shared, number).await,
    };
    answer.unwrap_or_else(|e| AdminReply::Error {
        message: e.to_string(),
    })
}

/// Runs a store call on the blocking pool; a failure becomes an error reply.
async fn blocking(
    f: impl FnOnce() -> Result<AdminReply, crate::store::StoreError> + Send + 'static,
) -> AdminReply {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => AdminReply::Error {
            message: e.to_string(),
        },
        Err(e) => AdminReply::Error {
            message: format!("the task failed: {e}"),
        },
    }
}

async fn stats(shared: &Arc<Shared>) -> AdminReply {
    let store = shared.store.clone();
    let shared = shared.clone();
    blocking(move || Ok(AdminReply::Stats(node_stats(&shared, store.counts()?)))).await
}

/// The node's own figures beside `counts`.
fn node_stats(shared: &Shared, counts: crate::store::StoreCounts) -> NodeStats {
    NodeStats {
        store: counts,
        online_devices: Some(shared.connections.devices_online() as u64),
        connections: Some(shared.metrics.connections_open.get().max(0) as u64),
        data_dir_bytes: admin::dir_size(&shared.config.server.data_dir),
        uptime_secs: Some(shared.started.elapsed().as_secs()),
        schema_version: shared.store.schema_version(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

async fn delete(shared: &Arc<Shared>, number: String) -> AdminReply {
    let parsed = match crate::phone::Number::parse_e164(number.trim()) {
        Ok(n) => n.to_string(),
        Err(e) => {
            return AdminReply::Error {
                message: format!("{number:?}: {e}"),
            };
        }
    };
    let store = shared.store.clone();
    let target = parsed.clone();
    // As for a registration: caches filled before or during the change die with it.
    shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
    let deleted = match &shared.cluster {
        Some(c) => cluster_admin::delete(c, &target, crate::store::wall_ms())
            .await
            .map_err(|e| e.to_string()),
        None => match tokio::task::spawn_blocking(move || store.delete_account(&target)).await {
            Ok(done) => done.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the task failed: {e}")),
        },
    };
    shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
    let deleted = match deleted {
        Ok(Some(d)) => d,
        Ok(None) => {
            let place = if shared.cluster.is_some() {
                "this cluster"
            } else {
                "this node"
            };
            return AdminReply::Error {
                message: format!("{parsed} has no account on {place}"),
            };
        }
        Err(message) => return AdminReply::Error { message },
    };
    if shared.cluster.is_none()
        && let Err(e) = shared.commit.durable().await
    {
        return AdminReply::Error {
            message: format!("the account was deleted but could not be made durable: {e}"),
        };
    }
    shared.discovery.mark_dirty();
    let closed = shared.connections.close(
        &deleted.key_ids,
        codes::ACCOUNT_DELETED,
        b"account deleted by the node's operator",
    );
    tracing::info!(
        number = %parsed,
        devices = deleted.devices.len(),
        queued_items = deleted.queued_items,
        connections_closed = closed,
        "account deleted by the operator"
    );
    AdminReply::Deleted {
        number: parsed,
        devices: deleted.devices.len() as u64,
        queued_items: deleted.queued_items,
        connections_closed: closed as u64,
    }
}

/// Takes a backup: the snapshot is written to a temporary file in the data dir while
/// the store's write gate is held (writes wait only for that, not for the client),
/// then the `BackupStarting` line and the file's bytes go to the client, and the
/// file is removed.
async fn backup(mut stream: UnixStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let data_dir = shared.config.server.data_dir.clone();
    let tmp = data_dir.join(format!(
        "{TMP_PREFIX}{}.tmp",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let store = shared.store.clone();
    let files = admin::backup_files(&data_dir);
    let path = tmp.clone();
    let started = std::time::Instant::now();
    let snapshot = tokio::task::spawn_blocking(move || {
        let file = crate::fsutil::create_private(&path)?;
        let mut out = std::io::BufWriter::new(file);
        let summary = store
            .write_backup(&mut out, &files, |_| {})
            .map_err(std::io::Error::other)?;
        out.into_inner().map_err(|e| e.into_error())?;
        Ok::<_, std::io::Error>(summary)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    let summary = match snapshot {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!(error = %e, "backup failed");
            return reply(
                &mut stream,
                &AdminReply::Error {
                    message: format!("backup failed: {e}"),
                },
            )
            .await;
        }
    };
    let snapshot_ms = started.elapsed().as_millis() as u64;
    let sent = async {
        reply(
            &mut stream,
            &AdminReply::BackupStarting {
                entries_estimate: summary.entries,
            },
        )
        .await?;
        let mut file = tokio::fs::File::open(&tmp).await?;
        tokio::io::copy(&mut file, &mut stream).await?;
        stream.shutdown().await
    }
    .await;
    let _ = std::fs::remove_file(&tmp);
    match &sent {
        Ok(()) => tracing::info!(
            entries = summary.entries,
            bytes = summary.bytes,
            snapshot_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "backup sent"
        ),
        Err(e) => tracing::warn!(error = %e, "the admin client left during the backup"),
    }
    sent
}

/// Temporary backup files in the data dir start with this.
const TMP_PREFIX: &str = "backup-";

/// Removes temporary backup files a crash left in the data dir.
fn remove_stale_backups(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
