//! Requests, responses and errors as they travel on the wire.
//!
//! Every enum here is append-only: bincode encodes a variant as its index, so a
//! variant is never removed or reordered, only added at the end (and the ALPN
//! version bumped when an old peer could not cope).

use bincode::{Decode, Encode};

/// A request from a client. Each request travels on its own bidirectional QUIC stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// Ask the node to send a verification code to `number` (E.164).
    /// Needs no registered device. Answered by [`Response::CodeSent`].
    RequestCode {
        number: String,
        channel: Channel,
        /// BCP 47 language tag of the client (`en`, `de-CH`), for the message text.
        locale: String,
    },
    /// Prove ownership of `number` with the code it received. On success the
    /// connection's device key becomes the number's device. Answered by
    /// [`Response::Registered`].
    VerifyCode { number: String, code: String },
    /// Ask who this device is. Needs a registered device key. Answered by
    /// [`Response::Identity`].
    WhoAmI,
    /// Publish this device's identity keys, a signed fallback key and signed one-time
    /// keys (added to those already stored). A changed identity key replaces the
    /// device's keys and discards its stored one-time keys. Answered by
    /// [`Response::KeysStored`].
    PublishKeys(KeyUpload),
    /// Fetch the key bundles of every device of `number`. With `claim`, one one-time
    /// key of each device is claimed (removed from the node) and returned; without,
    /// only identity and fallback keys are returned (for safety numbers). Answered by
    /// [`Response::Bundles`].
    FetchBundles { number: String, claim: bool },
    /// Queue one envelope per device of the recipient. Answered by
    /// [`Response::Accepted`] once the envelopes are durable.
    Send(Outgoing),
    /// Turn this stream into the device's delivery stream: the node answers
    /// [`Response::Subscribed`], then writes [`Push`] frames; the client writes
    /// [`Ack`] frames. See PROTOCOL.md.
    Subscribe,
    /// Contact discovery: evaluate these blinded OPRF elements (compressed ristretto255
    /// points, at most [`MAX_DISCOVERY_BATCH`]) under the node's discovery key. Each
    /// counts against the account's daily discovery budget. Answered by
    /// [`Response::Evaluated`], in the same order.
    Evaluate { blinded: Vec<[u8; 32]> },
    /// Contact discovery: fetch the membership filter, from byte `offset`. With `have`
    /// equal to the current filter version the node answers
    /// [`Response::FilterUnchanged`]; otherwise [`Response::FilterChunk`].
    FetchFilter { have: Option<u64>, offset: u32 },
    /// Contact discovery: which of these PRF values (at most [`MAX_DISCOVERY_BATCH`])
    /// belong to a registered account. Answered by [`Response::Resolved`].
    Resolve { prfs: Vec<[u8; 32]> },
    /// Set (or replace) this account's registration lock: from now on, registering its
    /// number on another device also needs `pin`. Answered by [`Response::LockSet`].
    SetLock { pin: String },
    /// Remove this account's registration lock. Answered by [`Response::LockCleared`].
    ClearLock,
    /// [`Request::VerifyCode`] for a number with a registration lock: the code and
    /// the PIN. Answered by [`Response::Registered`].
    VerifyCodeWithPin {
        number: String,
        code: String,
        pin: String,
    },
    /// Contact discovery: [`Request::Resolve`] for PRF values computed under discovery
    /// key `key_version`. When the node's key is another (it was rotated), the answer
    /// is [`ErrorKind::DiscoveryKeyChanged`] rather than "not registered". Answered by
    /// [`Response::Resolved`].
    ResolveUnder {
        key_version: u32,
        prfs: Vec<[u8; 32]>,
    },
    /// Contact discovery: the registrations since the filter `version` was built, as
    /// filter keys (`discovery::filter_key` of each PRF value), so that a sync finds a
    /// contact who registered a moment ago. Answered by [`Response::FilterDelta`].
    FetchFilterDelta { version: u64 },
    /// The devices of this device's account, primary first. Answered by
    /// [`Response::Devices`].
    ListDevices,
    /// Unlink device `device_id` from this account: the primary may unlink any
    /// companion, a companion only itself; the primary is never unlinked. The device
    /// is signed out at once and what was queued for it is dropped. Answered by
    /// [`Response::DeviceUnlinked`].
    UnlinkDevice { device_id: u32 },
    /// Linking, on the primary: open a link slot with the primary's SPAKE2 message.
    /// Answered by [`Response::LinkOpened`] with the slot's nameplate. See PROTOCOL.md,
    /// "Linking a device".
    LinkOpen { pake: Vec<u8> },
    /// Linking, on the new (unregistered) device: take the slot `nameplate` with its
    /// SPAKE2 message. Answered by [`Response::LinkOffer`] with the primary's.
    LinkJoin { nameplate: u32, pake: Vec<u8> },
    /// Linking, on the new device: its request, sealed under the agreed key, for the
    /// primary. Answered by [`Response::LinkQueued`].
    LinkRequest { nameplate: u32, sealed: Vec<u8> },
    /// Linking, on either side: what happened to the slot. Answered by
    /// [`Response::LinkWaiting`], [`Response::LinkRequested`] (the primary),
    /// [`Response::LinkComplete`] (the new device) or [`Response::LinkAborted`].
    LinkPoll { nameplate: u32 },
    /// Linking, on the primary: authorise the new device under `name`; `sealed` (the
    /// grant, under the agreed key) goes to the new device. Answered by
    /// [`Response::LinkGranted`].
    LinkGrant {
        nameplate: u32,
        name: String,
        sealed: Vec<u8>,
    },
    /// Linking, on either side: give the slot up (the primary does on a wrong key).
    /// Answered by [`Response::LinkAborted`].
    LinkAbort { nameplate: u32 },
    /// Create a group of this account (its first admin) and the accounts of
    /// `members` (E.164), with `meta` (the name, description and picture, encrypted by
    /// the members; opaque to the node). Answered by [`Response::Group`].
    CreateGroup { members: Vec<String>, meta: Vec<u8> },
    /// Change group `group_id` (see [`GroupChange`] for who may). Answered by
    /// [`Response::Group`], or [`Response::GroupLeft`] after `Leave`.
    ChangeGroup { group_id: u64, change: GroupChange },
    /// The group `group_id`, for a member. Answered by [`Response::Group`].
    FetchGroup { group_id: u64 },
    /// The groups this account is in. Answered by [`Response::Groups`].
    ListGroups,
    /// A message to group `group_id`, encrypted once by the sender (its sender key);
    /// the node queues it for every device of every member but the sending device,
    /// storing `body` once. `devices` is [`group_devices_digest`] of the devices the
    /// sender shared its sender key with: if they are not the devices the node would
    /// queue it for, nothing is queued ([`ErrorKind::GroupDevicesChanged`]). Answered
    /// by [`Response::GroupAccepted`] once durable.
    SendGroup {
        group_id: u64,
        id: MessageId,
        body: Vec<u8>,
        devices: [u8; 32],
        /// Disappearing messages: the node drops the message (every device's copy)
        /// this many seconds after taking it, or at the node's TTL if sooner; 0: the
        /// node's TTL.
        expires_in_secs: u32,
    },
    /// Stores this account's profile: `blob` is end-to-end encrypted under the
    /// account's profile key (opaque to the node), `version` is derived from that key
    /// and must be named to fetch it. Replaces any profile before (and its presence).
    /// Answered by [`Response::ProfileStored`].
    SetProfile { version: [u8; 32], blob: Vec<u8> },
    /// The profile of `number`, if `version` is its current version (only holders of
    /// the profile key can name it). Charged against the discovery budget like a
    /// lookup. Answered by [`Response::Profile`], else [`ErrorKind::NoProfile`] (the
    /// same for an unknown number, no profile, or a wrong version).
    FetchProfile { number: String, version: [u8; 32] },
    /// Stores this account's presence ("last seen"), encrypted under the profile key
    /// like the profile; empty clears it. Needs a profile. Answered by
    /// [`Response::ProfileStored`].
    SetPresence { blob: Vec<u8> },
    /// "This device is typing to `to`" (or stopped): forwarded to the devices of the
    /// recipients that are connected now, and never stored. Answered by
    /// [`Response::TypingSent`].
    Typing { to: TypingTo, typing: bool },
    /// Opens an attachment upload on this stream: `size` bytes of ciphertext (the
    /// client encrypted the file; the node never sees its key, name or type), to be
    /// downloaded by `downloads` devices (0: unknown, kept until the TTL). With
    /// `resume`, the id of an upload of this account that broke off. Answered by
    /// [`Response::UploadReady`]; then the client writes the bytes from its `offset`
    /// as raw stream data (no frames) and finishes the stream, and the node answers
    /// [`Response::Uploaded`] once the blob is durable.
    Upload {
        size: u64,
        downloads: u32,
        resume: Option<[u8; 16]>,
    },
    /// Opens a download of attachment `id` (its capability: there is no listing) from
    /// `offset`. Answered by [`Response::DownloadReady`], then the blob's bytes from
    /// `offset` as raw stream data, and the end of the stream.
    Download { id: [u8; 16], offset: u64 },
}

