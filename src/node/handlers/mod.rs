//! Request handlers, one file per family of requests (as mini-redis keeps one file
//! per command), with the dispatch here. Handlers see a [`Session`], never a quinn
//! type.
//!
//! - `registration.rs`: `RequestCode`, `VerifyCode`, `VerifyCodeWithPin`, `SetLock`,
//!   `ClearLock`;
//! - `keys.rs`: `PublishKeys`, `FetchBundles`;
//! - `send.rs`: `Send` and what its answer waits on ([`Waiting`]);
//! - `discovery.rs`: `Evaluate`, `FetchFilter`, `Resolve`;
//! - `devices.rs`: `ListDevices`, `UnlinkDevice`, and the removal of a companion;
//! - `link.rs`: `LinkOpen`, `LinkJoin`, `LinkRequest`, `LinkPoll`, `LinkGrant`,
//!   `LinkAbort`;
//! - `groups.rs`: `CreateGroup`, `ChangeGroup`, `FetchGroup`, `ListGroups`.

mod devices;
mod discovery;
mod groups;
mod keys;
mod link;
mod profiles;
mod registration;
mod send;

use std::sync::Arc;
use std::time::Duration;

use crate::node::Shared;
use crate::node::clock::now_secs;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::phone::Number;
use crate::proto::messages::MAX_DISCOVERY_BATCH;
use crate::proto::{ErrorKind, Identity, NodeError, Reply, Request, Response};
use crate::store::DeviceIdentity;

pub(crate) use devices::{LINGER as REMOVAL_LINGER, remove as remove_device};
pub use send::Waiting;

/// Answers one request.
/// `answer`: set by a `Send` whose answer carries delivery receipts or leaves a
/// sent-id record; the caller confirms it once the reply reached the client
/// ([`Waiting::answered`]), or drops it to queue the receipts instead and keep the
/// record.
pub async fn handle(
    request: Request,
    shared: &Arc<Shared>,
    session: &Session,
    answer: &mut Option<Waiting>,
) -> Reply {
    let result = match request {
        Request::RequestCode {
            number,
            channel,
            locale,
        } => {
            let result =
                registration::request_code(shared, session, &number, channel, &locale).await;
            shared.metrics.code_request(&result);
            result
        }
        Request::VerifyCode { number, code } => {
            registration::verify_code(shared, session, &number, &code, None).await
        }
        Request::VerifyCodeWithPin { number, code, pin } => {
            registration::verify_code(shared, session, &number, &code, Some(&pin)).await
        }
        Request::SetLock { pin } => registration::set_lock(shared, session, pin).await,
        Request::ClearLock => registration::clear_lock(shared, session).await,
        Request::WhoAmI => whoami(shared, session).await,
        Request::PublishKeys(upload) => keys::publish_keys(shared, session, upload).await,
        Request::FetchBundles { number, claim } => {
            keys::fetch_bundles(shared, session, &number, claim).await
        }
        Request::Send(outgoing) => send::send(shared, session, outgoing, answer).await,
        // The connection layer turns a Subscribe stream into a delivery stream before
        // it gets here; a Subscribe that arrives here is a bug, answered as one.
        Request::Subscribe => Err(NodeError::new(
            ErrorKind::Internal,
            "subscribe is not a plain request",
        )),
        Request::Evaluate { blinded } => discovery::evaluate(shared, session, blinded).await,
        Request::FetchFilter { have, offset } => {
            discovery::fetch_filter(shared, session, have, offset).await
        }
        Request::Resolve { prfs } => discovery::resolve(shared, session, None, prfs).await,
        Request::ResolveUnder { key_version, prfs } => {
            discovery::resolve(shared, session, Some(key_version), prfs).await
        }
        Request::FetchFilterDelta { version } => {
            discovery::fetch_filter_delta(shared, session, version).await
        }
        Request::ListDevices => devices::list_devices(shared, session).await,
        Request::UnlinkDevice { device_id } => {
            devices::unlink_device(shared, session, device_id).await
        }
        Request::LinkOpen { pake } => link::open(shared, session, pake).await,
        Request::LinkJoin { nameplate, pake } => link::join(shared, session, nameplate, pake).await,
        Request::LinkRequest { nameplate, sealed } => {
            link::request(shared, session, nameplate, sealed).await
        }
        Request::LinkPoll { nameplate } => link::poll(shared, session, nameplate).await,
        Request::LinkGrant {
            nameplate,
            name,
            sealed,
        } => link::grant(shared, session, nameplate, name, sealed).await,
        Request::LinkAbort { nameplate } => link::abort(shared, session, nameplate).await,
        Request::CreateGroup { members, meta } => {
            groups::create(shared, session, members, meta).await
        }
        Request::ChangeGroup { group_id, change } => {
            groups::change(shared, session, group_id, change).await
        }
        Request::FetchGroup { group_id } => groups::fetch(shared, session, group_id).await,
        Request::ListGroups => groups::list(shared, session).await,
        Request::SendGroup {
            group_id,
            id,
            body,
            devices,
            expires_in_secs,
        } => {
            groups::send(
                shared,
                session,
                group_id,
                id,
                body,
                devices,
                expires_in_secs,
            )
            .await
        }
        Request::SetProfile { version, blob } => {
            profiles::set(shared, session, version, blob).await
        }
        Request::FetchProfile { number, version } => {
            profiles::fetch(shared, session, number, version).await
        }
        Request::SetPresence { blob } => profiles::set_presence(shared, session, blob).await,
        Request::Typing { to, typing } => profiles::typing(shared, session, to, typing).await,
        // Like Subscribe, uploads and downloads are streams of their own (node::blobs).
        Request::Upload { .. } | Request::Download { .. } => Err(NodeError::new(
            ErrorKind::Internal,
            "an upload or download is not a plain request",
        )),
    };
    match result {
        Ok(response) => Reply::Ok(response),
        Err(error) => Reply::Err(error),
    }
}

