//! The messenger: what an app (the CLI, a chat app, a phone app) calls to send and
//! receive, built so that the client loses nothing either.
//!
//! - **Receiving.** Pushes are taken in batches; each batch is decrypted and written
//!   to the history in one transaction of the home database, and only once that
//!   transaction is committed are the items acknowledged to the node. An envelope
//!   that cannot be decrypted is kept (`pending`), acknowledged, and its sender's
//!   device is asked to send it again over a fresh session (a *retry request*); only
//!   when that fails is it shown as undecryptable.
//! - **Sending.** A message is encrypted, written to the history as `Sending` and put
//!   in the outbox in one transaction, then sent; the outbox entry goes when the node
//!   accepted it. What a crash or a lost connection leaves in the outbox is sent
//!   again (same id, so the node and the recipient drop any copy) by the next
//!   command that connects.
//! - **Work that needs the network** (retry requests, resends, "cannot resend"
//!   answers) is a `job` row written in the transaction that decided it, leased to one
//!   process at a time, and removed when done.
//! - **Staying connected.** [`Messenger::receive`] with `follow` reconnects by itself
//!   with back-off and jitter and says so through [`Event`]s; the node redelivers
//!   whatever was not acknowledged, and the seen ids drop what was.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bincode::{Decode, Encode};
use rand::RngExt;

mod acts;
mod files;
mod group_ops;
mod group_recv;
mod group_send;
mod profiles;

pub use acts::{Conversation, ConversationSummary, TIMERS};
pub use group_send::GroupSent;
pub use profiles::{KnownProfile, cached_profile_in, shown_name};

use super::content::{Body, Content, MAX_RETRY_IDS, Plaintext};
use super::db::{DbError, Hashed, HomeDb, Table, Tx};
use super::e2e::{self, E2eError, Olm};
use super::groups;
use super::history::{self, Entry, State};
use super::settings::{Settings, SettingsError};
use super::{Client, ClientError, Connector, Home, HomeError, now_ms};
use crate::phone::Number;
use crate::proto::{
    Delivery, DeviceEnvelope, EPHEMERAL_SEQ, ErrorKind, Item, MessageId, Outgoing, Receipt,
};

/// Items decrypted and stored per transaction (and acknowledged per `Ack`).
const MAX_BATCH: usize = 1024;
/// Resends of one message to one device, at most.
const MAX_RESENDS: u32 = 3;
/// The longest text a message may carry (WhatsApp's limit is 65,536 characters);
/// files go as attachments.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// How often a following `receive` looks for jobs that came due (a retry after a
/// failure, a job a killed process had leased) and for envelopes waiting too long.
const TICK: Duration = Duration::from_secs(30);
/// How long a process holds a job it took before another may take it.
const JOB_LEASE_MS: u64 = 60_000;
/// Back-off of a job that failed for want of the network.
const JOB_RETRY_MS: u64 = 30_000;
/// Seen ids are kept this long: well past the node's queue TTL, after which nothing
/// can be redelivered.
const SEEN_KEEP_MS: u64 = 90 * 24 * 3600 * 1000;
/// How long an app shows a typing indicator that is not renewed; a typing client
/// renews it every few seconds (WhatsApp and Signal show it for about that long).
pub const TYPING_SHOWN_FOR: Duration = Duration::from_secs(6);
/// Reconnect back-off: first wait, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What can go wrong in the messenger.
#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    E2e(#[from] E2eError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Attachment(#[from] super::attachment::AttachmentError),
    #[error("{0} is this device's own number; send to someone else")]
    OwnNumber(String),
    #[error(
        "not sent yet ({reason}); it is kept, and sent by the next command that connects to the node"
    )]
    NotSentYet { id: MessageId, reason: String },
    #[error("the node ended the delivery stream (is it shutting down?)")]
    StreamEnded,
    #[error("the message is {len} bytes; at most {max} go in one message")]
    TooLarge { len: usize, max: usize },
    #[error("the node refused the message: {0}")]
    Refused(String),
    #[error("the history is damaged: {0}")]
    History(String),
}

impl MessengerError {
    /// Whether trying again on a new connection may help.
    pub fn is_connection(&self) -> bool {
        match self {
            MessengerError::Client(e) => e.is_connection(),
            MessengerError::E2e(E2eError::Client(e)) => e.is_connection(),
            MessengerError::StreamEnded => true,
            _ => false,
        }
    }

    /// Whether trying again later may help: the connection, or a refusal the node
    /// gives for now (a limit, a full disk, a full queue).
    fn is_transient(&self) -> bool {
        match self {
            MessengerError::Client(e) | MessengerError::E2e(E2eError::Client(e)) => transient(e),
            MessengerError::StreamEnded | MessengerError::NotSentYet { .. } => true,
            _ => false,
        }
    }
}

/// Whether the node may take later what it refused now.
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Node(n) => matches!(
            n.kind,
            ErrorKind::RateLimited { .. }
                | ErrorKind::QueueFull { .. }
                | ErrorKind::StorageFull
                | ErrorKind::Internal
                | ErrorKind::StaleDevices { .. }
                | ErrorKind::StaleOwnDevices { .. }
        ),
        ClientError::TooLarge { .. } | ClientError::BadServer { .. } | ClientError::Removed(_) => {
            false
        }
        ClientError::FingerprintMismatch { .. }
        | ClientError::Tls(_)
        | ClientError::Outdated { .. } => false,
        // Connect, Connection, Protocol (a stream closed without a reply).
        _ => true,
    }
}

/// When to try a job again after `e`.
fn retry_after(e: &MessengerError) -> Duration {
    if let MessengerError::Client(ClientError::Node(n)) = e
        && let ErrorKind::RateLimited { retry_after_secs } = n.kind
    {
        return Duration::from_secs(u64::from(retry_after_secs).max(1));
    }
    Duration::from_millis(JOB_RETRY_MS)
}

/// What happened, for an app to show. Events come after what they report is
/// committed to the home database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message arrived (and is in the history).
    Message(Entry),
    /// A device of `to` has message `id`.
    Delivered {
        to: String,
        device: u32,
        id: MessageId,
        at_ms: u64,
    },
    /// A message from `from` could not be decrypted yet: its sender's device was asked
    /// to send it again (WhatsApp's "waiting for this message").
    Waiting {
        from: String,
        id: MessageId,
        reason: String,
    },
    /// A message could not be decrypted, even after asking its sender again.
    Undecryptable(Entry),
    /// `number`'s identity key changed (a new phone, or someone in between).
    IdentityChanged { number: String },
    /// `number` linked a new device (vouched for by their unchanged account
    /// identity): their safety number is the same.
    NewDevice { number: String, device: u32 },
    /// `by` added this account to group `group_id`, called `name`.
    AddedToGroup {
        group_id: u64,
        name: String,
        by: String,
    },
    /// `delivered` of the `of` devices that this device's group message `id` went to
    /// have it (one event per new count, not one per device).
    GroupDelivered {
        group_id: u64,
        id: MessageId,
        delivered: u32,
        of: u32,
    },
    /// `by` removed this account from group `group_id`, called `name`.
    RemovedFromGroup {
        group_id: u64,
        name: String,
        by: String,
    },
    /// `by` reacted to, edited or deleted a message (`act`): `entry` is that message
    /// now.
    Changed {
        by: String,
        act: Content,
        entry: Entry,
    },
    /// `by` was shown this account's message `entry` (their read receipt).
    Read { by: String, entry: Entry },
    /// `from`'s device `device` is typing (or stopped) to this account, or in group
    /// `group_id`. Never stored: show it until `typing` is false, or for
    /// [`TYPING_SHOWN_FOR`] unless another comes.
    Typing {
        from: String,
        device: u32,
        group_id: Option<u64>,
        typing: bool,
    },
    /// `number`'s profile is new or changed (its name was `old_name`).
    ProfileChanged {
        number: String,
        old_name: Option<String>,
        name: String,
    },
    /// The connection is gone; the next try comes after `retry_in`.
    Reconnecting { reason: String, retry_in: Duration },
    /// Connected (again).
    Connected,
    /// Background work failed; the reason is for people. Nothing is lost: it is
    /// tried again later.
    Warning(String),
}

