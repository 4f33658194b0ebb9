//! The client library: what any app needs to talk to a node.
//!
//! Two levels:
//! - [`Messenger`] (`messenger`): what an app calls. It owns the home database
//!   (`db`: keys, sessions, contacts, the history), stays connected, and sends,
//!   receives and keeps messages so that none is lost on this side either.
//! - [`Client`]: one QUIC connection authenticated by the device's own key (its TLS
//!   client certificate), with one method per request. Each request runs on its own
//!   stream, so many can be in flight at once. The node's certificate is pinned by
//!   fingerprint: pass the pin when it is known, or `None` to trust on first use and
//!   store [`Client::fingerprint`]. A [`Connector`] makes the connections of one
//!   device, resuming its TLS session so a reconnect skips the certificate work.

pub mod attachment;
pub mod contacts;
pub mod content;
pub mod db;
pub mod e2e;
pub mod groups;
pub mod history;
pub mod home;
pub mod import;
mod legacy;
pub mod link;
pub mod messenger;
pub mod profile;
pub mod sealed;
pub mod senderkeys;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::phone::Number;
use crate::proto::{
    self, Accepted, Ack, Bundles, Channel, CodeSent, Identity, KeyUpload, NodeError, Outgoing,
    Push, Registered, Reply, Request, Response, frame,
};
use crate::tls::{self, Credentials, Fingerprint, PinObservation, TlsError};

pub use home::{Home, HomeError, Registration};
pub use messenger::{Event, GroupSent, Messenger, MessengerError};

impl Registration {
    /// A connection of this device to its node, checking the pinned certificate.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.server, &self.credentials, Some(self.fingerprint)).await
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{server:?} is not a server address: expected HOST:PORT ({reason})")]
    BadServer { server: String, reason: String },
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error(
        "the node at {server} presented certificate {actual}, but this device pinned {expected}: \
         refusing to connect. If the operator really replaced the certificate, check the new \
         fingerprint with them and register again with --fingerprint"
    )]
    FingerprintMismatch {
        server: String,
        expected: Fingerprint,
        actual: Fingerprint,
    },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("the node sent an answer that does not fit the request: {0}")]
    Protocol(String),
    #[error("connection to the node failed: {0}")]
    Connection(String),
    #[error("the request is {len} bytes, over the protocol's limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "the node at {server} speaks another version of the Switchboard protocol than this \
         app (version {ours}): {reason}"
    )]
    Outdated {
        server: String,
        ours: u32,
        reason: String,
    },
    /// The node closed the connection because this device left its account (it was
    /// unlinked, or signed out); it cannot connect again.
    #[error("{0}")]
    Removed(String),
}

impl ClientError {
    /// Whether this is the connection failing (the node unreachable, the connection
    /// lost), as opposed to an answer: worth trying again on a new connection.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Connection(_)
        )
    }
}

/// Makes the connections of one device to one node: the TLS configuration is built
/// once, so the session tickets the node hands out are offered on the next connect
/// (TLS 1.3 resumption: no certificates, no signatures), and they all go out of
/// one UDP socket, which [`Connector::rebind`] can move.
pub struct Connector {
    /// `HOST:PORT`, or several separated by commas: nodes of one cluster.
    server: String,
    /// The address (index into the list) that answered last: tried first.
    preferred: std::sync::atomic::AtomicUsize,
    pin: Option<Fingerprint>,
    config: quinn::ClientConfig,
    observation: Arc<PinObservation>,
    endpoint: std::sync::Mutex<Option<quinn::Endpoint>>,
}