/// Where a typing indicator goes.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum TypingTo {
    /// One account (E.164), and this account's other devices.
    Account(String),
    /// Every member of a group (the sender must be one).
    Group(u64),
}

/// The devices of one member a group message goes to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Encode, Decode)]
pub struct MemberDevices {
    /// E.164.
    pub number: String,
    pub devices: Vec<u32>,
}

/// SHA-256 over the devices a group message goes to, in order of number (bytewise)
/// then device id: for each device, the number's UTF-8 bytes, a zero byte, and the
/// device id (u32 BE). Members listed without devices count for nothing.
pub fn group_devices_digest(members: &[MemberDevices]) -> [u8; 32] {
    use sha2::Digest;
    let mut all: Vec<(&str, u32)> = members
        .iter()
        .flat_map(|m| m.devices.iter().map(|&d| (m.number.as_str(), d)))
        .collect();
    all.sort_unstable();
    all.dedup();
    let mut hash = sha2::Sha256::new();
    for (number, device) in all {
        hash.update(number.as_bytes());
        hash.update([0]);
        hash.update(device.to_be_bytes());
    }
    hash.finalize().into()
}

/// A change to a group.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum GroupChange {
    /// Admins: add the accounts of these numbers.
    Add { numbers: Vec<String> },
    /// Admins: remove this member.
    Remove { number: String },
    /// Admins: make this member an admin.
    Promote { number: String },
    /// Anyone: leave the group (the last admin to leave hands the role to the member
    /// who joined first).
    Leave,
    /// Admins: replace the encrypted name, description and picture.
    SetMeta { meta: Vec<u8> },
}

