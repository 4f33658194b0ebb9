//! Contact discovery requests: OPRF evaluation, the filter, resolving hits.

use std::sync::Arc;

use super::too_many;
use crate::node::Shared;
use crate::node::clock::now_secs;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::proto::messages::{FILTER_CHUNK_BYTES, MAX_DISCOVERY_BATCH};
use crate::proto::{ErrorKind, NodeError, Response};

pub(super) async fn evaluate(
    shared: &Arc<Shared>,
    session: &Session,
    blinded: Vec<[u8; 32]>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    if blinded.len() > MAX_DISCOVERY_BATCH {
        return Err(too_many("blinded elements", blinded.len()));
    }
    let budget_left = engine::charge_discovery(
        shared,
        me.device.account_id,
        blinded.len() as u32,
        now_secs(),
    )
    .await?;
    let key = engine::discovery_key(shared);
    // About 50 µs of scalar multiplication per element: off the async workers.
    let evaluated = tokio::task::spawn_blocking(move || {
        blinded
            .iter()
            .map(|b| key.evaluate(b))
            .collect::<Result<Vec<_>, _>>()
            .map(|e| (key.version(), e))
    })
    .await
    .map_err(|e| NodeError::new(ErrorKind::Internal, format!("evaluation task failed: {e}")))?;
    match evaluated {
        Ok((key_version, evaluated)) => {
            shared
                .metrics
                .discovery_evaluations
                .inc_by(evaluated.len() as u64);
            Ok(Response::Evaluated {
                key_version,
                evaluated,
                budget_left,
            })
        }
        Err(_) => Err(NodeError::new(
            ErrorKind::Malformed,
            "a blinded element is not a valid ristretto255 point",
        )),
    }
}

pub(super) async fn fetch_filter(
    shared: &Arc<Shared>,
    session: &Session,
    have: Option<u64>,
    offset: u32,
) -> Result<Response, NodeError> {
    authenticated(shared, session).await?;
    let filter = engine::discovery_filter(shared).await?;
    if have == Some(filter.version) {
        return Ok(Response::FilterUnchanged {
            version: filter.version,
            key_version: filter.key_version,
        });
    }
    let start = offset as usize;
    if start > filter.bytes.len() {
        return Err(NodeError::new(
            ErrorKind::Malformed,
            format!(
                "offset {offset} is past the end of the filter ({} bytes)",
                filter.bytes.len()
            ),
        ));
    }
    let end = (start + FILTER_CHUNK_BYTES).min(filter.bytes.len());
    Ok(Response::FilterChunk {
        version: filter.version,
        key_version: filter.key_version,
        total_len: filter.bytes.len() as u32,
        offset,
        chunk: filter.bytes[start..end].to_vec(),
    })
}

/// Which PRF values are registered. With `key_version` (`ResolveUnder`), a rotated key
/// is an error, never a wrong "not registered"; without it (`Resolve`, older clients)
/// the values are taken to be under the current key.
pub(super) async fn resolve(
    shared: &Arc<Shared>,
    session: &Session,
    key_version: Option<u32>,
    prfs: Vec<[u8; 32]>,
) -> Result<Response, NodeError> {
    authenticated(shared, session).await?;
    if prfs.len() > MAX_DISCOVERY_BATCH {
        return Err(too_many("PRF values", prfs.len()));
    }
    let answer = engine::discovery_resolve(shared, key_version, prfs).await?;
    match answer {
        Ok(registered) => Ok(Response::Resolved { registered }),
        Err(current) => Err(NodeError::new(
            ErrorKind::DiscoveryKeyChanged {
                key_version: current,
            },
            "the node's discovery key changed: evaluate the numbers again",
        )),
    }
}

pub(super) async fn fetch_filter_delta(
    shared: &Arc<Shared>,
    session: &Session,
    _version: u64,
) -> Result<Response, NodeError> {
    authenticated(shared, session).await?;
    let filter = engine::discovery_filter(shared).await?;
    let keys = shared.discovery.delta_since(&filter);
    Ok(Response::FilterDelta {
        version: filter.version,
        key_version: filter.key_version,
        keys,
    })
}
