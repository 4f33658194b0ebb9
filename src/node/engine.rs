//! Where the node keeps what every node must see: its own sled store (one node, the
//! default), or a NATS JetStream cluster (`[cluster] nats`, several nodes).
//!
//! Handlers call the functions here, not the store: each asks the cluster's
//! implementation of a storage trait when the node runs on one, else runs the sled
//! operation on the store thread (plain lookups that were on the reader thread
//! stay there). A write on sled is durable at the next group
//! commit, which the handler awaits with [`durable`] before it answers (one wait for
//! several writes); on the cluster a write is durable once it returns (acknowledged
//! by a quorum of the replicas), and [`durable`] has nothing to wait for. The hand-off
//! of online devices and the group commit stay on the sled side. Attachments
//! (`node::blobs`) take the cluster's side themselves (`ClusterEngine::blobs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::Shared;
use super::handlers::commit_failed;
use super::worker::{blocking, internal, read};
use crate::cluster::accounts::JetStreamAccounts;
use crate::cluster::blobs::JetStreamBlobs;
use crate::cluster::bucket::Bucket;
use crate::cluster::discovery::JetStreamDiscovery;
use crate::cluster::groups::JetStreamGroups;
use crate::cluster::keys::JetStreamKeys;
use crate::cluster::profiles::JetStreamProfiles;
use crate::cluster::queues::{JetStreamQueues, QueueLimits};
use crate::cluster::quotas::{self, JetStreamQuotas};
use crate::cluster::{Cluster, ClusterError};
use crate::config::Config;
use crate::discovery::{DiscoveryKey, Prf};
use crate::node::discovery::FilterSnapshot;
use crate::proto::NodeError;
use crate::store::account_store::AccountStore;
use crate::store::keydir::{KeyDirectory, Upload};
use crate::store::layout::KeyId;
use crate::store::limit_store::LimitStore;
use crate::store::queue_store::{GroupSend, QueueStore};
use crate::store::records::{
    AccountRecord, CodeRecord, GroupRecord, LockRecord, ProfileRecord, Removal, RemovedKeyRecord,
};
use crate::store::{
    Claimed, DeviceIdentity, DeviceRef, DeviceView, GroupAppend, GroupChange, GroupRefusal,
    GroupStore, IdentityPair, Judgement, KeysRefusal, Linked, NewDevice, ProfileStore, Queued,
    Unlinked, VerifyOutcome,
};

/// The cluster's side of each storage concern the node runs on.
pub(crate) struct ClusterEngine {
    pub cluster: Cluster,
    pub accounts: JetStreamAccounts,
    pub keys: JetStreamKeys,
    pub queues: JetStreamQueues,
    pub profiles: JetStreamProfiles,
    pub groups: JetStreamGroups,
    pub discovery: JetStreamDiscovery,
    /// Devices being linked (`node::link`).
    pub links: Bucket,
    pub blobs: JetStreamBlobs,
    /// Quotas counted for the whole cluster.
    pub quotas: JetStreamQuotas,
}

impl std::fmt::Debug for ClusterEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterEngine")
            .field("server", &self.cluster.server_version)
            .finish_non_exhaustive()
    }
}

/// How long a starting node waits for the cluster: members starting at the same
/// time need a few seconds to elect the leaders that create buckets and streams.
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the queue stream recognises an item published again by its id (at
/// most the TTL).
pub(crate) const DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(86_400);

/// What a [`ClusterEngine`] is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Serving clients: refused while an export into the cluster is unfinished.
    Serve,
    /// `admin export-to-cluster` of a node whose discovery key is at `node_version`.
    Export { node_version: u32 },
}