/// A group as its members see it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupInfo {
    pub group_id: u64,
    /// Bumped by every change.
    pub version: u64,
    /// In the order they joined.
    pub members: Vec<GroupMember>,
    pub meta: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupMember {
    pub number: String,
    pub admin: bool,
    pub joined_at_ms: u64,
}

/// One group of [`Response::Groups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct GroupSummary {
    pub group_id: u64,
    pub version: u64,
}

impl Request {
    /// The request's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::RequestCode { .. } => "request_code",
            Request::VerifyCode { .. } => "verify_code",
            Request::WhoAmI => "whoami",
            Request::PublishKeys(_) => "publish_keys",
            Request::FetchBundles { .. } => "fetch_bundles",
            Request::Send(_) => "send",
            Request::Subscribe => "subscribe",
            Request::Evaluate { .. } => "evaluate",
            Request::FetchFilter { .. } => "fetch_filter",
            Request::Resolve { .. } => "resolve",
            Request::SetLock { .. } => "set_lock",
            Request::ClearLock => "clear_lock",
            Request::VerifyCodeWithPin { .. } => "verify_code_with_pin",
            Request::ResolveUnder { .. } => "resolve",
            Request::FetchFilterDelta { .. } => "fetch_filter_delta",
            Request::ListDevices => "list_devices",
            Request::UnlinkDevice { .. } => "unlink_device",
            Request::LinkOpen { .. } => "link_open",
            Request::LinkJoin { .. } => "link_join",
            Request::LinkRequest { .. } => "link_request",
            Request::LinkPoll { .. } => "link_poll",
            Request::LinkGrant { .. } => "link_grant",
            Request::LinkAbort { .. } => "link_abort",
            Request::CreateGroup { .. } => "create_group",
            Request::ChangeGroup { .. } => "change_group",
            Request::FetchGroup { .. } => "fetch_group",
            Request::ListGroups => "list_groups",
            Request::SendGroup { .. } => "send_group",
            Request::SetProfile { .. } => "set_profile",
            Request::FetchProfile { .. } => "fetch_profile",
            Request::SetPresence { .. } => "set_presence",
            Request::Typing { .. } => "typing",
            Request::Upload { .. } => "upload",
            Request::Download { .. } => "download",
        }
    }
}

/// The most elements one `Evaluate` or `Resolve` may carry.
pub const MAX_DISCOVERY_BATCH: usize = 1024;
/// The most filter bytes one `FilterChunk` carries.
pub const FILTER_CHUNK_BYTES: usize = 512 * 1024;

/// A device's public identity keys (Olm: Curve25519 for key agreement, Ed25519 for
/// signatures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub struct IdentityKeys {
    pub curve25519: [u8; 32],
    pub ed25519: [u8; 32],
}

impl IdentityKeys {
    /// Label of the bytes an account identity signs to vouch for a device's keys.
    pub const DEVICE_LABEL: &'static [u8] = b"switchboard device v1";

    /// The bytes an account's identity signs for its device `device` of `number`:
    /// the label, the device's Curve25519 and Ed25519 keys, then the number (E.164).
    pub fn device_signed_bytes(number: &str, device: &IdentityKeys) -> Vec<u8> {
        [
            Self::DEVICE_LABEL,
            &device.curve25519[..],
            &device.ed25519[..],
            number.as_bytes(),
        ]
        .concat()
    }

    /// Whether `signature` is this (account) identity's, vouching for `device` as a
    /// device of `number`.
    pub fn vouches_for(&self, number: &str, device: &IdentityKeys, signature: &[u8; 64]) -> bool {
        let Ok(public) = vodozemac::Ed25519PublicKey::from_slice(&self.ed25519) else {
            return false;
        };
        vodozemac::Ed25519Signature::from_slice(signature).is_ok_and(|sig| {
            public
                .verify(&Self::device_signed_bytes(number, device), &sig)
                .is_ok()
        })
    }
}

/// A Curve25519 public key signed by the device's Ed25519 identity key. The signed
/// bytes are a domain label (`switchboard one-time key` or `switchboard fallback
/// key`, ASCII) followed by the 32 key bytes. The node stores these opaquely; the
/// client that uses one verifies its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct SignedKey {
    pub key: [u8; 32],
    pub signature: [u8; 64],
}

impl SignedKey {
    /// Label of the bytes a one-time key's signature covers.
    pub const ONE_TIME: &'static [u8] = b"switchboard one-time key";
    /// Label of the bytes a fallback key's signature covers.
    pub const FALLBACK: &'static [u8] = b"switchboard fallback key";