/// A message the node accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub id: MessageId,
    pub accepted_at_ms: u64,
    /// The recipient's devices that had already received it (no receipt follows).
    pub delivered: Vec<u32>,
    pub identity_changed: bool,
}

/// Who this device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub number: Number,
    pub account_id: u64,
    pub device_id: u32,
}

/// An envelope that could not be decrypted yet.
#[derive(Encode, Decode)]
struct PendingRecord {
    from: String,
    device: u32,
    id: MessageId,
    queued_at_ms: u64,
    first_failed_ms: u64,
    reason: String,
}

/// Work that needs the network, as a `job` row holds it.
#[derive(Debug, Encode, Decode)]
enum Job {
    /// Ask `to`'s device `device` to send envelopes `ids` again; the request goes
    /// out as `node_id`.
    RetryRequest {
        to: String,
        device: u32,
        ids: Vec<MessageId>,
        node_id: MessageId,
    },
    /// Send history message `seq` to `to` again, for their device `device` that
    /// could not decrypt envelope `retry_of`.
    Resend {
        seq: i64,
        to: String,
        device: u32,
        retry_of: MessageId,
        node_id: MessageId,
    },
    /// Tell `to` that envelope `id` cannot be sent again.
    Unavailable {
        to: String,
        id: MessageId,
        node_id: MessageId,
    },
    /// Send this account's other devices a copy of history message `seq` (once the
    /// node took it), as `node_id`.
    OwnCopy { seq: i64, node_id: MessageId },
    /// Send `to` the key of group `group_id` (as this device knows it when the job
    /// runs), as `node_id`.
    GroupKey {
        to: String,
        group_id: u64,
        node_id: MessageId,
    },
    /// Tell `to` they were removed from group `group_id`, as `node_id`.
    GroupRemoved {
        to: String,
        group_id: u64,
        node_id: MessageId,
    },
    /// Tell `to` that this account was shown their messages `ids` (in group
    /// `group_id`, or 1:1), as `node_id`.
    Read {
        to: String,
        group_id: Option<u64>,
        ids: Vec<MessageId>,
        node_id: MessageId,
    },
    /// Give `to` this account's profile key (as it is when the job runs), as
    /// `node_id`.
    ProfileKey { to: String, node_id: MessageId },
    /// Fetch `number`'s profile (with the profile key they gave).
    FetchProfile { number: String },
    /// Tell `to` that envelope `id` carried nothing to show (a receipt, a key), as
    /// `node_id`: they forget it rather than show it as undecryptable.
    NothingToShow {
        to: String,
        id: MessageId,
        node_id: MessageId,
    },
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 4 << 20 }>()
}

fn encode<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, bincode_config())
        .unwrap_or_else(|e| unreachable!("encoding to a Vec cannot fail: {e}"))
}

fn decode<T: Decode<()>>(bytes: &[u8], what: &str) -> Result<T, MessengerError> {
    bincode::decode_from_slice(bytes, bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| MessengerError::History(format!("{what}: {e}")))
}

/// Decodes `bytes` as each value the messenger stores (a pending envelope, a job, an
/// outbox entry), for the fuzz target: a damaged home gives errors, never a panic.
pub fn decode_stored(bytes: &[u8]) {
    let _ = decode::<PendingRecord>(bytes, "a pending envelope");
    let _ = decode::<Job>(bytes, "a job");
    let _ = decode_outgoing(bytes);
    profiles::decode_stored(bytes);
}

/// An outbox entry as builds before disappearing messages wrote it.
#[derive(Decode)]
struct OutgoingV3 {
    id: MessageId,
    to: String,
    envelopes: Vec<DeviceEnvelope>,
}

/// An outbox entry (of this build, or of one before disappearing messages).
fn decode_outgoing(bytes: &[u8]) -> Result<Outgoing, MessengerError> {
    decode::<Outgoing>(bytes, "an outbox entry").or_else(|e| {
        decode::<OutgoingV3>(bytes, "an outbox entry")
            .map(|o| Outgoing {
                id: o.id,
                to: o.to,
                envelopes: o.envelopes,
                expires_in_secs: 0,
            })
            .map_err(|_| e)
    })
}

/// The `seen` (and `pending`) key of envelope `id` from `from`.
pub fn seen_key(tx: &Tx<'_>, from: &str, id: &[u8]) -> Hashed {
    tx.hash(b"seen", &[from.as_bytes(), id])
}

fn sent_key(tx: &Tx<'_>, node_id: &MessageId) -> Hashed {
    tx.hash(b"sent", &[node_id])
}

/// The `sent_id` value of a message nobody sees (a retry request, an answer to one).
const CONTROL: i64 = -1;

fn put_sent_id(tx: &Tx<'_>, node_id: &MessageId, seq: i64) -> Result<(), DbError> {
    tx.put(Table::SentId, &sent_key(tx, node_id), &seq.to_be_bytes())
}

fn sent_id(tx: &Tx<'_>, node_id: &MessageId) -> Result<Option<i64>, DbError> {
    Ok(tx
        .get(Table::SentId, &sent_key(tx, node_id))?
        .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
        .map(i64::from_be_bytes))
}

/// History message `entry` as a plaintext again (a resend, a copy, a re-encryption):
/// its own id, time and timer, carrying `body`.
fn again(entry: &Entry, body: Body) -> Plaintext {
    Plaintext::new(entry.id, entry.at_ms, body).expiring(entry.expires_in_secs)
}

/// The history row of outbox entry `seq` and its plaintext, to encrypt again.
fn outbox_plaintext(tx: &Tx<'_>, seq: i64) -> Result<(Entry, Vec<u8>), MessengerError> {
    let entry = history::get(tx, seq)?
        .ok_or_else(|| MessengerError::History(format!("message {seq} is gone")))?;
    let content = entry
        .content
        .clone()
        .ok_or_else(|| MessengerError::History(format!("message {seq} has no content")))?;
    let plaintext = again(&entry, Body::Content(content)).encode();
    Ok((entry, plaintext))
}

fn outbox_key(seq: i64) -> [u8; 8] {
    seq.to_be_bytes()
}

struct Inner {
    db: HomeDb,
    me: Me,
    settings: Settings,
    connector: Connector,
    /// The current connection, shared by everything this messenger does.
    link: tokio::sync::Mutex<Option<Client>>,
    /// Events of background work, until [`Messenger::take_events`] or
    /// [`Messenger::receive`] hands them on.
    stashed: std::sync::Mutex<Vec<Event>>,
}

/// A device's messenger: its home database, its connection and what it does with
/// them. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Messenger {
    inner: Arc<Inner>,
}

/// What one batch of pushes produced.
#[derive(Default)]
struct Outcome {
    events: Vec<Event>,
    /// Jobs were added: run them.
    jobs: bool,
}

/// How a delivery stream ended.
enum StreamEnd {
    /// What was asked for is done (the backlog, or a stop).
    Done,
    /// The node ended it, or the connection went.
    Lost(String),
}

impl Messenger {
    /// The messenger of the registered device in `home`.
    pub fn open(home: &Home) -> Result<Messenger, MessengerError> {
        let reg = home.load()?;
        let db = HomeDb::open(home.dir(), home.passphrase())?;
        let settings = Settings::load(home.dir())?;
        let connector = Connector::new(&reg.server, &reg.credentials, Some(reg.fingerprint))?;
        let me = Me {
            number: reg.number,
            account_id: reg.account_id,
            device_id: reg.device_id,
        };
        Ok(Messenger::with_parts(db, me, settings, connector))
    }