impl ClusterEngine {
    /// Connects to `config.cluster.nats` and opens (creating where needed) the
    /// buckets and the queue stream; the discovery key that gives registered
    /// numbers their PRF is derived from `seed` (the shared TLS key's), at the
    /// version an export chose (1 without one). A cluster that does not answer yet
    /// is tried again for up to a minute; one too old, or with an unfinished export
    /// when serving, at once refused.
    pub async fn open(
        config: &Config,
        seed: [u8; 32],
        purpose: Purpose,
    ) -> Result<ClusterEngine, ClusterError> {
        let deadline = tokio::time::Instant::now() + OPEN_PATIENCE;
        loop {
            match Self::try_open(config, &seed, purpose).await {
                Ok(engine) => return Ok(engine),
                Err(
                    e @ (ClusterError::TooOld { .. }
                    | ClusterError::NoAddress
                    | ClusterError::Refused { .. }
                    | ClusterError::ExportUnfinished),
                ) => return Err(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "the cluster is not ready; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn try_open(
        config: &Config,
        seed: &[u8; 32],
        purpose: Purpose,
    ) -> Result<ClusterEngine, ClusterError> {
        let cluster = Cluster::connect_with(&config.cluster).await?;
        let mark = crate::cluster::accounts::export_mark(&cluster, config.cluster.replicas).await?;
        let version = match (purpose, mark) {
            (Purpose::Serve, Some(m)) if !m.done => return Err(ClusterError::ExportUnfinished),
            (_, Some(m)) => m.discovery_version,
            (Purpose::Serve, None) => 1,
            (Purpose::Export { node_version }, None) => node_version.saturating_add(1),
        };
        let discovery = DiscoveryKey::from_seed(seed, version)
            .map_err(|e| ClusterError::JetStream(format!("discovery key: {e}")))?;
        let discovery = Arc::new(discovery);
        let replicas = config.cluster.replicas;
        let limits = QueueLimits {
            max_queued: config.messages.max_queued_per_device.into(),
            ttl: config.messages.ttl,
            // Sends are deduplicated by their id for a day (a client sends again
            // within seconds, or at its next start).
            duplicate_window: config.messages.ttl.min(DUPLICATE_WINDOW),
        };
        Ok(ClusterEngine {
            accounts: JetStreamAccounts::open(&cluster, replicas, discovery.clone()).await?,
            discovery: JetStreamDiscovery::open(&cluster, replicas, discovery).await?,
            blobs: JetStreamBlobs::open(&cluster, replicas, config.messages.ttl).await?,
            links: super::link::Links::open_bucket(
                &cluster,
                replicas,
                config.accounts.link_code_ttl,
            )
            .await?,
            keys: JetStreamKeys::open(&cluster, replicas).await?,
            queues: JetStreamQueues::open(&cluster, replicas, limits).await?,
            profiles: JetStreamProfiles::open(&cluster, replicas).await?,
            groups: JetStreamGroups::open(&cluster, replicas).await?,
            quotas: JetStreamQuotas::open(&cluster, replicas).await?,
            cluster,
        })
    }
}

/// Waits until what this request wrote is durable (sled's group commit; the
/// cluster's writes are once they return).
pub(crate) async fn durable(shared: &Arc<Shared>) -> Result<(), NodeError> {
    match shared.cluster {
        Some(_) => Ok(()),
        None => shared.commit.durable().await.map_err(commit_failed),
    }
}

/// Counts a code send under `keys` if `judge` allows it ([`LimitStore::record_code_send`]).
pub(crate) async fn record_code_send<E: Send + 'static>(
    shared: &Arc<Shared>,
    keys: Vec<String>,
    now_ms: u64,
    keep_ms: u64,
    judge: impl Fn(&[Vec<u64>]) -> Result<(), E> + Send + Sync + 'static,
) -> Result<Result<(), E>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .record_code_send(keys, now_ms, keep_ms, judge)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.record_code_send(&keys, now_ms, keep_ms, judge)
            })
            .await
        }
    }
}

/// Replaces the pending code of `number` ([`AccountStore::replace_code`]).
pub(crate) async fn replace_code<E: Send + 'static>(
    shared: &Arc<Shared>,
    number: String,
    decide: impl Fn(Option<&CodeRecord>) -> Result<CodeRecord, E> + Send + Sync + 'static,
) -> Result<Result<CodeRecord, E>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .replace_code(number, decide)
            .await
            .map_err(internal),
        None => blocking(shared, move |s| s.replace_code(&number, decide)).await,
    }
}

/// Removes the code of `number` that could not be delivered, and takes back its
/// count under `counted`.
pub(crate) async fn withdraw_code(
    shared: &Arc<Shared>,
    number: String,
    counted: Option<Vec<String>>,
    at_ms: u64,
) -> Result<(), NodeError> {
    match &shared.cluster {
        Some(c) => {
            c.accounts.remove_code(number).await.map_err(internal)?;
            match counted {
                Some(keys) => c
                    .accounts
                    .forget_code_send(keys, at_ms)
                    .await
                    .map_err(internal),
                None => Ok(()),
            }
        }
        None => {
            blocking(shared, move |s| {
                s.remove_code(&number)?;
                match &counted {
                    Some(keys) => s.forget_code_send(keys, at_ms),
                    None => Ok(()),
                }
            })
            .await
        }
    }
}

