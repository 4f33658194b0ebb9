//! Uploads and downloads in cluster mode: the bytes go to the cluster's object
//! store a segment ([`SEGMENT`]) at a time, spooled in a file of this node's
//! `blobs/partial/` until the segment is whole; the upload counts as received only
//! what the cluster stored, so it resumes from there through any node. A download
//! reads the segments back in order, through any node.

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    CHUNK, Shared, Upload, check_stored, io_error, no_attachment, partial_path, read_chunk,
    storage_full, upload_ready,
};
use crate::cluster::blobs::{SEGMENT, segments};
use crate::node::clock::now_ms;
use crate::node::engine::ClusterEngine;
use crate::node::worker::internal;
use crate::proto::{ErrorKind, NodeError, Reply, Response, frame};
use crate::store::DeviceRef;

/// The most attachments one account has stored in the cluster at a time.
const MAX_BLOBS_PER_ACCOUNT: usize = 10_000;

/// [`super::upload`] on the cluster, after the checks every upload passes.
pub(super) async fn upload(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    shared: &std::sync::Arc<Shared>,
    c: &ClusterEngine,
    to: Upload,
) -> Result<Response, NodeError> {
    let Upload {
        account,
        size,
        downloads,
        resume,
    } = to;
    let blobs = &c.blobs;
    let limits = &shared.config.attachments;
    let abandoned = now_ms().saturating_sub(limits.incomplete_ttl.as_millis() as u64);
    let (id, offset) = match resume {
        Some(id) => match blobs.record(&id).await.map_err(internal)? {
            Some(r)
                if r.owner == account
                    && !r.complete
                    && r.size == size
                    && r.created_at_ms >= abandoned =>
            {
                (id, r.received)
            }
            _ => return Err(no_attachment()),
        },
        None => {
            let (stored, count) = blobs
                .account_bytes(account, now_ms(), limits.incomplete_ttl)
                .await
                .map_err(internal)?;
            check_stored(shared, stored, size)?;
            // The account's list is one entry of the cluster: bounded.
            if count >= MAX_BLOBS_PER_ACCOUNT {
                return Err(NodeError::new(
                    ErrorKind::AttachmentQuota {
                        max: limits.max_stored_bytes_per_account,
                    },
                    format!(
                        "this account has {count} attachments on the node, as many as it may \
                         have until they are downloaded or expire"
                    ),
                ));
            }
            (rand::random::<[u8; 16]>(), 0)
        }
    };
    let flight = shared.uploads.take(
        account,
        id,
        size - offset,
        limits.max_in_flight_bytes_per_account,
    )?;
    if !shared.space.room_for((size - offset).min(SEGMENT)) {
        return Err(storage_full());
    }
    if resume.is_none() {
        blobs
            .create(id, account, size, downloads, now_ms())
            .await
            .map_err(internal)?;
    }
    let spool_path = partial_path(&shared.config.server.data_dir, &id);
    let mut spool = tokio::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&spool_path)
        .await
        .map_err(|e| io_error("opening an upload's spool file", e))?;
    upload_ready(send, id, offset).await?;

    let timeout = shared.config.limits.request_timeout;
    // Bytes the cluster holds, and bytes received (the rest spooled).
    let (mut stored, mut received) = (offset, offset);
    let mut buf = vec![0u8; CHUNK];
    let result = loop {
        let (filled, ended, failed) = read_chunk(recv, &mut buf, timeout).await;
        let len = filled as u64;
        if received + len > size {
            break Err(NodeError::new(
                ErrorKind::Malformed,
                format!("the upload sent more than the {size} bytes it promised"),
            ));
        }
        if let Err(e) = spool.write_all(&buf[..filled]).await {
            break Err(io_error("spooling an upload", e));
        }
        received += len;
        if received - stored >= SEGMENT || (received == size && received > stored) {
            if let Err(e) = store_segment(blobs, &mut spool, &id, stored, received).await {
                break Err(e);
            }
            stored = received;
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if ended {
            break Ok(());
        }
    };
    drop(spool);
    if let Err(e) = tokio::fs::remove_file(&spool_path).await {
        tracing::warn!(error = %e, "an upload's spool file was not removed");
    }
    result?;
    if received < size {
        return Err(NodeError::new(
            ErrorKind::Malformed,
            format!("the upload ended at {stored} of {size} bytes; resume it with its id"),
        ));
    }
    if size == 0 {
        blobs.complete(&id).await.map_err(internal)?;
    }
    drop(flight);
    shared.metrics.attachment_bytes_in.inc_by(size - offset);
    Ok(Response::Uploaded { id, size })
}

