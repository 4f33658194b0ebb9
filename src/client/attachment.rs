//! Attachments: files encrypted here, streamed to the node, and back.
//!
//! A file is encrypted under a fresh random 32-byte key with ChaCha20-Poly1305 in
//! chunks of [`CHUNK`] bytes (the STREAM construction, as `age` does it): chunk `i`
//! has the 12-byte nonce `i` (11 bytes, big-endian) · `01` for the last chunk, `00`
//! for the others, so chunks cannot be reordered, dropped or cut off unseen, and a
//! file never has to fit in memory. An empty file is one empty last chunk. The key,
//! the SHA-256 of the plaintext, its size, name, type and (for images) a thumbnail
//! travel in the end-to-end message ([`Attachment`]); the node sees only ciphertext
//! of [`ciphertext_len`] bytes under a random capability id.

use std::path::{Path, PathBuf};

use bincode::{Decode, Encode};
use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::{Client, ClientError};
use crate::proto::{Request, Response};

/// Plaintext bytes per encrypted chunk.
pub const CHUNK: usize = 64 * 1024;
/// The tag each chunk adds.
pub const TAG: usize = 16;
/// Chunks read from the file and written to the stream at a time.
const BLOCK_CHUNKS: usize = 16;
/// The longest file name, type and thumbnail taken.
pub const MAX_NAME_BYTES: usize = 255;
pub const MAX_MIME_BYTES: usize = 127;
pub const MAX_THUMBNAIL_BYTES: usize = 16 * 1024;

/// What the end-to-end message carries of an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Attachment {
    /// The node's capability id of the ciphertext.
    pub id: [u8; 16],
    pub key: [u8; 32],
    /// Plaintext bytes.
    pub size: u64,
    /// SHA-256 of the plaintext.
    pub digest: [u8; 32],
    pub name: String,
    /// A MIME type (`image/jpeg`, `audio/ogg`: a voice note is a file of an audio type).
    pub mime: String,
    /// A small JPEG of an image.
    pub thumbnail: Option<Vec<u8>>,
    pub caption: String,
}

impl Attachment {
    /// Refuses fields over their limits (the sender is untrusted).
    pub fn check(&self) -> Result<(), String> {
        if self.name.len() > MAX_NAME_BYTES
            || self.mime.len() > MAX_MIME_BYTES
            || self
                .thumbnail
                .as_ref()
                .is_some_and(|t| t.len() > MAX_THUMBNAIL_BYTES)
            || self.caption.len() > super::messenger::MAX_TEXT_BYTES
        {
            return Err("an attachment whose name, type, thumbnail or caption is too long".into());
        }
        Ok(())
    }
}

/// What can go wrong with an attachment.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the attachment does not decrypt: chunk {chunk} was changed (or is not this attachment's)"
    )]
    Tampered { chunk: u64 },
    #[error("the attachment decrypted, but it is not the file that was sent ({0})")]
    Mismatch(String),
    #[error("{path} changed while it was being sent")]
    Changed { path: PathBuf },
}

impl AttachmentError {
    /// Whether a new connection may help (the transfer then resumes).
    pub fn is_connection(&self) -> bool {
        matches!(self, AttachmentError::Client(e) if e.is_connection())
    }
}

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> AttachmentError + '_ {
    move |source| AttachmentError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Chunks of a file of `size` bytes (at least one).
fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK as u64).max(1)
}

/// The ciphertext's size for `size` bytes of plaintext.
pub fn ciphertext_len(size: u64) -> u64 {
    size + chunks(size) * TAG as u64
}

fn nonce(i: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&i.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::from(n)
}

/// Encrypts chunk `i` (`last` or not).
pub fn seal_chunk(key: &[u8; 32], i: u64, last: bool, plain: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(&(*key).into())
        .encrypt(&nonce(i, last), plain)
        .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 encrypts any chunk this size"))
}

/// Decrypts chunk `i`; `None` when it does not verify.
pub fn open_chunk(key: &[u8; 32], i: u64, last: bool, sealed: &[u8]) -> Option<Vec<u8>> {
    ChaCha20Poly1305::new(&(*key).into())
        .decrypt(&nonce(i, last), sealed)
        .ok()
}

/// A finished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub id: [u8; 16],
    pub size: u64,
    pub digest: [u8; 32],
}

