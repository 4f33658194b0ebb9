//! `switchboard admin export-to-cluster`: a stopped single node's data moved into
//! a cluster (issue "Beyond one machine"), so a community that outgrows one machine
//! keeps its accounts, devices, keys, groups, profiles, undelivered messages and
//! attachments.
//!
//! The node's database is read (`store::export`) and each record written the way
//! the cluster keeps it (the `import` methods of `cluster::*`), concern by concern,
//! accounts first (the rest names them). What it promises:
//!
//! - **Into an empty cluster only.** It refuses a cluster that has accounts,
//!   unless they are those of an export of the same node that did not finish (the
//!   `x.export` mark, taken by compare-and-set, so of two exports at once one
//!   begins): run again after a failure, it goes on where it broke off, each
//!   record written again changing nothing and each queue item published under a
//!   name the stream deduplicates for a day (past that day it refuses to go on).
//!   No cluster node serves while the mark says unfinished, so nothing changes
//!   under a resumed export. A finished export is not run twice (the cluster's
//!   nodes may have served since).
//! - **A new discovery key version.** The cluster's key (derived from the shared
//!   TLS key) is given the node's version plus one, kept in the mark: clients see
//!   the version change and look their contacts up again (answers under the
//!   node's key would find no one in the cluster's index).
//! - **Order kept.** Queue items are published in the order the node queued them
//!   (one counter across every queue), so each device's queue, and each sender's
//!   messages within it, read back in their order.
//! - **The node's certificate.** Clients pinned the node's certificate: the
//!   cluster's nodes should use it (`server.tls_cert`/`tls_key`), or every client
//!   must pin a new one. The report says which.
//!
//! Not moved: pending verification codes and code-send counters (a registration
//! under way starts again), link codes (minutes of life), attachments not uploaded
//! whole (the client uploads again) or whose file is gone, queue items and
//! attachments past the TTL. The discovery index is written anew under the
//! cluster's key. A message's TTL on the cluster counts from the export.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::engine::{ClusterEngine, DUPLICATE_WINDOW, Purpose};
use crate::cluster::ClusterError;
use crate::cluster::accounts::{ExportMark, ExportStart};
use crate::config::Config;
use crate::discovery::DiscoveryKey;
use crate::store::queue_store::{GroupSend, Outgoing, QueueStore};
use crate::store::records::{self, QueueItem};
use crate::store::{AppendOutcome, DeviceRef, GroupAppend, Store, StoreError, blocking as read};
use crate::tls::{Credentials, TlsError};

/// What an export moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    pub accounts: u64,
    pub devices: u64,
    pub one_time_keys: u64,
    pub removed_keys: u64,
    pub profiles: u64,
    pub groups: u64,
    /// Queued messages and receipts published to the cluster.
    pub queue_items: u64,
    /// Group messages among them (each body stored once).
    pub group_messages: u64,
    /// Items past the TTL or their own expiry, left behind.
    pub expired_items: u64,
    /// Receipts for a sender whose receipts were at the queue limit, dropped.
    pub dropped_receipts: u64,
    pub attachments: u64,
    pub attachment_bytes: u64,
    /// Attachments not whole, or past the TTL, left behind.
    pub attachments_left: u64,
    /// Numbers written to the discovery index.
    pub indexed: u64,
    /// The node's certificate fingerprint, and the cluster's.
    pub node_fingerprint: String,
    pub cluster_fingerprint: String,
}