/// Puts what `spool` holds as the segment that starts at `stored`, counted as
/// received up to `received`, and empties the spool.
async fn store_segment(
    blobs: &crate::cluster::blobs::JetStreamBlobs,
    spool: &mut tokio::fs::File,
    id: &[u8; 16],
    stored: u64,
    received: u64,
) -> Result<(), NodeError> {
    spool
        .flush()
        .await
        .map_err(|e| io_error("spooling an upload", e))?;
    spool
        .seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| io_error("reading an upload's spool", e))?;
    blobs
        .put_segment(id, stored / SEGMENT, spool, received)
        .await
        .map_err(internal)?;
    spool
        .set_len(0)
        .await
        .map_err(|e| io_error("emptying an upload's spool", e))?;
    spool
        .seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| io_error("emptying an upload's spool", e))?;
    Ok(())
}

/// Segment `k` of blob `id`, opened within `timeout` (`None`, logged, else).
async fn open_segment(
    blobs: &crate::cluster::blobs::JetStreamBlobs,
    id: &[u8; 16],
    k: u64,
    timeout: std::time::Duration,
) -> Option<async_nats::jetstream::object_store::Object> {
    match tokio::time::timeout(timeout, blobs.segment(id, k)).await {
        Ok(Ok(object)) => Some(object),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "opening an attachment segment");
            None
        }
        Err(_) => {
            tracing::error!("opening an attachment segment stalled");
            None
        }
    }
}

/// [`super::download`] on the cluster.
pub(super) async fn download(
    send: &mut quinn::SendStream,
    shared: &std::sync::Arc<Shared>,
    c: &ClusterEngine,
    me: DeviceRef,
    id: [u8; 16],
    offset: u64,
) -> Result<(), Option<NodeError>> {
    let blobs = &c.blobs;
    // Its segments age out a TTL after they were stored (the record, rewritten by
    // every download, would outlive them): past that it is not offered.
    let ttl_ms = shared.config.messages.ttl.as_millis() as u64;
    let record = blobs
        .record(&id)
        .await
        .map_err(internal)?
        .filter(|r| r.complete && r.created_at_ms.saturating_add(ttl_ms) > now_ms())
        .ok_or_else(no_attachment)?;
    // Every read of the cluster is bounded: a segment gone under a reader would
    // otherwise leave it waiting.
    let timeout = shared.config.limits.request_timeout;
    if offset > record.size {
        return Err(Some(NodeError::new(
            ErrorKind::Malformed,
            format!(
                "offset {offset} is past the attachment's {} bytes",
                record.size
            ),
        )));
    }
    // The first segment is fetched before the answer, so a missing one is an error
    // the client reads, not a stream cut short.
    let first = offset / SEGMENT;
    let mut segment = match first < segments(record.size) {
        true => Some(
            open_segment(blobs, &id, first, timeout)
                .await
                .ok_or_else(no_attachment)?,
        ),
        false => None,
    };
    let ready = Reply::Ok(Response::DownloadReady { size: record.size });
    frame::write(send, &ready).await.map_err(|_| None)?;
    let mut buf = vec![0u8; CHUNK];
    let mut skip = offset % SEGMENT;
    let mut sent = offset;
    let mut k = first;
    while sent < record.size {
        let object = match &mut segment {
            Some(object) => object,
            None => return Err(None),
        };
        let n = match tokio::time::timeout(timeout, object.read(&mut buf)).await {
            Ok(read) => read.map_err(|e| io_error("reading an attachment", e))?,
            Err(_) => {
                tracing::error!("reading an attachment segment stalled");
                return Err(None);
            }
        };
        if n == 0 {
            // This segment is done: the next one.
            k += 1;
            if k >= segments(record.size) {
                return Err(Some(NodeError::new(
                    ErrorKind::Internal,
                    "the attachment's segments are shorter than its record",
                )));
            }
            segment = Some(open_segment(blobs, &id, k, timeout).await.ok_or(None)?);
            continue;
        }
        let from = usize::try_from(skip.min(n as u64)).unwrap_or(n);
        skip -= from as u64;
        if from < n {
            send.write_all(&buf[from..n]).await.map_err(|_| None)?;
            sent += (n - from) as u64;
        }
    }
    if super::finish_download(send, shared, record.size - offset).await {
        let last = blobs
            .count_download(&id, (me.account_id, me.device_id))
            .await
            .map_err(internal)?;
        if last && shared.config.attachments.delete_when_downloaded {
            super::remove(shared, id).await;
        }
    }
    Ok(())
}
