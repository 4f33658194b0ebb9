//! Metrics: counters the node keeps as it works, and the Prometheus endpoint that
//! serves them (off by default; `[metrics]` in the config).
//!
//! Everything is registered once in [`Metrics::new`]; the request path only bumps
//! atomics. Gauges of state the store already tracks (queue totals, store size,
//! connections) are read when the endpoint is scraped.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;

use super::Shared;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: &'static str,
    /// `ok` or the error's name (`rate_limited`, `queue_full`...).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// Every metric of the node.
pub struct Metrics {
    registry: Registry,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    /// Connections of apps of an earlier protocol version, closed with "update".
    pub outdated_clients: Counter,
    pub requests: Family<RequestLabels, Counter>,
    pub messages_accepted: Counter,
    messages_delivered: Counter,
    pub messages_expired: Counter,
    /// Attachment bytes uploaded and downloaded.
    pub attachment_bytes_in: Counter,
    pub attachment_bytes_out: Counter,
    handoff: Family<OutcomeLabels, Counter>,
    queue_items: Gauge,
    queue_bytes: Gauge,
    pub commit_batch: Histogram,
    pub commit_seconds: Histogram,
    pub code_requests: Family<OutcomeLabels, Counter>,
    pub code_limits: Family<LimitLabels, Counter>,
    pub discovery_evaluations: Counter,
    /// Registration-lock PINs judged (Argon2id verifications).
    pin_checks: Counter,
    /// Bundle fetches served without a one-time key because of the claim limits.
    key_claims_limited: Counter,
    /// Send answers whose arrival QUIC never confirmed.
    answers_unconfirmed: Counter,
    /// Request streams answered, confirmed and closed.
    streams_closed: Counter,
    store_bytes: Gauge,
    devices_online: Gauge,
    directory_changes: Gauge,
    uptime: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("switchboard");
        let m = Metrics {
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            outdated_clients: Counter::default(),
            requests: Family::default(),
            messages_accepted: Counter::default(),
            messages_delivered: Counter::default(),
            messages_expired: Counter::default(),
            attachment_bytes_in: Counter::default(),
            attachment_bytes_out: Counter::default(),
            handoff: Family::default(),
            queue_items: Gauge::default(),
            queue_bytes: Gauge::default(),
            // 1, 2, 4 ... 4096 waiters per flush.
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            // 50 µs ... about 1.6 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            code_requests: Family::default(),
            code_limits: Family::default(),
            discovery_evaluations: Counter::default(),
            pin_checks: Counter::default(),
            key_claims_limited: Counter::default(),
            answers_unconfirmed: Counter::default(),
            streams_closed: Counter::default(),
            store_bytes: Gauge::default(),
            devices_online: Gauge::default(),
            directory_changes: Gauge::default(),
            uptime: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections_open",
            "QUIC connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "connections_accepted",
            "Connections admitted since start",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused by the connection limits since start",
            m.connections_refused.clone(),
        );
        r.register(
            "outdated_clients",
            "Connections of apps speaking an earlier protocol version, closed with a request to update",
            m.outdated_clients.clone(),
        );
        r.register(
            "devices_online",
            "Device keys with at least one open connection",
            m.devices_online.clone(),
        );
        r.register(
            "directory_changes",
            "Changes of who is registered since the node started (each one empties the caches of registrations)",
            m.directory_changes.clone(),
        );
        r.register(
            "requests",
            "Requests answered, by kind and outcome",
            m.requests.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages accepted (queued durably and acknowledged to the sender); resends of an accepted id are not counted",
            m.messages_accepted.clone(),
        );
        r.register(
            "messages_delivered",
            "Messages acknowledged by their recipient device and removed from its queue",
            m.messages_delivered.clone(),
        );
        r.register(
            "messages_expired",
            "Queued items dropped by the sweep after the message TTL",
            m.messages_expired.clone(),
        );
        r.register(
            "attachment_bytes_in",
            "Attachment bytes uploaded (ciphertext)",
            m.attachment_bytes_in.clone(),
        );
        r.register(
            "attachment_bytes_out",
            "Attachment bytes downloaded (ciphertext)",
            m.attachment_bytes_out.clone(),
        );
        r.register(
            "handoff_items",
            "Queue items held in memory for an online device (staged), and where they went: acknowledged from memory (never written) or written; bypassed: items for an online but slow device, written at once",
            m.handoff.clone(),
        );
        r.register(
            "queue_items",
            "Items (messages and receipts) waiting in device queues; in cluster mode, every item of the cluster's queue stream (group message bodies too)",
            m.queue_items.clone(),
        );
        r.register_with_unit(
            "queue",
            "Stored bytes of the items waiting in device queues",
            Unit::Bytes,
            m.queue_bytes.clone(),
        );
        r.register(
            "group_commit_batch",
            "Durable writes made durable by one group-commit flush",
            m.commit_batch.clone(),
        );
        r.register_with_unit(
            "group_commit_flush",
            "Time of one group-commit flush",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        r.register(
            "code_requests",
            "Verification code requests, by outcome (sent, limited, delivery_failed, invalid_number, refused)",
            m.code_requests.clone(),
        );
        r.register(
            "code_limited",
            "Code requests refused by an abuse limit, by limit",
            m.code_limits.clone(),
        );
        r.register(
            "discovery_evaluations",
            "Blinded contact points evaluated (OPRF) for discovery",
            m.discovery_evaluations.clone(),
        );
        r.register(
            "request_streams_closed",
            "Request streams answered and closed (after the reply was confirmed, or given up on)",
            m.streams_closed.clone(),
        );
        r.register(
            "send_answers_unconfirmed",
            "Send answers QUIC never confirmed the sender received (their sent-id records stay, so resends are duplicates)",
            m.answers_unconfirmed.clone(),
        );
        r.register(
            "key_claims_limited",
            "Bundle fetches served with the fallback key only, past a one-time key claim limit",
            m.key_claims_limited.clone(),
        );
        r.register(
            "registration_lock_pin_checks",
            "Registration-lock PINs judged (Argon2id verifications)",
            m.pin_checks.clone(),
        );
        r.register_with_unit(
            "store",
            "Bytes of the database on disk",
            Unit::Bytes,
            m.store_bytes.clone(),
        );
        r.register_with_unit(
            "uptime",
            "Time since the node started",
            Unit::Seconds,
            m.uptime.clone(),
        );
        // Known label values start at zero, so a dashboard shows a flat line rather
        // than "no data" until the first event.
        for limit in [
            "global_day",
            "country_day",
            "number_10min",
            "number_hour",
            "number_wait",
            "address_hour",
            "cooldown",
            "country_denied",
        ] {
            let _ = m.code_limits.get_or_create(&LimitLabels { limit });
        }
        for outcome in [
            "sent",
            "limited",
            "delivery_failed",
            "invalid_number",
            "refused",
        ] {
            let _ = m.code_requests.get_or_create(&OutcomeLabels { outcome });
        }
        Metrics { registry, ..m }
    }