/// The account of `number` with its registration lock, and when it was last seen.
pub(crate) async fn registration_lock(
    shared: &Arc<Shared>,
    number: String,
) -> Result<Option<(u64, LockRecord, u64)>, NodeError> {
    match &shared.cluster {
        Some(c) => c.accounts.registration_lock(number).await.map_err(internal),
        None => blocking(shared, move |s| s.registration_lock(&number)).await,
    }
}

/// Judges the code pending for `number` without registering ([`LimitStore::judge_code`]).
pub(crate) async fn judge_code<E: Send + 'static>(
    shared: &Arc<Shared>,
    number: String,
    judge: impl Fn(&CodeRecord) -> (Option<CodeRecord>, E) + Send + Sync + 'static,
) -> Result<Option<E>, NodeError> {
    match &shared.cluster {
        Some(c) => c.accounts.judge_code(number, judge).await.map_err(internal),
        None => blocking(shared, move |s| s.judge_code(&number, judge)).await,
    }
}

/// Takes one wrong-PIN try of `account`'s lock ([`LimitStore::take_pin_try`]).
pub(crate) async fn take_pin_try(
    shared: &Arc<Shared>,
    account: u64,
    max: u32,
) -> Result<Option<(u32, LockRecord)>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .take_pin_try(account, max)
            .await
            .map_err(internal),
        None => blocking(shared, move |s| s.take_pin_try(account, max)).await,
    }
}

/// Sets or clears the registration lock of `account`.
pub(crate) async fn set_registration_lock(
    shared: &Arc<Shared>,
    account: u64,
    lock: Option<LockRecord>,
) -> Result<(), NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .set_registration_lock(account, lock)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.set_registration_lock(account, lock.as_ref())
            })
            .await
        }
    }
}

/// Consumes a right code and registers `device` as `number`'s primary
/// ([`AccountStore::verify_and_register`]).
pub(crate) async fn verify_and_register<E: Clone + Send + 'static>(
    shared: &Arc<Shared>,
    number: String,
    device: NewDevice,
    now_ms: u64,
    judge: impl Fn(&CodeRecord) -> Judgement<E> + Send + Sync + 'static,
) -> Result<VerifyOutcome<E>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .verify_and_register(number, device, now_ms, judge)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.verify_and_register(&number, &device, now_ms, judge)
            })
            .await
        }
    }
}

/// Records that `device` was seen at `now_ms`.
pub(crate) async fn mark_device_seen(
    shared: &Arc<Shared>,
    device: DeviceRef,
    now_ms: u64,
) -> Result<(), NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .mark_device_seen(device, now_ms)
            .await
            .map_err(internal),
        None => blocking(shared, move |s| s.mark_device_seen(device, now_ms)).await,
    }
}

/// Drops what the node held for a signed-out `device` (its queue; on sled its keys
/// too); how many queued items went.
pub(crate) async fn drop_device(shared: &Arc<Shared>, device: DeviceRef) -> Result<u64, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let dropped = c.queues.drop_queue(device).await.map_err(internal)?;
            forget_keys(c, device).await;
            Ok(dropped)
        }
        None => blocking(shared, move |s| s.drop_device(device)).await,
    }
}

/// Drops the keys a removed device published on the cluster. A failure is logged,
/// not the request's: keys left behind are never handed out (a fetch asks only for
/// the devices an account lists, and device ids are never reused).
async fn forget_keys(c: &ClusterEngine, device: DeviceRef) {
    if let Err(e) = c.keys.forget(device).await {
        tracing::warn!(error = %e, "a removed device's published keys were not dropped");
    }
}

/// The device whose key is `key_id`, or else why that key was removed, if known.
pub(crate) async fn device_by_key(
    shared: &Arc<Shared>,
    key_id: KeyId,
) -> Result<Result<DeviceIdentity, Option<RemovedKeyRecord>>, NodeError> {
    match &shared.cluster {
        Some(c) => match c.accounts.device_by_key(key_id).await.map_err(internal)? {
            Some(found) => Ok(Ok(found)),
            None => Ok(Err(c
                .accounts
                .removed_key(key_id)
                .await
                .map_err(internal)?)),
        },
        None => {
            blocking(shared, move |s| {
                Ok(match s.device_by_key(&key_id)? {
                    Some(found) => Ok(found),
                    None => Err(s.removed_key(&key_id)?),
                })
            })
            .await
        }
    }
}

/// The account of `number`.
pub(crate) async fn account_by_number(
    shared: &Arc<Shared>,
    number: String,
) -> Result<Option<(u64, AccountRecord)>, NodeError> {
    match &shared.cluster {
        Some(c) => c.accounts.account_by_number(number).await.map_err(internal),
        None => blocking(shared, move |s| s.account_by_number(&number)).await,
    }
}

