//! The session: what a handler knows of the connection a request came on, and the
//! authentication of its device (cached per directory epoch).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use super::clock::now_ms;
use super::engine;
use crate::proto::{ErrorKind, NodeError};
use crate::store::DeviceIdentity;
use crate::store::layout::KeyId;

/// What a handler knows of the connection a request came on.
pub struct Session {
    /// SHA-256 of the device's public key, from its TLS client certificate.
    pub key_id: KeyId,
    /// The device's SubjectPublicKeyInfo, stored when the device registers.
    pub public_key: Vec<u8>,
    pub remote: SocketAddr,
    /// The registered device behind the key, as last looked up, with the directory
    /// epoch it was read in (see `Shared::directory_epoch`).
    pub identity: std::sync::Mutex<Option<(u64, crate::store::DeviceIdentity)>>,
    /// When this connection last recorded its account as seen (ms; 0: not yet).
    pub seen_marked: std::sync::atomic::AtomicU64,
    /// The connection's flow-control windows, widened while it moves attachments.
    pub windows: Windows,
}

/// A connection's flow-control windows: a few request frames while it only asks
/// and answers, `attachments.transfer_window_bytes` while an upload or download
/// runs on it (so a transfer is not held to a few frames per round trip, and idle
/// connections cost no more memory).
pub struct Windows {
    conn: quinn::Connection,
    normal: u64,
    transfer: u64,
    /// Transfers running on the connection.
    running: std::sync::Mutex<u32>,
}

impl Windows {
    pub fn new(conn: quinn::Connection, config: &crate::config::Config) -> Windows {
        let (normal, transfer) = Windows::sizes(config);
        Windows {
            conn,
            normal,
            transfer,
            running: std::sync::Mutex::new(0),
        }
    }

    /// The windows `config` gives: four request frames, and while a transfer runs
    /// `attachments.transfer_window_bytes` (never less).
    pub fn sizes(config: &crate::config::Config) -> (u64, u64) {
        let normal = u64::from(config.limits.max_frame_bytes) * 4;
        (normal, config.attachments.transfer_window_bytes.max(normal))
    }

    fn set(&self, bytes: u64) {
        self.conn.set_send_window(bytes);
        self.conn
            .set_receive_window(quinn::VarInt::from_u64(bytes).unwrap_or(quinn::VarInt::MAX));
    }

    /// Widens the windows until the returned guard (and every other one) is dropped.
    pub fn transfer(&self) -> TransferWindows<'_> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if *running == 0 {
            self.set(self.transfer);
        }
        *running += 1;
        TransferWindows(self)
    }
}

/// One transfer's hold on the wide windows.
pub struct TransferWindows<'a>(&'a Windows);

impl Drop for TransferWindows<'_> {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        *running = running.saturating_sub(1);
        if *running == 0 {
            self.0.set(self.0.normal);
        }
    }
}

/// The registered device behind this connection's key, or `Unauthenticated`.
pub(crate) async fn authenticated(
    shared: &Arc<Shared>,
    session: &Session,
) -> Result<DeviceIdentity, NodeError> {
    let epoch = shared.directory_epoch.load(Ordering::Acquire);
    let cached = match session.identity.lock() {
        Ok(cached) => cached
            .as_ref()
            .filter(|(at, _)| *at == epoch)
            .map(|(_, identity)| identity.clone()),
        Err(_) => None,
    };
    let identity = match cached {
        Some(identity) => identity,
        None => {
            let found = engine::device_by_key(shared, session.key_id).await?;
            let identity = match found {
                Ok(identity) => identity,
                Err(Some(removed)) => {
                    let why = crate::proto::Removal::from(removed.why);
                    return Err(NodeError::new(
                        ErrorKind::DeviceRemoved { why },
                        why.describe(),
                    ));
                }
                Err(None) => {
                    return Err(NodeError::new(
                        ErrorKind::Unauthenticated,
                        "this device is not registered on this node",
                    ));
                }
            };
            // In cluster mode another node may sign this device out at any moment:
            // cached only while this node hears of every such change.
            if engine::directory_cacheable(shared)
                && let Ok(mut cached) = session.identity.lock()
            {
                *cached = Some((epoch, identity.clone()));
            }
            identity
        }
    };
    note_seen(shared, session, identity.device).await?;
    Ok(identity)
}

/// Records the device (and so its account) as seen, at most hourly per connection: a
/// registration lock lapses when an account is not, and a linked device when it is
/// not.
pub(crate) async fn note_seen(
    shared: &Arc<Shared>,
    session: &Session,
    device: crate::store::DeviceRef,
) -> Result<(), NodeError> {
    const HOUR_MS: u64 = 3_600_000;
    let now = now_ms();
    let last = session.seen_marked.load(Ordering::Relaxed);
    if now < last.saturating_add(HOUR_MS)
        || session
            .seen_marked
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return Ok(());
    }
    engine::mark_device_seen(shared, device, now).await
}