/// An upload that did not finish: its id, when the node gave one (resume with it).
#[derive(Debug)]
pub struct UploadFailed {
    pub id: Option<[u8; 16]>,
    pub error: AttachmentError,
}

impl Client {
    /// Encrypts `path` under `key` and uploads it for `downloads` devices (0:
    /// unknown), resuming upload `resume` where the node has it. `progress` gets the
    /// ciphertext bytes done so far.
    pub async fn upload_file(
        &self,
        path: &Path,
        key: &[u8; 32],
        downloads: u32,
        resume: Option<[u8; 16]>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Uploaded, UploadFailed> {
        let fail = |id, error| UploadFailed { id, error };
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| fail(resume, file_error(path)(e)))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| fail(resume, file_error(path)(e)))?
            .len();
        let total = ciphertext_len(size);
        let request = Request::Upload {
            size: total,
            downloads,
            resume,
        };
        let (mut send, mut recv, ready) = self
            .exchange(&request, false)
            .await
            .map_err(|e| fail(resume, e.into()))?;
        let (id, offset) = match ready {
            Response::UploadReady { id, offset } => (id, offset),
            other => {
                return Err(fail(resume, super::unexpected(other).into()));
            }
        };
        let conn = |e: String| fail(Some(id), self.connection_error(e).into());
        // Reading, hashing and sealing run on the blocking pool, a block ahead of
        // the stream: the CPU work of one block overlaps the sending of the last.
        let (blocks, mut sealed) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let file = file.into_std().await;
        let (owned_path, key) = (path.to_path_buf(), *key);
        let producer = tokio::task::spawn_blocking(move || {
            seal_file(file, &owned_path, &key, size, offset, &blocks)
        });
        let mut at = offset;
        let mut broken = None;
        while let Some(block) = sealed.recv().await {
            if let Err(e) = send.write_all(&block).await {
                broken = Some(e.to_string());
                break;
            }
            at += block.len() as u64;
            progress(at, total);
        }
        // Dropping the receiver stops the producer at its next block.
        drop(sealed);
        let digest = producer
            .await
            .map_err(|e| {
                fail(
                    Some(id),
                    AttachmentError::Mismatch(format!("sealing stopped: {e}")),
                )
            })?
            .map_err(|e| fail(Some(id), e));
        if let Some(e) = broken {
            return Err(conn(e));
        }
        let digest = digest?;
        send.finish().map_err(|e| conn(e.to_string()))?;
        let reply =
            crate::proto::frame::read::<crate::proto::Reply, _>(&mut recv, super::MAX_REPLY_BYTES)
                .await
                .map_err(|e| conn(e.to_string()))?
                .ok_or_else(|| conn("the node ended the upload without an answer".into()))?;
        match reply {
            crate::proto::Reply::Ok(Response::Uploaded { id, .. }) => {
                Ok(Uploaded { id, size, digest })
            }
            crate::proto::Reply::Ok(other) => Err(fail(Some(id), super::unexpected(other).into())),
            crate::proto::Reply::Err(e) => Err(fail(Some(id), ClientError::Node(e).into())),
        }
    }

    /// Downloads `att` and decrypts it into `out` (appending to what `state` says is
    /// there already, so a broken-off download resumes), checking every chunk.
    pub async fn download_into(
        &self,
        att: &Attachment,
        out: &mut tokio::fs::File,
        state: &mut DownloadState,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), AttachmentError> {
        let total = ciphertext_len(att.size);
        let n = chunks(att.size);
        let offset = state.chunks * (CHUNK + TAG) as u64;
        let request = Request::Download { id: att.id, offset };
        let (_, mut recv, ready) = self.exchange(&request, true).await?;
        match ready {
            Response::DownloadReady { size } if size == total => {}
            Response::DownloadReady { size } => {
                return Err(AttachmentError::Mismatch(format!(
                    "the node holds {size} bytes, the message says {total}"
                )));
            }
            other => return Err(super::unexpected(other).into()),
        }
        let file_error = |source| AttachmentError::File {
            path: PathBuf::from("the download"),
            source,
        };
        // Opening, hashing and writing run on the blocking pool, beside the stream:
        // the CPU work of one chunk overlaps the receiving of the next. The worker
        // gets the download's state and gives it back, whatever happens.
        out.flush().await.map_err(file_error)?;
        let file = out.try_clone().await.map_err(file_error)?.into_std().await;
        let (key, first) = (att.key, state.chunks);
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2 * BLOCK_CHUNKS);
        let taken = std::mem::take(state);
        let worker =
            tokio::task::spawn_blocking(move || open_into(file, &key, n, taken, &mut chunks_rx));
        let received = async {
            let mut buf = vec![0u8; CHUNK + TAG];
            for i in first..n {
                let want = if i + 1 == n {
                    (total - i * (CHUNK + TAG) as u64) as usize
                } else {
                    CHUNK + TAG
                };
                let mut sealed = Vec::with_capacity(want);
                while sealed.len() < want {
                    let room = want - sealed.len();
                    match recv.read(&mut buf[..room]).await {
                        Ok(Some(got)) => sealed.extend_from_slice(&buf[..got]),
                        Ok(None) => {
                            return Err(self
                                .connection_error("the download ended early".into())
                                .into());
                        }
                        Err(e) => return Err(self.connection_error(e.to_string()).into()),
                    }
                }
                if chunks_tx.send(sealed).await.is_err() {
                    // The worker stopped: its error says why.
                    return Ok(());
                }
                progress(((i + 1) * (CHUNK + TAG) as u64).min(total), total);
            }
            // Anything after the last chunk is not this attachment.
            if recv
                .read(&mut buf[..1])
                .await
                .is_ok_and(|r| r.is_some_and(|n| n > 0))
            {
                return Err(AttachmentError::Mismatch(
                    "bytes after its last chunk".into(),
                ));
            }
            Ok(())
        }
        .await;
        drop(chunks_tx);
        let (back, opened) = worker.await.map_err(|e| {
            // Not a connection error: what was written is unknown, so no resume.
            AttachmentError::Mismatch(format!("the download's worker stopped: {e}"))
        })?;
        *state = back;
        opened?;
        received
    }
}

