//! The admin socket's answers on a cluster node: what `store::admin` answers on
//! sled (counts, accounts, deleting an account), read from and written to the
//! cluster, so that the admin commands of any node see and change the whole
//! cluster. Like the sled side these read every account: they serve a person at a
//! terminal, not the request path.

use super::engine::ClusterEngine;
use crate::store::account_store::AccountStore;
use crate::store::keydir::KeyDirectory;
use crate::store::queue_store::QueueStore;
use crate::store::records;
use crate::store::{
    AccountSummary, Deleted, DeviceRef, DeviceSummary, GroupChange, GroupStore, ProfileStore,
    StoreCounts, StoreError,
};

/// Queue pages read for one device's summary, at most (a queue holds no more than
/// `messages.max_queued_per_device` items and their receipts).
const MAX_PAGES: usize = 10_000;

/// Counts over the whole cluster. Queued bytes and the oldest item are the queue
/// stream's, group message bodies included.
pub(super) async fn counts(c: &ClusterEngine) -> Result<StoreCounts, StoreError> {
    let mut counts = StoreCounts::default();
    for (_, id) in c.accounts.numbers().await? {
        if let Some(account) = c.accounts.account(id).await? {
            counts.accounts += 1;
            counts.devices += account.devices.len() as u64;
        }
    }
    let (messages, receipts, bytes, oldest) = c.queues.census().await?;
    counts.queued_messages = messages;
    counts.queued_receipts = receipts;
    counts.queued_bytes = bytes;
    counts.oldest_queued_ms = oldest;
    Ok(counts)
}

/// Every account, in number order.
pub(super) async fn accounts(c: &ClusterEngine) -> Result<Vec<AccountSummary>, StoreError> {
    let mut numbers = c.accounts.numbers().await?;
    numbers.sort();
    let mut out = Vec::with_capacity(numbers.len());
    for (number, id) in numbers {
        if let Some(summary) = summarise(c, number, id).await? {
            out.push(summary);
        }
    }
    Ok(out)
}

/// The account of `number`, if it has one.
pub(super) async fn account(
    c: &ClusterEngine,
    number: String,
) -> Result<Option<AccountSummary>, StoreError> {
    match c.accounts.id_of(&number).await? {
        Some(id) => summarise(c, number, id).await,
        None => Ok(None),
    }
}

async fn summarise(
    c: &ClusterEngine,
    number: String,
    id: u64,
) -> Result<Option<AccountSummary>, StoreError> {
    let Some(view) = c.accounts.view(id).await? else {
        return Ok(None);
    };
    let mut devices = Vec::with_capacity(view.record.devices.len());
    for (i, d) in view.record.devices.iter().enumerate() {
        let device = DeviceRef {
            account_id: id,
            device_id: d.device_id,
        };
        let (queued, queued_bytes) = queued(c, device).await?;
        let find = |list: &[(u32, String)]| {
            list.iter()
                .find(|(at, _)| *at == d.device_id)
                .map(|(_, n)| n.clone())
        };
        devices.push(DeviceSummary {
            device_id: d.device_id,
            primary: i == 0,
            name: find(&view.names),
            last_seen_ms: view
                .seen
                .iter()
                .find(|(at, _)| *at == d.device_id)
                .map(|(_, ms)| *ms),
            key_id: hex::encode(d.key_id),
            created_at_ms: d.created_at_ms,
            queued,
            queued_bytes,
            keys_published: c.keys.identity_keys(device).await?.is_some(),
            one_time_keys: c.keys.count_one_time_keys(device, u32::MAX).await?.into(),
        });
    }
    Ok(Some(AccountSummary {
        last_seen_ms: view.seen.iter().map(|(_, ms)| *ms).max(),
        registration_lock: view.locked,
        number,
        account_id: id,
        created_at_ms: view.record.created_at_ms,
        devices,
    }))
}

/// The items of `device`'s queue and their encoded bytes, read page by page.
async fn queued(c: &ClusterEngine, device: DeviceRef) -> Result<(u64, u64), StoreError> {
    let (mut items, mut bytes, mut after) = (0u64, 0u64, None);
    for _ in 0..MAX_PAGES {
        let (page, more) = c.queues.page(device, after, 1_000, 1 << 20).await?;
        for q in &page {
            items += 1;
            bytes += records::encode(&q.item)?.len() as u64;
            after = Some(q.seq);
        }
        if !more || page.is_empty() {
            break;
        }
    }
    Ok((items, bytes))
}

/// Deletes the account of `number` and what the cluster holds for it: its number
/// entry and pending code, its devices (their keys marked removed, which closes
/// their connections on every node), their published keys and queues, its
/// registration lock, profile and discovery index entry; it leaves its groups.
/// Messages it sent that wait in other devices' queues stay: they are the
/// recipients' mail.
///
/// The index entry, the profile and the group memberships go first (deleting
/// again finishes them if it breaks off), then the account
/// ([`JetStreamAccounts::delete_account`], decided on the number's entry), then
/// the index entry once more and the devices' queues and keys. Broken off after
/// the account went, what is left is never handed out: no device lists the keys,
/// and nobody can read the queues, which age out with the TTL.
///
/// [`JetStreamAccounts::delete_account`]: crate::cluster::accounts::JetStreamAccounts::delete_account
pub(super) async fn delete(
    c: &ClusterEngine,
    number: &str,
    now_ms: u64,
) -> Result<Option<Deleted>, StoreError> {
    let Some(id) = c.accounts.id_of(number).await? else {
        return Ok(None);
    };
    let prf = c
        .discovery
        .key()
        .prf(number)
        .map_err(|e| StoreError::Corrupt(format!("the PRF of a number: {e}")))?;
    c.discovery.unindex(&prf, id).await?;
    c.profiles.forget_profile(id).await?;
    for group in c.groups.groups_of(id).await? {
        // An admin's role passes on as on a leave; a refusal (the group is gone)
        // leaves nothing to do.
        let _ = c
            .groups
            .change_group(group, id, GroupChange::Leave, u32::MAX, now_ms)
            .await?;
    }
    let Some((account_id, records)) = c.accounts.delete_account(number, now_ms).await? else {
        return Ok(None);
    };
    // A registration of the number in flight may have indexed it since
    // (`engine::index_number` checks after it writes).
    c.discovery.unindex(&prf, account_id).await?;
    let mut queued_items = 0;
    let mut devices = Vec::with_capacity(records.len());
    for d in &records {
        let device = DeviceRef {
            account_id,
            device_id: d.device_id,
        };
        queued_items += c.queues.drop_queue(device).await?;
        c.keys.forget(device).await?;
        devices.push(device);
    }
    Ok(Some(Deleted {
        account_id,
        devices,
        key_ids: records.iter().map(|d| d.key_id).collect(),
        queued_items,
    }))
}
