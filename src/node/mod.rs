//! The node: a QUIC endpoint, one task per connection, one task per request stream.
//!
//! [`Node::bind`] opens the store, loads or makes the certificate and binds the socket;
//! [`Node::run`] serves until the `shutdown` future completes, then stops taking
//! connections and streams, lets in-flight requests finish (up to the configured
//! grace), closes the endpoint and flushes the store. Every task belongs to one
//! `TaskTracker`, so shutdown knows when the work is done.

mod admin;
mod blobs;
mod claims;
mod clock;
mod cluster_admin;
mod commit;
mod conn;
mod delivery;
mod discovery;
mod engine;
pub mod export;
mod handlers;
mod limits;
mod link;
mod mailbox;
mod metrics;
mod session;
mod space;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Provider as ProviderKind};
use crate::fsutil;
use crate::proto::codes;
use crate::store::{Store, StoreError};
use crate::tls::{Credentials, Fingerprint, TlsError};
use crate::verify::gateway::{CommandGateway, HttpGateway};
use crate::verify::{Codes, LogProvider, Provider};

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database in {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("flushing the database on shutdown: {0}")]
    Flush(StoreError),
    #[error(
        "the database failed ({0}); the node stopped so that a new start recovers it \
         from what is on disk (free space or fix the disk, and start it again)"
    )]
    StorageFailed(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cluster mode: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Registered number → (account id, sorted device ids).
pub(crate) type Directory = std::collections::HashMap<String, (u64, Vec<u32>)>;

/// The code delivery of each channel.
pub(crate) struct Providers {
    pub sms: Box<dyn Provider>,
    pub voice: Box<dyn Provider>,
}

fn provider(kind: &ProviderKind) -> Box<dyn Provider> {
    match kind {
        ProviderKind::Log => Box::new(LogProvider),
        ProviderKind::Http(c) => Box::new(HttpGateway::new(c.clone())),
        ProviderKind::Command(c) => Box::new(CommandGateway::new(c.clone())),
    }
}

/// Registration-lock PIN hashes that may run at once.
const PIN_CHECKS: usize = 2;

/// What every connection and request shares.
pub(crate) struct Shared {
    pub config: Config,
    pub store: Store,
    /// The cluster the node runs on (`[cluster] nats`): accounts, keys, profiles,
    /// limits and queues are there, not in `store`. `None`: one node on sled.
    pub cluster: Option<Arc<engine::ClusterEngine>>,
    pub codes: Codes,
    /// Code delivery, per channel.
    pub providers: Providers,
    pub admission: limits::Admission,
    pub commit: commit::GroupCommit,
    pub mailboxes: mailbox::Mailboxes,
    pub worker: worker::StoreWorker,
    /// A second store thread for reads (delivery pages, lookups), so that a drain of
    /// a large backlog does not queue behind its own acknowledgements.
    pub reader: worker::StoreWorker,
    /// Bumped after every change of registrations (a device registered, an account
    /// deleted): caches of who is registered (a session's identity, the recipient
    /// directory) are valid only within one epoch, read before the store was.
    pub directory_epoch: std::sync::atomic::AtomicU64,
    /// In cluster mode, whether this node is watching the cluster's accounts bucket,
    /// so that the epoch is bumped by every change of registrations through any node
    /// too: only then are those caches used there (`engine::watch_registrations`).
    pub directory_watched: std::sync::atomic::AtomicBool,
    /// Recipient number → (account id, device ids), for the current epoch.
    pub directory: std::sync::Mutex<(u64, Directory)>,
    /// Free space on the data dir's filesystem against `storage.min_free_bytes`.
    pub space: space::SpaceGuard,
    /// Contact discovery: budgets and the membership filter.
    pub discovery: discovery::Discovery,
    /// Live connections per device key, to close those of signed-out devices.
    pub connections: conn::Connections,
    pub metrics: Arc<metrics::Metrics>,
    /// Raised when the store failed for good: the node stops.
    pub fatal: Arc<worker::Fatal>,
    /// How many one-time keys each account may claim of others.
    pub claims: claims::ClaimLimits,
    /// Link slots in progress (in memory).
    pub links: link::Links,
    /// Group creations and changes per account and hour (in memory).
    pub group_changes: governor::DefaultKeyedRateLimiter<u64>,
    /// Envelopes sent per account (`messages.envelopes_per_account_minute`).
    pub sends: governor::DefaultKeyedRateLimiter<u64>,
    /// Argon2id hashes of registration-lock PINs in progress: each costs 19 MiB and
    /// tens of milliseconds of a core, so only a few run at once.
    pub pin_checks: tokio::sync::Semaphore,
    /// Attachment uploads in progress.
    pub uploads: blobs::InFlight,
    pub started: std::time::Instant,
}

/// A bound node, ready to [`run`](Node::run).
pub struct Node {
    endpoint: quinn::Endpoint,
    admin: Option<tokio::net::UnixListener>,
    metrics: Option<tokio::net::TcpListener>,
    shared: Arc<Shared>,
    fingerprint: Fingerprint,
}

impl Node {
    /// Opens the data dir, the store and the certificate, and binds the UDP socket.
    pub async fn bind(config: Config) -> Result<Node, ServeError> {
        let data_dir = config.server.data_dir.clone();
        fsutil::create_private_dir(&data_dir).map_err(|source| ServeError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let creds = match &config.server.tls {
            Some(files) => Credentials::load_pem(&files.cert, &files.key)?,
            None => load_or_make_self_signed(&data_dir)?,
        };
        let fingerprint = creds.fingerprint();

        blobs::prepare(&data_dir, config.cluster.enabled()).map_err(|source| {
            ServeError::DataDir {
                path: blobs::dir(&data_dir),
                source,
            }
        })?;
        let db_path = data_dir.join("db");
        let power_loss_sync = config.storage.power_loss_sync;
        let store =
            tokio::task::spawn_blocking(move || Store::open_with(&db_path, power_loss_sync))
                .await
                .map_err(|e| ServeError::Store {
                    path: data_dir.join("db"),
                    source: StoreError::Corrupt(format!("opening task failed: {e}")),
                })?
                .map_err(|source| ServeError::Store {
                    path: data_dir.join("db"),
                    source,
                })?;
        // In cluster mode every node must hash codes with the same key and give
        // numbers the same PRF: both are derived from the TLS key they share, and
        // so never stored in the engine.
        let (code_key, cluster) = if config.cluster.enabled() {
            let engine = engine::ClusterEngine::open(
                &config,
                creds.derive_secret("discovery key"),
                engine::Purpose::Serve,
            )
            .await?;
            tracing::info!(
                server = %engine.cluster.server_version,
                replicas = config.cluster.replicas,
                "running on the NATS JetStream cluster"
            );
            (creds.derive_secret("code hash key"), Some(Arc::new(engine)))
        } else {
            let key = store
                .secret("code_hash_key")
                .map_err(|source| ServeError::Store {
                    path: data_dir.join("db"),
                    source,
                })?;
            (key, None)
        };

        crate::admin::set_cluster_mark(&data_dir, cluster.is_some()).map_err(|source| {
            ServeError::DataDir {
                path: crate::admin::cluster_mark(&data_dir),
                source,
            }
        })?;
        let server_config = conn::server_config(&creds, &config)?;
        let endpoint = bind_endpoint(
            config.server.listen,
            config.server.udp_buffer_bytes as usize,
            server_config,
        )?;
        // Without its admin socket (a data dir path too long for a Unix socket, say)
        // the node still serves; the admin commands then need it stopped.
        let admin = match admin::bind(&data_dir) {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(
                    path = %crate::admin::socket_path(&data_dir).display(),
                    error = %e,
                    "no admin socket; admin commands work only while the node is stopped"
                );
                None
            }
        };
        let metrics_listener = match config.metrics.enabled {
            true => Some(
                tokio::net::TcpListener::bind(config.metrics.listen)
                    .await
                    .map_err(|source| ServeError::Bind {
                        addr: config.metrics.listen,
                        source,
                    })?,
            ),
            false => None,
        };
        let metrics = Arc::new(metrics::Metrics::new());
        let providers = Providers {
            sms: provider(&config.verification.sms),
            voice: provider(&config.verification.voice),
        };
        let fatal = Arc::new(worker::Fatal::default());
        let shared = Arc::new(Shared {
            codes: Codes::new(code_key, config.verification.clone()),
            admission: limits::Admission::new(
                config.limits.max_connections,
                config.limits.max_connections_per_address,
                config.limits.ipv6_prefix_len,
            ),
            providers,
            commit: commit::GroupCommit::start(store.clone(), metrics.clone(), fatal.clone()),
            mailboxes: mailbox::Mailboxes::default(),
            worker: worker::StoreWorker::start(store.clone(), "store", fatal.clone()).map_err(
                |source| ServeError::DataDir {
                    path: data_dir.join("db"),
                    source,
                },
            )?,
            reader: worker::StoreWorker::start(store.clone(), "store-read", fatal.clone())
                .map_err(|source| ServeError::DataDir {
                    path: data_dir.join("db"),
                    source,
                })?,
            directory_epoch: std::sync::atomic::AtomicU64::new(0),
            directory_watched: std::sync::atomic::AtomicBool::new(false),
            directory: std::sync::Mutex::new((0, std::collections::HashMap::new())),
            space: space::SpaceGuard::new(data_dir.clone(), config.storage.min_free_bytes),
            discovery: discovery::Discovery::new(config.discovery.daily_budget),
            connections: conn::Connections::default(),
            metrics,
            pin_checks: tokio::sync::Semaphore::new(PIN_CHECKS),
            fatal,
            claims: claims::ClaimLimits::new(
                config.messages.key_claims_per_pair_per_hour,
                config.messages.key_claims_per_account_per_hour,
            ),
            group_changes: governor::RateLimiter::keyed(governor::Quota::per_hour(
                std::num::NonZeroU32::new(config.groups.changes_per_account_hour)
                    .unwrap_or(std::num::NonZeroU32::MIN),
            )),
            sends: governor::RateLimiter::keyed(governor::Quota::per_minute(
                std::num::NonZeroU32::new(config.messages.envelopes_per_account_minute)
                    .unwrap_or(std::num::NonZeroU32::MIN),
            )),
            links: link::Links::new(
                config.accounts.link_code_ttl,
                config.accounts.link_joins_per_address_hour,
                cluster.as_ref().map(|c| c.links.clone()),
            ),
            uploads: blobs::InFlight::default(),
            started: std::time::Instant::now(),
            store,
            cluster,
            config,
        });
        Ok(Node {
            endpoint,
            admin,
            metrics: metrics_listener,
            shared,
            fingerprint,
        })
    }

    /// The address the node listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The address of the metrics endpoint, when `[metrics] enabled`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The fingerprint of the node's certificate, for clients to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Serves until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        tracker.spawn(sweeper(self.shared.clone(), stop.clone()));
        // Outside the tracker: requests still finishing at shutdown wait on it.
        let write_behind_stop = CancellationToken::new();
        let write_behind = tokio::spawn(write_behind(
            self.shared.clone(),
            stop.clone(),
            write_behind_stop.clone(),
        ));
        tracker.spawn(filter_refresher(self.shared.clone(), stop.clone()));
        if self.shared.cluster.is_some() {
            tracker.spawn(engine::watch_registrations(
                self.shared.clone(),
                stop.clone(),
            ));
            tracker.spawn(engine::watch_index(self.shared.clone(), stop.clone()));
        }
        if let Some(listener) = self.admin {
            tracker.spawn(admin::serve(
                listener,
                self.shared.clone(),
                stop.clone(),
                tracker.clone(),
            ));
        }
        if let Some(listener) = self.metrics {
            tracker.spawn(metrics::serve(listener, self.shared.clone(), stop.clone()));
        }
        tokio::pin!(shutdown);
        let fatal = self.shared.fatal.clone();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                // The store failed: take no more work, and exit with an error.
                () = fatal.raised() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    let Some(ticket) = self.shared.admission.admit(remote.ip()) else {
                        self.shared.metrics.connections_refused.inc();
                        tracing::warn!(%remote, "connection refused: connection limit reached");
                        incoming.refuse();
                        continue;
                    };
                    self.shared.metrics.connections_accepted.inc();
                    let task = conn::serve(incoming, ticket, self.shared.clone(), stop.clone(), tracker.clone());
                    tracker.spawn(task);
                }
            }
        }

        if let Some(why) = self.shared.fatal.why() {
            // The database fails every operation now, and sled may never finish one
            // (a flush waits for a log write that cannot happen): stop at once, as a
            // crash would, leaving recovery to the next process. What was acknowledged
            // is on disk; what was only in memory was not acknowledged.
            stop.cancel();
            self.endpoint
                .close(codes::SHUTDOWN.into(), b"node storage failed");
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle())
                    .await;
            return Err(ServeError::StorageFailed(why));
        }
        tracing::info!(
            in_flight = tracker.len(),
            "shutting down: finishing in-flight requests"
        );
        self.endpoint.set_server_config(None);
        stop.cancel();
        tracker.close();
        let finished =
            tokio::time::timeout(self.shared.config.limits.shutdown_grace, tracker.wait())
                .await
                .is_ok();
        if !finished {
            tracing::warn!(
                left = tracker.len(),
                "shutdown grace elapsed; closing the remaining requests"
            );
        }
        self.endpoint
            .close(codes::SHUTDOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle())
            .await;
        write_behind_stop.cancel();
        let _ = write_behind.await;
        // What is still held in memory for the hand-off is written now.
        if let Err(e) = self.shared.worker.run(|s| s.write_staged(None)).await {
            tracing::error!(error = %e, "writing the staged messages at shutdown failed");
        }
        self.shared.commit.stop().await;
        self.shared.worker.stop().await;
        self.shared.reader.stop().await;
        // Only when every task ended: a straggler could still change the queues.
        if finished && let Err(e) = self.shared.store.save_queue_totals() {
            tracing::warn!(error = %e, "could not save the queue totals; the next start counts them");
        }
        if let Some(why) = self.shared.fatal.why() {
            return Err(ServeError::StorageFailed(why));
        }
        self.shared.store.flush().await.map_err(ServeError::Flush)?;
        let stats = self.shared.commit.stats();
        tracing::info!(
            group_commits = stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
            durable_writes = stats.commits.load(std::sync::atomic::Ordering::Relaxed),
            "stopped; storage flushed"
        );
        Ok(())
    }
}