    /// A messenger from its parts (tests, tools, apps that keep their own home).
    pub fn with_parts(db: HomeDb, me: Me, settings: Settings, connector: Connector) -> Messenger {
        Messenger {
            inner: Arc::new(Inner {
                db,
                me,
                settings,
                connector,
                link: tokio::sync::Mutex::new(None),
                stashed: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// The home database.
    pub fn db(&self) -> &HomeDb {
        &self.inner.db
    }

    /// Who this device is.
    pub fn me(&self) -> &Me {
        &self.inner.me
    }

    /// The connector (for its counters, and to move its socket).
    pub fn connector(&self) -> &Connector {
        &self.inner.connector
    }

    /// The current connection, or a new one. A new connection first publishes this
    /// device's keys if they never were, then sends what the outbox holds and runs the
    /// jobs that are due, before anyone else gets it; what fails of the catch-up is
    /// reported as warnings ([`Messenger::take_events`]) and tried again later.
    pub async fn client(&self) -> Result<Client, MessengerError> {
        let mut link = self.inner.link.lock().await;
        if let Some(c) = link.as_ref().filter(|c| c.is_alive()) {
            return Ok(c.clone());
        }
        *link = None;
        let client = self.inner.connector.connect().await?;
        self.ensure_published(&client).await?;
        let events = self.catch_up(&client).await;
        self.stash(events);
        *link = Some(client.clone());
        Ok(client)
    }

    fn stash(&self, events: Vec<Event>) {
        self.inner
            .stashed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(events);
    }

    /// Forgets `client` as the current connection (it failed).
    async fn drop_client(&self, client: &Client) {
        let mut link = self.inner.link.lock().await;
        if link
            .as_ref()
            .is_some_and(|c| c.connection().stable_id() == client.connection().stable_id())
        {
            *link = None;
        }
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        if let Some(c) = self.inner.link.lock().await.take() {
            c.close().await;
        }
        self.inner.connector.close().await;
    }

    async fn ensure_published(&self, client: &Client) -> Result<(), MessengerError> {
        let device = (self.inner.me.account_id, self.inner.me.device_id);
        let db = self.inner.db.clone();
        if !blocking(move || e2e::published_for(&db, device)).await? {
            e2e::publish(&self.inner.db, client, device, 0).await?;
        }
        Ok(())
    }

    /// Events of background work done outside [`Messenger::receive`] (the catch-up
    /// of a new connection), for an app to show.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(
            &mut *self
                .inner
                .stashed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Sends what the outbox holds, runs the jobs that are due, and shows as
    /// undecryptable what waited too long; returns what that produced.
    async fn catch_up(&self, client: &Client) -> Vec<Event> {
        let mut events = Vec::new();
        let db = self.inner.db.clone();
        let waiting = db
            .read_async(|tx| tx.scan(Table::Outbox, &[]))
            .await
            .unwrap_or_else(|e| {
                events.push(Event::Warning(format!("reading the outbox: {e}")));
                Vec::new()
            });
        for (key, _) in waiting {
            let Some(seq) = key
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
            else {
                continue;
            };
            let pushed = if key.len() == group_send::outbox_key(seq).len() {
                self.push_group_outbox(client, seq).await.map(|_| ())
            } else {
                self.push_outbox(client, seq).await.map(|_| ())
            };
            match pushed {
                Ok(()) => {}
                Err(e) if e.is_connection() => {
                    events.push(Event::Warning(format!("a message is still not sent: {e}")));
                    break;
                }
                Err(e) => events.push(Event::Warning(format!("a message was not sent: {e}"))),
            }
        }
        events.extend(self.give_up_on_old_pending().await);
        events.extend(self.run_jobs(client).await);
        if let Err(e) = self.sweep_expired().await {
            events.push(Event::Warning(format!(
                "removing disappeared messages: {e}"
            )));
        }
        if let Err(e) = self.share_presence(client).await {
            events.push(Event::Warning(format!("sharing last seen: {e}")));
        }
        events
    }

    /// Sends a text message to `to`; returns once the node holds it.
    pub async fn send_text(&self, to: &Number, text: &str) -> Result<Sent, MessengerError> {
        self.send_content(to, Content::Text(text.to_string())).await
    }

    /// Sends `content` to `to`; returns once the node holds it. A message the node
    /// could not be reached for, or refused for now (a limit, a full queue or disk),
    /// is kept in the outbox ([`MessengerError::NotSentYet`]) and sent by the next
    /// connection; one it refused for good is marked failed in the history.
    pub async fn send_content(
        &self,
        to: &Number,
        content: Content,
    ) -> Result<Sent, MessengerError> {
        if *to == self.inner.me.number {
            return Err(MessengerError::OwnNumber(to.to_string()));
        }
        acts::check_content(&content)?;
        self.check_act(&to.to_string(), &content).await?;
        let client = self.client().await?;
        let mut identity_changed = false;
        if self.devices_of(to).await?.is_empty() {
            identity_changed |= self.start_sessions(&client, to, None).await?;
        }
        let id = e2e::new_message_id();
        let written = now_ms();
        let (peer, device) = (to.to_string(), self.inner.me.device_id);
        let own = self.inner.me.number.to_string();
        let (seq, jobs) = self
            .inner
            .db
            .write_async(move |tx| {
                let secs = acts::timer_for(tx, &peer, &content)?;
                let plaintext = Plaintext::new(id, written, Body::Content(content.clone()))
                    .expiring(secs)
                    .encode();
                let mut olm = Olm::new(tx);
                let identity = olm.known_identity(&peer)?;
                let envelopes = olm.encrypt(&peer, &plaintext)?;
                // The account's other devices (those this device has a session with;
                // the node names any new one) get a copy, in the same transaction: a
                // job, run once the node took the message.
                let copies = !olm.devices(&own)?.is_empty();
                olm.flush()?;
                let seq = history::add_sent(tx, &peer, device, &id, written, &content, identity)?;
                put_sent_id(tx, &id, seq)?;
                history::set_expiry(tx, seq, secs, written)?;
                acts::sent(tx, &peer, &own, &content, written)?;
                // A profile key for a new correspondent is a job too.
                let profile_job = profiles::talked_to(tx, &[peer.as_str()], written)?;
                let outgoing = Outgoing {
                    id,
                    to: peer,
                    envelopes,
                    expires_in_secs: secs,
                };
                tx.put(Table::Outbox, &outbox_key(seq), &encode(&outgoing))?;
                if copies {
                    let job = Job::OwnCopy {
                        seq,
                        node_id: e2e::new_message_id(),
                    };
                    tx.add_job(written, &encode(&job))?;
                }
                Ok::<_, MessengerError>((seq, copies | profile_job))
            })
            .await?;
        let pushed = self.push_outbox(&client, seq).await;
        if matches!(&pushed, Err(e) if e.is_connection()) {
            self.drop_client(&client).await;
        }
        let (sent, changed) = pushed?;
        if jobs {
            let events = self.run_jobs(&client).await;
            self.stash(events);
        }
        Ok(Sent {
            identity_changed: identity_changed | changed,
            ..sent
        })
    }

    /// Sends `plaintext` to every other device of this account that this device has a
    /// session with (none: nothing).
    async fn to_own_devices(
        &self,
        client: &Client,
        plaintext: Vec<u8>,
        node_id: MessageId,
    ) -> Result<(), MessengerError> {
        // Sessions with the own devices come with the link (the primary's welcome,
        // the new device's join), and the node names any device linked since
        // (`StaleOwnDevices`); with none, this account has no other device to tell.
        let own = self.inner.me.number.clone();
        if self.devices_of(&own).await?.is_empty() {
            return Ok(());
        }
        self.transmit(client, &own, node_id, plaintext, CONTROL)
            .await
    }

    /// On the primary, after linking device `device_id`: waits (up to 30 s) for its
    /// keys, starts a session with it, and sends it the history of the last
    /// `link_history_days` days. Returns how many messages were sent.
    pub async fn welcome_device(&self, device_id: u32) -> Result<usize, MessengerError> {
        let client = self.client().await?;
        let own = self.inner.me.number.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let bundles = client.fetch_bundles(&own, false).await?;
            if bundles.devices.iter().any(|b| b.device_id == device_id) {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(MessengerError::NotSentYet {
                    id: [0; 16],
                    reason: format!("device {device_id} has not published its keys"),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.start_sessions(&client, &own, None).await?;
        let days = u64::from(self.inner.settings.link_history_days);
        let since = now_ms().saturating_sub(days * 24 * 3600 * 1000);
        let mut after = 0;
        let mut sent = 0;
        loop {
            let db = self.inner.db.clone();
            let batch = db
                .read_async(move |tx| {
                    history::recent(tx, after, since, super::content::MAX_SYNC_ENTRIES)
                })
                .await?;
            let Some(&(last, _)) = batch.last() else {
                if sent == 0 {
                    // An empty history all the same: the new device then has a
                    // session with this one for what it sends.
                    self.sync_chunk(&client, Vec::new()).await?;
                }
                break;
            };
            after = last;
            let entries: Vec<_> = batch.into_iter().map(|(_, e)| e).collect();
            let mut chunk = Vec::new();
            let mut bytes = 0;
            for e in entries {
                let size = e.peer.len() + 64 + e.content.text().map_or(0, str::len);
                // Well under an envelope's limit once encrypted.
                if bytes + size > 24 * 1024 && !chunk.is_empty() {
                    sent += chunk.len();
                    self.sync_chunk(&client, std::mem::take(&mut chunk)).await?;
                    bytes = 0;
                }
                bytes += size;
                chunk.push(e);
            }
            if !chunk.is_empty() {
                sent += chunk.len();
                self.sync_chunk(&client, chunk).await?;
            }
        }
        Ok(sent)
    }

    async fn sync_chunk(
        &self,
        client: &Client,
        entries: Vec<super::content::Synced>,
    ) -> Result<(), MessengerError> {
        let plain = Plaintext::new(
            e2e::new_message_id(),
            now_ms(),
            Body::HistorySync { entries },
        );
        self.to_own_devices(client, plain.encode(), e2e::new_message_id())
            .await
    }

    /// Sends outbox entry `seq` until the node accepts or refuses it. Returns what
    /// the node said and whether the recipient's identity changed meanwhile.
    async fn push_outbox(&self, client: &Client, seq: i64) -> Result<(Sent, bool), MessengerError> {
        let mut identity_changed = false;
        let mut id = [0u8; 16];
        for attempt in 0..3 {
            let db = self.inner.db.clone();
            let Some(outgoing) = db
                .read_async(move |tx| tx.get(Table::Outbox, &outbox_key(seq)))
                .await?
            else {
                return self.settled_elsewhere(seq).await;
            };
            let outgoing = decode_outgoing(&outgoing)?;
            let to = outgoing.to.clone();
            id = outgoing.id;
            match client.send(outgoing).await {
                Ok(accepted) => {
                    let delivered = accepted.delivered.clone();
                    let at = accepted.accepted_at_ms;
                    self.inner
                        .db
                        .write_async(move |tx| {
                            history::mark_sent(tx, seq, at, &delivered)?;
                            tx.delete(Table::Outbox, &outbox_key(seq))?;
                            Ok::<_, DbError>(())
                        })
                        .await?;
                    return Ok((
                        Sent {
                            id: accepted.id,
                            accepted_at_ms: accepted.accepted_at_ms,
                            delivered: accepted.delivered,
                            identity_changed: false,
                        },
                        identity_changed,
                    ));
                }
                Err(ClientError::Node(e))
                    if matches!(e.kind, ErrorKind::StaleDevices { .. }) && attempt < 2 =>
                {
                    let number = Number::parse_e164(&to)
                        .map_err(|e| MessengerError::History(e.to_string()))?;
                    identity_changed |= self.start_sessions(client, &number, None).await?;
                    self.reencrypt_outbox(seq).await?;
                }
                Err(e) => return Err(self.refused(seq, outbox_key(seq).to_vec(), id, e).await),
            }
        }
        Err(MessengerError::NotSentYet {
            id,
            reason: "the recipient's devices kept changing while sending".into(),
        })
    }

    /// The node did not take outbox entry `seq` (under `key`), message `id`: the error
    /// to return. Kept in the outbox if trying later may help, else marked failed.
    async fn refused(
        &self,
        seq: i64,
        key: Vec<u8>,
        id: MessageId,
        e: ClientError,
    ) -> MessengerError {
        if transient(&e) {
            return MessengerError::NotSentYet {
                id,
                reason: e.to_string(),
            };
        }
        let why = e.to_string();
        let marked = self
            .inner
            .db
            .write_async(move |tx| {
                history::mark_failed(tx, seq, &why)?;
                tx.delete(Table::Outbox, &key)?;
                Ok::<_, DbError>(())
            })
            .await;
        match marked {
            Ok(()) => e.into(),
            Err(db) => db.into(),
        }
    }

    /// The history entry of outbox entry `seq`, which another process settled; an
    /// error if the node refused it.
    async fn settled_entry(&self, seq: i64) -> Result<Entry, MessengerError> {
        let db = self.inner.db.clone();
        let entry = db
            .read_async(move |tx| history::get(tx, seq))
            .await?
            .ok_or_else(|| MessengerError::History(format!("message {seq} is gone")))?;
        if entry.state == State::Failed {
            return Err(MessengerError::Refused(
                entry.problem.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(entry)
    }

    /// What became of outbox entry `seq`, which another process settled.
    async fn settled_elsewhere(&self, seq: i64) -> Result<(Sent, bool), MessengerError> {
        let entry = self.settled_entry(seq).await?;
        Ok((
            Sent {
                id: entry.id,
                accepted_at_ms: entry.at_ms,
                delivered: entry.delivered.iter().map(|(d, _)| *d).collect(),
                identity_changed: false,
            },
            false,
        ))
    }

    /// Encrypts outbox entry `seq` again, from its history record, for the devices
    /// this device now has sessions with (same id). Nothing, if the entry is gone
    /// (another process sent it meanwhile).
    async fn reencrypt_outbox(&self, seq: i64) -> Result<(), MessengerError> {
        self.inner
            .db
            .write_async(move |tx| {
                if tx.get(Table::Outbox, &outbox_key(seq))?.is_none() {
                    return Ok(());
                }
                let (entry, plaintext) = outbox_plaintext(tx, seq)?;
                let mut olm = Olm::new(tx);
                let envelopes = olm.encrypt(&entry.peer, &plaintext)?;
                olm.flush()?;
                let outgoing = Outgoing {
                    id: entry.id,
                    to: entry.peer,
                    envelopes,
                    expires_in_secs: entry.expires_in_secs,
                };
                tx.put(Table::Outbox, &outbox_key(seq), &encode(&outgoing))?;
                Ok(())
            })
            .await
    }

    async fn devices_of(&self, to: &Number) -> Result<Vec<u32>, MessengerError> {
        let peer = to.to_string();
        self.inner
            .db
            .read_async(move |tx| Ok::<_, MessengerError>(Olm::new(tx).devices(&peer)?))
            .await
    }

    /// Fetches `to`'s bundles (claiming one-time keys) and starts sessions with their
    /// devices (with `only`, just that one). Returns whether the identity changed.
    async fn start_sessions(
        &self,
        client: &Client,
        to: &Number,
        only: Option<u32>,
    ) -> Result<bool, MessengerError> {
        let bundles = client.fetch_bundles(to, true).await?;
        let (changed, new_devices) = self
            .inner
            .db
            .write_async(move |tx| {
                let mut olm = Olm::new(tx);
                let changed = olm.start_sessions(&bundles, only)?;
                let new_devices = olm.new_devices().to_vec();
                olm.flush()?;
                Ok::<_, MessengerError>((changed, new_devices))
            })
            .await?;
        if *to != self.inner.me.number {
            self.stash(
                new_devices
                    .into_iter()
                    .map(|device| Event::NewDevice {
                        number: to.to_string(),
                        device,
                    })
                    .collect(),
            );
        }
        Ok(changed)
    }

    /// Encrypts `plaintext` for every device of `to` and sends it as `node_id`,
    /// starting sessions where there are none and following the node's device list.
    async fn transmit(
        &self,
        client: &Client,
        to: &Number,
        node_id: MessageId,
        plaintext: Vec<u8>,
        seq: i64,
    ) -> Result<(), MessengerError> {
        if self.devices_of(to).await?.is_empty() {
            self.start_sessions(client, to, None).await?;
        }
        for attempt in 0..3 {
            let peer = to.to_string();
            let plain = plaintext.clone();
            let envelopes = self
                .inner
                .db
                .write_async(move |tx| {
                    put_sent_id(tx, &node_id, seq)?;
                    let mut olm = Olm::new(tx);
                    let envelopes = olm.encrypt(&peer, &plain)?;
                    olm.flush()?;
                    Ok::<_, MessengerError>(envelopes)
                })
                .await?;
            let outgoing = Outgoing {
                id: node_id,
                to: to.to_string(),
                envelopes,
                expires_in_secs: 0,
            };
            match client.send(outgoing).await {
                Ok(_) => return Ok(()),
                Err(ClientError::Node(e))
                    if matches!(
                        e.kind,
                        ErrorKind::StaleDevices { .. } | ErrorKind::StaleOwnDevices { .. }
                    ) && attempt < 2 =>
                {
                    self.start_sessions(client, to, None).await?;
                    if self.devices_of(to).await?.is_empty() {
                        // To this account: no other device left.
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(MessengerError::NotSentYet {
            id: node_id,
            reason: "the recipient's devices kept changing while sending".into(),
        })
    }

    /// Receives: the backlog, then (with `follow`) whatever arrives, until `stop`
    /// completes. Calls `on_event` for everything an app shows. With `follow` a lost
    /// connection is retried with back-off (and reported); without, it is an error.
    pub async fn receive(
        &self,
        follow: bool,
        stop: impl Future<Output = ()>,
        mut on_event: impl FnMut(Event),
    ) -> Result<(), MessengerError> {
        tokio::pin!(stop);
        let mut backoff = BACKOFF_FIRST;
        let mut down = false;
        loop {
            let connected = tokio::select! {
                c = self.client() => c,
                () = &mut stop => return Ok(()),
            };
            let reason = match connected {
                Ok(client) => {
                    if down {
                        on_event(Event::Connected);
                    }
                    for event in self.take_events() {
                        on_event(event);
                    }
                    match self.stream(&client, follow, &mut stop, &mut on_event).await {
                        Ok(StreamEnd::Done) => return Ok(()),
                        Ok(StreamEnd::Lost(reason)) => {
                            backoff = BACKOFF_FIRST;
                            self.drop_client(&client).await;
                            if !follow {
                                return Err(MessengerError::StreamEnded);
                            }
                            reason
                        }
                        Err(e) if follow && e.is_connection() => {
                            self.drop_client(&client).await;
                            e.to_string()
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if follow && e.is_connection() => e.to_string(),
                Err(e) => return Err(e),
            };
            // Jitter over the upper half: reconnecting devices spread out.
            let wait = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            on_event(Event::Reconnecting {
                reason,
                retry_in: wait,
            });
            down = true;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut stop => return Ok(()),
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One delivery stream on `client`. When `stop` completes it ends the stream and
    /// returns `Done`, whatever ending it does (the caller must not poll `stop` again).
    async fn stream(
        &self,
        client: &Client,
        follow: bool,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<StreamEnd, MessengerError> {
        let mut sub = match client.subscribe().await {
            Ok(s) => s,
            Err(e) if e.is_connection() => return Ok(StreamEnd::Lost(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let push = tokio::select! {
                push = sub.next() => push,
                () = stop.as_mut() => {
                    // Acknowledgements already sent are applied by the node either
                    // way; a failed ending loses nothing.
                    let _ = sub.finish().await;
                    return Ok(StreamEnd::Done);
                }
                _ = tick.tick() => {
                    for event in self.give_up_on_old_pending().await {
                        on_event(event);
                    }
                    for event in self.run_jobs(client).await {
                        on_event(event);
                    }
                    continue;
                }
            };
            let push = match push {
                Ok(Some(p)) => p,
                Ok(None) => {
                    return Ok(StreamEnd::Lost("the node ended the delivery stream".into()));
                }
                Err(e) if e.is_connection() => return Ok(StreamEnd::Lost(e.to_string())),
                Err(e) => return Err(e.into()),
            };
            let mut items = push.items;
            let mut backlog_end = push.backlog_end;
            let mut keys_left = push.one_time_keys_left;
            while items.len() < MAX_BATCH {
                match sub.ready() {
                    Ok(Some(p)) => {
                        items.extend(p.items);
                        backlog_end |= p.backlog_end;
                        keys_left = p.one_time_keys_left.or(keys_left);
                    }
                    Ok(None) => break,
                    Err(e) => return Ok(StreamEnd::Lost(e.to_string())),
                }
            }
            // Ephemeral items (typing) are not in the queue: nothing to acknowledge.
            let seqs: Vec<u64> = items
                .iter()
                .map(|d| d.seq)
                .filter(|&s| s != EPHEMERAL_SEQ)
                .collect();
            let outcome = self.store_batch(items).await?;
            for event in outcome.events {
                on_event(event);
            }
            // Acknowledged only now that every item is committed to the history (or
            // kept as pending): a crash before this redelivers, and the seen ids
            // drop the copies.
            if !seqs.is_empty()
                && let Err(e) = sub.ack(seqs).await
            {
                return Ok(StreamEnd::Lost(e.to_string()));
            }
            if outcome.jobs {
                for event in self.run_jobs(client).await {
                    on_event(event);
                }
            }
            if let Some(left) = keys_left {
                let device = (self.inner.me.account_id, self.inner.me.device_id);
                let top_up = e2e::ONE_TIME_KEY_TARGET.saturating_sub(left);
                if let Err(e) = e2e::publish(&self.inner.db, client, device, top_up).await {
                    on_event(Event::Warning(format!(
                        "could not top up one-time keys: {e}"
                    )));
                }
            }
            if backlog_end && !follow {
                sub.finish().await?;
                return Ok(StreamEnd::Done);
            }
        }
    }

    /// Decrypts and stores a batch of deliveries in one transaction.
    async fn store_batch(&self, items: Vec<Delivery>) -> Result<Outcome, MessengerError> {
        let me = self.inner.me.clone();
        let window_ms = u64::from(self.inner.settings.resend_window_days) * 24 * 3600 * 1000;
        let receipts = self.inner.settings.read_receipts;
        self.inner
            .db
            .write_async(move |tx| store_batch(tx, &me, (window_ms, receipts), &items))
            .await
    }

    /// Shows as undecryptable what waited too long for its sender.
    async fn give_up_on_old_pending(&self) -> Vec<Event> {
        let after_ms = u64::from(self.inner.settings.undecryptable_after_days) * 24 * 3600 * 1000;
        let me = self.inner.me.clone();
        let result = self
            .inner
            .db
            .write_async(move |tx| {
                let now = now_ms();
                let mut events = Vec::new();
                for (key, value) in tx.scan(Table::Pending, &[])? {
                    let p: PendingRecord = decode(&value, "a pending envelope")?;
                    if now.saturating_sub(p.first_failed_ms) >= after_ms {
                        events.extend(give_up(
                            tx,
                            &key,
                            p,
                            "its sender did not send it again in time",
                        )?);
                    }
                }
                events.extend(group_recv::give_up_waiting(tx, &me, now, after_ms)?);
                tx.forget_seen(now.saturating_sub(SEEN_KEEP_MS))?;
                Ok::<_, MessengerError>(events)
            })
            .await;
        result.unwrap_or_else(|e| vec![Event::Warning(format!("checking pending messages: {e}"))])
    }

    /// Runs the jobs that are due (each leased to this process while it runs).
    async fn run_jobs(&self, client: &Client) -> Vec<Event> {
        let mut events = Vec::new();
        // Bounded: each round takes up to 16 jobs, and a job never adds one.
        for _ in 0..64 {
            let now = now_ms();
            let taken = self
                .inner
                .db
                .write_async(move |tx| tx.take_jobs(now, now + JOB_LEASE_MS, 16))
                .await;
            let jobs = match taken {
                Ok(j) if j.is_empty() => break,
                Ok(j) => j,
                Err(e) => {
                    events.push(Event::Warning(format!("reading jobs: {e}")));
                    break;
                }
            };
            let mut stalled = false;
            for (id, value) in jobs {
                let db = self.inner.db.clone();
                if stalled {
                    // The connection failed: the rest waits (their lease runs out).
                    continue;
                }
                let outcome = match decode::<Job>(&value, "a job") {
                    Ok(job) => self.run_job(client, job).await,
                    Err(e) => Err(e),
                };
                let done = match outcome {
                    Ok(more) => {
                        events.extend(more);
                        db.write_async(move |tx| tx.finish_job(id)).await
                    }
                    Err(e) if e.is_transient() => {
                        let due = now_ms() + retry_after(&e).as_millis() as u64;
                        events.push(Event::Warning(format!("will try again: {e}")));
                        stalled = e.is_connection();
                        db.write_async(move |tx| tx.reschedule_job(id, due)).await
                    }
                    Err(e) => {
                        events.push(Event::Warning(e.to_string()));
                        db.write_async(move |tx| tx.finish_job(id)).await
                    }
                };
                if let Err(e) = done {
                    events.push(Event::Warning(format!("updating a job: {e}")));
                }
            }
            if stalled {
                break;
            }
        }
        events
    }

    async fn run_job(&self, client: &Client, job: Job) -> Result<Vec<Event>, MessengerError> {
        let number =
            |n: &str| Number::parse_e164(n).map_err(|e| MessengerError::History(e.to_string()));
        match job {
            Job::RetryRequest {
                to,
                device,
                ids,
                node_id,
            } => {
                let peer = number(&to)?;
                // Still wanted? (Messages may have arrived meanwhile.)
                let db = self.inner.db.clone();
                let from = to.clone();
                let ids: Vec<MessageId> = db
                    .read_async(move |tx| {
                        let mut wanted = Vec::new();
                        for id in ids {
                            if tx.get(Table::Pending, &seen_key(tx, &from, &id))?.is_some() {
                                wanted.push(id);
                            }
                        }
                        Ok::<_, MessengerError>(wanted)
                    })
                    .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                // A fresh session with that device: the old one is what failed.
                self.start_sessions(client, &peer, Some(device)).await?;
                let body = Body::RetryRequest { device, ids };
                let plaintext = Plaintext::new(node_id, now_ms(), body).encode();
                self.transmit(client, &peer, node_id, plaintext, CONTROL)
                    .await?;
                Ok(Vec::new())
            }
            Job::Resend {
                seq,
                to,
                device: _,
                retry_of,
                node_id,
            } => {
                let peer = number(&to)?;
                let db = self.inner.db.clone();
                let entry = db.read_async(move |tx| history::get(tx, seq)).await?;
                let Some(entry) = entry else {
                    return Ok(Vec::new());
                };
                let Some(content) = entry.content.clone() else {
                    return Ok(Vec::new());
                };
                let mut plain = again(&entry, Body::Content(content));
                plain.retry_of = Some(retry_of);
                self.transmit(client, &peer, node_id, plain.encode(), seq)
                    .await?;
                Ok(Vec::new())
            }
            Job::GroupKey {
                to,
                group_id,
                node_id,
            } => {
                let peer = number(&to)?;
                let db = self.inner.db.clone();
                let Some(g) = db.read_async(move |tx| groups::known(tx, group_id)).await? else {
                    return Ok(Vec::new());
                };
                let body = Body::GroupKey {
                    group_id,
                    name: g.name,
                    key: g.key,
                };
                let plain = Plaintext::new(node_id, now_ms(), body).encode();
                if peer == self.inner.me.number {
                    self.to_own_devices(client, plain, node_id).await?;
                } else {
                    self.transmit(client, &peer, node_id, plain, CONTROL)
                        .await?;
                }
                Ok(Vec::new())
            }
            Job::GroupRemoved {
                to,
                group_id,
                node_id,
            } => {
                let peer = number(&to)?;
                let plain =
                    Plaintext::new(node_id, now_ms(), Body::GroupRemoved { group_id }).encode();
                self.transmit(client, &peer, node_id, plain, CONTROL)
                    .await?;
                Ok(Vec::new())
            }
            Job::OwnCopy { seq, node_id } => {
                let db = self.inner.db.clone();
                let Some(entry) = db.read_async(move |tx| history::get(tx, seq)).await? else {
                    return Ok(Vec::new());
                };
                match (entry.state, entry.content.clone()) {
                    (State::Sending, _) => Err(MessengerError::NotSentYet {
                        id: entry.id,
                        reason: "its copy for this account's other devices waits for it".into(),
                    }),
                    (State::Failed, _) | (_, None) => Ok(Vec::new()),
                    (_, Some(content)) => {
                        let copy = Body::SentCopy {
                            to: entry.peer.clone(),
                            content,
                        };
                        let plain = again(&entry, copy).encode();
                        self.to_own_devices(client, plain, node_id).await?;
                        Ok(Vec::new())
                    }
                }
            }
            Job::Read {
                to,
                group_id,
                ids,
                node_id,
            } => {
                let peer = number(&to)?;
                let plain =
                    Plaintext::new(node_id, now_ms(), Body::Read { group_id, ids }).encode();
                self.transmit(client, &peer, node_id, plain, CONTROL)
                    .await?;
                Ok(Vec::new())
            }
            Job::ProfileKey { to, node_id } => {
                let peer = number(&to)?;
                self.give_profile_key(client, &peer, node_id).await?;
                Ok(Vec::new())
            }
            Job::FetchProfile { number: of } => {
                let peer = number(&of)?;
                Ok(self
                    .refresh_profile(client, &peer)
                    .await?
                    .1
                    .into_iter()
                    .collect())
            }
            Job::NothingToShow { to, id, node_id } => {
                let peer = number(&to)?;
                let plaintext =
                    Plaintext::new(node_id, now_ms(), Body::NothingToShow { id }).encode();
                self.transmit(client, &peer, node_id, plaintext, CONTROL)
                    .await?;
                Ok(Vec::new())
            }
            Job::Unavailable { to, id, node_id } => {
                let peer = number(&to)?;
                let plaintext =
                    Plaintext::new(node_id, now_ms(), Body::RetryUnavailable { id }).encode();
                self.transmit(client, &peer, node_id, plaintext, CONTROL)
                    .await?;
                Ok(Vec::new())
            }
        }
    }

    /// The last `limit` messages with `peer` before `before` (all when `None`),
    /// oldest first.
    pub async fn history(
        &self,
        peer: &Number,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Entry>, MessengerError> {
        let peer = peer.to_string();
        self.inner
            .db
            .read_async(move |tx| Ok::<_, MessengerError>(history::page(tx, &peer, before, limit)?))
            .await
    }

    /// Marks message `seq` as shown to the user. True when this call did: of several
    /// processes (or windows) showing new messages, exactly one shows each. Show the
    /// message only after this returned true: a crash in between costs the screen
    /// that one message (the history keeps it), never a second showing.
    ///
    /// A short write that does not wait for the disk (a lost mark costs a second
    /// showing after a power cut, nothing else). It blocks: from async code, call it
    /// where blocking is allowed (`block_in_place`, the blocking pool).
    pub fn claim_shown(&self, seq: i64) -> Result<bool, MessengerError> {
        Ok(self
            .inner
            .db
            .write_light(|tx| history::claim_shown(tx, seq))?)
    }

    /// Received messages not yet shown (up to `limit`, oldest first): what an app
    /// that was not running, or was killed, has yet to show.
    pub async fn unshown(&self, limit: usize) -> Result<Vec<Entry>, MessengerError> {
        let db = self.inner.db.clone();
        blocking(move || db.write_light(|tx| history::unshown(tx, limit)))
            .await
            .map_err(Into::into)
    }

    /// Moves this device's socket to a new local port (QUIC connection migration).
    pub fn rebind(&self) -> std::io::Result<()> {
        self.inner.connector.rebind()
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Shows pending envelope `key` as undecryptable: a history row and an event.
fn give_up(
    tx: &Tx<'_>,
    key: &[u8],
    p: PendingRecord,
    why: &str,
) -> Result<Vec<Event>, MessengerError> {
    tx.delete(Table::Pending, key)?;
    let problem = format!("{} ({why})", p.reason);
    Ok(history::add_received(
        tx,
        &p.from,
        p.device,
        &p.id,
        p.queued_at_ms,
        None,
        Some(problem),
    )?
    .map(Event::Undecryptable)
    .into_iter()
    .collect())
}

/// Decrypts and stores `items` in `tx`: the body of [`Messenger::store_batch`].
fn store_batch(
    tx: &Tx<'_>,
    me: &Me,
    (window_ms, read_receipts): (u64, bool),
    items: &[Delivery],
) -> Result<Outcome, MessengerError> {
    let mut olm = Olm::new(tx);
    let now = now_ms();
    let mut out = Outcome::default();
    // Envelopes to ask for again, per sending device: one retry request (and one
    // fresh session) each, however many failed.
    let mut retries: BTreeMap<(String, u32), Vec<MessageId>> = BTreeMap::new();
    for delivery in items {
        match &delivery.item {
            Item::Message(m) => {
                // A redelivery: what went to the history is found there, everything
                // else (answers to retries, envelopes kept for a retry, copies sent
                // again) in `seen`. Checked before decrypting: the ratchet has moved
                // on, and a second decryption would fail.
                let key = seen_key(tx, &m.from, &m.id);
                if history::has_received(tx, &m.from, &m.id)? || tx.seen(&key)? {
                    continue;
                }
                let decrypted = match olm.decrypt(&m.from, m.from_device, &m.body)? {
                    Ok(d) => d,
                    Err(failure) => {
                        tx.see(&key, now)?;
                        let record = PendingRecord {
                            from: m.from.clone(),
                            device: m.from_device,
                            id: m.id,
                            queued_at_ms: delivery.queued_at_ms,
                            first_failed_ms: now,
                            reason: failure.reason().to_string(),
                        };
                        if !failure.worth_asking() {
                            // Not an Olm message at all: asking again gives the
                            // same bytes.
                            out.events.extend(give_up(
                                tx,
                                &key,
                                record,
                                "it is not an Olm message",
                            )?);
                            continue;
                        }
                        // Kept, acknowledged, and asked for again.
                        out.events.push(Event::Waiting {
                            from: m.from.clone(),
                            id: m.id,
                            reason: failure.reason().to_string(),
                        });
                        tx.put(Table::Pending, &key, &encode(&record))?;
                        retries
                            .entry((m.from.clone(), m.from_device))
                            .or_default()
                            .push(m.id);
                        continue;
                    }
                };
                if decrypted.identity_changed {
                    out.events.push(Event::IdentityChanged {
                        number: m.from.clone(),
                    });
                }
                if decrypted.new_device && m.from != me.number.as_str() {
                    out.events.push(Event::NewDevice {
                        number: m.from.clone(),
                        device: m.from_device,
                    });
                }
                let plain =
                    match Plaintext::decode(&decrypted.plaintext, m.id, delivery.queued_at_ms) {
                        Ok(p) => p,
                        Err(reason) => {
                            // Decrypted, but not a plaintext any client writes: asking
                            // again would give the same bytes.
                            tx.see(&key, now)?;
                            let problem = Some(format!("decrypted, but {reason}"));
                            if let Some(e) = history::add_received(
                                tx,
                                &m.from,
                                m.from_device,
                                &m.id,
                                delivery.queued_at_ms,
                                None,
                                problem,
                            )? {
                                out.events.push(Event::Undecryptable(e));
                            }
                            continue;
                        }
                    };
                // The answer to a retry request of ours: what it replaces is done.
                let mut at_ms = delivery.queued_at_ms;
                if let Some(failed) = plain.retry_of {
                    let pending_key = seen_key(tx, &m.from, &failed);
                    if let Some(v) = tx.get(Table::Pending, &pending_key)? {
                        let p: PendingRecord = decode(&v, "a pending envelope")?;
                        at_ms = p.queued_at_ms;
                        tx.delete(Table::Pending, &pending_key)?;
                    }
                }
                // Only a message stored under the envelope's own id is found in the
                // history by that id; everything else is remembered in `seen`.
                let under_its_id = matches!(plain.body, Body::Content(_)) && plain.id == m.id;
                if !under_its_id {
                    tx.see(&key, now)?;
                }
                match plain.body {
                    Body::Content(content) => {
                        match history::add_received(
                            tx,
                            &m.from,
                            m.from_device,
                            &plain.id,
                            at_ms,
                            Some(content),
                            None,
                        )? {
                            Some(e) => {
                                acts::took(
                                    tx,
                                    me.number.as_str(),
                                    e,
                                    plain.expires_in_secs,
                                    &mut out,
                                )?;
                            }
                            // A copy of a message we have (under its id): remembered
                            // by its own, so a redelivery is dropped unread.
                            None if under_its_id => {
                                tx.see(&key, now)?;
                            }
                            None => {}
                        }
                    }
                    Body::RetryRequest { device, ids } => {
                        if device == me.device_id {
                            let current = olm.known_identity(&m.from)?;
                            let trusted = !decrypted.identity_changed;
                            for id in ids.into_iter().take(MAX_RETRY_IDS) {
                                retry_requested(
                                    tx,
                                    &m.from,
                                    m.from_device,
                                    id,
                                    (trusted, current),
                                    now,
                                    window_ms,
                                )?;
                            }
                            out.jobs = true;
                        }
                    }
                    Body::HistorySync { entries } => {
                        if m.from != me.number.as_str() {
                            continue;
                        }
                        for entry in &entries {
                            history::add_synced(tx, entry)?;
                        }
                    }
                    Body::GroupKey {
                        group_id,
                        name,
                        key,
                    } => {
                        let new = groups::known(tx, group_id)?.is_none();
                        groups::remember(
                            tx,
                            &groups::KnownGroup {
                                group_id,
                                name: name.clone(),
                                key,
                            },
                        )?;
                        if new && m.from != me.number.as_str() {
                            out.events.push(Event::AddedToGroup {
                                group_id,
                                name,
                                by: m.from.clone(),
                            });
                        }
                    }
                    Body::GroupRemoved { group_id } => {
                        // The node has the membership; this only tells the person
                        // (and drops the key, which no longer opens anything new).
                        // The event names who said so.
                        if let Some(g) = groups::known(tx, group_id)? {
                            groups::forget(tx, group_id)?;
                            super::senderkeys::forget(tx, group_id)?;
                            out.events.push(Event::RemovedFromGroup {
                                group_id,
                                name: g.name,
                                by: m.from.clone(),
                            });
                        }
                    }
                    Body::SenderKey { group_id, key } => {
                        let sender = (group_id, m.from.as_str(), m.from_device);
                        group_recv::sender_key(tx, me, sender, &key, &mut out)?;
                    }
                    Body::SentCopy { to, content } => {
                        // Only this account's own devices tell it what it sent.
                        if m.from != me.number.as_str() {
                            continue;
                        }
                        if let Some(seq) = history::add_sent_copy(
                            tx,
                            &to,
                            m.from_device,
                            &plain.id,
                            plain.written_at_ms,
                            &content,
                        )? && let Some(e) = history::get(tx, seq)?
                        {
                            acts::took(tx, me.number.as_str(), e, plain.expires_in_secs, &mut out)?;
                        }
                    }
                    Body::Read { group_id, ids } => {
                        // With read receipts off, none are sent and none shown.
                        if read_receipts && m.from != me.number.as_str() {
                            let peer = group_id.map_or_else(|| m.from.clone(), history::group_peer);
                            let ids: Vec<MessageId> =
                                ids.into_iter().take(super::content::MAX_READ_IDS).collect();
                            for entry in
                                history::mark_read(tx, &peer, &ids, &m.from, delivery.queued_at_ms)?
                            {
                                out.events.push(Event::Read {
                                    by: m.from.clone(),
                                    entry,
                                });
                            }
                        }
                    }
                    Body::ProfileKey { key } => {
                        if m.from != me.number.as_str() {
                            profiles::key_received(tx, &m.from, key, now)?;
                            out.jobs = true;
                        }
                    }
                    Body::NothingToShow { id } => {
                        // Keyed by sender: only its sender can say so of an envelope.
                        tx.delete(Table::Pending, &seen_key(tx, &m.from, &id))?;
                    }
                    Body::RetryUnavailable { id } => {
                        let pending_key = seen_key(tx, &m.from, &id);
                        if let Some(v) = tx.get(Table::Pending, &pending_key)? {
                            let p: PendingRecord = decode(&v, "a pending envelope")?;
                            out.events.extend(give_up(
                                tx,
                                &pending_key,
                                p,
                                "its sender cannot send it again",
                            )?);
                        }
                    }
                }
            }
            Item::Delivered(receipt) => {
                out.events
                    .extend(receipt_event(tx, receipt, delivery.queued_at_ms)?);
            }
            // Group messages need sender keys, which this client does not have yet: it
            // says so rather than drop them silently.
            Item::GroupMessage(g) => {
                group_recv::take(tx, me, g, delivery.queued_at_ms, now, &mut out)?;
            }
            Item::GroupDelivered(r) => out.events.extend(group_recv::delivered(tx, r)?),
            Item::Typing(t) => out.events.push(Event::Typing {
                from: t.from.clone(),
                device: t.from_device,
                group_id: t.group_id,
                typing: t.typing,
            }),
        }
    }
    for ((to, device), ids) in retries {
        for chunk in ids.chunks(MAX_RETRY_IDS) {
            let job = Job::RetryRequest {
                to: to.clone(),
                device,
                ids: chunk.to_vec(),
                node_id: e2e::new_message_id(),
            };
            tx.add_job(now, &encode(&job))?;
            out.jobs = true;
        }
    }
    olm.flush()?;
    Ok(out)
}

/// `from`'s device `device` could not decrypt our envelope `id`: resend the message
/// it carried if it was a message to `from`, sent recently, not resent too often,
/// and the request came over a session with the identity it was encrypted to; else
/// say it cannot be sent again. `identity` is whether the request's session kept
/// the identity this device knew, and the identity key it knows now: a request from
/// a new identity (someone else holding the number, or a node lying about the
/// sender) gets nothing.
fn retry_requested(
    tx: &Tx<'_>,
    from: &str,
    device: u32,
    id: MessageId,
    identity: (bool, Option<[u8; 32]>),
    now: u64,
    window_ms: u64,
) -> Result<(), MessengerError> {
    let entry = match sent_id(tx, &id)? {
        Some(CONTROL) => {
            // A message between clients (a read receipt, a key): nobody is shown it,
            // so nobody should be shown it as lost either.
            let job = Job::NothingToShow {
                to: from.to_string(),
                id,
                node_id: e2e::new_message_id(),
            };
            tx.add_job(now, &encode(&job))?;
            return Ok(());
        }
        Some(seq) => history::get(tx, seq)?,
        None => None,
    };
    let (trusted, current) = identity;
    let job = match entry {
        Some(e)
            if e.outgoing
                && e.peer == from
                && e.content.is_some()
                && trusted
                && e.to_identity.is_some()
                && e.to_identity == current
                && now.saturating_sub(e.at_ms) <= window_ms
                && history::count_resend(tx, e.seq, device)? <= MAX_RESENDS =>
        {
            Job::Resend {
                seq: e.seq,
                to: from.to_string(),
                device,
                retry_of: id,
                node_id: e2e::new_message_id(),
            }
        }
        _ => Job::Unavailable {
            to: from.to_string(),
            id,
            node_id: e2e::new_message_id(),
        },
    };
    tx.add_job(now, &encode(&job))?;
    Ok(())
}

/// The event for a delivery receipt, after recording it in the history.
fn receipt_event(
    tx: &Tx<'_>,
    receipt: &Receipt,
    at_ms: u64,
) -> Result<Option<Event>, MessengerError> {
    match sent_id(tx, &receipt.id)? {
        // A receipt for a message nobody sees.
        Some(CONTROL) => Ok(None),
        Some(seq) => Ok(
            history::mark_delivered(tx, seq, receipt.device_id, at_ms)?.map(|e| Event::Delivered {
                to: receipt.to.clone(),
                device: receipt.device_id,
                id: e.id,
                at_ms,
            }),
        ),
        // Sent before this home kept a history (or by another home of the account).
        None => Ok(Some(Event::Delivered {
            to: receipt.to.clone(),
            device: receipt.device_id,
            id: receipt.id,
            at_ms,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The jobs `retry_requested` leaves for each request, as (resend?, to).
    fn decide(
        db: &HomeDb,
        from: &str,
        id: MessageId,
        identity: (bool, Option<[u8; 32]>),
        now: u64,
    ) -> Vec<(bool, String)> {
        db.write(|tx| {
            retry_requested(tx, from, 1, id, identity, now, 3 * 24 * 3600 * 1000)?;
            let jobs = tx.take_jobs(u64::MAX / 2, u64::MAX / 2, 100)?;
            let mut out = Vec::new();
            for (jid, v) in jobs {
                tx.finish_job(jid)?;
                out.push(match decode::<Job>(&v, "a job")? {
                    Job::Resend { to, .. } => (true, to),
                    Job::Unavailable { to, .. } => (false, to),
                    Job::RetryRequest { to, .. } => panic!("a retry request for {to}"),
                    Job::OwnCopy { seq, .. } => panic!("a copy of {seq}"),
                    Job::GroupKey { to, .. } => panic!("a group key for {to}"),
                    Job::GroupRemoved { to, .. } => panic!("a removal for {to}"),
                    Job::Read { to, .. } => panic!("a read receipt for {to}"),
                    Job::ProfileKey { to, .. } => panic!("a profile key for {to}"),
                    Job::FetchProfile { number } => panic!("a profile fetch of {number}"),
                    Job::NothingToShow { to, .. } => panic!("nothing to show for {to}"),
                });
            }
            Ok::<_, MessengerError>(out)
        })
        .unwrap()
    }

    #[test]
    fn only_the_identity_a_message_went_to_gets_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = HomeDb::open(dir.path(), None).unwrap();
        let (bob, bob_key, other_key) = ("+14155550101", [1u8; 32], [2u8; 32]);
        let id = [9u8; 16];
        let sent_at = 1_000_000;
        db.write(|tx| {
            let content = Content::Text("for Bob only".into());
            let seq = history::add_sent(tx, bob, 1, &id, sent_at, &content, Some(bob_key))?;
            history::mark_sent(tx, seq, sent_at, &[])?;
            put_sent_id(tx, &id, seq)
        })
        .unwrap();
        let now = sent_at + 1000;
        let resend = vec![(true, bob.to_string())];
        let refuse = |to: &str| vec![(false, to.to_string())];
        assert_eq!(decide(&db, bob, id, (true, Some(bob_key)), now), resend);
        // Someone else asking, by any name but the recipient's.
        assert_eq!(
            decide(&db, "+14155550102", id, (true, Some(bob_key)), now),
            refuse("+14155550102")
        );
        // The recipient's number with another identity (a new phone, a node lying
        // about the sender), or a request whose session changed the identity.
        assert_eq!(
            decide(&db, bob, id, (true, Some(other_key)), now),
            refuse(bob)
        );
        assert_eq!(
            decide(&db, bob, id, (false, Some(bob_key)), now),
            refuse(bob)
        );
        // An id never sent, and a message older than the window.
        assert_eq!(
            decide(&db, bob, [8; 16], (true, Some(bob_key)), now),
            refuse(bob)
        );
        let late = sent_at + 4 * 24 * 3600 * 1000;
        assert_eq!(
            decide(&db, bob, id, (true, Some(bob_key)), late),
            refuse(bob)
        );
        // At most three resends to one device (one was made above).
        assert_eq!(decide(&db, bob, id, (true, Some(bob_key)), now), resend);
        assert_eq!(decide(&db, bob, id, (true, Some(bob_key)), now), resend);
        assert_eq!(
            decide(&db, bob, id, (true, Some(bob_key)), now),
            refuse(bob)
        );
    }
}