    /// The bytes signed for `key` under `label`: the label, then the key.
    pub fn signed_bytes(label: &[u8], key: &[u8; 32]) -> Vec<u8> {
        [label, &key[..]].concat()
    }

    /// Whether this key is signed under `label` by `signer`'s Ed25519 identity key.
    pub fn verify(&self, signer: &IdentityKeys, label: &[u8]) -> bool {
        let Ok(public) = vodozemac::Ed25519PublicKey::from_slice(&signer.ed25519) else {
            return false;
        };
        vodozemac::Ed25519Signature::from_slice(&self.signature).is_ok_and(|sig| {
            public
                .verify(&Self::signed_bytes(label, &self.key), &sig)
                .is_ok()
        })
    }
}

/// Keys a device publishes.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct KeyUpload {
    pub identity: IdentityKeys,
    /// A new fallback key, replacing the stored one; `None` keeps it.
    pub fallback: Option<SignedKey>,
    /// One-time keys to add.
    pub one_time_keys: Vec<SignedKey>,
    /// For a linked device: the account identity's (the primary's) signature over
    /// [`IdentityKeys::device_signed_bytes`] of `identity`. `None` from the primary.
    pub account_signature: Option<[u8; 64]>,
}

/// A 16-byte message id chosen by the sending client (random). Sending the same id
/// again is idempotent.
pub type MessageId = [u8; 16];

/// A message to one account, encrypted separately for each of its devices.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Outgoing {
    pub id: MessageId,
    /// Recipient number, E.164.
    pub to: String,
    /// Exactly one per device of the recipient account (as the node knows them).
    pub envelopes: Vec<DeviceEnvelope>,
    /// Disappearing messages: the node drops every copy this many seconds after
    /// taking it, or at the node's TTL if sooner; 0: the node's TTL.
    pub expires_in_secs: u32,
}

/// Ciphertext for one device. The node never looks inside `body`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeviceEnvelope {
    pub device_id: u32,
    pub body: Vec<u8>,
}

/// The key bundles of an account's devices.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Bundles {
    pub number: String,
    pub devices: Vec<Bundle>,
}

/// One device's keys.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Bundle {
    pub device_id: u32,
    pub identity: IdentityKeys,
    /// A claimed one-time key; `None` when none was asked for or none is left (use
    /// the fallback key then).
    pub one_time_key: Option<SignedKey>,
    pub fallback: Option<SignedKey>,
    /// The account's primary: its identity is the account identity.
    pub primary: bool,
    /// For a linked device, the account identity's signature over its keys (see
    /// [`KeyUpload::account_signature`]).
    pub account_signature: Option<[u8; 64]>,
}

/// The node holds the message durably.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Accepted {
    pub id: MessageId,
    /// When the node first accepted this id (milliseconds since the Unix epoch).
    pub accepted_at_ms: u64,
    /// True when this id had been accepted before and nothing new was queued.
    pub duplicate: bool,
    /// Recipient devices that acknowledged the message before this answer. Their
    /// delivery receipts are these: no `Delivered` item is queued for them.
    pub delivered: Vec<u32>,
}

/// A batch of queued items, node to client, on the delivery stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Push {
    pub items: Vec<Delivery>,
    /// Set on the push that completes the backlog the device had when it subscribed
    /// (once per subscription; an empty push when there was no backlog).
    pub backlog_end: bool,
    /// The device's stock of one-time keys on the node, when it is running low.
    pub one_time_keys_left: Option<u32>,
}

/// One item of a device's queue.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Delivery {
    /// Position in the device's queue; acknowledge with it. Increases in queue order.
    pub seq: u64,
    /// When the node queued it (milliseconds since the Unix epoch).
    pub queued_at_ms: u64,
    pub item: Item,
}

/// What a queue holds.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Item {
    /// A message from another device.
    Message(Incoming),
    /// A recipient device acknowledged a message this device sent.
    Delivered(Receipt),
    /// A message to a group this account is in.
    GroupMessage(GroupIncoming),
    /// How many of the devices a group message of this device went to have it: one
    /// item per message, replaced as the count grows (not a receipt per device).
    GroupDelivered(GroupReceipt),
    /// Someone is typing (or stopped). Never stored: pushed only to devices connected
    /// when it was sent, under `seq` 0, and never acknowledged.
    Typing(TypingNotice),
}

/// A typing indicator, as the node forwards it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TypingNotice {
    /// Who is typing (E.164), as authenticated by the node.
    pub from: String,
    pub from_device: u32,
    /// The group they are typing in; `None`: to this account.
    pub group_id: Option<u64>,
    pub typing: bool,
}

/// The delivery of a group message, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct GroupReceipt {
    pub group_id: u64,
    pub id: MessageId,
    /// Devices that acknowledged it so far.
    pub delivered: u32,
    /// Devices it was queued for.
    pub of: u32,
}

/// A group message as a member device receives it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupIncoming {
    pub group_id: u64,
    /// The sender's number (E.164), as authenticated by the node.
    pub from: String,
    pub from_device: u32,
    pub id: MessageId,
    /// Empty when the node no longer holds it (expired).
    pub body: Vec<u8>,
}

