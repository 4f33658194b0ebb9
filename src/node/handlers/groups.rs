//! Groups: `CreateGroup`, `ChangeGroup`, `FetchGroup`, `ListGroups`. The node keeps
//! the membership and enforces who may change it; the group's name is opaque.

use std::sync::Arc;

use super::send::unknown_recipient;
use super::{check_space, parse_number};
use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::clock::now_secs;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::proto::{
    ErrorKind, GroupChange, GroupInfo, GroupMember, GroupSummary, MemberDevices, NodeError,
    Response, group_devices_digest,
};
use crate::store::queue_store::GroupSend;
use crate::store::records::GroupRecord;
use crate::store::{self, DeviceRef, GroupAppend, GroupRefusal};

/// The most members one request names.
const MAX_NAMED: usize = 1024;

/// The error for `r`; `named` is the member the change named (the one a
/// `NotInGroup` is about).
fn refusal(r: GroupRefusal, named: Option<&str>) -> NodeError {
    match r {
        GroupRefusal::NotMember => NodeError::new(
            ErrorKind::NotGroupMember,
            "this account is not in that group",
        ),
        GroupRefusal::NotAdmin => NodeError::new(
            ErrorKind::NotGroupAdmin,
            "only the group's admins may do this",
        ),
        GroupRefusal::Full { max } => NodeError::new(
            ErrorKind::GroupFull { max },
            format!("a group has at most {max} members"),
        ),
        GroupRefusal::NotInGroup(_) => NodeError::new(
            ErrorKind::NotGroupMember,
            format!("{} is not in that group", named.unwrap_or("that member")),
        ),
    }
}

/// Counts a group creation or change of `account` against its hourly quota.
async fn charge(shared: &Arc<Shared>, account: u64) -> Result<(), NodeError> {
    if !engine::allow_group_change(shared, account, now_secs()).await? {
        return Err(NodeError::new(
            ErrorKind::RateLimited {
                retry_after_secs: 60,
            },
            format!(
                "this account made {} group changes in the last hour, as many as the node \
                 allows; try again later",
                shared.config.groups.changes_per_account_hour
            ),
        ));
    }
    Ok(())
}

fn check_meta(shared: &Shared, meta: &[u8]) -> Result<(), NodeError> {
    let max = shared.config.groups.max_meta_bytes;
    if meta.len() > max as usize {
        return Err(NodeError::new(
            ErrorKind::Malformed,
            format!("a group's name, description and picture take at most {max} bytes"),
        ));
    }
    Ok(())
}

/// The accounts of `numbers`, each registered (else `UnknownRecipient`, naming it).
async fn accounts_of(shared: &Arc<Shared>, numbers: &[String]) -> Result<Vec<u64>, NodeError> {
    if numbers.len() > MAX_NAMED {
        return Err(NodeError::new(
            ErrorKind::Malformed,
            format!(
                "{} members in one request; at most {MAX_NAMED}",
                numbers.len()
            ),
        ));
    }
    let mut parsed = Vec::with_capacity(numbers.len());
    for n in numbers {
        parsed.push(parse_number(n)?.to_string());
    }
    let found = engine::accounts_by_number(shared, parsed.clone()).await?;
    parsed
        .iter()
        .zip(found)
        .map(|(n, a)| a.map(|(id, _)| id).ok_or_else(|| unknown_recipient(n)))
        .collect()
}

/// The group as its members see it (numbers for account ids).
async fn info(
    shared: &Arc<Shared>,
    group_id: u64,
    record: GroupRecord,
) -> Result<GroupInfo, NodeError> {
    let ids = record.members.iter().map(|m| m.account_id).collect();
    let accounts = engine::accounts(shared, ids).await?;
    // An account deleted by the operator leaves no number behind.
    let members = record
        .members
        .iter()
        .zip(accounts)
        .filter_map(|(m, account)| {
            Some(GroupMember {
                number: account?.number,
                admin: m.admin,
                joined_at_ms: m.joined_at_ms,
            })
        })
        .collect();
    Ok(GroupInfo {
        group_id,
        version: record.version,
        members,
        meta: record.meta,
    })
}

pub(super) async fn create(
    shared: &Arc<Shared>,
    session: &Session,
    members: Vec<String>,
    meta: Vec<u8>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    check_space(shared)?;
    check_meta(shared, &meta)?;
    let accounts = accounts_of(shared, &members).await?;
    charge(shared, me.device.account_id).await?;
    let (creator, max, now) = (
        me.device.account_id,
        shared.config.groups.max_members,
        now_ms(),
    );
    let created = engine::create_group(shared, creator, accounts, meta, max, now).await?;
    let (id, record) = created.map_err(|r| refusal(r, None))?;
    engine::durable(shared).await?;
    tracing::info!(group = id, members = record.members.len(), "group created");
    Ok(Response::Group(info(shared, id, record).await?))
}