/// Links `new` to `account` as a companion device ([`AccountStore::link_device`]).
pub(crate) async fn link_device(
    shared: &Arc<Shared>,
    account: u64,
    new: NewDevice,
    name: String,
    max_devices: u32,
    now_ms: u64,
) -> Result<Linked, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .accounts
            .link_device(account, new, name, max_devices, now_ms)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.link_device(account, &new, &name, max_devices, now_ms)
            })
            .await
        }
    }
}

/// Unlinks the companion `device` ([`AccountStore::unlink_device`]); on the cluster
/// its queue goes too (on sled, in the same transaction).
pub(crate) async fn unlink_device(
    shared: &Arc<Shared>,
    device: DeviceRef,
    why: Removal,
    now_ms: u64,
) -> Result<Unlinked, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let outcome = c
                .accounts
                .unlink_device(device, why, now_ms)
                .await
                .map_err(internal)?;
            // The device is unlinked whatever befalls its queue: nobody can read it
            // again, and what stays ages out with the TTL.
            if matches!(outcome, Unlinked::Done { .. }) {
                if let Err(e) = c.queues.drop_queue(device).await {
                    tracing::warn!(error = %e, "an unlinked device's queue was not dropped");
                }
                forget_keys(c, device).await;
            }
            Ok(outcome)
        }
        None => blocking(shared, move |s| s.unlink_device(device, why, now_ms)).await,
    }
}

/// The companions not seen since `cutoff_ms`, to unlink as lapsed. On the cluster,
/// only the node whose sweep takes this interval's turn lists them (every account is
/// read), the others find none.
pub(crate) async fn lapsed_companions(
    shared: &Arc<Shared>,
    cutoff_ms: u64,
    now_ms: u64,
) -> Result<Vec<DeviceRef>, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let every = shared.config.messages.sweep_interval.as_millis() as u64;
            if !c
                .quotas
                .take_turn("lapse", now_ms, every)
                .await
                .map_err(internal)?
            {
                return Ok(Vec::new());
            }
            c.accounts
                .lapsed_companions(cutoff_ms)
                .await
                .map_err(internal)
        }
        None => blocking(shared, move |s| s.lapsed_companions(cutoff_ms)).await,
    }
}

/// The account `id`.
pub(crate) async fn account(
    shared: &Arc<Shared>,
    id: u64,
) -> Result<Option<AccountRecord>, NodeError> {
    match &shared.cluster {
        Some(c) => c.accounts.account(id).await.map_err(internal),
        None => read(shared, move |s| s.account(id)).await,
    }
}

/// The number and devices of `account`, primary first.
pub(crate) async fn devices(
    shared: &Arc<Shared>,
    account: u64,
) -> Result<Option<(String, Vec<DeviceView>)>, NodeError> {
    match &shared.cluster {
        Some(c) => c.accounts.devices(account).await.map_err(internal),
        None => read(shared, move |s| s.devices(account)).await,
    }
}

/// Stores `upload` for `device` ([`KeyDirectory::publish_keys`]) and, when it is
/// taken, the account signature over it.
pub(crate) async fn publish_keys(
    shared: &Arc<Shared>,
    device: DeviceRef,
    upload: Upload,
    account_signature: Option<[u8; 64]>,
    max_one_time_keys: u32,
    now_ms: u64,
) -> Result<Result<u32, KeysRefusal>, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let stored = c
                .keys
                .publish_keys(device, upload, max_one_time_keys, now_ms)
                .await
                .map_err(internal)?;
            if stored.is_ok() {
                c.keys
                    .set_account_signature(device, account_signature)
                    .await
                    .map_err(internal)?;
            }
            Ok(stored)
        }
        None => {
            blocking(shared, move |s| {
                let stored = s.publish_upload(device, upload, max_one_time_keys, now_ms)?;
                if stored.is_ok() {
                    s.set_account_signature(device, account_signature)?;
                }
                Ok(stored)
            })
            .await
        }
    }
}

/// One-time keys stored for `device`, counting no further than `limit`.
pub(crate) async fn count_one_time_keys(
    shared: &Arc<Shared>,
    device: DeviceRef,
    limit: u32,
) -> Result<u32, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .keys
            .count_one_time_keys(device, limit)
            .await
            .map_err(internal),
        None => blocking(shared, move |s| s.count_one_time_keys(device, limit)).await,
    }
}

