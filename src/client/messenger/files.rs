//! Sending and saving attachments: the file is encrypted and uploaded first (resumed
//! on a new connection when one breaks), then its key goes in an ordinary message;
//! a recipient downloads, decrypts and checks it into a directory of its choosing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngExt;

use super::acts::Conversation;
use super::{Messenger, MessengerError};
use crate::client::attachment::{self, Attachment, AttachmentError, DownloadState};
use crate::client::content::Content;
use crate::proto::MessageId;

/// Tries of one transfer over new connections before it is given up.
const TRIES: u32 = 6;
/// The largest image a thumbnail is made of (it is read whole).
const MAX_THUMBNAIL_SOURCE: u64 = 32 << 20;

impl Messenger {
    /// Sends file `path` with `caption` to `conversation`: encrypted here under a
    /// fresh key, uploaded (resuming where it stopped if a connection breaks), then
    /// announced in a message that carries its key. `progress` gets the bytes done
    /// and the total. Returns the message's id.
    pub async fn send_file(
        &self,
        conversation: &Conversation,
        path: &Path,
        caption: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<MessageId, MessengerError> {
        if caption.len() > super::MAX_TEXT_BYTES {
            return Err(MessengerError::TooLarge {
                len: caption.len(),
                max: super::MAX_TEXT_BYTES,
            });
        }
        let name = attachment::safe_name(&path.to_string_lossy());
        let mime = attachment::mime_of(&name).to_string();
        let size = std::fs::metadata(path)
            .map_err(|source| AttachmentError::File {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let thumbnail = if mime.starts_with("image/") && size <= MAX_THUMBNAIL_SOURCE {
            let file = path.to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::fs::read(&file)
                    .ok()
                    .and_then(|b| attachment::thumbnail(&b))
            })
            .await
            .unwrap_or(None)
        } else {
            None
        };
        // The devices it is for: the recipient's and this account's others (as this
        // device knows them); a group's are not known here, so it stays to the TTL.
        let downloads = match conversation {
            Conversation::With(n) => {
                let own = self.inner.me.number.clone();
                (self.devices_of(n).await?.len() + self.devices_of(&own).await?.len()) as u32
            }
            Conversation::Group(_) => 0,
        };
        let key: [u8; 32] = rand::rng().random();
        let mut resume = None;
        let mut tries = 0;
        let uploaded = loop {
            let client = self.client().await?;
            match client
                .upload_file(path, &key, downloads, resume, progress)
                .await
            {
                Ok(done) => break done,
                Err(failed) => {
                    resume = failed.id.or(resume);
                    tries += 1;
                    if !failed.error.is_connection() || tries >= TRIES {
                        return Err(failed.error.into());
                    }
                    self.drop_client(&client).await;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                }
            }
        };
        let content = Content::Attachment(Attachment {
            id: uploaded.id,
            key,
            size: uploaded.size,
            digest: uploaded.digest,
            name,
            mime,
            thumbnail,
            caption: caption.to_string(),
        });
        self.send_to(conversation, content).await
    }

    /// Downloads attachment `att` into `dir`, decrypting and checking every chunk and
    /// the whole file's digest; a download that breaks off resumes on a new
    /// connection. The file appears under its (made safe) name, with a number added
    /// if that is taken, only once it is whole and checked. Returns its path.
    pub async fn save_attachment(
        &self,
        att: &Attachment,
        dir: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<PathBuf, MessengerError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AttachmentError::File { path, source }
        };
        crate::fsutil::create_private_dir(dir).map_err(io(dir))?;
        let name = attachment::safe_name(&att.name);
        let part = dir.join(format!(".{name}.{}.part", hex::encode(&att.id[..4])));
        let mut out = tokio::fs::File::create(&part).await.map_err(io(&part))?;
        let mut state = DownloadState::default();
        let mut tries = 0;
        let result = loop {
            let client = match self.client().await {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            match client
                .download_into(att, &mut out, &mut state, progress)
                .await
            {
                Ok(()) => break Ok(()),
                Err(e) => {
                    tries += 1;
                    if !e.is_connection() || tries >= TRIES {
                        break Err(e.into());
                    }
                    self.drop_client(&client).await;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                }
            }
        };
        let checked = result.and_then(|()| {
            let digest = std::mem::take(&mut state).digest();
            if digest != att.digest {
                return Err(AttachmentError::Mismatch("its SHA-256 differs".into()).into());
            }
            Ok(())
        });
        if let Err(e) = checked {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        out.sync_all().await.map_err(io(&part))?;
        drop(out);
        let target = free_name(dir, &name);
        tokio::fs::rename(&part, &target)
            .await
            .map_err(io(&target))?;
        Ok(target)
    }
}

/// `dir/name`, or `dir/name (1)`… when that is taken.
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.to_string(), String::new()),
    };
    (1..)
        .map(|i| dir.join(format!("{stem} ({i}){ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}