pub(super) async fn change(
    shared: &Arc<Shared>,
    session: &Session,
    group_id: u64,
    change: GroupChange,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    check_space(shared)?;
    let (change, named) = match change {
        GroupChange::Add { numbers } => {
            let accounts = accounts_of(shared, &numbers).await?;
            (store::GroupChange::Add(accounts), numbers)
        }
        GroupChange::Remove { number } => {
            let account = accounts_of(shared, std::slice::from_ref(&number)).await?;
            (store::GroupChange::Remove(account[0]), vec![number])
        }
        GroupChange::Promote { number } => {
            let account = accounts_of(shared, std::slice::from_ref(&number)).await?;
            (store::GroupChange::Promote(account[0]), vec![number])
        }
        GroupChange::Leave => (store::GroupChange::Leave, Vec::new()),
        GroupChange::SetMeta { meta } => {
            check_meta(shared, &meta)?;
            (store::GroupChange::SetMeta(meta), Vec::new())
        }
    };
    charge(shared, me.device.account_id).await?;
    let (actor, max, now) = (
        me.device.account_id,
        shared.config.groups.max_members,
        now_ms(),
    );
    let leaving = change == store::GroupChange::Leave;
    let changed = engine::change_group(shared, group_id, actor, change, max, now).await?;
    let record = changed.map_err(|r| refusal(r, named.first().map(String::as_str)))?;
    engine::durable(shared).await?;
    match record {
        _ if leaving => Ok(Response::GroupLeft),
        Some(record) => Ok(Response::Group(info(shared, group_id, record).await?)),
        // Only a leave empties a group.
        None => Ok(Response::GroupLeft),
    }
}

pub(super) async fn fetch(
    shared: &Arc<Shared>,
    session: &Session,
    group_id: u64,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let account = me.device.account_id;
    let record = engine::group(shared, group_id)
        .await?
        .filter(|g| g.members.iter().any(|m| m.account_id == account))
        .ok_or_else(|| refusal(GroupRefusal::NotMember, None))?;
    Ok(Response::Group(info(shared, group_id, record).await?))
}

pub(super) async fn list(shared: &Arc<Shared>, session: &Session) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let account = me.device.account_id;
    let groups = engine::groups_of(shared, account)
        .await?
        .into_iter()
        .map(|(id, g)| GroupSummary {
            group_id: id,
            version: g.version,
        })
        .collect();
    Ok(Response::Groups { groups })
}

/// Every device of every member of group `group_id` but `sending` (its own other
/// devices too: the conversation reads the same on each), by member number; refused
/// when `sending`'s account is not a member.
pub(super) async fn member_devices(
    shared: &Arc<Shared>,
    group_id: u64,
    sending: DeviceRef,
) -> Result<Vec<(String, Vec<DeviceRef>)>, NodeError> {
    let account = sending.account_id;
    let group = engine::group(shared, group_id)
        .await?
        .filter(|g| g.members.iter().any(|m| m.account_id == account))
        .ok_or_else(|| refusal(GroupRefusal::NotMember, None))?;
    let ids: Vec<u64> = group.members.iter().map(|m| m.account_id).collect();
    let records = engine::accounts(shared, ids.clone()).await?;
    Ok(ids
        .into_iter()
        .zip(records)
        .filter_map(|(account_id, record)| {
            let record = record?;
            let devices: Vec<DeviceRef> = record
                .devices
                .iter()
                .map(|d| DeviceRef {
                    account_id,
                    device_id: d.device_id,
                })
                .filter(|d| *d != sending)
                .collect();
            Some((record.number, devices))
        })
        .collect())
}

pub(super) async fn send(
    shared: &Arc<Shared>,
    session: &Session,
    group_id: u64,
    id: crate::proto::MessageId,
    body: Vec<u8>,
    digest: [u8; 32],
    expires_in_secs: u32,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let limits = &shared.config.messages;
    let max = limits.max_envelope_bytes;
    if body.len() > max as usize {
        return Err(NodeError::new(
            ErrorKind::EnvelopeTooLarge { max },
            format!("a message may be at most {max} bytes once encrypted"),
        ));
    }
    check_space(shared)?;
    let account = me.device.account_id;
    let members = member_devices(shared, group_id, me.device).await?;
    let listed: Vec<MemberDevices> = members
        .iter()
        .filter(|(_, devices)| !devices.is_empty())
        .map(|(number, devices)| MemberDevices {
            number: number.clone(),
            devices: devices.iter().map(|d| d.device_id).collect(),
        })
        .collect();
    if group_devices_digest(&listed) != digest {
        // The sender's key went to other devices than these: it shares it (or a new
        // one) and sends again.
        return Err(NodeError::new(
            ErrorKind::GroupDevicesChanged { members: listed },
            "the group's devices are not those the sender key went to",
        ));
    }
    let recipients: Vec<DeviceRef> = members.into_iter().flat_map(|(_, d)| d).collect();
    super::send::charge_envelopes(shared, account, recipients.len())?;
    let now = now_ms();
    let max_queued = u64::from(limits.max_queued_per_device);
    let message = GroupSend {
        sender: me.device,
        sender_number: me.number.clone(),
        group_id,
        id,
        body,
        recipients: recipients.clone(),
        now_ms: now,
        expires_at_ms: super::send::expiry(shared, now, expires_in_secs),
    };
    match engine::append_group(shared, message, max_queued).await? {
        GroupAppend::Queued { accepted_at_ms } => {
            engine::durable(shared).await?;
            for device in &recipients {
                shared.mailboxes.wake(*device);
            }
            Ok(Response::GroupAccepted {
                id,
                accepted_at_ms,
                recipients: recipients.len() as u32,
            })
        }
        GroupAppend::QueueFull { device } => Err(NodeError::new(
            ErrorKind::QueueFull {
                device_id: device.device_id,
            },
            "a member device's queue is full; nothing was queued",
        )),
    }
}