/// A message as the recipient receives it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Incoming {
    /// The sender's number (E.164), as authenticated by the node.
    pub from: String,
    pub from_device: u32,
    pub id: MessageId,
    pub body: Vec<u8>,
}

/// A delivery receipt.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Receipt {
    /// The recipient's number (E.164).
    pub to: String,
    pub device_id: u32,
    pub id: MessageId,
}

/// Client to node, on the delivery stream: these items may leave the queue.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Ack {
    pub seqs: Vec<u64>,
}

/// How a verification code is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Channel {
    Sms,
    Voice,
}

impl Channel {
    /// The lower-case name used in config and logs.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Voice => "voice",
        }
    }
}

/// The node's answer to one request: exactly one per request stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Reply {
    Ok(Response),
    Err(NodeError),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    CodeSent(CodeSent),
    Registered(Registered),
    Identity(Identity),
    /// The device's keys are stored; this many one-time keys are on the node.
    KeysStored {
        one_time_keys: u32,
    },
    Bundles(Bundles),
    Accepted(Accepted),
    /// The delivery stream is open; this many items were queued for the device.
    Subscribed {
        queued: u64,
    },
    /// The evaluated elements, in request order, under discovery key `key_version`.
    Evaluated {
        key_version: u32,
        evaluated: Vec<[u8; 32]>,
        /// Evaluations left in today's budget.
        budget_left: u32,
    },
    /// Part of the membership filter (`discovery::MembershipFilter::encode`): bytes
    /// `offset..offset + chunk.len()` of `total_len`.
    FilterChunk {
        version: u64,
        key_version: u32,
        total_len: u32,
        offset: u32,
        chunk: Vec<u8>,
    },
    /// The client's filter is current.
    FilterUnchanged {
        version: u64,
        key_version: u32,
    },
    /// One flag per PRF value asked about, in request order: true when an account is
    /// indexed under it.
    Resolved {
        registered: Vec<bool>,
    },
    /// The lock is set; it lapses after the account's devices stay away this long.
    LockSet {
        lapse_days: u32,
    },
    /// The lock is gone (or there was none).
    LockCleared,
    /// The filter keys of the accounts indexed since the current filter was built.
    /// `version` is the current filter's: when it is not the one asked about, the
    /// client's filter is old and `keys` belong to the new one.
    FilterDelta {
        version: u64,
        key_version: u32,
        keys: Vec<u64>,
    },
    /// The account's devices, primary first.
    Devices {
        devices: Vec<DeviceInfo>,
    },
    /// The device is unlinked.
    DeviceUnlinked,
    /// A link slot is open under `nameplate` for `expires_in_secs`.
    LinkOpened {
        nameplate: u32,
        expires_in_secs: u32,
    },
    /// The primary's SPAKE2 message, for the device that took the slot.
    LinkOffer {
        pake: Vec<u8>,
    },
    /// The new device's request waits for the primary.
    LinkQueued,
    /// Nothing new on the slot yet: poll again.
    LinkWaiting,
    /// For the primary: the new device's SPAKE2 message and sealed request.
    LinkRequested {
        pake: Vec<u8>,
        sealed: Vec<u8>,
    },
    /// For the new device: it is registered (as the primary's account's device), and
    /// the primary's sealed grant.
    LinkComplete {
        registered: Registered,
        sealed: Vec<u8>,
    },
    /// For the primary: the new device is the account's, with this id.
    LinkGranted {
        device_id: u32,
    },
    /// The slot is gone (given up, or the primary found the key wrong).
    LinkAborted,
    /// A group, as it is now.
    Group(GroupInfo),
    /// This account left the group.
    GroupLeft,
    /// The groups this account is in.
    Groups {
        groups: Vec<GroupSummary>,
    },
    /// A group message is durable, queued for `recipients` devices.
    GroupAccepted {
        id: MessageId,
        accepted_at_ms: u64,
        recipients: u32,
    },
    /// The profile (or presence) is stored.
    ProfileStored,
    /// An account's encrypted profile, and its encrypted presence (empty: none).
    Profile {
        blob: Vec<u8>,
        presence: Vec<u8>,
    },
    /// The typing indicator went to `devices` connected devices.
    TypingSent {
        devices: u32,
    },
    /// Write the upload's bytes from `offset` (0, or where a broken-off upload
    /// stopped); `id` is its capability.
    UploadReady {
        id: [u8; 16],
        offset: u64,
    },
    /// The blob is whole and durable.
    Uploaded {
        id: [u8; 16],
        size: u64,
    },
    /// The blob's bytes follow, `size` in all (from the offset asked for).
    DownloadReady {
        size: u64,
    },
}

/// One device of an account, as the account's devices see it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeviceInfo {
    pub device_id: u32,
    /// The name it was linked with (empty for the primary).
    pub name: String,
    /// The account's primary: the device that proved the number.
    pub primary: bool,
    /// When it registered or was linked (ms since the Unix epoch).
    pub linked_at_ms: u64,
    /// When it was last seen (ms; the node records it at most hourly), if ever.
    pub last_seen_ms: Option<u64>,
}

/// A code is on its way.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CodeSent {
    /// Seconds the code stays valid.
    pub expires_in_secs: u32,
    /// Seconds before another code may be requested for this number.
    pub resend_after_secs: u32,
    /// Wrong guesses allowed before the code dies.
    pub tries: u32,
}

