//! Groups: who is in them, with which role, at which version. The node enforces the
//! rules (admins add, remove and promote; anyone may leave; the last admin to leave
//! hands the role to the member who joined first); what a group is called is its
//! members' secret ([`GroupRecord::meta`] is opaque here).

use std::future::Future;

use sled::transaction::Transactional;

use super::layout::{self, DeviceKey};
use super::queue_store::GroupSend;
use super::records::{self, GroupMemberRecord, GroupRecord};
use super::{DeviceRef, QueueState, Store, StoreError, abort};

/// The flag, in the top bit of a `group_body` row's time, of a disappearing
/// message's body: the time is then when it is dropped, not when it was stored.
const BODY_EXPIRES: u64 = 1 << 63;

/// A change to a group, by one of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// Admins: add these accounts (those already in are left as they are).
    Add(Vec<u64>),
    /// Admins: remove this member.
    Remove(u64),
    /// Admins: make this member an admin.
    Promote(u64),
    /// Anyone: leave.
    Leave,
    /// Admins: replace the encrypted name, description and picture.
    SetMeta(Vec<u8>),
}

/// Why a group change was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRefusal {
    /// The actor is not a member (or there is no such group: the same to them).
    NotMember,
    NotAdmin,
    /// The group would have more than `max` members.
    Full {
        max: u32,
    },
    /// The account to remove or promote is not a member.
    NotInGroup(u64),
}

fn group_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn member_key(account: u64, group: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&account.to_be_bytes());
    k[8..].copy_from_slice(&group.to_be_bytes());
    k
}