impl Connector {
    /// A connector for the device `creds` to `server` (`HOST:PORT`), checking the
    /// node's certificate against `pin` when given.
    pub fn new(
        server: &str,
        creds: &Credentials,
        pin: Option<Fingerprint>,
    ) -> Result<Connector, ClientError> {
        let (crypto, observation) = tls::client_crypto(creds, pin)?;
        let mut config = quinn::ClientConfig::new(crypto);
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(15)));
        transport.ack_frequency_config(Some(crate::quic::ack_frequency()));
        // A download may have this much unread in flight (a node's transfer window,
        // attachments.transfer_window_bytes, up to 4 MiB); quinn's default is 1.25 MB.
        transport.stream_receive_window(quinn::VarInt::from_u32(4 << 20));
        config.transport_config(Arc::new(transport));
        Ok(Connector {
            server: server.to_string(),
            preferred: std::sync::atomic::AtomicUsize::new(0),
            pin,
            config,
            observation,
            endpoint: std::sync::Mutex::new(None),
        })
    }

    /// The server address as given.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The node addresses, in the order given.
    pub fn addresses(&self) -> Vec<&str> {
        addresses(&self.server)
    }

    /// Connects over this connector's own endpoint (made on first use).
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let first = self.addresses().first().copied().unwrap_or("");
        let (_, addr) = resolve(first).await?;
        let endpoint = {
            let mut slot = self
                .endpoint
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match slot.as_ref() {
                Some(e) => e.clone(),
                None => {
                    let e = client_endpoint(addr.is_ipv6()).map_err(|e| ClientError::Connect {
                        server: self.server.clone(),
                        reason: e.to_string(),
                    })?;
                    *slot = Some(e.clone());
                    e
                }
            }
        };
        self.connect_via(&endpoint).await
    }

    /// Connects over `endpoint` (from [`client_endpoint`]), so that many devices can
    /// share a few sockets (load generators, multi-account apps). With several node
    /// addresses, the one that answered last is tried first, then the others in
    /// order; a node that cannot be reached (or a connection that cannot be made)
    /// moves on to the next, anything else (a wrong certificate, an outdated app, a
    /// bad address) is the answer.
    pub async fn connect_via(&self, endpoint: &quinn::Endpoint) -> Result<Client, ClientError> {
        use std::sync::atomic::Ordering;
        let list = self.addresses();
        if list.len() <= 1 {
            return self
                .connect_one(
                    endpoint,
                    list.first().copied().unwrap_or(""),
                    CONNECT_TIMEOUT,
                )
                .await;
        }
        let start = self.preferred.load(Ordering::Relaxed) % list.len();
        let mut failures = Vec::new();
        for i in (0..list.len()).map(|k| (start + k) % list.len()) {
            match self.connect_one(endpoint, list[i], FAILOVER_TIMEOUT).await {
                Ok(client) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(ClientError::Connect { server, reason }) => {
                    failures.push(format!("{server}: {reason}"));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Connect {
            server: self.server.clone(),
            reason: format!("no node answered ({})", failures.join("; ")),
        })
    }

    /// Connects to the one node at `server`, waiting at most `timeout`.
    async fn connect_one(
        &self,
        endpoint: &quinn::Endpoint,
        server: &str,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let (host, addr) = resolve(server).await?;
        let connect_err = |reason: String| ClientError::Connect {
            server: server.to_string(),
            reason,
        };
        let connecting = endpoint
            .connect_with(self.config.clone(), addr, &host)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(handshake_error(server, self.pin, &self.observation, e)),
            Err(_) => {
                return Err(connect_err(format!(
                    "no answer within {} seconds (is the node running and the UDP port open?)",
                    timeout.as_secs()
                )));
            }
        };
        let fingerprint = self
            .observation
            .seen()
            .ok_or_else(|| connect_err("the node presented no certificate".into()))?;
        Ok(Client {
            endpoint: endpoint.clone(),
            owns_endpoint: false,
            conn,
            server: server.to_string(),
            fingerprint,
        })
    }

    /// Moves this connector's endpoint to a new UDP socket (a new local port): the
    /// connections on it migrate (QUIC path migration), as when a phone changes
    /// network.
    pub fn rebind(&self) -> std::io::Result<()> {
        let slot = self
            .endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(endpoint) = slot.as_ref() else {
            return Ok(());
        };
        let ipv6 = endpoint.local_addr()?.is_ipv6();
        let bind: SocketAddr = if ipv6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        endpoint.rebind(std::net::UdpSocket::bind(bind)?)
    }

    /// The local address of this connector's socket, once it has one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        let slot = self
            .endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// How many handshakes checked the node's certificate: connects that did not
    /// resume a TLS session.
    pub fn full_handshakes(&self) -> u64 {
        self.observation.verified()
    }

    /// Waits (up to a second) until the node has been told of every closed
    /// connection of this connector.
    pub async fn close(&self) {
        let endpoint = self
            .endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(e) = endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
    }
}