/// Rebuilds the discovery filter when registrations changed the index: at start, then
/// every `discovery.filter_refresh_secs`, or at once when the delta of registrations
/// since the last build grows large.
async fn filter_refresher(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(shared.config.discovery.filter_refresh);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
            () = shared.discovery.rebuild_now.notified() => {}
        }
        // In cluster mode one node builds for the cluster and every node serves it.
        let refreshed = match &shared.cluster {
            Some(c) => {
                shared
                    .discovery
                    .refresh_cluster(&c.discovery, crate::store::wall_ms())
                    .await
            }
            None => shared.discovery.refresh(&shared.store).await.map(Some),
        };
        match refreshed {
            // Another node is building the cluster's first filter.
            Ok(None) => tracing::debug!("no discovery filter yet"),
            Ok(Some(f)) => tracing::debug!(
                entries = f.entries,
                bytes = f.bytes.len(),
                version = f.version,
                "discovery filter current"
            ),
            Err(e) => tracing::error!(error = %e, "building the discovery filter failed"),
        }
    }
}

/// Writes the messages held in memory for the hand-off once they are older than
/// `messages.handoff_ms` (within a quarter of it). Once the node is `stopping`, no
/// acknowledgement will come any more: it writes everything at once, and keeps doing
/// so for sends that finish meanwhile, until `done`.
async fn write_behind(shared: Arc<Shared>, stopping: CancellationToken, done: CancellationToken) {
    let window = shared.config.messages.handoff_window;
    if window.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval((window / 4).max(std::time::Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopped = stopping.is_cancelled();
        tokio::select! {
            () = done.cancelled() => return,
            () = stopping.cancelled(), if !stopped => {}
            _ = ticks.tick() => {}
        }
        let cutoff = if stopping.is_cancelled() {
            None
        } else {
            match std::time::Instant::now().checked_sub(window) {
                Some(cutoff) => Some(cutoff),
                None => continue,
            }
        };
        let due = shared
            .store
            .oldest_staged()
            .is_some_and(|at| cutoff.is_none_or(|cutoff| at <= cutoff));
        if !due {
            continue;
        }
        match shared.worker.run(move |s| s.write_staged(cutoff)).await {
            Ok(done) => tracing::trace!(units = done.units, items = done.items, "write-behind"),
            Err(e) => tracing::error!(error = %e, "write-behind failed"),
        }
    }
}

/// Every `sweep_interval`, until the node stops: drops queued items older than the
/// TTL, unlinks companions away for longer than `accounts.companion_lapse_days`, and
/// forgets old removals and idle counters.
async fn sweeper(shared: Arc<Shared>, stop: CancellationToken) {
    let messages = &shared.config.messages;
    let mut ticks = tokio::time::interval(messages.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        shared.claims.forget_idle();
        let ttl_ms = messages.ttl.as_millis() as u64;
        let now = clock::now_ms();
        let cutoff = now.saturating_sub(ttl_ms);
        let store = shared.store.clone();
        match tokio::task::spawn_blocking(move || store.sweep(cutoff, now)).await {
            Ok(Ok(stats)) if stats.items + stats.sent_ids > 0 => {
                shared.metrics.messages_expired.inc_by(stats.items);
                tracing::info!(
                    items = stats.items,
                    sent_ids = stats.sent_ids,
                    "swept expired items"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "sweep failed"),
            Err(e) => tracing::error!(error = %e, "sweep task failed"),
        }
        let store = shared.store.clone();
        let now = clock::now_ms();
        let keep = crate::verify::limits::KEEP_MS;
        match tokio::task::spawn_blocking(move || store.sweep_code_sends(now, keep)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(keys = n, "dropped idle code-limit counters"),
            Ok(Err(e)) => tracing::error!(error = %e, "sweeping code-limit counters failed"),
            Err(e) => tracing::error!(error = %e, "sweep task failed"),
        }
        blobs::sweep(&shared, clock::now_ms()).await;
        shared.links.prune();
        shared.group_changes.retain_recent();
        shared.group_changes.shrink_to_fit();
        lapse_companions(&shared).await;
        shared.mailboxes.prune();
    }
}

/// Unlinks the companions not seen for `accounts.companion_lapse`, and forgets device
/// removals older than the store keeps them.
async fn lapse_companions(shared: &Arc<Shared>) {
    let now = clock::now_ms();
    let cutoff = now.saturating_sub(shared.config.accounts.companion_lapse.as_millis() as u64);
    let lapsed = match engine::lapsed_companions(shared, cutoff, now).await {
        Ok(lapsed) => lapsed,
        Err(e) => return tracing::error!(error = %e, "finding lapsed devices failed"),
    };
    for device in lapsed {
        if let Err(e) =
            handlers::remove_device(shared, device, crate::store::records::Removal::Lapsed).await
        {
            tracing::error!(error = %e, "unlinking a lapsed device failed");
        }
    }
    let store = shared.store.clone();
    match tokio::task::spawn_blocking(move || store.sweep_removed_keys(now)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(keys = n, "forgot old device removals"),
        Ok(Err(e)) => tracing::error!(error = %e, "sweeping device removals failed"),
        Err(e) => tracing::error!(error = %e, "sweep task failed"),
    }
}

/// The self-signed certificate kept in `data_dir/tls`, made on first start.
fn load_or_make_self_signed(data_dir: &Path) -> Result<Credentials, ServeError> {
    let dir = data_dir.join("tls");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok(Credentials::load_pem(&cert_path, &key_path)?);
    }
    let io_err = |source| ServeError::DataDir {
        path: dir.clone(),
        source,
    };
    fsutil::create_private_dir(&dir).map_err(io_err)?;
    let (creds, pem) = Credentials::generate_node(vec!["localhost".into(), "switchboard".into()])?;
    // Key first: a crash between the two writes leaves no certificate without its key.
    fsutil::write_private(&key_path, pem.key.as_bytes()).map_err(io_err)?;
    fsutil::write_private(&cert_path, pem.cert.as_bytes()).map_err(io_err)?;
    tracing::info!(path = %cert_path.display(), "generated a self-signed certificate");
    Ok(creds)
}

/// Binds the UDP socket, with the configured buffer sizes.
fn bind_endpoint(
    addr: SocketAddr,
    buffer_bytes: usize,
    server_config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, ServeError> {
    let (endpoint, granted) = crate::quic::endpoint(addr, buffer_bytes, Some(server_config))
        .map_err(|source| ServeError::Bind { addr, source })?;
    if buffer_bytes > 0 && granted.recv_buffer.min(granted.send_buffer) < buffer_bytes {
        tracing::warn!(
            asked = buffer_bytes,
            granted_recv = granted.recv_buffer,
            granted_send = granted.send_buffer,
            "the kernel capped the UDP receive buffer (raise net.core.rmem_max and net.core.wmem_max)"
        );
    }
    Ok(endpoint)
}