/// The device is registered.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Registered {
    pub number: String,
    pub account_id: u64,
    pub device_id: u32,
    /// True when the number already had an account that moved to this device.
    pub took_over: bool,
}

/// Who the authenticated device is.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Identity {
    pub number: String,
    pub account_id: u64,
    pub device_id: u32,
}

/// A typed error: a machine-readable kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl NodeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> NodeError {
        NodeError {
            kind,
            message: message.into(),
        }
    }
}

/// What went wrong, for programs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ErrorKind {
    /// The request frame could not be decoded (garbage, unknown request kind,
    /// trailing bytes). The stream is closed.
    Malformed,
    /// The request frame was larger than the node's `max_frame_bytes`.
    FrameTooLarge { max: u32 },
    /// The phone number is not a valid E.164 number.
    InvalidNumber,
    /// The code is not six ASCII digits.
    InvalidCode,
    /// The request needs a registered device and this connection's key is not one.
    Unauthenticated,
    /// Too many requests; try again after this many seconds.
    RateLimited { retry_after_secs: u32 },
    /// No code is pending for this number (never requested, or already used).
    NoCodePending,
    /// The code was wrong; this many guesses remain for it.
    WrongCode { tries_left: u32 },
    /// The code expired; request a new one.
    CodeExpired,
    /// Too many wrong guesses: the code is dead; request a new one after
    /// `retry_after_secs`.
    TooManyAttempts { retry_after_secs: u32 },
    /// The node could not deliver the code; try later.
    DeliveryFailed,
    /// Something failed inside the node; nothing was changed.
    Internal,
    /// The number has no account on this node.
    UnknownRecipient,
    /// None of the number's devices has published keys yet.
    NoKeys,
    /// The envelopes do not match the recipient's devices; these are its devices now.
    /// Fetch bundles for the new ones and send again.
    StaleDevices { devices: Vec<u32> },
    /// An envelope is larger than the node accepts.
    EnvelopeTooLarge { max: u32 },
    /// A recipient device's queue is full; it must receive before more can be queued.
    QueueFull { device_id: u32 },
    /// The key upload is invalid or would store more one-time keys than allowed.
    BadKeys,
    /// The node's disk is (nearly) full: it takes no new messages or keys until space
    /// is freed. Deliveries and acknowledgements go on. Try again later.
    StorageFull,
    /// The number has a registration lock: the code was right, but registering it
    /// needs the account's PIN too ([`Request::VerifyCodeWithPin`]). `tries_left`
    /// wrong PINs remain (at 0, none is accepted until the lock lapses); the lock
    /// lapses in `lapses_in_secs` if the account's devices stay away.
    RegistrationLocked {
        tries_left: u32,
        lapses_in_secs: u64,
    },
    /// The PRF values were computed under a discovery key the node no longer uses
    /// (it was rotated to `key_version`): evaluate the numbers again.
    DiscoveryKeyChanged { key_version: u32 },
    /// The envelopes for the sender's own other devices (`Outgoing::copies`) do not
    /// match them; these are the account's other devices now.
    StaleOwnDevices { devices: Vec<u32> },
    /// This device key belonged to a device that was removed from its account (and
    /// why): it can do nothing more on this node.
    DeviceRemoved { why: Removal },
    /// Only the account's primary may do this.
    NotPrimary,
    /// The account has as many devices as the node allows.
    TooManyDevices { max: u32 },
    /// The link code is unknown, expired, used, or was tried with a wrong secret.
    LinkUnavailable,
    /// The account has no device with this id.
    UnknownDevice { device_id: u32 },
    /// This account is not in that group (or there is no such group).
    NotGroupMember,
    /// Only the group's admins may do this.
    NotGroupAdmin,
    /// The group would have more than `max` members.
    GroupFull { max: u32 },
    /// The group message's `devices` digest is not that of the devices the node would
    /// queue it for: these are the member devices now (the sending device left out).
    /// Share the sender key with the new ones (a new key if any is gone) and send
    /// again.
    GroupDevicesChanged { members: Vec<MemberDevices> },
    /// No profile of that version (or that number) is here.
    NoProfile,
    /// A profile (or presence) of more than `max` bytes.
    ProfileTooLarge { max: u32 },
    /// An attachment of more than `max` bytes (`attachments.max_bytes`): refused
    /// before any byte is sent.
    AttachmentTooLarge { max: u64 },
    /// The account's attachments would take more than `max` bytes: stored
    /// (`attachments.max_stored_bytes_per_account`) or being uploaded
    /// (`attachments.max_in_flight_bytes_per_account`); the message says which.
    AttachmentQuota { max: u64 },
    /// No attachment with that id is here (never uploaded, not whole yet, expired,
    /// or downloaded by every device it was for), or none of this account to resume.
    NoAttachment,
    /// This node does not do this (none of this protocol version's requests is
    /// answered with it; kept for a node that lacks a capability).
    Unsupported,
}

