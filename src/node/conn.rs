//! One connection: the handshake, the device key, and a task per request stream.
//!
//! This is the only part of the node that sees quinn types; handlers get a
//! [`Session`] and a decoded request and return a reply.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Shared;
use super::limits::Ticket;
use super::session::Session;
use super::{delivery, handlers};
use crate::config::Config;
use crate::proto::{ErrorKind, FrameError, NodeError, Reply, Request, codes, frame};
use crate::quic;
use crate::store::layout::KeyId;
use crate::tls::{self, Credentials, TlsError};

/// The live connections of each device key, so that signing a device out can close
/// them at once.
#[derive(Default)]
pub struct Connections {
    next: std::sync::atomic::AtomicU64,
    by_key: std::sync::Mutex<std::collections::HashMap<KeyId, Vec<(u64, quinn::Connection)>>>,
}

impl Connections {
    fn add(&self, key: KeyId, conn: &quinn::Connection) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_default().push((id, conn.clone()));
        id
    }

    fn remove(&self, key: &KeyId, id: u64) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Closes every connection of these device keys: the devices were signed out.
    pub fn sign_out(&self, keys: &[KeyId]) -> usize {
        self.close(
            keys,
            codes::SIGNED_OUT,
            b"signed out: this number was registered on another device",
        )
    }

    /// Closes every connection of device key `key`, removed from its account for
    /// `why`, with the close code and reason a removal of that kind has.
    pub fn close_removed(&self, key: KeyId, why: crate::store::records::Removal) -> usize {
        use crate::store::records::Removal;
        let code = match why {
            Removal::SignedOut => codes::SIGNED_OUT,
            Removal::Unlinked | Removal::Lapsed => codes::UNLINKED,
            Removal::AccountDeleted => codes::ACCOUNT_DELETED,
        };
        let reason = crate::proto::Removal::from(why).describe();
        self.close(&[key], code, reason.as_bytes())
    }

    /// Closes every connection of these device keys with `code` and `reason`.
    pub fn close(&self, keys: &[KeyId], code: u32, reason: &[u8]) -> usize {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for key in keys {
            for (_, conn) in map.remove(key).unwrap_or_default() {
                conn.close(code.into(), reason);
                closed += 1;
            }
        }
        closed
    }

    /// Device keys with at least one live connection.
    pub fn devices_online(&self) -> usize {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The quinn server configuration: TLS plus the transport limits from config.
pub fn server_config(
    creds: &Credentials,
    config: &Config,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut server = quinn::ServerConfig::with_crypto(tls::server_crypto(creds)?);
    let limits = &config.limits;
    let (normal, transfer) = super::session::Windows::sizes(config);
    let window = |bytes| quinn::VarInt::from_u64(bytes).unwrap_or(quinn::VarInt::MAX);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout)
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        ))
        // Windows sized to the protocol, not to bulk transfer: most connections sit
        // idle, and quinn's defaults (1.25 MB per stream, 10 MB to send) cost memory
        // on every connection. What a peer may have unread at the node is capped by
        // the connection's window, four frames, widened to
        // attachments.transfer_window_bytes only while a transfer runs on it
        // (`session::Windows`); a stream may use all of it.
        .stream_receive_window(window(transfer))
        .receive_window(window(normal))
        .send_window(normal)
        .datagram_receive_buffer_size(None);
    transport.ack_frequency_config(Some(crate::quic::ack_frequency()));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Serves one connection until it closes or the node stops.
pub async fn serve(
    incoming: quinn::Incoming,
    ticket: Ticket,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let remote = incoming.remote_address();
    let span = tracing::info_span!("conn", %remote);
    async move {
        let _ticket = ticket;
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "handshake refused");
                return;
            }
        };
        let conn =
            match tokio::time::timeout(shared.config.limits.handshake_timeout, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("handshake timed out");
                    return;
                }
            };
        if negotiated_alpn(&conn).as_deref() != Some(crate::proto::ALPN) {
            tracing::info!("an app of an earlier protocol version connected; told to update");
            shared.metrics.outdated_clients.inc();
            conn.close(
                codes::OUTDATED.into(),
                crate::proto::OUTDATED_REASON.as_bytes(),
            );
            return;
        }
        let Some((key_id, public_key)) = device_key(&conn) else {
            conn.close(codes::REFUSED.into(), b"no usable client certificate");
            return;
        };
        let registered = shared.connections.add(key_id, &conn);
        shared.metrics.connections_open.inc();
        let _unregister = Unregister {
            shared: &shared,
            key_id,
            id: registered,
        };
        let session = Arc::new(Session {
            key_id,
            public_key,
            remote,
            identity: std::sync::Mutex::new(None),
            seen_marked: std::sync::atomic::AtomicU64::new(0),
            windows: super::session::Windows::new(conn.clone(), &shared.config),
        });
        tracing::debug!(device_key = %hex::encode(&key_id[..8]), "connected");
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = conn.accept_bi() => accepted,
            };
            match accepted {
                Ok((send, recv)) => {
                    let task =
                        serve_stream(send, recv, shared.clone(), session.clone(), stop.clone());
                    tracker.spawn(task.in_current_span());
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "connection closed");
                    break;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Takes a connection out of [`Connections`] when its task ends, however it ends.
struct Unregister<'a> {
    shared: &'a Shared,
    key_id: KeyId,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.shared.connections.remove(&self.key_id, self.id);
        self.shared.metrics.connections_open.dec();
    }
}