impl ExportReport {
    /// Whether clients must pin a new certificate.
    pub fn certificate_changed(&self) -> bool {
        self.node_fingerprint != self.cluster_fingerprint
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0} holds no node database")]
    NoDatabase(PathBuf),
    #[error("the cluster config has no [cluster] nats addresses")]
    NotCluster,
    #[error(
        "the cluster config has no server.tls_cert/tls_key: the cluster's nodes share one \
         certificate (give them the node's, {0}/tls/cert.pem and key.pem, so clients keep \
         their pin)"
    )]
    NoSharedCertificate(PathBuf),
    #[error("the node's database: {0}")]
    Store(#[from] StoreError),
    #[error("a certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("the cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("the cluster has accounts already: an export goes into an empty cluster")]
    NotEmpty,
    #[error(
        "a switchboard node ran on the cluster in the last five minutes: stop every cluster \
         node, export, then start them"
    )]
    NodesServing,
    #[error("the cluster holds an export of another node (certificate {0}) that did not finish")]
    OtherExport(String),
    #[error("this node was exported to the cluster already (finished); nothing was written")]
    Finished,
    #[error(
        "the export broke off more than a day ago: going on would queue twice what it \
         published then; empty the cluster (its streams and buckets) and export again"
    )]
    TooLate,
    #[error(
        "{number} belongs to account {holder} on the cluster, not to account {id} as on the node"
    )]
    NumberTaken {
        number: String,
        holder: u64,
        id: u64,
    },
    #[error("the queue of account {} device {} is full on the cluster", .0.account_id, .0.device_id)]
    QueueFull(DeviceRef),
}

/// Moves the data of the stopped node in `data_dir`, whose certificate is `node`,
/// into the cluster `cluster_config` names. `progress` hears what it is doing.
pub async fn export_to_cluster(
    data_dir: &Path,
    node: &Credentials,
    cluster_config: &Config,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<ExportReport, ExportError> {
    if !cluster_config.cluster.enabled() {
        return Err(ExportError::NotCluster);
    }
    let files = cluster_config
        .server
        .tls
        .as_ref()
        .ok_or_else(|| ExportError::NoSharedCertificate(data_dir.to_path_buf()))?;
    let shared = Credentials::load_pem(&files.cert, &files.key)?;
    let db = data_dir.join("db");
    if !db.exists() {
        return Err(ExportError::NoDatabase(data_dir.to_path_buf()));
    }
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| StoreError::Corrupt(format!("opening task failed: {e}")))??;
    let node_version = store.discovery_key().version();
    progress("connecting to the cluster");
    // The key every cluster node derives (`Node::bind`), one version above the node's.
    let engine = ClusterEngine::open(
        cluster_config,
        shared.derive_secret("discovery key"),
        Purpose::Export { node_version },
    )
    .await?;
    let discovery = engine.discovery.key();
    let mut report = ExportReport {
        node_fingerprint: node.fingerprint().to_string(),
        cluster_fingerprint: shared.fingerprint().to_string(),
        ..ExportReport::default()
    };
    let window = cluster_config.messages.ttl.min(DUPLICATE_WINDOW);
    let mark = begin(
        &engine,
        &report.node_fingerprint,
        discovery.version(),
        window,
    )
    .await?;

    let exporter = Exporter {
        store,
        engine,
        data_dir: data_dir.to_path_buf(),
        now_ms: crate::node::clock::now_ms(),
        ttl_ms: cluster_config.messages.ttl.as_millis() as u64,
    };
    progress("accounts, devices, keys and profiles");
    exporter.accounts(&discovery, &mut report).await?;
    progress("groups");
    exporter.groups(&mut report).await?;
    progress("queued messages");
    exporter.queues(&mut report).await?;
    progress("attachments");
    exporter.attachments(&mut report).await?;
    exporter
        .engine
        .accounts
        .set_export_mark(&ExportMark { done: true, ..mark })
        .await?;
    Ok(report)
}

