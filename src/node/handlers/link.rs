//! Linking a device: `LinkOpen`, `LinkJoin`, `LinkRequest`, `LinkPoll`, `LinkGrant`,
//! `LinkAbort` (the slots are [`crate::node::link::Links`]; the flow is in PROTOCOL.md).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::check_space;
use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::clock::now_secs;
use crate::node::engine;
use crate::node::link::Polled;
use crate::node::session::{Session, authenticated};
use crate::node::worker::internal;
use crate::proto::{ErrorKind, NodeError, Registered, Response};
use crate::store::{Linked, NewDevice};

/// A SPAKE2 message (Ed25519 group) is 33 bytes; a little room for another group.
const MAX_PAKE_BYTES: usize = 64;
/// A sealed request or grant: a few keys, a name and a number.
const MAX_SEALED_BYTES: usize = 4096;
/// The longest device name, in characters.
const MAX_NAME_CHARS: usize = 64;

fn unavailable(message: &str) -> NodeError {
    NodeError::new(ErrorKind::LinkUnavailable, message)
}

fn gone() -> NodeError {
    unavailable(
        "this link code is unknown, expired, already used, or was given up: \
         run `devices link` on the primary again",
    )
}

fn malformed(message: String) -> NodeError {
    NodeError::new(ErrorKind::Malformed, message)
}

fn check_len(what: &str, bytes: &[u8], max: usize) -> Result<(), NodeError> {
    if bytes.is_empty() || bytes.len() > max {
        return Err(malformed(format!(
            "{what} is {} bytes; expected 1 to {max}",
            bytes.len()
        )));
    }
    Ok(())
}

/// The primary of `account`'s device id and the account's device count.
async fn primary_of(shared: &Arc<Shared>, account: u64) -> Result<(u32, usize), NodeError> {
    engine::account(shared, account)
        .await?
        .and_then(|a| a.devices.first().map(|d| (d.device_id, a.devices.len())))
        .ok_or_else(|| NodeError::new(ErrorKind::Internal, "this device's account is gone"))
}

fn too_many(max: u32) -> NodeError {
    NodeError::new(
        ErrorKind::TooManyDevices { max },
        format!(
            "this account has {max} devices, as many as this node allows (the primary \
             included): unlink one first"
        ),
    )
}

pub(super) async fn open(
    shared: &Arc<Shared>,
    session: &Session,
    pake: Vec<u8>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    check_len("the SPAKE2 message", &pake, MAX_PAKE_BYTES)?;
    let (primary, count) = primary_of(shared, me.device.account_id).await?;
    if primary != me.device.device_id {
        return Err(NodeError::new(
            ErrorKind::NotPrimary,
            "only the account's primary device (the one that registered the number) links \
             new devices",
        ));
    }
    let max = shared.config.accounts.max_devices;
    if count >= max as usize {
        return Err(too_many(max));
    }
    let nameplate = shared
        .links
        .open(me.device.account_id, session.key_id, pake)
        .await
        .map_err(internal)?;
    Ok(Response::LinkOpened {
        nameplate,
        expires_in_secs: super::secs(shared.links.ttl()),
    })
}

pub(super) async fn join(
    shared: &Arc<Shared>,
    session: &Session,
    nameplate: u32,
    pake: Vec<u8>,
) -> Result<Response, NodeError> {
    check_len("the SPAKE2 message", &pake, MAX_PAKE_BYTES)?;
    let key_id = session.key_id;
    if engine::device_by_key(shared, key_id).await?.is_ok() {
        return Err(unavailable(
            "this device is registered already: a new device joins with a new key (a new home)",
        ));
    }
    if !engine::allow_join(shared, session.remote.ip(), now_secs()).await? {
        return Err(NodeError::new(
            ErrorKind::RateLimited {
                retry_after_secs: 3600,
            },
            format!(
                "too many link codes tried from this address ({} an hour); try again later",
                shared.config.accounts.link_joins_per_address_hour
            ),
        ));
    }
    let device = NewDevice {
        key_id: session.key_id,
        public_key: session.public_key.clone(),
    };
    match shared
        .links
        .join(nameplate, device, pake)
        .await
        .map_err(internal)?
    {
        Some(pake) => Ok(Response::LinkOffer { pake }),
        None => Err(gone()),
    }
}

pub(super) async fn request(
    shared: &Arc<Shared>,
    session: &Session,
    nameplate: u32,
    sealed: Vec<u8>,
) -> Result<Response, NodeError> {
    check_len("the sealed request", &sealed, MAX_SEALED_BYTES)?;
    if shared
        .links
        .request(nameplate, &session.key_id, sealed)
        .await
        .map_err(internal)?
    {
        Ok(Response::LinkQueued)
    } else {
        Err(gone())
    }
}

pub(super) async fn poll(
    shared: &Arc<Shared>,
    session: &Session,
    nameplate: u32,
) -> Result<Response, NodeError> {
    let polled = shared
        .links
        .poll(nameplate, &session.key_id)
        .await
        .map_err(internal)?;
    Ok(match polled {
        Polled::Waiting => Response::LinkWaiting,
        Polled::Requested { pake, sealed } => Response::LinkRequested { pake, sealed },
        Polled::Complete { registered, sealed } => Response::LinkComplete { registered, sealed },
        Polled::Gone => Response::LinkAborted,
    })
}

pub(super) async fn grant(
    shared: &Arc<Shared>,
    session: &Session,
    nameplate: u32,
    name: String,
    sealed: Vec<u8>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    check_space(shared)?;
    check_len("the sealed grant", &sealed, MAX_SEALED_BYTES)?;
    let name = name.trim().to_string();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(malformed(format!(
            "a device name is 1 to {MAX_NAME_CHARS} characters, none of them control characters"
        )));
    }
    let ready = shared
        .links
        .to_grant(nameplate, &session.key_id)
        .await
        .map_err(internal)?;
    let Some(ready) = ready else {
        return Err(gone());
    };
    if ready.account != me.device.account_id {
        return Err(gone());
    }
    let max = shared.config.accounts.max_devices;
    let now = now_ms();
    let account = ready.account;
    let device = ready.device;
    let linked = engine::link_device(shared, account, device, name, max, now).await?;
    match linked {
        Linked::Done { device, number } => {
            // Caches of who has which devices are stale from now on.
            shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
            engine::durable(shared).await?;
            tracing::info!(
                account = device.account_id,
                device = device.device_id,
                "device linked"
            );
            let registered = Registered {
                number,
                account_id: device.account_id,
                device_id: device.device_id,
                took_over: false,
            };
            shared
                .links
                .granted(nameplate, registered, sealed)
                .await
                .map_err(internal)?;
            Ok(Response::LinkGranted {
                device_id: device.device_id,
            })
        }
        Linked::TooMany { max } => Err(too_many(max)),
        Linked::KeyInUse => Err(unavailable(
            "the joining device's key is registered already",
        )),
        Linked::NoAccount => Err(NodeError::new(
            ErrorKind::Internal,
            "this device's account is gone",
        )),
    }
}

pub(super) async fn abort(
    shared: &Arc<Shared>,
    session: &Session,
    nameplate: u32,
) -> Result<Response, NodeError> {
    shared
        .links
        .abort(nameplate, &session.key_id)
        .await
        .map_err(internal)?;
    Ok(Response::LinkAborted)
}