/// A connection to a node (cheap to clone: clones share the connection).
#[derive(Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    /// Whether the endpoint is this client's alone (then `close` waits for it).
    owns_endpoint: bool,
    conn: quinn::Connection,
    server: String,
    fingerprint: Fingerprint,
}

/// How long a connect waits for the node, with one node address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connect waits for each node, with several addresses (it moves on).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(3);

/// The node addresses in `server`: `HOST:PORT`, or several separated by commas.
fn addresses(server: &str) -> Vec<&str> {
    server
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// The largest reply the client accepts.
const MAX_REPLY_BYTES: usize = proto::HARD_MAX_FRAME_BYTES;

impl Client {
    /// Connects to `server` (`HOST:PORT`) as the device `creds`, checking the node's
    /// certificate against `pin` when given. The connection gets its own UDP socket.
    /// (A [`Connector`] reconnects cheaper.)
    pub async fn connect(
        server: &str,
        creds: &Credentials,
        pin: Option<Fingerprint>,
    ) -> Result<Client, ClientError> {
        let mut client = Connector::new(server, creds, pin)?.connect().await?;
        client.owns_endpoint = true;
        Ok(client)
    }

    /// Like [`Client::connect`], over an existing endpoint (from [`client_endpoint`]).
    pub async fn connect_via(
        endpoint: &quinn::Endpoint,
        server: &str,
        creds: &Credentials,
        pin: Option<Fingerprint>,
    ) -> Result<Client, ClientError> {
        Connector::new(server, creds, pin)?
            .connect_via(endpoint)
            .await
    }

    /// The error for a failure of this connection: [`ClientError::Outdated`] when the
    /// node closed it for speaking an earlier protocol version, else `what`.
    fn connection_error(&self, what: String) -> ClientError {
        let removed = [
            proto::codes::SIGNED_OUT,
            proto::codes::ACCOUNT_DELETED,
            proto::codes::UNLINKED,
        ];
        if let Some(quinn::ConnectionError::ApplicationClosed(c)) = self.conn.close_reason()
            && removed.iter().any(|&code| c.error_code == code.into())
        {
            return ClientError::Removed(String::from_utf8_lossy(&c.reason).into_owned());
        }
        match self.conn.close_reason().as_ref().and_then(version_mismatch) {
            Some(reason) => ClientError::Outdated {
                server: self.server.clone(),
                ours: proto::VERSION,
                reason,
            },
            None => ClientError::Connection(what),
        }
    }

    /// Whether the connection is still up (as far as this side knows).
    pub fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The fingerprint of the node's certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The server address as given to [`Client::connect`].
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends one request on its own stream and waits for its reply.
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let (_, mut recv, response) = self.exchange(request, true).await?;
        // Read on to the end of the stream (the node finishes it right after the
        // reply, usually in the same packet), so the node sees the reply received
        // rather than stopped: receipts carried in an `Accepted` count as delivered
        // only then. Bounded, and its outcome does not change the answer.
        let _ = tokio::time::timeout(Duration::from_secs(1), recv.read_to_end(64)).await;
        Ok(response)
    }

    /// Opens a stream, writes `request` (finishing the stream when `finish`), and
    /// reads the reply; hands back the stream for requests that go on using it.
    async fn exchange(
        &self,
        request: &Request,
        finish: bool,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Response), ClientError> {
        let conn_err = |e: String| self.connection_error(e);
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        frame::write(&mut send, request)
            .await
            .map_err(|e| match e {
                frame::FrameError::TooLarge { len, max } => ClientError::TooLarge { len, max },
                e => conn_err(e.to_string()),
            })?;
        if finish {
            send.finish().map_err(|e| conn_err(e.to_string()))?;
        }
        let reply = frame::read::<Reply, _>(&mut recv, MAX_REPLY_BYTES)
            .await
            .map_err(|e| conn_err(e.to_string()))?
            .ok_or_else(|| {
                ClientError::Protocol("the node closed the stream without a reply".into())
            })?;
        match reply {
            Reply::Ok(response) => Ok((send, recv, response)),
            Reply::Err(e) => Err(ClientError::Node(e)),
        }
    }

    /// Asks the node to send a verification code to `number`.
    pub async fn request_code(
        &self,
        number: &Number,
        channel: Channel,
        locale: &str,
    ) -> Result<CodeSent, ClientError> {
        let request = Request::RequestCode {
            number: number.to_string(),
            channel,
            locale: locale.to_string(),
        };
        match self.call(&request).await? {
            Response::CodeSent(sent) => Ok(sent),
            other => Err(unexpected(other)),
        }
    }

    /// Proves ownership of `number` with `code`, registering this device.
    pub async fn verify_code(
        &self,
        number: &Number,
        code: &str,
    ) -> Result<Registered, ClientError> {
        let request = Request::VerifyCode {
            number: number.to_string(),
            code: code.to_string(),
        };
        match self.call(&request).await? {
            Response::Registered(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the node who this device is.
    pub async fn whoami(&self) -> Result<Identity, ClientError> {
        match self.call(&Request::WhoAmI).await? {
            Response::Identity(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// Publishes this device's keys; returns how many one-time keys the node holds.
    pub async fn publish_keys(&self, upload: KeyUpload) -> Result<u32, ClientError> {
        match self.call(&Request::PublishKeys(upload)).await? {
            Response::KeysStored { one_time_keys } => Ok(one_time_keys),
            other => Err(unexpected(other)),
        }
    }

    /// Fetches the key bundles of `number`'s devices, claiming a one-time key of each
    /// when `claim` is set.
    pub async fn fetch_bundles(
        &self,
        number: &Number,
        claim: bool,
    ) -> Result<Bundles, ClientError> {
        let request = Request::FetchBundles {
            number: number.to_string(),
            claim,
        };
        match self.call(&request).await? {
            Response::Bundles(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    /// Sends envelopes; returns once the node holds them durably.
    pub async fn send(&self, outgoing: Outgoing) -> Result<Accepted, ClientError> {
        match self.call(&Request::Send(outgoing)).await? {
            Response::Accepted(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// The devices of this device's account, primary first.
    pub async fn list_devices(&self) -> Result<Vec<proto::DeviceInfo>, ClientError> {
        match self.call(&Request::ListDevices).await? {
            Response::Devices { devices } => Ok(devices),
            other => Err(unexpected(other)),
        }
    }

    /// Unlinks the device `device_id` of this account: this device itself, or (from
    /// the primary) any companion.
    pub async fn unlink_device(&self, device_id: u32) -> Result<(), ClientError> {
        match self.call(&Request::UnlinkDevice { device_id }).await? {
            Response::DeviceUnlinked => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Linking, on the primary: opens a link slot; returns its nameplate and how
    /// long it stays open (s).
    pub async fn link_open(&self, pake: Vec<u8>) -> Result<(u32, u32), ClientError> {
        match self.call(&Request::LinkOpen { pake }).await? {
            Response::LinkOpened {
                nameplate,
                expires_in_secs,
            } => Ok((nameplate, expires_in_secs)),
            other => Err(unexpected(other)),
        }
    }

    /// Linking, on the new device: takes the slot; returns the primary's message.
    pub async fn link_join(&self, nameplate: u32, pake: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::LinkJoin { nameplate, pake }).await? {
            Response::LinkOffer { pake } => Ok(pake),
            other => Err(unexpected(other)),
        }
    }

    /// Linking, on the new device: hands in the sealed request.
    pub async fn link_request(&self, nameplate: u32, sealed: Vec<u8>) -> Result<(), ClientError> {
        match self
            .call(&Request::LinkRequest { nameplate, sealed })
            .await?
        {
            Response::LinkQueued => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Linking, either side: what happened to the slot (`LinkWaiting`,
    /// `LinkRequested`, `LinkComplete` or `LinkAborted`).
    pub async fn link_poll(&self, nameplate: u32) -> Result<Response, ClientError> {
        match self.call(&Request::LinkPoll { nameplate }).await? {
            r @ (Response::LinkWaiting
            | Response::LinkRequested { .. }
            | Response::LinkComplete { .. }
            | Response::LinkAborted) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Linking, on the primary: authorises the new device; returns its device id.
    pub async fn link_grant(
        &self,
        nameplate: u32,
        name: &str,
        sealed: Vec<u8>,
    ) -> Result<u32, ClientError> {
        let request = Request::LinkGrant {
            nameplate,
            name: name.to_string(),
            sealed,
        };
        match self.call(&request).await? {
            Response::LinkGranted { device_id } => Ok(device_id),
            other => Err(unexpected(other)),
        }
    }

    /// Linking, either side: gives the slot up.
    pub async fn link_abort(&self, nameplate: u32) -> Result<(), ClientError> {
        match self.call(&Request::LinkAbort { nameplate }).await? {
            Response::LinkAborted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a group with the accounts of `members` (this account its admin) and
    /// the encrypted `meta`.
    pub async fn create_group(
        &self,
        members: &[Number],
        meta: Vec<u8>,
    ) -> Result<proto::GroupInfo, ClientError> {
        let request = Request::CreateGroup {
            members: members.iter().map(Number::to_string).collect(),
            meta,
        };
        match self.call(&request).await? {
            Response::Group(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Changes group `group_id`; `None` after this account left it.
    pub async fn change_group(
        &self,
        group_id: u64,
        change: proto::GroupChange,
    ) -> Result<Option<proto::GroupInfo>, ClientError> {
        match self
            .call(&Request::ChangeGroup { group_id, change })
            .await?
        {
            Response::Group(g) => Ok(Some(g)),
            Response::GroupLeft => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Group `group_id`, if this account is in it.
    pub async fn fetch_group(&self, group_id: u64) -> Result<proto::GroupInfo, ClientError> {
        match self.call(&Request::FetchGroup { group_id }).await? {
            Response::Group(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a group message (`body` encrypted once, by the caller) to every device
    /// of every member, which must be the devices `devices` is the digest of
    /// ([`proto::group_devices_digest`]); returns when it was accepted and for how
    /// many devices.
    pub async fn send_group(
        &self,
        group_id: u64,
        id: proto::MessageId,
        body: Vec<u8>,
        devices: [u8; 32],
    ) -> Result<(u64, u32), ClientError> {
        self.send_group_expiring(group_id, id, body, devices, 0)
            .await
    }

    /// [`Client::send_group`] of a disappearing message: the node drops its copies
    /// `expires_in_secs` after taking it (0: at its TTL).
    pub async fn send_group_expiring(
        &self,
        group_id: u64,
        id: proto::MessageId,
        body: Vec<u8>,
        devices: [u8; 32],
        expires_in_secs: u32,
    ) -> Result<(u64, u32), ClientError> {
        match self
            .call(&Request::SendGroup {
                group_id,
                id,
                body,
                devices,
                expires_in_secs,
            })
            .await?
        {
            Response::GroupAccepted {
                accepted_at_ms,
                recipients,
                ..
            } => Ok((accepted_at_ms, recipients)),
            other => Err(unexpected(other)),
        }
    }

    /// The groups this account is in.
    pub async fn list_groups(&self) -> Result<Vec<proto::GroupSummary>, ClientError> {
        match self.call(&Request::ListGroups).await? {
            Response::Groups { groups } => Ok(groups),
            other => Err(unexpected(other)),
        }
    }

    /// Verifies a code for a number that has a registration lock, with its PIN.
    pub async fn verify_code_with_pin(
        &self,
        number: &Number,
        code: &str,
        pin: &str,
    ) -> Result<Registered, ClientError> {
        let request = Request::VerifyCodeWithPin {
            number: number.to_string(),
            code: code.to_string(),
            pin: pin.to_string(),
        };
        match self.call(&request).await? {
            Response::Registered(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Stores this account's encrypted profile under `version` (see
    /// `client::profile`).
    pub async fn set_profile(&self, version: [u8; 32], blob: Vec<u8>) -> Result<(), ClientError> {
        match self.call(&Request::SetProfile { version, blob }).await? {
            Response::ProfileStored => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Stores this account's encrypted presence (empty: none).
    pub async fn set_presence(&self, blob: Vec<u8>) -> Result<(), ClientError> {
        match self.call(&Request::SetPresence { blob }).await? {
            Response::ProfileStored => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// `number`'s encrypted profile and presence, if `version` is its current one;
    /// `None` when the node has no such profile.
    pub async fn fetch_profile(
        &self,
        number: &Number,
        version: [u8; 32],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, ClientError> {
        let request = Request::FetchProfile {
            number: number.to_string(),
            version,
        };
        match self.call(&request).await {
            Ok(Response::Profile { blob, presence }) => Ok(Some((blob, presence))),
            Ok(other) => Err(unexpected(other)),
            Err(ClientError::Node(e)) if e.kind == proto::ErrorKind::NoProfile => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Tells `to` this device is typing (or stopped); how many of their devices
    /// were connected to be told.
    pub async fn typing(&self, to: proto::TypingTo, typing: bool) -> Result<u32, ClientError> {
        match self.call(&Request::Typing { to, typing }).await? {
            Response::TypingSent { devices } => Ok(devices),
            other => Err(unexpected(other)),
        }
    }

    /// Sets this account's registration lock; returns its lapse in days.
    pub async fn set_lock(&self, pin: &str) -> Result<u32, ClientError> {
        match self
            .call(&Request::SetLock {
                pin: pin.to_string(),
            })
            .await?
        {
            Response::LockSet { lapse_days } => Ok(lapse_days),
            other => Err(unexpected(other)),
        }
    }

    /// Removes this account's registration lock.
    pub async fn clear_lock(&self) -> Result<(), ClientError> {
        match self.call(&Request::ClearLock).await? {
            Response::LockCleared => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Contact discovery: evaluates blinded elements (at most
    /// [`proto::messages::MAX_DISCOVERY_BATCH`]). Returns the key version, the evaluated
    /// elements in order, and what is left of today's budget.
    pub async fn evaluate(
        &self,
        blinded: Vec<[u8; 32]>,
    ) -> Result<(u32, Vec<[u8; 32]>, u32), ClientError> {
        let n = blinded.len();
        match self.call(&Request::Evaluate { blinded }).await? {
            Response::Evaluated {
                key_version,
                evaluated,
                budget_left,
            } if evaluated.len() == n => Ok((key_version, evaluated, budget_left)),
            other => Err(unexpected(other)),
        }
    }

    /// Contact discovery: the node's membership filter, unless `have` is its current
    /// version (then `None`). Returns the version, the key version and the filter
    /// bytes, fetched chunk by chunk.
    pub async fn fetch_filter(
        &self,
        have: Option<u64>,
    ) -> Result<Option<(u64, u32, Vec<u8>)>, ClientError> {
        let mut bytes = Vec::new();
        let mut current: Option<(u64, u32)> = None;
        // Bounded: a filter that keeps changing under us is fetched afresh at most
        // a few times.
        for _ in 0..64 {
            let offset = bytes.len() as u32;
            match self.call(&Request::FetchFilter { have, offset }).await? {
                Response::FilterUnchanged { .. } => return Ok(None),
                Response::FilterChunk {
                    version,
                    key_version,
                    total_len,
                    offset: at,
                    chunk,
                } => {
                    if at != offset || current.is_some_and(|c| c != (version, key_version)) {
                        // The filter was rebuilt mid-download: start over.
                        bytes.clear();
                        current = None;
                        continue;
                    }
                    current = Some((version, key_version));
                    if chunk.is_empty() && bytes.len() < total_len as usize {
                        return Err(unexpected(Response::FilterChunk {
                            version,
                            key_version,
                            total_len,
                            offset: at,
                            chunk,
                        }));
                    }
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() >= total_len as usize {
                        return Ok(Some((version, key_version, bytes)));
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Err(ClientError::Protocol(
            "the node's filter kept changing during the download".into(),
        ))
    }

    /// Contact discovery: which of these PRF values belong to registered accounts.
    pub async fn resolve(&self, prfs: Vec<[u8; 32]>) -> Result<Vec<bool>, ClientError> {
        let n = prfs.len();
        match self.call(&Request::Resolve { prfs }).await? {
            Response::Resolved { registered } if registered.len() == n => Ok(registered),
            other => Err(unexpected(other)),
        }
    }

    /// Contact discovery: which of these PRF values, computed under discovery key
    /// `key_version`, belong to registered accounts. A rotated key is the error
    /// `DiscoveryKeyChanged`, never a wrong "not registered".
    pub async fn resolve_under(
        &self,
        key_version: u32,
        prfs: Vec<[u8; 32]>,
    ) -> Result<Vec<bool>, ClientError> {
        let n = prfs.len();
        match self
            .call(&Request::ResolveUnder { key_version, prfs })
            .await?
        {
            Response::Resolved { registered } if registered.len() == n => Ok(registered),
            other => Err(unexpected(other)),
        }
    }

    /// Contact discovery: the registrations since the current filter was built, as
    /// filter keys, with that filter's version and key version.
    pub async fn fetch_filter_delta(
        &self,
        version: u64,
    ) -> Result<(u64, u32, Vec<u64>), ClientError> {
        match self.call(&Request::FetchFilterDelta { version }).await? {
            Response::FilterDelta {
                version,
                key_version,
                keys,
            } => Ok((version, key_version, keys)),
            other => Err(unexpected(other)),
        }
    }

    /// Opens this device's delivery stream.
    pub async fn subscribe(&self) -> Result<Subscription, ClientError> {
        match self.exchange(&Request::Subscribe, false).await? {
            (send, recv, Response::Subscribed { queued }) => Ok(Subscription {
                send,
                recv,
                buf: Vec::new(),
                queued,
            }),
            (_, _, other) => Err(unexpected(other)),
        }
    }

    /// The underlying QUIC connection, for tests and tools that speak raw frames.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection politely and waits until the node has been told.
    pub async fn close(self) {
        self.conn.close(proto::codes::OK.into(), b"bye");
        if self.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
    }
}

/// A device's delivery stream: pushes from the node, acknowledgements to it.
pub struct Subscription {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes read from the stream and not yet decoded (at most a frame and a chunk).
    buf: Vec<u8>,
    /// Items queued for the device when it subscribed.
    pub queued: u64,
}

impl Subscription {
    /// The next push, or `None` when the node ended the stream.
    ///
    /// Cancel-safe: bytes read before the future is dropped stay buffered, so it may
    /// be raced against a timeout or used in `select!`.
    pub async fn next(&mut self) -> Result<Option<Push>, ClientError> {
        loop {
            if let Some(push) = self.buffered()? {
                return Ok(Some(push));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ClientError::Connection(
                        frame::FrameError::Truncated.to_string(),
                    ))
                };
            }
        }
    }

    /// A push that is already here (buffered, or readable without waiting), else
    /// `None`. After [`Subscription::next`], take what is ready and acknowledge it
    /// all in one `Ack`: fewer frames and packets, and no added wait.
    pub fn ready(&mut self) -> Result<Option<Push>, ClientError> {
        use std::task::{Context, Poll, Waker};
        loop {
            if let Some(push) = self.buffered()? {
                return Ok(Some(push));
            }
            let fill = std::pin::pin!(self.fill());
            match fill.poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) | Poll::Pending => return Ok(None),
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
    }

    /// Decodes a whole push from the buffer, if one is there.
    fn buffered(&mut self) -> Result<Option<Push>, ClientError> {
        match frame::decode::<Push>(&self.buf, MAX_REPLY_BYTES) {
            Ok(Some((push, used))) => {
                self.buf.drain(..used);
                Ok(Some(push))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ClientError::Connection(e.to_string())),
        }
    }

    /// Reads one more chunk into the buffer; `false` when the stream has ended.
    /// Cancel-safe, as quinn's `read_chunk` is.
    async fn fill(&mut self) -> Result<bool, ClientError> {
        match self.recv.read_chunk(MAX_REPLY_BYTES, true).await {
            Ok(Some(chunk)) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(ClientError::Connection(e.to_string())),
        }
    }

    /// Acknowledges items: the node removes them from the queue.
    pub async fn ack(&mut self, seqs: Vec<u64>) -> Result<(), ClientError> {
        for chunk in seqs.chunks(crate::proto::MAX_ACKS_PER_FRAME) {
            let ack = Ack {
                seqs: chunk.to_vec(),
            };
            frame::write(&mut self.send, &ack)
                .await
                .map_err(|e| ClientError::Connection(e.to_string()))?;
        }
        Ok(())
    }

    /// Ends the subscription: returns once the node has applied every acknowledgement
    /// and made it durable. Pushes that arrive meanwhile are dropped unacknowledged
    /// (they stay queued).
    pub async fn finish(mut self) -> Result<(), ClientError> {
        self.send
            .finish()
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let wait = async {
            while self.next().await?.is_some() {}
            Ok::<(), ClientError>(())
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .map_err(|_| {
                ClientError::Connection("the node did not end the delivery stream".into())
            })?
    }
}

/// A client-only QUIC endpoint on an ephemeral port, for [`Client::connect_via`].
pub fn client_endpoint(ipv6: bool) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if ipv6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {response:?}"))
}

fn handshake_error(
    server: &str,
    pin: Option<Fingerprint>,
    observation: &PinObservation,
    e: quinn::ConnectionError,
) -> ClientError {
    if let (Some(expected), Some(actual)) = (pin, observation.seen())
        && expected != actual
    {
        return ClientError::FingerprintMismatch {
            server: server.to_string(),
            expected,
            actual,
        };
    }
    if let Some(reason) = version_mismatch(&e) {
        return ClientError::Outdated {
            server: server.to_string(),
            ours: proto::VERSION,
            reason,
        };
    }
    ClientError::Connect {
        server: server.to_string(),
        reason: e.to_string(),
    }
}

/// Why `e` says the node and this app share no protocol version, if it does: a
/// handshake refused for want of a common ALPN (TLS alert 120, an older node), or a
/// connection a newer node closed as outdated.
pub fn version_mismatch(e: &quinn::ConnectionError) -> Option<String> {
    let no_alpn = quinn::TransportErrorCode::crypto(120);
    match e {
        quinn::ConnectionError::ConnectionClosed(c) if c.error_code == no_alpn => {
            Some("update the node (or use the app of its version)".into())
        }
        quinn::ConnectionError::TransportError(t) if t.code == no_alpn => {
            Some("update the node (or use the app of its version)".into())
        }
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == proto::codes::OUTDATED.into() =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

/// Splits `HOST:PORT` and resolves it. The host is also the TLS server name; the
/// node's certificate is pinned, so the name is not checked.
async fn resolve(server: &str) -> Result<(String, SocketAddr), ClientError> {
    let bad = |reason: &str| ClientError::BadServer {
        server: server.to_string(),
        reason: reason.to_string(),
    };
    let (host, port) = server.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    port.parse::<u16>()
        .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("the host name has no address"))?;
    let name = if rustls::pki_types::ServerName::try_from(host).is_ok() {
        host.to_string()
    } else {
        "switchboard".to_string()
    };
    Ok((name, addr))
}