/// Checks that the cluster may take this node's data and marks the export begun
/// (in one compare-and-set: of two exports at once, one begins).
async fn begin(
    engine: &ClusterEngine,
    source: &str,
    discovery_version: u32,
    window: std::time::Duration,
) -> Result<ExportMark, ExportError> {
    let accounts = &engine.accounts;
    let now = crate::node::clock::now_ms();
    let fresh = ExportMark {
        source: source.to_string(),
        started_at_ms: now,
        done: false,
        discovery_version,
    };
    if accounts.export_mark().await?.is_none() {
        if accounts.any_account().await? {
            return Err(ExportError::NotEmpty);
        }
        // A node serving now would go on under the old discovery key, and could
        // change what the export writes.
        if engine.quotas.node_ran_recently(now, 5 * 60_000).await? {
            return Err(ExportError::NodesServing);
        }
    }
    match accounts.begin_export(&fresh).await? {
        ExportStart::Fresh => Ok(fresh),
        ExportStart::Finished => Err(ExportError::Finished),
        ExportStart::Other(source) => Err(ExportError::OtherExport(source)),
        ExportStart::Resume(mark) => {
            // Published again later, the queue items would be queued twice.
            if now.saturating_sub(mark.started_at_ms) >= window.as_millis() as u64 {
                return Err(ExportError::TooLate);
            }
            Ok(mark)
        }
    }
}

struct Exporter {
    store: Store,
    engine: ClusterEngine,
    data_dir: PathBuf,
    now_ms: u64,
    ttl_ms: u64,
}

impl Exporter {
    async fn accounts(
        &self,
        discovery: &DiscoveryKey,
        report: &mut ExportReport,
    ) -> Result<(), ExportError> {
        let e = &self.engine;
        let ids = read(&self.store, |s| s.export_account_ids()).await?;
        for id in ids {
            let Some(account) = read(&self.store, move |s| s.export_account(id)).await? else {
                continue;
            };
            if let Err(taken) = e.accounts.import(&account).await? {
                return Err(ExportError::NumberTaken {
                    number: taken.number,
                    holder: taken.holder,
                    id: taken.id,
                });
            }
            for (device_id, keys) in &account.keys {
                let device = DeviceRef {
                    account_id: id,
                    device_id: *device_id,
                };
                e.keys.import(device, keys).await?;
                report.one_time_keys += keys.one_time.len() as u64;
            }
            if let Some(profile) = &account.profile {
                e.profiles.import(id, profile).await?;
                report.profiles += 1;
            }
            let prf = discovery
                .prf(&account.record.number)
                .map_err(|err| StoreError::Corrupt(format!("discovery: {err}")))?;
            e.discovery.index(&prf, id).await?;
            report.indexed += 1;
            report.accounts += 1;
            report.devices += account.record.devices.len() as u64;
        }
        for (key_id, removed) in read(&self.store, |s| s.export_removed_keys()).await? {
            e.accounts.import_removed(&key_id, removed).await?;
            report.removed_keys += 1;
        }
        Ok(())
    }

    async fn groups(&self, report: &mut ExportReport) -> Result<(), ExportError> {
        for (id, group) in read(&self.store, |s| s.export_groups()).await? {
            self.engine.groups.import(id, &group).await?;
            report.groups += 1;
        }
        Ok(())
    }

    /// Whether an item queued at `queued_at_ms` (expiring at `expires`) is gone.
    fn expired(&self, queued_at_ms: u64, expires: Option<u64>) -> bool {
        queued_at_ms.saturating_add(self.ttl_ms) <= self.now_ms
            || expires.is_some_and(|at| at <= self.now_ms)
    }