/// Opens the sealed chunks that come on `sealed` (the next being chunk
/// `state.chunks` of `n`), writing each to `file` and counting it in `state`; stops
/// at the first that does not open. Gives `state` back with the outcome.
fn open_into(
    mut file: std::fs::File,
    key: &[u8; 32],
    n: u64,
    mut state: DownloadState,
    sealed: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> (DownloadState, Result<(), AttachmentError>) {
    use std::io::Write;
    while let Some(chunk) = sealed.blocking_recv() {
        let i = state.chunks;
        let Some(plain) = open_chunk(key, i, i + 1 == n, &chunk) else {
            return (state, Err(AttachmentError::Tampered { chunk: i }));
        };
        if let Err(source) = file.write_all(&plain) {
            let path = PathBuf::from("the download");
            return (state, Err(AttachmentError::File { path, source }));
        }
        state.hasher.update(&plain);
        state.chunks += 1;
    }
    (state, Ok(()))
}

/// Reads `file` (`size` bytes at `path`) from its start, hashing every byte, and
/// sends its sealed chunks from ciphertext offset `offset` on, a block of
/// [`BLOCK_CHUNKS`] chunks per message. Returns the SHA-256 of the whole file;
/// stops early (an error) once nobody receives.
fn seal_file(
    mut file: std::fs::File,
    path: &Path,
    key: &[u8; 32],
    size: u64,
    offset: u64,
    blocks: &tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<[u8; 32], AttachmentError> {
    use std::io::Read;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; BLOCK_CHUNKS * CHUNK];
    let mut at = 0u64;
    let n = chunks(size);
    let mut i = 0u64;
    while i < n {
        let read = (size - i * CHUNK as u64).min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..read]).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                AttachmentError::Changed { path: path.into() }
            } else {
                file_error(path)(e)
            }
        })?;
        hasher.update(&buf[..read]);
        let mut out = Vec::with_capacity(BLOCK_CHUNKS * (CHUNK + TAG));
        let mut start = 0;
        loop {
            let len = (read - start).min(CHUNK);
            let sealed_len = (len + TAG) as u64;
            if at + sealed_len > offset {
                let sealed = seal_chunk(key, i, i + 1 == n, &buf[start..start + len]);
                let skip = offset.saturating_sub(at) as usize;
                out.extend_from_slice(&sealed[skip..]);
            }
            at += sealed_len;
            start += len;
            i += 1;
            if start >= read || i >= n {
                break;
            }
        }
        if !out.is_empty() && blocks.blocking_send(out).is_err() {
            return Err(AttachmentError::Mismatch("the upload stopped".into()));
        }
    }
    // One byte more means the file grew while it was read.
    if file.read(&mut buf[..1]).is_ok_and(|n| n > 0) {
        return Err(AttachmentError::Changed { path: path.into() });
    }
    Ok(hasher.finalize().into())
}