pub(super) fn secs(d: Duration) -> u32 {
    // Round up: "retry after 0 seconds" while still refusing would be a lie.
    u32::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u32::MAX)
}

pub(super) fn parse_number(number: &str) -> Result<Number, NodeError> {
    Number::parse_e164(number).map_err(|e| NodeError::new(ErrorKind::InvalidNumber, e.to_string()))
}

async fn whoami(shared: &Arc<Shared>, session: &Session) -> Result<Response, NodeError> {
    let identity = authenticated(shared, session).await?;
    Ok(Response::Identity(Identity {
        number: identity.number,
        account_id: identity.device.account_id,
        device_id: identity.device.device_id,
    }))
}

/// Refuses a write that would grow the store when the disk is nearly full.
pub(super) fn check_space(shared: &Shared) -> Result<(), NodeError> {
    if shared.space.full() {
        return Err(NodeError::new(
            ErrorKind::StorageFull,
            "storage full: the node's disk is nearly full and it takes no new messages or keys \
             until space is freed; try again later",
        ));
    }
    Ok(())
}

pub(super) fn commit_failed(e: String) -> NodeError {
    tracing::error!(error = %e, "group commit failed");
    NodeError::new(
        ErrorKind::Internal,
        "the node could not make the write durable; send again",
    )
}

/// Turning a number into an account counts against the discovery budget, so sending
/// and key fetches cannot be used to enumerate around the OPRF.
pub(super) async fn charge_lookup(
    shared: &Arc<Shared>,
    me: &DeviceIdentity,
    number: &str,
) -> Result<(), NodeError> {
    engine::charge_lookup(shared, me.device.account_id, number, now_secs()).await
}

pub(super) fn too_many(what: &str, n: usize) -> NodeError {
    NodeError::new(
        ErrorKind::Malformed,
        format!("{n} {what} in one request; at most {MAX_DISCOVERY_BATCH} are allowed"),
    )
}