/// The key bundles of `devices` of `account_id`, claiming one-time keys with `claim`.
pub(crate) async fn fetch_bundles(
    shared: &Arc<Shared>,
    account_id: u64,
    devices: Vec<u32>,
    claim: bool,
) -> Result<Vec<Claimed>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .keys
            .fetch_bundles(account_id, devices, claim)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.fetch_bundles(account_id, &devices, claim)
            })
            .await
        }
    }
}

/// The identity keys `device` published, if any.
pub(crate) async fn identity_keys(
    shared: &Arc<Shared>,
    device: DeviceRef,
) -> Result<Option<IdentityPair>, NodeError> {
    match &shared.cluster {
        Some(c) => c.keys.identity_keys(device).await.map_err(internal),
        None => read(shared, move |s| s.identity_keys(device)).await,
    }
}

/// Stores `account_id`'s profile.
pub(crate) async fn set_profile(
    shared: &Arc<Shared>,
    account_id: u64,
    version: [u8; 32],
    blob: Vec<u8>,
    now_ms: u64,
) -> Result<(), NodeError> {
    match &shared.cluster {
        Some(c) => c
            .profiles
            .set_profile(account_id, version, blob, now_ms)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.set_profile(account_id, version, blob, now_ms)
            })
            .await
        }
    }
}

/// `account_id`'s profile, if it has one.
pub(crate) async fn profile(
    shared: &Arc<Shared>,
    account_id: u64,
) -> Result<Option<ProfileRecord>, NodeError> {
    match &shared.cluster {
        Some(c) => c.profiles.profile(account_id).await.map_err(internal),
        None => read(shared, move |s| s.profile(account_id)).await,
    }
}

/// Replaces `account_id`'s presence; false without a profile.
pub(crate) async fn set_presence(
    shared: &Arc<Shared>,
    account_id: u64,
    presence: Vec<u8>,
) -> Result<bool, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .profiles
            .set_presence(account_id, presence)
            .await
            .map_err(internal),
        None => blocking(shared, move |s| s.set_presence(account_id, presence)).await,
    }
}

/// The accounts of `numbers`, in order (`None`: not registered).
pub(crate) async fn accounts_by_number(
    shared: &Arc<Shared>,
    numbers: Vec<String>,
) -> Result<Vec<Option<(u64, AccountRecord)>>, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let found = futures_util::future::join_all(
                numbers.into_iter().map(|n| c.accounts.account_by_number(n)),
            )
            .await;
            found.into_iter().map(|a| a.map_err(internal)).collect()
        }
        None => {
            read(shared, move |s| {
                numbers.iter().map(|n| s.account_by_number(n)).collect()
            })
            .await
        }
    }
}

/// The accounts `ids`, in order (`None`: no such account, as one the operator
/// deleted).
pub(crate) async fn accounts(
    shared: &Arc<Shared>,
    ids: Vec<u64>,
) -> Result<Vec<Option<AccountRecord>>, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let found =
                futures_util::future::join_all(ids.into_iter().map(|id| c.accounts.account(id)))
                    .await;
            found.into_iter().map(|a| a.map_err(internal)).collect()
        }
        None => {
            read(shared, move |s| {
                ids.iter().map(|&id| s.account(id)).collect()
            })
            .await
        }
    }
}

/// Creates a group ([`GroupStore::create_group`]).
pub(crate) async fn create_group(
    shared: &Arc<Shared>,
    creator: u64,
    members: Vec<u64>,
    meta: Vec<u8>,
    max: u32,
    now_ms: u64,
) -> Result<Result<(u64, GroupRecord), GroupRefusal>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .groups
            .create_group(creator, members, meta, max, now_ms)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.create_group(creator, &members, &meta, max, now_ms)
            })
            .await
        }
    }
}

/// Changes a group ([`GroupStore::change_group`]); `Ok(None)`: the group is gone.
pub(crate) async fn change_group(
    shared: &Arc<Shared>,
    group: u64,
    actor: u64,
    change: GroupChange,
    max: u32,
    now_ms: u64,
) -> Result<Result<Option<GroupRecord>, GroupRefusal>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .groups
            .change_group(group, actor, change, max, now_ms)
            .await
            .map_err(internal),
        None => {
            blocking(shared, move |s| {
                s.change_group(group, actor, &change, max, now_ms)
            })
            .await
        }
    }
}

/// Group `group`, if there is one.
pub(crate) async fn group(
    shared: &Arc<Shared>,
    group: u64,
) -> Result<Option<GroupRecord>, NodeError> {
    match &shared.cluster {
        Some(c) => c.groups.group(group).await.map_err(internal),
        None => read(shared, move |s| s.group(group)).await,
    }
}