    /// A request answered with `reply`.
    pub fn request(&self, kind: &'static str, reply: &crate::proto::Reply) {
        let outcome = match reply {
            crate::proto::Reply::Ok(_) => "ok",
            crate::proto::Reply::Err(e) => e.kind.name(),
        };
        self.requests
            .get_or_create(&RequestLabels { kind, outcome })
            .inc();
    }

    /// A code request answered with `result`.
    pub fn code_request(&self, result: &Result<crate::proto::Response, crate::proto::NodeError>) {
        use crate::proto::ErrorKind;
        let outcome = match result {
            Ok(_) => "sent",
            Err(e) => match e.kind {
                ErrorKind::RateLimited { .. } => "limited",
                ErrorKind::DeliveryFailed => "delivery_failed",
                ErrorKind::InvalidNumber => "invalid_number",
                _ => "refused",
            },
        };
        self.code_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A request stream answered and closed (the reply confirmed, or given up on).
    pub fn stream_closed(&self) {
        self.streams_closed.inc();
    }

    /// A send's answer whose arrival was never confirmed (lost, or the connection
    /// went): its sent-id record stays for a resend.
    pub fn answer_unconfirmed(&self) {
        self.answers_unconfirmed.inc();
    }

    /// A bundle fetch served without one-time keys, past a claim limit.
    pub fn key_claim_limited(&self) {
        self.key_claims_limited.inc();
    }

    /// A registration-lock PIN judged.
    pub fn pin_checked(&self) {
        self.pin_checks.inc();
    }

    /// A code request refused by the abuse limit `limit`.
    pub fn code_limited(&self, limit: &'static str) {
        self.code_limits.get_or_create(&LimitLabels { limit }).inc();
    }

    /// The metrics in the OpenMetrics text format, with the scrape-time gauges read now.
    /// In cluster mode the queue gauges are the cluster's stream, `cluster_queues`
    /// (read by the caller; `None`: it did not answer, and they keep their last
    /// value), and deliveries are those acknowledged through this node.
    pub fn render(&self, shared: &Shared, cluster_queues: Option<(u64, u64)>) -> String {
        let handoff = shared.store.handoff_stats();
        let (queues, delivered) = match &shared.cluster {
            Some(c) => (cluster_queues, c.queues.delivered_total()),
            None => (
                Some(shared.store.queue_totals()),
                handoff.delivered.load(std::sync::atomic::Ordering::Relaxed),
            ),
        };
        if let Some((items, bytes)) = queues {
            self.queue_items.set(clamp(items));
            self.queue_bytes.set(clamp(bytes));
        }
        self.messages_delivered
            .inc_by(delivered.saturating_sub(self.messages_delivered.get()));
        for (outcome, total) in [
            ("staged", &handoff.staged),
            ("acknowledged", &handoff.acknowledged),
            ("written", &handoff.written),
            ("bypassed", &handoff.bypassed),
        ] {
            let counter = self.handoff.get_or_create(&OutcomeLabels { outcome });
            let total = total.load(std::sync::atomic::Ordering::Relaxed);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.store_bytes.set(clamp(shared.store.size_on_disk()));
        self.devices_online
            .set(clamp(shared.connections.devices_online() as u64));
        self.directory_changes.set(clamp(
            shared
                .directory_epoch
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
        self.uptime.set(clamp(shared.started.elapsed().as_secs()));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// In cluster mode, the items and bytes of the cluster's queue stream (`None`: not
/// in cluster mode, or the cluster did not answer within 2 s).
async fn cluster_queue_totals(shared: &Shared) -> Option<(u64, u64)> {
    let c = shared.cluster.as_ref()?;
    let limit = std::time::Duration::from_secs(2);
    match tokio::time::timeout(limit, c.queues.totals()).await {
        Ok(Ok(totals)) => Some(totals),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "queue totals not read");
            None
        }
        Err(_) => None,
    }
}

/// Serves `GET /metrics` over HTTP/1.1 until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};

    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let shared = shared.clone();
                    async move {
                        if req.uri().path() != "/metrics" {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(
                                    b"not found; metrics are at /metrics\n",
                                )))
                        } else if req.method() != Method::GET && req.method() != Method::HEAD {
                            Response::builder()
                                .status(StatusCode::METHOD_NOT_ALLOWED)
                                .header("allow", "GET, HEAD")
                                .body(Full::new(Bytes::from_static(b"only GET\n")))
                        } else {
                            let cluster_queues = cluster_queue_totals(&shared).await;
                            // The store size is read from the filesystem: off the async workers.
                            let text = tokio::task::spawn_blocking(move || {
                                shared.metrics.render(&shared, cluster_queues)
                            })
                            .await
                            .unwrap_or_default();
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(text)))
                        }
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                () = stop.cancelled() => {}
                result = conn => if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "metrics connection failed");
                }
            }
        });
    }
}