/// The ALPN protocol id the handshake settled on.
fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The device key of the peer, from its client certificate.
fn device_key(conn: &quinn::Connection) -> Option<(KeyId, Vec<u8>)> {
    let identity = conn.peer_identity()?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::key_id(chain.first()?).ok()
}

/// Serves one request stream: read one request frame, answer with one reply frame.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
    session: Arc<Session>,
    stop: CancellationToken,
) {
    let limits = &shared.config.limits;
    let max = limits.max_frame_bytes as usize;
    // What a send leaves for its answer (receipts it carries, its sent-id record):
    // confirmed once the client has the reply.
    let mut answer = None;
    let read = tokio::time::timeout(
        limits.request_timeout,
        frame::read::<Request, _>(&mut recv, max),
    )
    .await;
    let reply = match read {
        Ok(Ok(Some(Request::Subscribe))) => {
            delivery::serve(send, recv, shared.clone(), session, stop).await;
            return;
        }
        Ok(Ok(Some(Request::Upload {
            size,
            downloads,
            resume,
        }))) => {
            let _wide = session.windows.transfer();
            super::blobs::serve_upload(
                send,
                recv,
                shared,
                session.clone(),
                (size, downloads, resume),
            )
            .await;
            return;
        }
        Ok(Ok(Some(Request::Download { id, offset }))) => {
            quic::read_end(&mut recv);
            let _wide = session.windows.transfer();
            super::blobs::serve_download(send, shared, session.clone(), id, offset).await;
            return;
        }
        Ok(Ok(Some(request))) => {
            let kind = request.name();
            let reply = handlers::handle(request, &shared, &session, &mut answer).await;
            shared.metrics.request(kind, &reply);
            reply
        }
        Ok(Ok(None)) => {
            // An empty stream asks nothing; close it quietly.
            let _ = send.finish();
            return;
        }
        Ok(Err(FrameError::TooLarge { len, max })) => {
            tracing::debug!(len, max, "frame too large");
            let _ = recv.stop(codes::FRAME_TOO_LARGE.into());
            Reply::Err(NodeError::new(
                ErrorKind::FrameTooLarge { max: max as u32 },
                format!("request frame of {len} bytes is over the node's limit of {max} bytes"),
            ))
        }
        Ok(Err(FrameError::Malformed(reason))) => {
            tracing::debug!(%reason, "malformed request");
            let _ = recv.stop(codes::MALFORMED.into());
            Reply::Err(NodeError::new(
                ErrorKind::Malformed,
                format!("malformed request: {reason}"),
            ))
        }
        Ok(Err(FrameError::Truncated)) => Reply::Err(NodeError::new(
            ErrorKind::Malformed,
            "the stream ended in the middle of a request frame",
        )),
        Ok(Err(FrameError::Io(e))) => {
            tracing::debug!(error = %e, "request stream failed");
            return;
        }
        Err(_) => {
            tracing::debug!("request not received in time");
            let _ = recv.stop(codes::TIMEOUT.into());
            let _ = send.reset(codes::TIMEOUT.into());
            return;
        }
    };
    if let Err(e) = frame::write(&mut send, &reply).await {
        tracing::debug!(error = %e, "could not send the reply");
        return;
    }
    let _ = send.finish();
    // Wait until the peer has the whole reply, so a graceful shutdown does not cut it
    // off; bounded, so a peer that never acknowledges cannot hold the task.
    let received = tokio::time::timeout(limits.request_timeout, send.stopped()).await;
    match (received, answer) {
        (Ok(Ok(None)), Some(answer)) => answer.answered(),
        // Not confirmed: dropping it queues the carried receipts and keeps the
        // sent-id record, so a resend is answered as a duplicate.
        (_, Some(answer)) => {
            drop(answer);
            shared.metrics.answer_unconfirmed();
        }
        (_, None) => {}
    }
    // The client finished its side with the request, so its FIN is here: read it, or
    // dropping `recv` would send a STOP_SENDING, in a packet of its own (src/quic.rs).
    quic::read_end(&mut recv);
    drop(recv);
    drop(send);
    shared.metrics.stream_closed();
}