/// How far a download has come: whole chunks written, and the hash of them.
#[derive(Default)]
pub struct DownloadState {
    pub chunks: u64,
    hasher: sha2::Sha256,
}

impl DownloadState {
    /// The SHA-256 of everything written.
    pub fn digest(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

/// A MIME type for a file name (by its extension; what this cannot tell is
/// `application/octet-stream`).
pub fn mime_of(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "ogg" | "opus" => "audio/ogg",
        "m4a" | "aac" => "audio/mp4",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// A file name safe to create in a directory: the last component of `name`, no
/// control characters, no leading dot, at most [`MAX_NAME_BYTES`].
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut clean: String = last
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim_start_matches('.')
        .trim()
        .to_string();
    while clean.len() > MAX_NAME_BYTES {
        clean.pop();
    }
    if clean.is_empty() {
        "attachment".into()
    } else {
        clean
    }
}

/// A small JPEG of an image file (`None` if it is not one this reads).
pub fn thumbnail(bytes: &[u8]) -> Option<Vec<u8>> {
    let image = image::load_from_memory(bytes).ok()?;
    for side in [96, 64, 32] {
        let small = image.thumbnail(side, side).into_rgb8();
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 60)
            .encode_image(&small)
            .ok()?;
        if out.len() <= MAX_THUMBNAIL_BYTES {
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thumbnail_is_a_small_jpeg_of_an_image_and_nothing_of_other_files() {
        // A noisy photo-sized PNG: the hardest case for the size bound.
        let photo = image::RgbImage::from_fn(1600, 1200, |x, y| {
            let n = x
                .wrapping_mul(2_654_435_761)
                .wrapping_add(y.wrapping_mul(40_503));
            image::Rgb([(n >> 3) as u8, (n >> 11) as u8, (n >> 19) as u8])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(photo)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let thumb = thumbnail(&png).expect("a PNG makes a thumbnail");
        assert!(thumb.len() <= MAX_THUMBNAIL_BYTES, "{} bytes", thumb.len());
        assert_eq!(
            image::guess_format(&thumb).unwrap(),
            image::ImageFormat::Jpeg
        );
        let small = image::load_from_memory(&thumb).unwrap();
        assert!(small.width() <= 96 && small.height() <= 96);
        // The aspect ratio is kept: 4:3.
        assert_eq!(small.width() * 3, small.height() * 4);
        assert_eq!(thumbnail(b"not an image at all"), None);
        assert_eq!(thumbnail(&png[..png.len() / 3]), None, "a cut-off PNG");
    }

    #[test]
    fn sizes_and_chunks() {
        assert_eq!(ciphertext_len(0), 16);
        assert_eq!(ciphertext_len(1), 17);
        assert_eq!(ciphertext_len(CHUNK as u64), CHUNK as u64 + 16);
        assert_eq!(ciphertext_len(CHUNK as u64 + 1), CHUNK as u64 + 1 + 32);
    }

    #[test]
    fn chunks_verify_only_in_their_place() {
        let key = [7; 32];
        let a = seal_chunk(&key, 0, false, b"first");
        assert_eq!(
            open_chunk(&key, 0, false, &a).as_deref(),
            Some(&b"first"[..])
        );
        // Moved, marked last, another key, or a flipped bit: refused.
        assert!(open_chunk(&key, 1, false, &a).is_none());
        assert!(open_chunk(&key, 0, true, &a).is_none());
        assert!(open_chunk(&[8; 32], 0, false, &a).is_none());
        let mut b = a.clone();
        b[0] ^= 1;
        assert!(open_chunk(&key, 0, false, &b).is_none());
    }

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("a\nb\u{1b}[2J.txt"), "ab[2J.txt");
        assert_eq!(safe_name(""), "attachment");
        assert_eq!(safe_name("C:\\Users\\x\\photo.jpg"), "photo.jpg");
        assert!(safe_name(&"x".repeat(1000)).len() <= MAX_NAME_BYTES);
        assert_eq!(mime_of("Voice Note.OPUS"), "audio/ogg");
    }
}
