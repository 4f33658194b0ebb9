//! Delivery providers: how a code reaches a person.
//!
//! Registration only sees the [`Provider`] trait; the verification-delivery work adds
//! `http` and `command` providers beside [`LogProvider`] without touching it.

use std::collections::BTreeMap;
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

/// The message template for a client's locale (BCP 47): the exact tag, else its
/// primary language (`de` for `de-CH`), else English.
pub fn template<'a>(messages: &'a BTreeMap<String, String>, locale: &str) -> &'a str {
    let locale = locale.trim().to_ascii_lowercase();
    let primary = locale.split(['-', '_']).next().unwrap_or("");
    messages
        .get(&locale)
        .or_else(|| messages.get(primary))
        .or_else(|| messages.get("en"))
        .map_or(crate::config::DEFAULT_MESSAGE, String::as_str)
}

/// The message text: `template` with `{code}` and `{minutes}` filled in.
pub fn message(template: &str, code: &str, ttl_minutes: u64) -> String {
    template
        .replace("{code}", code)
        .replace("{minutes}", &ttl_minutes.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_follows_the_locale() {
        let messages = BTreeMap::from([
            ("en".to_string(), "Code {code}, {minutes} min".to_string()),
            ("de".to_string(), "Code {code}, {minutes} Min.".to_string()),
            ("pt-br".to_string(), "Código {code}".to_string()),
        ]);
        assert_eq!(
            message(template(&messages, "de-CH"), "123456", 10),
            "Code 123456, 10 Min."
        );
        assert_eq!(message(template(&messages, "pt-BR"), "1", 10), "Código 1");
        assert_eq!(
            message(template(&messages, "fr"), "1", 10),
            "Code 1, 10 min"
        );
        assert_eq!(
            template(&BTreeMap::new(), "fr"),
            crate::config::DEFAULT_MESSAGE
        );
    }
}
