//! `ListDevices`, `UnlinkDevice`, and removing a companion device (also when it
//! lapses).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::proto::{DeviceInfo, ErrorKind, NodeError, Response};
use crate::store::records::Removal;
use crate::store::{DeviceRef, Unlinked};

pub(super) async fn list_devices(
    shared: &Arc<Shared>,
    session: &Session,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let account = me.device.account_id;
    let (_, devices) = engine::devices(shared, account)
        .await?
        .ok_or_else(|| NodeError::new(ErrorKind::Internal, "this device's account is gone"))?;
    Ok(Response::Devices {
        devices: devices
            .into_iter()
            .map(|d| DeviceInfo {
                device_id: d.device_id,
                name: d.name.unwrap_or_default(),
                primary: d.primary,
                linked_at_ms: d.linked_at_ms,
                last_seen_ms: d.last_seen_ms,
            })
            .collect(),
    })
}

pub(super) async fn unlink_device(
    shared: &Arc<Shared>,
    session: &Session,
    device_id: u32,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let account = me.device.account_id;
    if device_id != me.device.device_id {
        let primary = engine::account(shared, account)
            .await?
            .and_then(|a| a.devices.first().map(|d| d.device_id));
        if primary != Some(me.device.device_id) {
            return Err(NodeError::new(
                ErrorKind::NotPrimary,
                "only the account's primary device may unlink another device",
            ));
        }
    }
    let target = DeviceRef {
        account_id: account,
        device_id,
    };
    // A device unlinking itself hears the answer before its connection closes (every
    // later request is refused anyway: the key is gone).
    let linger = (device_id == me.device.device_id).then_some(LINGER);
    match remove_after(shared, target, Removal::Unlinked, linger).await? {
        Unlinked::Done { .. } => Ok(Response::DeviceUnlinked),
        Unlinked::NotFound => Err(NodeError::new(
            ErrorKind::UnknownDevice { device_id },
            format!("this account has no device {device_id}"),
        )),
        Unlinked::Primary => Err(NodeError::new(
            ErrorKind::NotPrimary,
            "the primary device is never unlinked: registering the number on a new phone \
             replaces it",
        )),
    }
}

impl From<Removal> for crate::proto::Removal {
    fn from(why: Removal) -> Self {
        match why {
            Removal::SignedOut => crate::proto::Removal::SignedOut,
            Removal::Unlinked => crate::proto::Removal::Unlinked,
            Removal::Lapsed => crate::proto::Removal::Lapsed,
            Removal::AccountDeleted => crate::proto::Removal::AccountDeleted,
        }
    }
}

/// Removes the companion `device` (`why`: unlinked or lapsed), durably, and closes
/// its connections: it can read nothing sent after.
pub(crate) async fn remove(
    shared: &Arc<Shared>,
    device: DeviceRef,
    why: Removal,
) -> Result<Unlinked, NodeError> {
    remove_after(shared, device, why, None).await
}

/// How long a device unlinking itself keeps its connection, to hear the answer (on
/// every node: the others close it when they hear of the removal, this long after).
pub(crate) const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// [`remove`], closing the device's connections after `linger` when given.
async fn remove_after(
    shared: &Arc<Shared>,
    device: DeviceRef,
    why: Removal,
    linger: Option<std::time::Duration>,
) -> Result<Unlinked, NodeError> {
    let now = now_ms();
    let outcome = engine::unlink_device(shared, device, why, now).await?;
    if let Unlinked::Done { key_id } = &outcome {
        // Caches of who has which devices are stale from now on.
        shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
        engine::durable(shared).await?;
        tracing::info!(
            account = device.account_id,
            device = device.device_id,
            ?why,
            "device unlinked"
        );
        let (shared, key_id) = (shared.clone(), *key_id);
        let close = move || shared.connections.close_removed(key_id, why);
        match linger {
            None => {
                close();
            }
            Some(after) => {
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    close();
                });
            }
        }
    }
    Ok(outcome)
}
