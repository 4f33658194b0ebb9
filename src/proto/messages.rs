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
    }
}