/// Groups as a storage concern (sled here, `cluster::groups` on JetStream).
pub trait GroupStore: Send + Sync {
    /// Creates a group of `creator` (its admin) and `members`; its id and record.
    fn create_group(
        &self,
        creator: u64,
        members: Vec<u64>,
        meta: Vec<u8>,
        max: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<(u64, GroupRecord), GroupRefusal>, StoreError>> + Send;

    /// Applies `change` by `actor` ([`apply_change`]); `Ok(None)`: the group is gone.
    fn change_group(
        &self,
        group: u64,
        actor: u64,
        change: GroupChange,
        max: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError>> + Send;

    /// Group `group`, if there is one.
    fn group(
        &self,
        group: u64,
    ) -> impl Future<Output = Result<Option<GroupRecord>, StoreError>> + Send;

    /// The groups `account` is in, by id.
    fn groups_of(&self, account: u64) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
}

impl GroupStore for Store {
    async fn create_group(
        &self,
        creator: u64,
        members: Vec<u64>,
        meta: Vec<u8>,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<(u64, GroupRecord), GroupRefusal>, StoreError> {
        super::blocking(self, move |s| {
            Store::create_group(s, creator, &members, &meta, max, now_ms)
        })
        .await
    }

    async fn change_group(
        &self,
        group: u64,
        actor: u64,
        change: GroupChange,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError> {
        super::blocking(self, move |s| {
            Store::change_group(s, group, actor, &change, max, now_ms)
        })
        .await
    }

    async fn group(&self, group: u64) -> Result<Option<GroupRecord>, StoreError> {
        super::blocking(self, move |s| Store::group(s, group)).await
    }

    async fn groups_of(&self, account: u64) -> Result<Vec<u64>, StoreError> {
        super::blocking(self, move |s| Store::groups_of(s, account)).await
    }
}

/// The rules of a group change, whatever keeps the group: applies `change` by
/// `actor` to `record` (at most `max` members; admins add, remove, promote and set
/// the meta; anyone leaves; the member who joined first takes over when the last
/// admin goes) and bumps its version. Returns the accounts added and removed; a
/// refusal leaves `record` as it was. An emptied record means the group is gone.
pub fn apply_change(
    record: &mut GroupRecord,
    actor: u64,
    change: &GroupChange,
    max: u32,
    now_ms: u64,
) -> Result<(Vec<u64>, Vec<u64>), GroupRefusal> {
    let Some(me) = record
        .members
        .iter()
        .find(|m| m.account_id == actor)
        .copied()
    else {
        return Err(GroupRefusal::NotMember);
    };
    let admin_only = !matches!(change, GroupChange::Leave);
    if admin_only && !me.admin {
        return Err(GroupRefusal::NotAdmin);
    }
    let position = |r: &GroupRecord, a: u64| r.members.iter().position(|m| m.account_id == a);
    let mut removed = Vec::new();
    let mut added = Vec::new();
    match change {
        GroupChange::Add(accounts) => {
            for &a in accounts {
                if position(record, a).is_none() && !added.contains(&a) {
                    added.push(a);
                }
            }
            if record.members.len() + added.len() > max as usize {
                return Err(GroupRefusal::Full { max });
            }
            record
                .members
                .extend(added.iter().map(|&a| GroupMemberRecord {
                    account_id: a,
                    admin: false,
                    joined_at_ms: now_ms,
                }));
        }
        GroupChange::Remove(a) | GroupChange::Promote(a) => {
            let Some(at) = position(record, *a) else {
                return Err(GroupRefusal::NotInGroup(*a));
            };
            if matches!(change, GroupChange::Remove(_)) {
                record.members.remove(at);
                removed.push(*a);
            } else {
                record.members[at].admin = true;
            }
        }
        GroupChange::Leave => {
            if let Some(at) = position(record, actor) {
                record.members.remove(at);
            }
            removed.push(actor);
        }
        GroupChange::SetMeta(meta) => record.meta.clone_from(meta),
    }
    // A group always has an admin while it has members: the one who joined first
    // (the list is in joining order) takes over.
    if !record.members.is_empty() && !record.members.iter().any(|m| m.admin) {
        record.members[0].admin = true;
    }
    record.version += 1;
    Ok((added, removed))
}

/// The members of a new group: `creator` (its admin) and `members`, once each; at
/// most `max` in all.
pub fn new_group(
    creator: u64,
    members: &[u64],
    meta: &[u8],
    max: u32,
    now_ms: u64,
) -> Result<GroupRecord, GroupRefusal> {
    let mut list = vec![GroupMemberRecord {
        account_id: creator,
        admin: true,
        joined_at_ms: now_ms,
    }];
    for &m in members {
        if !list.iter().any(|x| x.account_id == m) {
            list.push(GroupMemberRecord {
                account_id: m,
                admin: false,
                joined_at_ms: now_ms,
            });
        }
    }
    if list.len() > max as usize {
        return Err(GroupRefusal::Full { max });
    }
    Ok(GroupRecord {
        version: 1,
        created_at_ms: now_ms,
        members: list,
        meta: meta.to_vec(),
    })
}

impl Store {
    /// Creates a group of `creator` (its admin) and `members`, with `meta`; at most
    /// `max` members in all. Returns its id and record.
    pub fn create_group(
        &self,
        creator: u64,
        members: &[u64],
        meta: &[u8],
        max: u32,
        now_ms: u64,
    ) -> Result<Result<(u64, GroupRecord), GroupRefusal>, StoreError> {
        let _gate = self.writing();
        let record = match new_group(creator, members, meta, max, now_ms) {
            Ok(r) => r,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let id = self.next_id()?;
        let value = records::encode(&record)?;
        let t = &self.trees;
        (&t.group, &t.account_group).transaction(|(groups, index)| {
            groups.insert(&group_key(id), value.as_slice())?;
            for m in &record.members {
                index.insert(&member_key(m.account_id, id), &[][..])?;
            }
            Ok(())
        })?;
        Ok(Ok((id, record)))
    }

    /// Applies `change` by `actor` to group `group` (at most `max` members), in one
    /// transaction. `Ok(None)`: the group is gone (its last member left).
    pub fn change_group(
        &self,
        group: u64,
        actor: u64,
        change: &GroupChange,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError> {
        let _gate = self.writing();
        self.change_group_held(group, actor, change, max, now_ms)
    }

    /// [`Store::change_group`] for a caller that holds the write gate.
    pub(super) fn change_group_held(
        &self,
        group: u64,
        actor: u64,
        change: &GroupChange,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError> {
        let t = &self.trees;
        let outcome = (&t.group, &t.account_group).transaction(|(groups, index)| {
            let Some(bytes) = groups.get(group_key(group))? else {
                return Ok(Err(GroupRefusal::NotMember));
            };
            let mut record = records::decode::<GroupRecord>(&bytes, "group").or_else(abort)?;
            let (added, removed) = match apply_change(&mut record, actor, change, max, now_ms) {
                Ok(done) => done,
                Err(refusal) => return Ok(Err(refusal)),
            };
            for a in &removed {
                index.remove(&member_key(*a, group)[..])?;
            }
            for a in &added {
                index.insert(&member_key(*a, group), &[][..])?;
            }
            if record.members.is_empty() {
                groups.remove(&group_key(group))?;
                return Ok(Ok(None));
            }
            groups.insert(&group_key(group), records::encode(&record).or_else(abort)?)?;
            Ok(Ok(Some(record)))
        })?;
        Ok(outcome)
    }

    /// Group `group`, if there is one.
    pub fn group(&self, group: u64) -> Result<Option<GroupRecord>, StoreError> {
        match self.trees.group.get(group_key(group))? {
            Some(bytes) => Ok(Some(records::decode(&bytes, "group")?)),
            None => Ok(None),
        }
    }

    /// The groups `account` is in, by id.
    pub fn groups_of(&self, account: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for key in self
            .trees
            .account_group
            .scan_prefix(account.to_be_bytes())
            .keys()
        {
            let key = key?;
            let id = key
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .ok_or_else(|| StoreError::Corrupt("account_group key".into()))?;
            out.push(u64::from_be_bytes(id));
        }
        Ok(out)
    }
}

/// What [`Store::append_group`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAppend {
    /// Queued for every recipient device, with one body.
    Queued { accepted_at_ms: u64 },
    /// That device's queue is full: nothing was queued.
    QueueFull { device: DeviceRef },
}

fn body_key(body_ref: u64) -> [u8; 8] {
    body_ref.to_be_bytes()
}

/// `group_receipt` key: the sending device, then the message id.
fn receipt_key(sender: DeviceKey, id: &[u8; 16]) -> [u8; 28] {
    let mut k = [0u8; 28];
    k[..12].copy_from_slice(&sender);
    k[12..].copy_from_slice(id);
    k
}

/// A `group_receipt` row: how far the delivery of one group message has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReceiptRow {
    group_id: u64,
    /// Devices it was queued for.
    of: u32,
    /// Devices that acknowledged it.
    delivered: u32,
    /// The sender's queue item that reports the count (0: none yet).
    pending_seq: u64,
    at_ms: u64,
}

impl ReceiptRow {
    fn encode(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[..8].copy_from_slice(&self.group_id.to_be_bytes());
        v[8..12].copy_from_slice(&self.of.to_be_bytes());
        v[12..16].copy_from_slice(&self.delivered.to_be_bytes());
        v[16..24].copy_from_slice(&self.pending_seq.to_be_bytes());
        v[24..].copy_from_slice(&self.at_ms.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<ReceiptRow, StoreError> {
        let v: &[u8; 32] = v
            .try_into()
            .map_err(|_| StoreError::Corrupt("a group_receipt value is not 32 bytes".into()))?;
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap_or_default());
        Ok(ReceiptRow {
            group_id: u64_at(0),
            of: u32_at(8),
            delivered: u32_at(12),
            pending_seq: u64_at(16),
            at_ms: u64_at(24),
        })
    }
}

impl Store {
    /// Queues the group message `id` of `sender` to group `group_id` for every device
    /// of `recipients`, storing `body` once: a `group_body` row counting the devices
    /// and a small queue item per device pointing at it. Written to sled directly (a
    /// recipient's items held in memory go first, so its queue stays in order); the
    /// caller makes it durable. Nothing is queued if a queue is full.
    pub fn append_group(&self, m: &GroupSend, max_queued: u64) -> Result<GroupAppend, StoreError> {
        let GroupSend {
            sender,
            ref sender_number,
            group_id,
            id,
            ref body,
            ref recipients,
            now_ms,
            expires_at_ms,
        } = *m;
        let _gate = self.writing();
        let mut q = self.queue_writer();
        for &device in recipients {
            self.written_max(&mut q, device.key())?;
            if self.len_of(&mut q, device.key()) >= max_queued {
                return Ok(GroupAppend::QueueFull { device });
            }
        }
        let body_ref = self.next_id()?;
        let of = recipients.len() as u32;
        // Held by `of` devices; stored at `now_ms`, or (top bit set) dropped at
        // `expires_at_ms`, a disappearing message.
        let mut row = of.to_be_bytes().to_vec();
        let at = expires_at_ms.map_or(now_ms, |until| until | BODY_EXPIRES);
        row.extend_from_slice(&at.to_be_bytes());
        row.extend_from_slice(body);
        self.trees.group_body.insert(body_key(body_ref), row)?;
        if of > 0 {
            let receipt = ReceiptRow {
                group_id,
                of,
                delivered: 0,
                pending_seq: 0,
                at_ms: now_ms,
            };
            self.trees
                .group_receipt
                .insert(receipt_key(sender.key(), &id), &receipt.encode()[..])?;
        }
        let item = records::QueueItem::GroupMessage {
            from_account: sender.account_id,
            from_device: sender.device_id,
            from_number: sender_number.to_string(),
            group_id,
            id,
            body_ref,
        };
        let value = records::encode_queued_until(now_ms, expires_at_ms, &item)?;
        for &device in recipients {
            let dk = device.key();
            self.write_device_staged(&mut q, dk)?;
            let seq = self.next_id()?;
            self.write_new_queue_item(&mut q, dk, seq, &value)?;
        }
        Ok(GroupAppend::Queued {
            accepted_at_ms: now_ms,
        })
    }

    /// The body of a group message, if it is still held.
    pub(super) fn group_body(&self, body_ref: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .trees
            .group_body
            .get(body_key(body_ref))?
            .and_then(|row| row.get(12..).map(<[u8]>::to_vec)))
    }

    /// One recipient device is done with the body `body_ref`; the last one drops it.
    pub(super) fn release_group_body(&self, body_ref: u64) -> Result<(), StoreError> {
        let key = body_key(body_ref);
        loop {
            let Some(row) = self.trees.group_body.get(key)? else {
                return Ok(());
            };
            let held = row
                .first_chunk::<4>()
                .map(|b| u32::from_be_bytes(*b))
                .ok_or_else(|| StoreError::Corrupt("group_body value too short".into()))?;
            let next = if held <= 1 {
                None
            } else {
                let mut next = row.to_vec();
                next[..4].copy_from_slice(&(held - 1).to_be_bytes());
                Some(next)
            };
            if self
                .trees
                .group_body
                .compare_and_swap(key, Some(&row), next)?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// One more device acknowledged `sender`'s group message `id`: counts it, and
    /// replaces the sender's item that reports the count with one of the new count
    /// (so its queue holds one per message, however many devices take it). Returns the
    /// sender, to be woken, or `None` when nothing is counted any more (the message
    /// expired, or every device had it). Caller holds the gate and the writer lock.
    /// A crash between this and the removal of the acknowledged item counts that
    /// device twice when it acknowledges the redelivery (the count stops at `of`).
    pub(super) fn count_group_delivery(
        &self,
        q: &mut QueueState,
        sender: DeviceRef,
        id: [u8; 16],
        now_ms: u64,
    ) -> Result<Option<DeviceRef>, StoreError> {
        let sk = sender.key();
        let key = receipt_key(sk, &id);
        let Some(row) = self.trees.group_receipt.get(key)? else {
            return Ok(None);
        };
        let mut row = ReceiptRow::decode(&row)?;
        row.delivered = row.delivered.saturating_add(1).min(row.of);
        self.write_device_staged(q, sk)?;
        if row.pending_seq != 0 {
            let old = layout::queue(sk, row.pending_seq);
            if let Some(value) = self.trees.queue.remove(&old[..])? {
                self.queue_totals.remove(value.len());
                if let Some(len) = q.lens.get_mut(&sk) {
                    *len = len.saturating_sub(1);
                }
            }
        }
        let item = records::QueueItem::GroupDelivered {
            group_id: row.group_id,
            id,
            delivered: row.delivered,
            of: row.of,
        };
        let value = records::encode_queued(now_ms, &item)?;
        let seq = self.next_id()?;
        self.write_new_queue_item(q, sk, seq, &value)?;
        if row.delivered >= row.of {
            self.trees.group_receipt.remove(key)?;
        } else {
            row.pending_seq = seq;
            self.trees.group_receipt.insert(key, &row.encode()[..])?;
        }
        Ok(Some(sender))
    }

    /// Drops group bodies stored before `cutoff_ms` or past their own expiry (their queue items have expired
    /// with them, or went with a removed device), and the counts of their delivery;
    /// returns how many bodies.
    pub(super) fn sweep_group_bodies(
        &self,
        cutoff_ms: u64,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        for entry in self.trees.group_receipt.iter() {
            let (key, row) = entry?;
            if ReceiptRow::decode(&row).is_ok_and(|r| r.at_ms < cutoff_ms) {
                let _ =
                    self.trees
                        .group_receipt
                        .compare_and_swap(&key, Some(&row), None::<&[u8]>)?;
            }
        }
        let mut dropped = 0;
        for entry in self.trees.group_body.iter() {
            let (key, row) = entry?;
            let at = row
                .get(4..12)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            let due = at.is_some_and(|at| {
                if at & BODY_EXPIRES == 0 {
                    at < cutoff_ms
                } else {
                    at & !BODY_EXPIRES <= now_ms
                }
            });
            if due
                && self
                    .trees
                    .group_body
                    .compare_and_swap(&key, Some(&row), None::<&[u8]>)?
                    .is_ok()
            {
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

impl Store {
    /// How many devices acknowledged `sender`'s group message `id` (0: none, or no
    /// count kept), for `switchboard admin export-to-cluster`.
    pub fn export_group_delivered(
        &self,
        sender: DeviceRef,
        id: &[u8; 16],
    ) -> Result<u32, StoreError> {
        match self
            .trees
            .group_receipt
            .get(receipt_key(sender.key(), id))?
        {
            Some(v) => Ok(ReceiptRow::decode(&v)?.delivered),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::QueueItem;

    fn members(r: &GroupRecord) -> Vec<(u64, bool)> {
        r.members.iter().map(|m| (m.account_id, m.admin)).collect()
    }

    #[test]
    fn admins_change_a_group_anyone_leaves_and_the_first_to_join_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (id, g) = store
            .create_group(1, &[2, 3, 2], b"meta", 4, 10)
            .unwrap()
            .unwrap();
        assert_eq!(members(&g), [(1, true), (2, false), (3, false)]);
        assert_eq!(g.version, 1);
        let change = |actor, c: GroupChange| store.change_group(id, actor, &c, 4, 20).unwrap();
        assert_eq!(
            change(2, GroupChange::Add(vec![4])),
            Err(GroupRefusal::NotAdmin)
        );
        assert_eq!(change(9, GroupChange::Leave), Err(GroupRefusal::NotMember));
        assert_eq!(
            change(1, GroupChange::Add(vec![4, 5])),
            Err(GroupRefusal::Full { max: 4 })
        );
        assert_eq!(
            change(1, GroupChange::Remove(7)),
            Err(GroupRefusal::NotInGroup(7))
        );
        // Nothing changed so far.
        assert_eq!(store.group(id).unwrap().unwrap().version, 1);
        let g = change(1, GroupChange::Add(vec![4, 2])).unwrap().unwrap();
        assert_eq!((g.version, g.members.len()), (2, 4));
        assert_eq!(store.groups_of(4).unwrap(), vec![id]);
        let g = change(1, GroupChange::Remove(3)).unwrap().unwrap();
        assert_eq!(members(&g), [(1, true), (2, false), (4, false)]);
        assert!(store.groups_of(3).unwrap().is_empty());
        // The last admin leaves: the member who joined first takes over.
        let g = change(1, GroupChange::Leave).unwrap().unwrap();
        assert_eq!(members(&g), [(2, true), (4, false)]);
        let g = change(2, GroupChange::Promote(4)).unwrap().unwrap();
        assert_eq!(members(&g), [(2, true), (4, true)]);
        let g = change(4, GroupChange::SetMeta(b"new".to_vec()))
            .unwrap()
            .unwrap();
        assert_eq!(g.meta, b"new");
        assert_eq!(
            change(2, GroupChange::Leave)
                .unwrap()
                .unwrap()
                .members
                .len(),
            1
        );
        // The last member leaves: the group is gone.
        assert_eq!(change(4, GroupChange::Leave), Ok(None));
        assert_eq!(store.group(id).unwrap(), None);
        assert!(store.groups_of(4).unwrap().is_empty());
        assert_eq!(
            store.create_group(1, &[2, 3, 4, 5], b"", 4, 30).unwrap(),
            Err(GroupRefusal::Full { max: 4 })
        );
    }

    #[test]
    fn a_group_message_is_stored_once_and_goes_with_its_last_recipient() {
        use crate::store::queues::tests::registered;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = registered(&store, "+14155550100", 1);
        let others: Vec<DeviceRef> = (2..5)
            .map(|i| registered(&store, &format!("+1415555010{i}"), i))
            .collect();
        let body = vec![7u8; 64 * 1024];
        let out = store
            .append_group(
                &GroupSend {
                    sender: alice,
                    sender_number: "+14155550100".into(),
                    group_id: 9,
                    id: [1; 16],
                    body: body.clone(),
                    recipients: others.clone(),
                    now_ms: 5,
                    expires_at_ms: None,
                },
                10,
            )
            .unwrap();
        assert_eq!(out, GroupAppend::Queued { accepted_at_ms: 5 });
        assert_eq!(store.trees.group_body.len(), 1);
        let stored: usize = store
            .trees
            .queue
            .iter()
            .values()
            .map(|v| v.unwrap().len())
            .sum();
        assert!(stored < 3 * 256, "3 queue items of {stored} bytes in all");
        for (n, device) in others.iter().enumerate() {
            let page = store.queue_page(*device, None, 10).unwrap();
            assert_eq!(page.len(), 1);
            assert_eq!(page[0].group_body.as_deref(), Some(&body[..]));
            let seq = page[0].seq;
            assert_eq!(store.ack(*device, "x", &[seq], 6).unwrap(), [alice]);
            assert_eq!(store.trees.group_body.len(), usize::from(n < 2));
            // The sender's queue holds one count of the deliveries, the latest.
            let counts: Vec<QueueItem> = store
                .queue_page(alice, None, 10)
                .unwrap()
                .into_iter()
                .map(|q| q.item)
                .collect();
            assert_eq!(
                counts,
                [QueueItem::GroupDelivered {
                    group_id: 9,
                    id: [1; 16],
                    delivered: n as u32 + 1,
                    of: 3
                }]
            );
        }
        // Every device has it: nothing more is counted.
        assert_eq!(store.trees.group_receipt.len(), 0);
        // A full queue refuses the whole message.
        let out = store
            .append_group(
                &GroupSend {
                    sender: alice,
                    sender_number: "+14155550100".into(),
                    group_id: 9,
                    id: [2; 16],
                    body: b"x".to_vec(),
                    recipients: others.clone(),
                    now_ms: 7,
                    expires_at_ms: None,
                },
                0,
            )
            .unwrap();
        assert_eq!(out, GroupAppend::QueueFull { device: others[0] });
        assert_eq!(store.trees.group_body.len(), 0);
        // Bodies outlive nothing: what the sweep finds past the TTL goes.
        store
            .append_group(
                &GroupSend {
                    sender: alice,
                    sender_number: "+14155550100".into(),
                    group_id: 9,
                    id: [3; 16],
                    body: b"y".to_vec(),
                    recipients: others.clone(),
                    now_ms: 8,
                    expires_at_ms: None,
                },
                10,
            )
            .unwrap();
        assert_eq!(store.trees.group_receipt.len(), 1);
        assert_eq!(store.sweep_group_bodies(9, 9).unwrap(), 1);
        assert_eq!(store.trees.group_receipt.len(), 0);
    }

    #[test]
    fn a_deleted_account_leaves_its_groups() {
        use crate::store::queues::tests::registered;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = registered(&store, "+14155550100", 1).account_id;
        let bob = registered(&store, "+14155550101", 2).account_id;
        let (id, _) = store
            .create_group(alice, &[bob], b"", 10, 1)
            .unwrap()
            .unwrap();
        store.delete_account("+14155550100").unwrap().unwrap();
        let g = store.group(id).unwrap().unwrap();
        assert_eq!(members(&g), [(bob, true)]);
        assert!(store.groups_of(alice).unwrap().is_empty());
    }
}