/// Why a device was removed from its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Removal {
    /// Its number was registered on another device.
    SignedOut,
    /// It was unlinked (by the primary, or by itself).
    Unlinked,
    /// It was linked, and stayed away longer than the node keeps linked devices.
    Lapsed,
    /// The node's operator deleted the account.
    AccountDeleted,
}

impl Removal {
    /// Why, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Removal::SignedOut => {
                "this device was signed out: its number was registered on another device"
            }
            Removal::Unlinked => "this device was unlinked from its account",
            Removal::Lapsed => "this device was unlinked from its account: it stayed away too long",
            Removal::AccountDeleted => "this device's account was deleted by the node's operator",
        }
    }
}

impl ErrorKind {
    /// The error's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::FrameTooLarge { .. } => "frame_too_large",
            ErrorKind::InvalidNumber => "invalid_number",
            ErrorKind::InvalidCode => "invalid_code",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::RateLimited { .. } => "rate_limited",
            ErrorKind::NoCodePending => "no_code_pending",
            ErrorKind::WrongCode { .. } => "wrong_code",
            ErrorKind::CodeExpired => "code_expired",
            ErrorKind::TooManyAttempts { .. } => "too_many_attempts",
            ErrorKind::DeliveryFailed => "delivery_failed",
            ErrorKind::Internal => "internal",
            ErrorKind::UnknownRecipient => "unknown_recipient",
            ErrorKind::NoKeys => "no_keys",
            ErrorKind::StaleDevices { .. } => "stale_devices",
            ErrorKind::EnvelopeTooLarge { .. } => "envelope_too_large",
            ErrorKind::QueueFull { .. } => "queue_full",
            ErrorKind::BadKeys => "bad_keys",
            ErrorKind::StorageFull => "storage_full",
            ErrorKind::RegistrationLocked { .. } => "registration_locked",
            ErrorKind::DiscoveryKeyChanged { .. } => "discovery_key_changed",
            ErrorKind::StaleOwnDevices { .. } => "stale_own_devices",
            ErrorKind::DeviceRemoved { .. } => "device_removed",
            ErrorKind::NotPrimary => "not_primary",
            ErrorKind::TooManyDevices { .. } => "too_many_devices",
            ErrorKind::LinkUnavailable => "link_unavailable",
            ErrorKind::UnknownDevice { .. } => "unknown_device",
            ErrorKind::NotGroupMember => "not_group_member",
            ErrorKind::NotGroupAdmin => "not_group_admin",
            ErrorKind::GroupFull { .. } => "group_full",
            ErrorKind::GroupDevicesChanged { .. } => "group_devices_changed",
            ErrorKind::NoProfile => "no_profile",
            ErrorKind::ProfileTooLarge { .. } => "profile_too_large",
            ErrorKind::AttachmentTooLarge { .. } => "attachment_too_large",
            ErrorKind::AttachmentQuota { .. } => "attachment_quota",
            ErrorKind::NoAttachment => "no_attachment",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame;