/// The groups `account` is in, with their records.
pub(crate) async fn groups_of(
    shared: &Arc<Shared>,
    account: u64,
) -> Result<Vec<(u64, GroupRecord)>, NodeError> {
    match &shared.cluster {
        Some(c) => {
            let mut out = Vec::new();
            for id in c.groups.groups_of(account).await.map_err(internal)? {
                if let Some(record) = c.groups.group(id).await.map_err(internal)? {
                    out.push((id, record));
                }
            }
            Ok(out)
        }
        None => {
            read(shared, move |s| {
                let mut out = Vec::new();
                for id in s.groups_of(account)? {
                    if let Some(record) = s.group(id)? {
                        out.push((id, record));
                    }
                }
                Ok(out)
            })
            .await
        }
    }
}

/// Queues a group message for each of `m.recipients` (durable on sled at the next
/// group commit, on the cluster once this returns).
pub(crate) async fn append_group(
    shared: &Arc<Shared>,
    m: GroupSend,
    max_queued: u64,
) -> Result<GroupAppend, NodeError> {
    match &shared.cluster {
        Some(c) => c.queues.append_group(m).await.map_err(internal),
        None => blocking(shared, move |s| s.append_group(&m, max_queued)).await,
    }
}

/// Items in `device`'s queue.
pub(crate) async fn queue_len(shared: &Arc<Shared>, device: DeviceRef) -> Result<u64, NodeError> {
    match &shared.cluster {
        Some(c) => c.queues.queue_len(device).await.map_err(internal),
        None => blocking(shared, move |s| s.queue_len(device)).await,
    }
}

