//! Attachments: uploads and downloads on streams of their own, blobs as files.
//!
//! An upload stream starts with an `Upload` frame and the node's `UploadReady` (a
//! random capability id, and the offset to send from); then the client's raw bytes,
//! written as they come to `data_dir/blobs/partial/<id>` (made durable and recorded
//! every [`SYNC_EVERY`] bytes, so a broken-off upload resumes from what is on disk).
//! Once the promised size is in, the file is synced, renamed to `blobs/<id>`, the
//! directory synced and the record marked whole, and only then `Uploaded`. A byte
//! past the promised size ends the upload with an error. A download streams the file
//! from an offset. Memory per transfer is one chunk: the node never holds a blob.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::Shared;
use super::clock::now_ms;
use super::handlers::{check_space, commit_failed};
use super::session::{Session, authenticated};
use super::worker::{blocking, read};
use crate::proto::{ErrorKind, NodeError, Reply, Response, frame};

mod cluster;

/// What an upload asks for.
struct Upload {
    account: u64,
    size: u64,
    downloads: u32,
    resume: Option<[u8; 16]>,
}

/// Bytes read or written per step (one buffer per transfer).
const CHUNK: usize = 256 * 1024;
/// Bytes of an upload made durable (and recorded) at a time.
const SYNC_EVERY: u64 = 8 << 20;

/// Bytes being uploaded per account, and the ids being written.
type Uploads = (HashMap<u64, u64>, std::collections::HashSet<[u8; 16]>);

/// Uploads in progress.
#[derive(Default)]
pub struct InFlight {
    inner: std::sync::Mutex<Uploads>,
}

/// One upload's share of [`InFlight`], given back when dropped.
struct Flight<'a> {
    table: &'a InFlight,
    account: u64,
    id: [u8; 16],
    bytes: u64,
}

impl InFlight {
    fn take<'a>(
        &'a self,
        account: u64,
        id: [u8; 16],
        bytes: u64,
        max: u64,
    ) -> Result<Flight<'a>, NodeError> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (per_account, ids) = &mut *guard;
        if ids.contains(&id) {
            return Err(NodeError::new(
                ErrorKind::RateLimited {
                    retry_after_secs: 1,
                },
                "this upload is already going on another stream",
            ));
        }
        let now = per_account.get(&account).copied().unwrap_or(0);
        if now.saturating_add(bytes) > max {
            return Err(NodeError::new(
                ErrorKind::AttachmentQuota { max },
                format!(
                    "this account is uploading {now} bytes already; at most {max} may be in \
                     flight (attachments.max_in_flight_bytes_per_account): wait for them"
                ),
            ));
        }
        per_account.insert(account, now + bytes);
        ids.insert(id);
        Ok(Flight {
            table: self,
            account,
            id,
            bytes,
        })
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut guard = self.table.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (per_account, ids) = &mut *guard;
        ids.remove(&self.id);
        if let Some(n) = per_account.get_mut(&self.account) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                per_account.remove(&self.account);
            }
        }
    }
}

/// Where blobs live.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("blobs")
}

fn whole_path(data_dir: &Path, id: &[u8; 16]) -> PathBuf {
    dir(data_dir).join(hex::encode(id))
}

fn partial_path(data_dir: &Path, id: &[u8; 16]) -> PathBuf {
    dir(data_dir).join("partial").join(hex::encode(id))
}

/// Makes the blob directories (owner-only). In cluster mode `partial/` holds only
/// spools of segments not stored yet, worth nothing after a restart: they go.
pub fn prepare(data_dir: &Path, cluster: bool) -> std::io::Result<()> {
    crate::fsutil::create_private_dir(&dir(data_dir))?;
    let partial = dir(data_dir).join("partial");
    crate::fsutil::create_private_dir(&partial)?;
    if cluster {
        for entry in std::fs::read_dir(&partial)? {
            std::fs::remove_file(entry?.path())?;
        }
    }
    Ok(())
}

fn storage_full() -> NodeError {
    NodeError::new(
        ErrorKind::StorageFull,
        "storage full: the node's disk has no room for this attachment; try again later",
    )
}

/// Tells the client its upload `id` may send from `offset`.
async fn upload_ready(
    send: &mut quinn::SendStream,
    id: [u8; 16],
    offset: u64,
) -> Result<(), NodeError> {
    frame::write(send, &Reply::Ok(Response::UploadReady { id, offset }))
        .await
        .map_err(|e| NodeError::new(ErrorKind::Internal, e.to_string()))
}

