//! Delivery providers: how a code reaches a person.
//!
//! Registration only sees the [`Provider`] trait; the verification-delivery work adds
//! `http` and `command` providers beside [`LogProvider`] without touching it.

use std::future::Future;
use std::pin::Pin;

use crate::phone::Number;
use crate::proto::Channel;

/// One code to deliver.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub number: Number,
    pub channel: Channel,
    pub code: String,
    /// The text to send, already filled in from the template.
    pub message: String,
}

/// A delivery that failed. The message is for the node's log only: clients are told
/// just that the code could not be sent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// A boxed future, so that providers can be chosen at run time.
pub type DeliveryFuture<'a> = Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send + 'a>>;

/// Something that delivers codes.
pub trait Provider: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Delivers one code.
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> DeliveryFuture<'a>;
}

/// Writes the code to the node's log, for an operator who passes codes on by hand.
/// This is the one provider that logs a code, by design.
pub struct LogProvider;

impl Provider for LogProvider {
    fn name(&self) -> &'static str {
        "log"
    }

    fn deliver<'a>(&'a self, d: &'a Delivery) -> DeliveryFuture<'a> {
        Box::pin(async move {
            tracing::info!(
                number = %d.number,
                channel = d.channel.name(),
                code = %d.code,
                "verification code (log provider: pass it on to its owner)"
            );
            Ok(())
        })
    }
}

/// The default message text.
pub fn message(code: &str, ttl_minutes: u64) -> String {
    format!(
        "Your Switchboard code is {code}. It expires in {ttl_minutes} minutes. Do not share it."
    )
}