    /// The examples in PROTOCOL.md, byte for byte: if this fails, fix the document too.
    #[test]
    fn documented_examples() {
        fn check<T: Encode>(value: T, expected_hex: &str) {
            let bytes = frame::encode(&value).unwrap();
            assert_eq!(hex::encode(bytes), expected_hex.replace(' ', ""));
        }
        check(Request::WhoAmI, "00000001 02");
        check(
            Request::RequestCode {
                number: "+14155550100".into(),
                channel: Channel::Sms,
                locale: "en".into(),
            },
            "00000012 00 0c 2b3134313535353530313030 00 02 656e",
        );
        check(
            Request::VerifyCode {
                number: "+14155550100".into(),
                code: "123456".into(),
            },
            "00000015 01 0c 2b3134313535353530313030 06 313233343536",
        );
        check(
            Reply::Ok(Response::Identity(Identity {
                number: "+14155550100".into(),
                account_id: 1,
                device_id: 300,
            })),
            "00000013 00 02 0c 2b3134313535353530313030 01 fb2c01",
        );
        check(
            Reply::Err(NodeError::new(
                ErrorKind::WrongCode { tries_left: 4 },
                "wrong code",
            )),
            "0000000e 01 07 04 0a 77726f6e6720636f6465",
        );
        check(Request::Subscribe, "00000001 06");
        check(Ack { seqs: vec![1, 300] }, "00000005 02 01 fb2c01");
        check(
            Reply::Ok(Response::Subscribed { queued: 2 }),
            "00000003 00 06 02",
        );
        check(
            Request::ResolveUnder {
                key_version: 1,
                prfs: vec![[7; 32]],
            },
            &format!("00000023 0d 01 01 {}", "07".repeat(32)),
        );
        check(Request::FetchFilterDelta { version: 5 }, "00000002 0e 05");
        check(
            Reply::Ok(Response::FilterDelta {
                version: 5,
                key_version: 1,
                keys: vec![1, 300],
            }),
            "00000009 00 0d 05 01 02 01 fb2c01",
        );
        check(
            Reply::Err(NodeError::new(
                ErrorKind::DiscoveryKeyChanged { key_version: 2 },
                "rotated",
            )),
            "0000000b 01 14 02 07 726f7461746564",
        );
        check(Request::ListDevices, "00000001 0f");
        check(Request::ListGroups, "00000001 1a");
        check(
            Request::SendGroup {
                group_id: 7,
                id: [1; 16],
                body: vec![42],
                devices: [3; 32],
                expires_in_secs: 0,
            },
            &format!(
                "00000035 1b 07 {} 01 2a {} 00",
                "01".repeat(16),
                "03".repeat(32)
            ),
        );
        check(
            Reply::Err(NodeError::new(
                ErrorKind::GroupDevicesChanged {
                    members: vec![MemberDevices {
                        number: "+1".into(),
                        devices: vec![1, 2],
                    }],
                },
                "x",
            )),
            "0000000b 01 1e 01 02 2b31 02 01 02 01 78",
        );
        check(
            Delivery {
                seq: 9,
                queued_at_ms: 1,
                item: Item::GroupDelivered(GroupReceipt {
                    group_id: 7,
                    id: [1; 16],
                    delivered: 2,
                    of: 3,
                }),
            },
            &format!("00000016 09 01 03 07 {} 02 03", "01".repeat(16)),
        );
        // The digest of a group's devices, as every client and node computes it.
        assert_eq!(
            hex::encode(group_devices_digest(&[
                MemberDevices {
                    number: "+2".into(),
                    devices: vec![1],
                },
                MemberDevices {
                    number: "+1".into(),
                    devices: vec![2, 1],
                },
            ])),
            "a1429c8fe4be98033b0d8210b479a1c5e1a4e4b51a6d76dea6141cef7cf2b44c",
        );
        check(
            Request::ChangeGroup {
                group_id: 7,
                change: GroupChange::Leave,
            },
            "00000003 18 07 03",
        );
        check(Request::UnlinkDevice { device_id: 2 }, "00000002 10 02");
        check(
            Request::LinkJoin {
                nameplate: 123_456,
                pake: vec![7; 33],
            },
            &format!("00000028 12 fc40e20100 21 {}", "07".repeat(33)),
        );
        check(
            Request::LinkPoll { nameplate: 123_456 },
            "00000006 14 fc40e20100",
        );
        check(
            Request::LinkGrant {
                nameplate: 123_456,
                name: "laptop".into(),
                sealed: vec![1, 2, 3],
            },
            "00000011 15 fc40e20100 06 6c6170746f70 03 010203",
        );
        check(
            Reply::Ok(Response::LinkOpened {
                nameplate: 123_456,
                expires_in_secs: 300,
            }),
            "0000000a 00 10 fc40e20100 fb2c01",
        );
        check(
            Reply::Err(NodeError::new(
                ErrorKind::DeviceRemoved {
                    why: Removal::Unlinked,
                },
                "x",
            )),
            "00000005 01 16 01 01 78",
        );
        // Version 4: disappearing messages, typing, profiles.
        check(
            Request::Send(Outgoing {
                id: [1; 16],
                to: "+14155550101".into(),
                envelopes: vec![DeviceEnvelope {
                    device_id: 1,
                    body: vec![42],
                }],
                expires_in_secs: 604_800,
            }),
            &format!(
                "00000027 05 {} 0c 2b3134313535353530313031 01 01 01 2a fc803a0900",
                "01".repeat(16)
            ),
        );
        check(
            Request::Typing {
                to: TypingTo::Account("+14155550101".into()),
                typing: true,
            },
            "00000010 1f 00 0c 2b3134313535353530313031 01",
        );
        check(
            Request::Typing {
                to: TypingTo::Group(7),
                typing: false,
            },
            "00000004 1f 01 07 00",
        );
        check(
            Reply::Ok(Response::TypingSent { devices: 2 }),
            "00000003 00 1e 02",
        );
        check(
            Push {
                items: vec![Delivery {
                    seq: u64::MAX,
                    queued_at_ms: 5,
                    item: Item::Typing(TypingNotice {
                        from: "+14155550100".into(),
                        from_device: 1,
                        group_id: None,
                        typing: true,
                    }),
                }],
                backlog_end: false,
                one_time_keys_left: None,
            },
            "0000001e 01 fdffffffffffffffff 05 04 0c 2b3134313535353530313030 01 00 01 00 00",
        );
        check(
            Request::FetchProfile {
                number: "+14155550100".into(),
                version: [1; 32],
            },
            &format!(
                "0000002e 1d 0c 2b3134313535353530313030 {}",
                "01".repeat(32)
            ),
        );
        check(
            Reply::Err(NodeError::new(ErrorKind::NoProfile, "")),
            "00000003 01 1f 00",
        );
        // Attachments.
        check(
            Request::Upload {
                size: 65_552,
                downloads: 1,
                resume: None,
            },
            "00000008 20 fc10000100 01 00",
        );
        check(
            Request::Download {
                id: [1; 16],
                offset: 0,
            },
            &format!("00000012 21 {} 00", "01".repeat(16)),
        );
        check(
            Reply::Ok(Response::UploadReady {
                id: [1; 16],
                offset: 0,
            }),
            &format!("00000013 00 1f {} 00", "01".repeat(16)),
        );
        check(
            Reply::Err(NodeError::new(ErrorKind::NoAttachment, "")),
            "00000003 01 23 00",
        );
    }
}