fn io_error(what: &str, e: std::io::Error) -> NodeError {
    tracing::error!(error = %e, "{what}");
    if e.raw_os_error() == Some(28) {
        return storage_full();
    }
    NodeError::new(ErrorKind::Internal, format!("{what} failed; try again"))
}

/// Refuses an upload of `size` bytes past the account's stored quota (it has
/// `stored` bytes stored).
fn check_stored(shared: &Shared, stored: u64, size: u64) -> Result<(), NodeError> {
    let max = shared.config.attachments.max_stored_bytes_per_account;
    if stored.saturating_add(size) > max {
        return Err(NodeError::new(
            ErrorKind::AttachmentQuota { max },
            format!(
                "this account's attachments take {stored} bytes on the node; at most \
                 {max} may be stored (attachments.max_stored_bytes_per_account) until \
                 they are downloaded or expire"
            ),
        ));
    }
    Ok(())
}

fn no_attachment() -> NodeError {
    NodeError::new(
        ErrorKind::NoAttachment,
        "no attachment with that id is here (not uploaded whole, expired, or already \
         downloaded by every device it was for)",
    )
}

/// Writes `reply` and finishes the stream, waiting (bounded) until the client has it.
async fn answer(shared: &Shared, send: &mut quinn::SendStream, reply: Reply) {
    if frame::write(send, &reply).await.is_err() {
        return;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(shared.config.limits.request_timeout, send.stopped()).await;
}

/// Serves an upload stream (after its `Upload` frame).
pub async fn serve_upload(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
    session: Arc<Session>,
    (size, downloads, resume): (u64, u32, Option<[u8; 16]>),
) {
    let reply = match upload(
        &mut send, &mut recv, &shared, &session, size, downloads, resume,
    )
    .await
    {
        Ok(response) => Reply::Ok(response),
        Err(e) => {
            let _ = recv.stop(crate::proto::codes::MALFORMED.into());
            Reply::Err(e)
        }
    };
    shared.metrics.request("upload", &reply);
    answer(&shared, &mut send, reply).await;
}

async fn upload(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    shared: &Arc<Shared>,
    session: &Session,
    size: u64,
    downloads: u32,
    resume: Option<[u8; 16]>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let limits = &shared.config.attachments;
    if size > limits.max_bytes {
        return Err(NodeError::new(
            ErrorKind::AttachmentTooLarge {
                max: limits.max_bytes,
            },
            format!(
                "an attachment may be at most {} bytes (attachments.max_bytes); this one is {size}",
                limits.max_bytes
            ),
        ));
    }
    check_space(shared)?;
    let account = me.device.account_id;
    if let Some(c) = &shared.cluster {
        let to = Upload {
            account,
            size,
            downloads,
            resume,
        };
        return cluster::upload(send, recv, shared, c, to).await;
    }
    let (id, offset) = match resume {
        Some(id) => {
            let record = read(shared, move |store| store.blob(&id)).await?;
            match record {
                Some(r) if r.owner == account && !r.complete && r.size == size => (id, r.received),
                _ => return Err(no_attachment()),
            }
        }
        None => {
            let stored = read(shared, move |store| store.account_blob_bytes(account)).await?;
            check_stored(shared, stored, size)?;
            (rand::rng().random::<[u8; 16]>(), 0)
        }
    };
    let flight = shared.uploads.take(
        account,
        id,
        size - offset,
        limits.max_in_flight_bytes_per_account,
    )?;
    if !shared.space.room_for(size - offset) {
        return Err(storage_full());
    }
    let data_dir = shared.config.server.data_dir.clone();
    let part = partial_path(&data_dir, &id);
    if resume.is_none() {
        let now = now_ms();
        blocking(shared, move |store| {
            store.new_blob(id, account, size, downloads, now)
        })
        .await?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&part)
        .await
        .map_err(|e| io_error("opening an upload's file", e))?;
    // What lies past the durable offset (a crash's torn tail) goes.
    file.set_len(offset)
        .await
        .map_err(|e| io_error("cutting an upload's file", e))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| io_error("seeking an upload's file", e))?;
    upload_ready(send, id, offset).await?;

    let timeout = shared.config.limits.request_timeout;
    let mut received = offset;
    let mut synced = offset;
    // Packets come a kilobyte or so at a time; the file is written a chunk at a time.
    let mut buf = vec![0u8; CHUNK];
    let mut ended = false;
    let result = loop {
        if ended {
            break Ok(());
        }
        let (filled, end, failed) = read_chunk(recv, &mut buf, timeout).await;
        ended = end;
        let chunk = &buf[..filled];
        let len = chunk.len() as u64;
        if received + len > size {
            // A client that breaks the protocol: nothing this stream wrote is kept.
            received = offset;
            synced = offset;
            let _ = file.set_len(offset).await;
            blocking(shared, move |store| store.blob_received(&id, offset)).await?;
            break Err(NodeError::new(
                ErrorKind::Malformed,
                format!("the upload sent more than the {size} bytes it promised"),
            ));
        }
        if let Err(e) = file.write_all(chunk).await {
            break Err(io_error("writing an upload", e));
        }
        received += len;
        if let Some(e) = failed {
            break Err(e);
        }
        if received - synced >= SYNC_EVERY {
            if let Err(e) = file.sync_data().await {
                break Err(io_error("syncing an upload", e));
            }
            synced = received;
            blocking(shared, move |store| store.blob_received(&id, synced)).await?;
        }
    };
    // What came is kept (durable, recorded) for a resume, whatever went wrong.
    let kept = file.flush().await.and(file.sync_data().await);
    if kept.is_ok() && received != synced {
        blocking(shared, move |store| store.blob_received(&id, received)).await?;
    }
    result?;
    kept.map_err(|e| io_error("syncing an upload", e))?;
    if received < size {
        return Err(NodeError::new(
            ErrorKind::Malformed,
            format!("the upload ended at {received} of {size} bytes; resume it with its id"),
        ));
    }
    drop(file);
    let whole = whole_path(&data_dir, &id);
    let blobs = dir(&data_dir);
    tokio::task::spawn_blocking(move || {
        std::fs::rename(&part, &whole)?;
        crate::fsutil::sync_dir(&blobs.join("partial"))?;
        crate::fsutil::sync_dir(&blobs)
    })
    .await
    .map_err(|e| NodeError::new(ErrorKind::Internal, e.to_string()))?
    .map_err(|e| io_error("placing an upload", e))?;
    blocking(shared, move |store| store.complete_blob(&id)).await?;
    shared.commit.durable().await.map_err(commit_failed)?;
    drop(flight);
    shared.metrics.attachment_bytes_in.inc_by(size - offset);
    Ok(Response::Uploaded { id, size })
}

