//! Storage on a NATS JetStream cluster, for several nodes (issue "Beyond one
//! machine"). This is its first part: connecting to the cluster with the server
//! version checked, and the key directory ([`keys::JetStreamKeys`]) as the first
//! storage concern kept in JetStream. The node itself still runs on sled only.
//!
//! Why a version check: nats-server before 2.10 is not safe for this (2.9.10 on 3
//! replicas let a key-value compare-and-set accept 2,000 updates of a counter that
//! ended at 250; fixed in 2.9.21; and it has no `sync_interval`).

pub mod accounts;
pub mod blobs;
pub mod bucket;
pub mod discovery;
pub mod groups;
pub mod keys;
pub mod profiles;
pub mod queues;
pub mod quotas;

use std::time::Duration;

/// The oldest nats-server this works with.
pub const MIN_SERVER: (u64, u64) = (2, 10);

/// Key-value buckets and streams are kept on this many members.
pub const REPLICAS: usize = 3;

/// Publishes no member answered before giving up (with a growing pause between
/// them, about ten seconds in all).
const UNANSWERED_TRIES: u32 = 40;

/// `e` and what caused it, outermost first.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| err.source())
}

/// The JetStream error in `e`'s causes, if one has one of `codes`.
pub(crate) fn jetstream_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
    codes: &[u64],
) -> Option<&'a async_nats::jetstream::Error> {
    causes(e)
        .filter_map(|err| err.downcast_ref::<async_nats::jetstream::Error>())
        .find(|js| codes.contains(&js.error_code().0))
}

/// Whether `e` (or what caused it) is a JetStream publish that no stream answered
/// (async-nats: "no stream found for given subject", NATS's no-responders). Nothing
/// was stored, so sending it again is safe. It happens for a moment after a stream
/// is created (the member this client talks to does not yet know the stream's
/// subjects) and while a stream's leader is being elected.
pub(crate) fn unanswered(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    causes(e).any(|err| {
        err.downcast_ref::<PublishError>()
            .is_some_and(|p| p.kind() == PublishErrorKind::StreamNotFound)
    })
}

/// Whether `e` (or what caused it) is JetStream refusing a publish because the same
/// duplicate id is being stored at this moment (10158, "duplicate message id is in
/// process": two nodes sending the same item at once). Sent again a moment later,
/// it is answered as a duplicate.
pub(crate) fn in_process(e: &(dyn std::error::Error + 'static)) -> bool {
    jetstream_error(e, &[10158]).is_some()
}

/// Runs `op` (a write to JetStream) again while its error is one `retry` says
/// stored nothing that a repeat could double, with a growing pause, for up to
/// about ten seconds; then its outcome, whatever it is.
pub(crate) async fn sent_again<T, E, F>(
    retry: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> F,
) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(e) if retry(&e) && tries < UNANSWERED_TRIES => {
                tries += 1;
                let ms = 25 * u64::from(tries.min(12));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            outcome => return outcome,
        }
    }
}

/// Why the cluster cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no NATS server address given")]
    NoAddress,
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error(
        "NATS at {urls} refused the node ({reason}): check `cluster.user`, \
         `cluster.password_file` and `cluster.tls_ca`"
    )]
    Refused { urls: String, reason: String },
    #[error(
        "nats-server {found} is too old: switchboard needs {}.{} or newer (older servers \
         lose compare-and-set updates on replicated buckets)",
        MIN_SERVER.0, MIN_SERVER.1
    )]
    TooOld { found: String },
    #[error("JetStream is not enabled on the NATS server: {0}")]
    NoJetStream(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error(
        "a node's data is being moved into the cluster and that has not finished: run \
         `switchboard admin export-to-cluster` again to finish it before serving"
    )]
    ExportUnfinished,
}

/// A connection to the cluster with JetStream checked.
#[derive(Clone)]
pub struct Cluster {
    pub client: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    /// What the connected server said it runs.
    pub server_version: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

/// `major.minor` of a version such as `2.15.1` or `v2.10.0-beta.3`.
pub fn parse_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().trim_start_matches('v').split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `version` is [`MIN_SERVER`] or newer (an unreadable version is not).
pub fn new_enough(version: &str) -> bool {
    parse_version(version).is_some_and(|v| v >= MIN_SERVER)
}

impl Cluster {
    /// Connects to any of `urls` (`nats://host:port`; the client follows the
    /// cluster's other members from there), checks the server's version and that
    /// JetStream answers.
    pub async fn connect(urls: &[String]) -> Result<Cluster, ClusterError> {
        let settings = crate::config::Cluster {
            nats: urls.to_vec(),
            ..crate::config::Config::default().cluster
        };
        Cluster::connect_with(&settings).await
    }

    /// [`Cluster::connect`] to `settings.nats`, logged in as its user and over TLS
    /// checked against its authority where it names them.
    pub async fn connect_with(settings: &crate::config::Cluster) -> Result<Cluster, ClusterError> {
        let urls = &settings.nats;
        if urls.is_empty() {
            return Err(ClusterError::NoAddress);
        }
        let joined = urls.join(",");
        let addrs = urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClusterError::Connect {
                urls: joined.clone(),
                reason: e.to_string(),
            })?;
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            // Once connected, reconnect for ever (a member restarting is routine).
            .max_reconnects(None::<usize>);
        if let Some(login) = &settings.login {
            let password = std::fs::read_to_string(&login.password_file).map_err(|e| {
                ClusterError::Refused {
                    urls: joined.clone(),
                    reason: format!(
                        "the NATS password file {}: {e}",
                        login.password_file.display()
                    ),
                }
            })?;
            options = options.user_and_password(login.user.clone(), password.trim_end().into());
        }
        if let Some(ca) = &settings.tls_ca {
            options = options.require_tls(true).add_root_certificates(ca.clone());
        }
        if let Some(files) = &settings.client_cert {
            options = options.add_client_certificate(files.cert.clone(), files.key.clone());
        }
        let client = options.connect(addrs).await.map_err(|e| {
            use async_nats::ConnectErrorKind as Kind;
            match e.kind() {
                // No use trying again: the settings are wrong.
                Kind::AuthorizationViolation | Kind::Authentication | Kind::Tls => {
                    ClusterError::Refused {
                        urls: joined.clone(),
                        reason: e.to_string(),
                    }
                }
                _ => ClusterError::Connect {
                    urls: joined.clone(),
                    reason: e.to_string(),
                },
            }
        })?;
        // The INFO arrives with the connection: wait for it briefly.
        let mut version = client.server_info().version;
        for _ in 0..50 {
            if !version.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            version = client.server_info().version;
        }
        if version.is_empty() {
            return Err(ClusterError::Connect {
                urls: joined,
                reason: "the server never said what it is (no INFO)".into(),
            });
        }
        if !new_enough(&version) {
            return Err(ClusterError::TooOld { found: version });
        }
        let jetstream = async_nats::jetstream::new(client.clone());
        jetstream
            .query_account()
            .await
            .map_err(|e| ClusterError::NoJetStream(e.to_string()))?;
        Ok(Cluster {
            client,
            jetstream,
            server_version: version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_2_10_are_refused() {
        assert!(new_enough("2.15.1"));
        assert!(new_enough("2.10.0"));
        assert!(new_enough("v2.11.0-beta.1"));
        assert!(new_enough("3.0.0"));
        assert!(!new_enough("2.9.21"));
        assert!(!new_enough("2.9.10"));
        assert!(!new_enough(""));
        assert!(!new_enough("banana"));
        assert_eq!(parse_version("2.10.25"), Some((2, 10)));
    }
}
