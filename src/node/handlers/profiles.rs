//! Profiles, presence and typing indicators.
//!
//! A profile is end-to-end encrypted by its account's client under a profile key the
//! node never sees; the node keeps the ciphertext beside a version derived from that
//! key and hands it out only to a device that names the version. A typing indicator
//! goes to the recipients' connected devices, in memory, and is never stored.

use std::sync::Arc;

use super::send::{charge_envelopes, recipient, unknown_recipient};
use super::{charge_lookup, check_space};
use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::proto::{ErrorKind, Item, NodeError, Response, TypingNotice, TypingTo};
use crate::store::DeviceRef;

/// The largest presence blob: a timestamp, sealed.
pub const MAX_PRESENCE_BYTES: usize = 256;

fn too_large(max: usize) -> NodeError {
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    NodeError::new(
        ErrorKind::ProfileTooLarge { max },
        format!("a profile may be at most {max} bytes once encrypted"),
    )
}

fn no_profile() -> NodeError {
    NodeError::new(
        ErrorKind::NoProfile,
        "no profile of that version is here (its owner has not shared its key with you)",
    )
}

pub(super) async fn set(
    shared: &Arc<Shared>,
    session: &Session,
    version: [u8; 32],
    blob: Vec<u8>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let max = shared.config.messages.max_profile_bytes as usize;
    if blob.len() > max {
        return Err(too_large(max));
    }
    check_space(shared)?;
    let (account, now) = (me.device.account_id, now_ms());
    engine::set_profile(shared, account, version, blob, now).await?;
    engine::durable(shared).await?;
    Ok(Response::ProfileStored)
}

pub(super) async fn set_presence(
    shared: &Arc<Shared>,
    session: &Session,
    blob: Vec<u8>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    if blob.len() > MAX_PRESENCE_BYTES {
        return Err(too_large(MAX_PRESENCE_BYTES));
    }
    let account = me.device.account_id;
    if !engine::set_presence(shared, account, blob).await? {
        return Err(NodeError::new(
            ErrorKind::NoProfile,
            "set a profile before a presence",
        ));
    }
    engine::durable(shared).await?;
    Ok(Response::ProfileStored)
}

pub(super) async fn fetch(
    shared: &Arc<Shared>,
    session: &Session,
    number: String,
    version: [u8; 32],
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    charge_lookup(shared, &me, &number).await?;
    let Some((account, _)) = recipient(shared, &number).await? else {
        return Err(no_profile());
    };
    let profile = engine::profile(shared, account).await?;
    // The version is compared in constant time: it stands for a key.
    match profile {
        Some(p) if bool::from(subtle::ConstantTimeEq::ct_eq(&p.version[..], &version[..])) => {
            Ok(Response::Profile {
                blob: p.blob,
                presence: p.presence,
            })
        }
        _ => Err(no_profile()),
    }
}

pub(super) async fn typing(
    shared: &Arc<Shared>,
    session: &Session,
    to: TypingTo,
    typing: bool,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let (targets, group_id): (Vec<DeviceRef>, Option<u64>) = match to {
        TypingTo::Account(number) => {
            charge_lookup(shared, &me, &number).await?;
            let Some((account_id, devices)) = recipient(shared, &number).await? else {
                return Err(unknown_recipient(&number));
            };
            let targets = devices
                .into_iter()
                .map(|device_id| DeviceRef {
                    account_id,
                    device_id,
                })
                .filter(|d| *d != me.device)
                .collect();
            (targets, None)
        }
        TypingTo::Group(group_id) => {
            let members = super::groups::member_devices(shared, group_id, me.device).await?;
            let targets = members
                .into_iter()
                .flat_map(|(_, devices)| devices)
                .filter(|d| d.account_id != me.device.account_id)
                .collect();
            (targets, Some(group_id))
        }
    };
    // Indicators count against the send budget like envelopes: one per device.
    charge_envelopes(shared, me.device.account_id, targets.len())?;
    let item = Item::Typing(TypingNotice {
        from: me.number.clone(),
        from_device: me.device.device_id,
        group_id,
        typing,
    });
    let (here, elsewhere): (Vec<DeviceRef>, Vec<DeviceRef>) = targets
        .into_iter()
        .partition(|d| shared.mailboxes.push_ephemeral(*d, item.clone()));
    let mut devices = here.len();
    // In cluster mode the others may be connected to another node: told through
    // the cluster, and counted (this node cannot know which are connected).
    if let Some(c) = &shared.cluster
        && !elsewhere.is_empty()
    {
        let payload = crate::proto::frame::encode(&item)
            .map_err(|e| NodeError::new(crate::proto::ErrorKind::Internal, e.to_string()))?;
        c.queues.tell(&elsewhere, payload.into()).await;
        devices += elsewhere.len();
    }
    Ok(Response::TypingSent {
        devices: u32::try_from(devices).unwrap_or(u32::MAX),
    })
}