/// Reads up to one [`CHUNK`] of an upload into `buf`: how many bytes, whether the
/// stream ended, and what broke it off (an error, or a stall past `timeout`).
async fn read_chunk(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    timeout: std::time::Duration,
) -> (usize, bool, Option<NodeError>) {
    let mut filled = 0;
    while filled < buf.len() {
        match tokio::time::timeout(timeout, recv.read(&mut buf[filled..])).await {
            Ok(Ok(Some(n))) => filled += n,
            Ok(Ok(None)) => return (filled, true, None),
            Ok(Err(e)) => {
                return (
                    filled,
                    false,
                    Some(NodeError::new(ErrorKind::Malformed, e.to_string())),
                );
            }
            Err(_) => {
                return (
                    filled,
                    false,
                    Some(NodeError::new(
                        ErrorKind::Malformed,
                        "the upload stalled; resume it with its id",
                    )),
                );
            }
        }
    }
    (filled, false, None)
}

/// Serves a download stream (after its `Download` frame).
pub async fn serve_download(
    mut send: quinn::SendStream,
    shared: Arc<Shared>,
    session: Arc<Session>,
    id: [u8; 16],
    offset: u64,
) {
    match download(&mut send, &shared, &session, id, offset).await {
        Ok(()) => shared
            .metrics
            .request("download", &Reply::Ok(Response::DownloadReady { size: 0 })),
        Err(Some(e)) => {
            let reply = Reply::Err(e);
            shared.metrics.request("download", &reply);
            answer(&shared, &mut send, reply).await;
        }
        // The stream broke in the middle: nothing more to say on it.
        Err(None) => {}
    }
}