    async fn queues(&self, report: &mut ExportReport) -> Result<(), ExportError> {
        let order = read(&self.store, |s| s.export_queue_order()).await?;
        // Who still holds each group message: they get it in one send.
        let holders = {
            let order = order.clone();
            read(&self.store, move |s| {
                let mut holders: HashMap<u64, Vec<DeviceRef>> = HashMap::new();
                for (seq, device) in order {
                    if let Some(item) = s.export_queue_item(device, seq)?
                        && let QueueItem::GroupMessage { body_ref, .. } = item.item
                    {
                        holders.entry(body_ref).or_default().push(device);
                    }
                }
                Ok(holders)
            })
            .await?
        };
        // Group messages dealt with, by body: published (true) or aged out.
        let mut done_groups: HashMap<u64, bool> = HashMap::new();
        let queues = &self.engine.queues;
        for (seq, device) in order {
            let Some(x) = read(&self.store, move |s| s.export_queue_item(device, seq)).await?
            else {
                continue;
            };
            if self.expired(x.queued_at_ms, x.expires_at_ms) {
                report.expired_items += 1;
                continue;
            }
            match x.item {
                QueueItem::Message {
                    from_account,
                    from_device,
                    from_number,
                    id,
                    body,
                } => {
                    let outcome = queues
                        .append(Outgoing {
                            sender: DeviceRef {
                                account_id: from_account,
                                device_id: from_device,
                            },
                            sender_number: from_number,
                            id,
                            envelopes: vec![(device, body)],
                            now_ms: x.queued_at_ms,
                            expires_at_ms: x.expires_at_ms,
                        })
                        .await?;
                    if let AppendOutcome::QueueFull { .. } = outcome {
                        return Err(ExportError::QueueFull(device));
                    }
                    report.queue_items += 1;
                }
                QueueItem::GroupMessage {
                    from_account,
                    from_device,
                    from_number,
                    group_id,
                    id,
                    body_ref,
                } => {
                    // Its other devices' items went out with the first one's.
                    if let Some(&sent) = done_groups.get(&body_ref) {
                        match sent {
                            true => report.queue_items += 1,
                            false => report.expired_items += 1,
                        }
                        continue;
                    }
                    let Some(body) =
                        read(&self.store, move |s| s.export_group_body(body_ref)).await?
                    else {
                        // Its body went (aged out): the items are worth nothing.
                        done_groups.insert(body_ref, false);
                        report.expired_items += 1;
                        continue;
                    };
                    done_groups.insert(body_ref, true);
                    let sender = DeviceRef {
                        account_id: from_account,
                        device_id: from_device,
                    };
                    let recipients = holders.get(&body_ref).cloned().unwrap_or_default();
                    let delivered =
                        read(&self.store, move |s| s.export_group_delivered(sender, &id)).await?;
                    let outcome = queues
                        .import_group(
                            GroupSend {
                                sender,
                                sender_number: from_number,
                                group_id,
                                id,
                                body,
                                recipients,
                                now_ms: x.queued_at_ms,
                                expires_at_ms: x.expires_at_ms,
                            },
                            delivered,
                        )
                        .await?;
                    if let GroupAppend::QueueFull { device } = outcome {
                        return Err(ExportError::QueueFull(device));
                    }
                    report.group_messages += 1;
                    report.queue_items += 1;
                }
                QueueItem::Delivered { .. } | QueueItem::GroupDelivered { .. } => {
                    let value =
                        records::encode_queued_until(x.queued_at_ms, x.expires_at_ms, &x.item)?;
                    let name = format!("{}.{}.{seq}", device.account_id, device.device_id);
                    if queues.import_receipt(device, &x.item, value, &name).await? {
                        report.queue_items += 1;
                    } else {
                        report.dropped_receipts += 1;
                    }
                }
            }
        }
        Ok(())
    }

    async fn attachments(&self, report: &mut ExportReport) -> Result<(), ExportError> {
        for (id, record) in read(&self.store, |s| s.export_blobs()).await? {
            if !record.complete || self.expired(record.created_at_ms, None) {
                report.attachments_left += 1;
                continue;
            }
            let file = super::blobs::dir(&self.data_dir).join(hex::encode(id));
            // A record whose file went (a removal that failed half-way) is worth
            // nothing: left behind, never a reason to stop.
            let on_disk = tokio::fs::metadata(&file).await.map(|m| m.len()).ok();
            if on_disk != Some(record.size) {
                report.attachments_left += 1;
                continue;
            }
            self.engine.blobs.import(id, &record, &file).await?;
            report.attachments += 1;
            report.attachment_bytes += record.size;
        }
        Ok(())
    }
}