/// A page of the cluster queue of `device` (the sled side pages in `delivery`,
/// where the hand-off is), read no further than `until` if given
/// ([`JetStreamQueues::page_until`](crate::cluster::queues::JetStreamQueues::page_until)).
pub(crate) async fn cluster_page(
    c: &ClusterEngine,
    device: DeviceRef,
    after: Option<u64>,
    max: usize,
    max_bytes: usize,
    until: Option<u64>,
) -> Result<(Vec<Queued>, bool), NodeError> {
    // A read changes nothing, so one that failed (a stream leader being elected, a
    // member restarting) is tried again, for about three seconds, before the
    // delivery stream gives up and the client reconnects.
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match c
            .queues
            .page_until(device, after, max, max_bytes, until)
            .await
        {
            Ok(page) => return Ok(page),
            Err(e) if pause < std::time::Duration::from_secs(2) => {
                tracing::debug!(error = %e, "reading a queue failed; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => return Err(internal(e)),
        }
    }
}

/// Charges `n` contact-discovery evaluations to `account` today: what is left of
/// its budget (on the cluster, counted for the whole cluster).
pub(crate) async fn charge_discovery(
    shared: &Arc<Shared>,
    account: u64,
    n: u32,
    now_secs: u64,
) -> Result<u32, NodeError> {
    let Some(c) = &shared.cluster else {
        return shared.discovery.charge(account, n, now_secs);
    };
    let key = format!("d.{account}.{}", quotas::day(now_secs));
    let per_day = shared.config.discovery.daily_budget;
    match c.quotas.take(&key, n, per_day).await.map_err(internal)? {
        Some(left) => Ok(left),
        None => Err(shared.discovery.refused(now_secs)),
    }
}

/// Charges `account`'s turning `number` into an account against its discovery
/// budget, once a day per number.
pub(crate) async fn charge_lookup(
    shared: &Arc<Shared>,
    account: u64,
    number: &str,
    now_secs: u64,
) -> Result<(), NodeError> {
    let Some(c) = &shared.cluster else {
        return shared.discovery.charge_lookup(account, number, now_secs);
    };
    if shared.discovery.counted_today(account, number, now_secs) {
        return Ok(());
    }
    // The number's PRF names it alike on every node, and never in plain.
    let prf = c
        .discovery
        .key()
        .prf(number)
        .map_err(|e| internal(crate::store::StoreError::Corrupt(format!("discovery: {e}"))))?;
    let item = u64::from_be_bytes(*prf.first_chunk::<8>().unwrap_or(&[0; 8]));
    let key = format!("d.{account}.{}", quotas::day(now_secs));
    let per_day = shared.config.discovery.daily_budget;
    match c
        .quotas
        .take_once(&key, item, per_day)
        .await
        .map_err(internal)?
    {
        true => {
            shared
                .discovery
                .counted_by_cluster(account, number, now_secs);
            Ok(())
        }
        false => Err(shared.discovery.refused(now_secs)),
    }
}

/// Takes one of the `limit` of the cluster's quota `key`: whether it was left.
async fn take_one(c: &ClusterEngine, key: &str, limit: u32) -> Result<bool, NodeError> {
    let left = c.quotas.take(key, 1, limit).await.map_err(internal)?;
    Ok(left.is_some())
}

/// Whether `requester` may claim one-time keys of `target` now (counted when yes):
/// a quota per pair and one per target account, each per hour.
pub(crate) async fn allow_claim(
    shared: &Arc<Shared>,
    requester: u64,
    target: u64,
    now_secs: u64,
) -> Result<bool, NodeError> {
    let Some(c) = &shared.cluster else {
        return Ok(shared.claims.allow(requester, target));
    };
    let limits = &shared.config.messages;
    let hour = quotas::hour(now_secs);
    let pair = format!("cp.{requester}.{target}.{hour}");
    if !take_one(c, &pair, limits.key_claims_per_pair_per_hour).await? {
        return Ok(false);
    }
    let account = format!("ca.{target}.{hour}");
    take_one(c, &account, limits.key_claims_per_account_per_hour).await
}

/// Whether `account` may create or change a group now (counted when yes).
pub(crate) async fn allow_group_change(
    shared: &Arc<Shared>,
    account: u64,
    now_secs: u64,
) -> Result<bool, NodeError> {
    let Some(c) = &shared.cluster else {
        return Ok(shared.group_changes.check_key(&account).is_ok());
    };
    let key = format!("g.{account}.{}", quotas::hour(now_secs));
    let limit = shared.config.groups.changes_per_account_hour;
    take_one(c, &key, limit).await
}

/// Whether `ip` may try another link join now (counted when yes).
pub(crate) async fn allow_join(
    shared: &Arc<Shared>,
    ip: std::net::IpAddr,
    now_secs: u64,
) -> Result<bool, NodeError> {
    let Some(c) = &shared.cluster else {
        return Ok(shared.links.allow_join(ip));
    };
    let key = format!(
        "j.{}.{}",
        hex::encode(ip.to_string()),
        quotas::hour(now_secs)
    );
    let limit = shared.config.accounts.link_joins_per_address_hour;
    take_one(c, &key, limit).await
}

/// The OPRF key numbers are evaluated under: the cluster's, or this node's.
pub(crate) fn discovery_key(shared: &Shared) -> Arc<DiscoveryKey> {
    match &shared.cluster {
        Some(c) => c.discovery.key(),
        None => shared.store.discovery_key(),
    }
}

/// The membership filter clients download: built once for the cluster, or by this
/// node from its own index.
pub(crate) async fn discovery_filter(shared: &Shared) -> Result<Arc<FilterSnapshot>, NodeError> {
    match &shared.cluster {
        Some(c) => shared.discovery.cluster_filter(&c.discovery).await,
        None => shared.discovery.filter(&shared.store).await,
    }
    .map_err(internal)
}

/// Which of `prfs` are registered; `Err(current)` when `key_version` is not the
/// current key's (without one, the current key is meant).
pub(crate) async fn discovery_resolve(
    shared: &Arc<Shared>,
    key_version: Option<u32>,
    prfs: Vec<Prf>,
) -> Result<Result<Vec<bool>, u32>, NodeError> {
    match &shared.cluster {
        Some(c) => c
            .discovery
            .resolve(key_version, prfs)
            .await
            .map_err(internal),
        None => {
            read(shared, move |store| {
                let version = key_version.unwrap_or_else(|| store.discovery_key().version());
                store.discovery_resolve(version, &prfs)
            })
            .await
        }
    }
}

/// A number registered as `account`, its PRF `prf`: indexed for discovery. On sled
/// the registration indexed it in its own transaction, and it joins the filter's
/// delta here; the cluster's index is written here, before the device is told it is
/// registered (again for a number registered before: the same entry), and every
/// node's [`watch_index`] adds it to its delta.
pub(crate) async fn index_number(
    shared: &Arc<Shared>,
    key_version: u32,
    prf: Prf,
    account: u64,
) -> Result<(), NodeError> {
    match &shared.cluster {
        Some(c) => {
            // The registration stands either way: a number left out of the index
            // (after a few tries) is found again once it registers again.
            let mut tries = 0;
            loop {
                match c.discovery.index(&prf, account).await {
                    Ok(()) => {
                        // An account deleted meanwhile (its devices gone) keeps no
                        // index entry: the deletion unindexes after it decided, and
                        // this after it wrote.
                        match c.accounts.account(account).await {
                            Ok(Some(a)) if a.devices.is_empty() => {
                                if let Err(e) = c.discovery.unindex(&prf, account).await {
                                    tracing::warn!(error = %e, "a deleted account's number stayed in the discovery index");
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "could not check the account just indexed")
                            }
                        }
                        return Ok(());
                    }
                    Err(e) if tries < 3 => {
                        tries += 1;
                        tracing::warn!(error = %e, "indexing a number failed; trying again");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a registered number is not in the discovery index");
                        return Ok(());
                    }
                }
            }
        }
        None => {
            shared.discovery.registered(key_version, &prf);
            Ok(())
        }
    }
}

/// In cluster mode, until `stop`: watches the discovery index from the revision the
/// installed filter covers, so a number registered through any node joins this
/// node's delta at once. Waits for the first filter; a broken watch starts again
/// after the last entry it saw.
pub(crate) async fn watch_index(shared: Arc<Shared>, stop: CancellationToken) {
    use futures_util::StreamExt;
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let mut next = None;
    loop {
        let from = match next {
            Some(revision) => revision,
            None if shared.discovery.current_filter().is_some() => {
                shared.discovery.covers().saturating_add(1)
            }
            // No filter yet: the refresher installs one soon.
            None => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_millis(200)) => continue,
                }
            }
        };
        let watch = tokio::select! {
            () = stop.cancelled() => return,
            watch = cluster.discovery.changes_from(from) => watch,
        };
        match watch {
            Ok(mut changes) => loop {
                let change = tokio::select! {
                    () = stop.cancelled() => return,
                    change = changes.next() => change,
                };
                match change {
                    Some(Ok(entry)) => {
                        next = Some(entry.revision.saturating_add(1));
                        if entry.operation == async_nats::jetstream::kv::Operation::Put
                            && let Some(prf) = crate::cluster::discovery::indexed_prf(&entry.key)
                        {
                            shared.discovery.indexed_at(entry.revision, &prf);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the watch on the discovery index broke");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot watch the discovery index"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// Whether the caches of who is registered (a session's identity, the recipient
/// directory) may be used: always on one node, whose registrations all pass through
/// it; in cluster mode only while [`watch_registrations`] hears of every change.
pub(crate) fn directory_cacheable(shared: &Shared) -> bool {
    shared.cluster.is_none() || shared.directory_watched.load(Ordering::Acquire)
}

/// Closes this node's connections of `key`, removed (`why`) through any node, after
/// the linger a device unlinking itself has to hear its answer, unless the key came
/// back meanwhile (registered or linked again).
fn close_removed_later(
    shared: &Arc<Shared>,
    cluster: &Arc<ClusterEngine>,
    key: KeyId,
    why: Removal,
) {
    let (shared, cluster) = (shared.clone(), cluster.clone());
    tokio::spawn(async move {
        tokio::time::sleep(super::handlers::REMOVAL_LINGER).await;
        if let Ok(Some(_)) = cluster.accounts.removed_key(key).await {
            shared.connections.close_removed(key, why);
        }
    });
}

/// In cluster mode, until `stop`: watches the accounts bucket and bumps the
/// directory epoch on every change through any node (a registration, a device
/// signed out or unlinked, a key entry, a last-seen time), so this node's caches
/// are dropped as soon as it hears of one. While there is no watch (the cluster
/// unreachable, the watch broken) nothing is cached: the watch is made first, then
/// the epoch bumped (what was read before it may have missed a change), and only
/// then are caches used; a broken watch turns them off before the epoch is bumped.
pub(crate) async fn watch_registrations(shared: Arc<Shared>, stop: CancellationToken) {
    use futures_util::StreamExt;
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let bump = || shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
    loop {
        let watch = tokio::select! {
            () = stop.cancelled() => return,
            watch = cluster.accounts.changes() => watch,
        };
        match watch {
            Ok(mut changes) => {
                bump();
                shared.directory_watched.store(true, Ordering::Release);
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => break,
                        next = changes.next() => next,
                    };
                    match next {
                        Some(Ok(entry)) => {
                            bump();
                            if let Some((key, why)) = crate::cluster::accounts::removed_in(&entry) {
                                close_removed_later(&shared, &cluster, key, why);
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the watch on registrations broke");
                            break;
                        }
                        None => break,
                    }
                }
                shared.directory_watched.store(false, Ordering::Release);
                bump();
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch registrations; not caching them"),
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