async fn download(
    send: &mut quinn::SendStream,
    shared: &Arc<Shared>,
    session: &Session,
    id: [u8; 16],
    offset: u64,
) -> Result<(), Option<NodeError>> {
    let me = authenticated(shared, session).await?;
    if let Some(c) = &shared.cluster {
        return cluster::download(send, shared, c, me.device, id, offset).await;
    }
    let record = read(shared, move |store| store.blob(&id))
        .await?
        .filter(|r| r.complete)
        .ok_or_else(no_attachment)?;
    if offset > record.size {
        return Err(Some(NodeError::new(
            ErrorKind::Malformed,
            format!(
                "offset {offset} is past the attachment's {} bytes",
                record.size
            ),
        )));
    }
    let path = whole_path(&shared.config.server.data_dir, &id);
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            no_attachment()
        } else {
            io_error("opening an attachment", e)
        }
    })?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| io_error("seeking an attachment", e))?;
    let ready = Reply::Ok(Response::DownloadReady { size: record.size });
    frame::write(send, &ready).await.map_err(|_| None)?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = offset;
    while sent < record.size {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| io_error("reading an attachment", e))?;
        if n == 0 {
            return Err(Some(NodeError::new(
                ErrorKind::Internal,
                "the attachment's file is shorter than its record",
            )));
        }
        send.write_all(&buf[..n]).await.map_err(|_| None)?;
        sent += n as u64;
    }
    if finish_download(send, shared, record.size - offset).await {
        let device = (me.device.account_id, me.device.device_id);
        let last = blocking(shared, move |store| store.count_download(&id, device)).await?;
        if last && shared.config.attachments.delete_when_downloaded {
            remove(shared, id).await;
        }
    }
    Ok(())
}

/// Finishes a download stream that sent `bytes`; whether the client confirmed it
/// has every byte (only then is the download counted).
async fn finish_download(send: &mut quinn::SendStream, shared: &Shared, bytes: u64) -> bool {
    let _ = send.finish();
    let confirmed = tokio::time::timeout(shared.config.limits.request_timeout, send.stopped())
        .await
        .is_ok_and(|r| r.is_ok());
    shared.metrics.attachment_bytes_out.inc_by(bytes);
    confirmed
}

/// Drops blob `id`: its file (whole or partial), then its record.
pub async fn remove(shared: &Arc<Shared>, id: [u8; 16]) {
    if let Some(c) = &shared.cluster {
        if let Err(e) = c.blobs.remove(&id).await {
            tracing::error!(error = %e, "removing an attachment failed");
        }
        return;
    }
    let data_dir = shared.config.server.data_dir.clone();
    let files = tokio::task::spawn_blocking(move || {
        for path in [whole_path(&data_dir, &id), partial_path(&data_dir, &id)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await;
    match files {
        Ok(Ok(())) => {
            if let Err(e) = blocking(shared, move |store| store.remove_blob(&id)).await {
                tracing::error!(error = %e.message, "forgetting an attachment failed");
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "removing an attachment's file failed"),
        Err(e) => tracing::error!(error = %e, "removing an attachment's file failed"),
    }
}

/// Drops the attachments past the TTL and the uploads left unfinished too long
/// (in cluster mode the cluster drops them at the TTL by itself).
pub async fn sweep(shared: &Arc<Shared>, now: u64) {
    let cutoff = now.saturating_sub(shared.config.messages.ttl.as_millis() as u64);
    let incomplete =
        now.saturating_sub(shared.config.attachments.incomplete_ttl.as_millis() as u64);
    if let Some(c) = &shared.cluster {
        // Whole ones expire in the cluster by themselves; abandoned uploads are found
        // by the node whose sweep takes this interval's turn.
        let every = shared.config.messages.sweep_interval.as_millis() as u64;
        let abandoned = match c.quotas.take_turn("blobs", now, every).await {
            Ok(true) => c.blobs.abandoned(incomplete).await,
            Ok(false) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let ids = match abandoned {
            Ok(ids) => ids,
            Err(e) => return tracing::error!(error = %e, "finding abandoned uploads failed"),
        };
        let n = ids.len();
        for id in ids {
            if let Err(e) = c.blobs.remove_abandoned(&id, incomplete).await {
                tracing::error!(error = %e, "removing an abandoned upload failed");
            }
        }
        if n > 0 {
            tracing::info!(attachments = n, "swept abandoned uploads");
        }
        return;
    }
    let expired = match blocking(shared, move |store| store.expired_blobs(cutoff, incomplete)).await
    {
        Ok(ids) => ids,
        Err(e) => return tracing::error!(error = %e.message, "finding expired attachments failed"),
    };
    let n = expired.len();
    for id in expired {
        remove(shared, id).await;
    }
    if n > 0 {
        tracing::info!(attachments = n, "swept expired attachments");
    }
}
