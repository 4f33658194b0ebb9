//! The wire protocol: the messages a client and a node exchange, and how they are framed.
//!
//! This module is the only place that defines wire types. It knows nothing of quinn,
//! sled or the node: frames are read from any `AsyncRead`, so the same code serves the
//! node, the client library and the fuzz targets. PROTOCOL.md describes the same thing
//! for people writing clients in other languages; keep the two in step.

pub mod frame;
pub mod messages;

pub use frame::{FrameError, HARD_MAX_FRAME_BYTES};
pub use messages::{
    Accepted, Ack, Bundle, Bundles, Channel, CodeSent, Delivery, DeviceEnvelope, DeviceInfo,
    ErrorKind, GroupChange, GroupIncoming, GroupInfo, GroupMember, GroupReceipt, GroupSummary,
    Identity, IdentityKeys, Incoming, Item, KeyUpload, MemberDevices, MessageId, NodeError,
    Outgoing, Push, Receipt, Registered, Removal, Reply, Request, Response, SignedKey,
    TypingNotice, TypingTo, group_devices_digest,
};

/// The `seq` of a pushed item that is not in the queue (a typing indicator): it is
/// never acknowledged, and an `Ack` naming it changes nothing.
pub const EPHEMERAL_SEQ: u64 = u64::MAX;

/// Seqs one `Ack` frame may carry; a frame with more is a protocol error.
pub const MAX_ACKS_PER_FRAME: usize = 4096;

/// The protocol version. It is carried in the TLS ALPN (`switchboard/4`), so a client
/// and a node that do not share a version never misread each other's frames.
pub const VERSION: u32 = 4;

/// The ALPN protocol id of [`VERSION`].
pub const ALPN: &[u8] = b"switchboard/4";

/// ALPN ids of earlier versions. The node still completes their handshake, only to
/// close the connection at once with [`codes::OUTDATED`] and a reason people can
/// read, so that an old app says "update" rather than "handshake failed".
pub const OUTDATED_ALPNS: &[&[u8]] = &[b"switchboard/3", b"switchboard/2", b"switchboard/1"];

/// The reason the node gives an app of an earlier protocol version.
pub const OUTDATED_REASON: &str = "this node speaks Switchboard protocol version 4 and this \
     app an older one: update the app";

/// QUIC application error codes used when the node closes a stream or a connection.
pub mod codes {
    /// Normal close.
    pub const OK: u32 = 0;
    /// The peer sent a frame that could not be decoded.
    pub const MALFORMED: u32 = 1;
    /// The peer announced a frame larger than the limit.
    pub const FRAME_TOO_LARGE: u32 = 2;
    /// The peer did not send a whole request in time.
    pub const TIMEOUT: u32 = 3;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// The device was signed out (its number was registered elsewhere).
    pub const SIGNED_OUT: u32 = 5;
    /// The node refused the connection (limits).
    pub const REFUSED: u32 = 6;
    /// The node's operator deleted the device's account.
    pub const ACCOUNT_DELETED: u32 = 7;
    /// The peer speaks an earlier protocol version (see [`super::OUTDATED_ALPNS`]).
    pub const OUTDATED: u32 = 8;
    /// The device was unlinked from its account.
    pub const UNLINKED: u32 = 9;
}
