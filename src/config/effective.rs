//! The effective settings as a config file (every key, defaults included), so
//! `check-config` can show what a node would run with.

use super::*;
use toml::{Table, Value};

fn int(n: impl Into<i64>) -> Value {
    Value::Integer(n.into())
}

fn uint(n: u64) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn text(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn map(m: &BTreeMap<String, String>) -> Value {
    Value::Table(
        m.iter()
            .map(|(k, v)| (k.clone(), text(v.clone())))
            .collect(),
    )
}

fn codes(v: &[u16]) -> Value {
    Value::Array(v.iter().map(|c| int(*c)).collect())
}

const MASK: &str = "********";

/// A URL with any user info and query string masked (gateways put keys there).
fn masked_url(url: &str) -> String {
    let (before_query, query) = match url.split_once('?') {
        Some((b, _)) => (b, format!("?{MASK}")),
        None => (url, String::new()),
    };
    let masked = match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
            match authority.rfind('@') {
                Some(at) => format!("{scheme}://{MASK}@{}", &rest[at + 1..]),
                None => before_query.to_string(),
            }
        }
        None => before_query.to_string(),
    };
    format!("{masked}{query}")
}

fn masked_map(m: &BTreeMap<String, String>, mask: bool) -> Value {
    if !mask {
        return map(m);
    }
    Value::Table(m.keys().map(|k| (k.clone(), text(MASK))).collect())
}

fn provider(p: &Provider, mask: bool) -> Table {
    let mut t = Table::new();
    match p {
        Provider::Log => {
            t.insert("kind".into(), text("log"));
        }
        Provider::Http(h) => {
            t.insert("kind".into(), text("http"));
            t.insert(
                "url".into(),
                text(if mask {
                    masked_url(&h.url)
                } else {
                    h.url.clone()
                }),
            );
            t.insert("method".into(), text(h.method.clone()));
            t.insert("headers".into(), masked_map(&h.headers, mask));
            if let Some((user, password)) = &h.basic_auth {
                t.insert("username".into(), text(user.clone()));
                t.insert(
                    "password".into(),
                    text(if mask { MASK } else { password.as_str() }),
                );
            }
            match &h.body {
                HttpBody::None => {}
                HttpBody::Form(f) => {
                    t.insert("form".into(), masked_map(f, mask));
                }
                HttpBody::Json(j) => {
                    t.insert("json".into(), text(if mask { MASK } else { j.as_str() }));
                }
            }
            t.insert("timeout_secs".into(), uint(h.timeout.as_secs()));
            t.insert("success_status".into(), codes(&h.success_status));
        }
        Provider::Command(c) => {
            t.insert("kind".into(), text("command"));
            t.insert("program".into(), text(c.program.clone()));
            t.insert(
                "args".into(),
                Value::Array(
                    c.args
                        .iter()
                        .map(|a| text(if mask { MASK } else { a.as_str() }))
                        .collect(),
                ),
            );
            t.insert("timeout_secs".into(), uint(c.timeout.as_secs()));
        }
    }
    t
}

/// `mask` replaces with asterisks whatever may hold a gateway secret (passwords,
/// header and form values, JSON bodies, program arguments, URL user info and
/// query strings) and the test numbers' fixed codes.
pub fn to_toml(c: &Config, mask: bool) -> String {
    let path = |p: &Path| text(p.display().to_string());
    let mut server = Table::new();
    server.insert("listen".into(), text(c.server.listen.to_string()));
    server.insert("data_dir".into(), path(&c.server.data_dir));
    if let Some(tls) = &c.server.tls {
        server.insert("tls_cert".into(), path(&tls.cert));
        server.insert("tls_key".into(), path(&tls.key));
    }
    server.insert("udp_buffer_bytes".into(), uint(c.server.udp_buffer_bytes));
    let l = &c.limits;
    let ms = |d: Duration| uint(d.as_millis() as u64);
    let limits: Table = [
        ("max_connections", int(l.max_connections)),
        (
            "max_connections_per_address",
            int(l.max_connections_per_address),
        ),
        ("ipv6_prefix_len", int(l.ipv6_prefix_len)),
        (
            "max_streams_per_connection",
            int(l.max_streams_per_connection),
        ),
        ("max_frame_bytes", int(l.max_frame_bytes)),
        ("handshake_timeout_ms", ms(l.handshake_timeout)),
        ("idle_timeout_ms", ms(l.idle_timeout)),
        ("request_timeout_ms", ms(l.request_timeout)),
        ("shutdown_grace_ms", ms(l.shutdown_grace)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let v = &c.verification;
    let secs = |d: Duration| uint(d.as_secs());
    let mut verification: Table = [
        ("provider", text("log")),
        ("retries", int(v.retries)),
        ("code_ttl_secs", secs(v.code_ttl)),
        ("max_attempts", int(v.max_attempts)),
        ("resend_cooldown_secs", secs(v.resend_cooldown)),
        ("lock_lapse_days", uint(v.lock_lapse.as_secs() / 86_400)),
        ("max_pin_tries", int(v.max_pin_tries)),
        ("messages", map(&v.messages)),
        (
            "test_numbers",
            Value::Table(
                v.test_numbers
                    .iter()
                    .map(|(n, code)| (n.to_string(), text(if mask { MASK } else { code.as_str() })))
                    .collect(),
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let cl = &v.limits;
    let code_limits: Table = [
        ("per_number_10min", int(cl.per_number_10min)),
        ("per_number_hour", int(cl.per_number_hour)),
        ("per_address_hour", int(cl.per_address_hour)),
        ("per_country_day", int(cl.per_country_day)),
        ("global_day", int(cl.global_day)),
        ("allowed_countries", codes(&cl.allowed_countries)),
        ("denied_countries", codes(&cl.denied_countries)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    verification.insert("limits".into(), Value::Table(code_limits));
    verification.insert("sms".into(), Value::Table(provider(&v.sms, mask)));
    verification.insert("voice".into(), Value::Table(provider(&v.voice, mask)));
    let m = &c.messages;
    let messages: Table = [
        ("max_envelope_bytes", int(m.max_envelope_bytes)),
        ("max_queued_per_device", int(m.max_queued_per_device)),
        ("ttl_secs", secs(m.ttl)),
        ("sweep_interval_secs", secs(m.sweep_interval)),
        ("delivery_batch", int(m.delivery_batch)),
        ("max_one_time_keys", int(m.max_one_time_keys)),
        ("one_time_keys_low", int(m.one_time_keys_low)),
        (
            "key_claims_per_pair_per_hour",
            int(m.key_claims_per_pair_per_hour),
        ),
        (
            "key_claims_per_account_per_hour",
            int(m.key_claims_per_account_per_hour),
        ),
        (
            "envelopes_per_account_minute",
            int(m.envelopes_per_account_minute),
        ),
        ("max_profile_bytes", int(m.max_profile_bytes)),
        ("handoff_ms", ms(m.handoff_window)),
        ("handoff_max_bytes", uint(m.handoff_max_bytes)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut storage = Table::new();
    storage.insert(
        "power_loss_sync".into(),
        Value::Boolean(c.storage.power_loss_sync),
    );
    storage.insert("min_free_bytes".into(), uint(c.storage.min_free_bytes));
    let mut discovery = Table::new();
    discovery.insert("daily_budget".into(), int(c.discovery.daily_budget));
    discovery.insert(
        "filter_refresh_secs".into(),
        secs(c.discovery.filter_refresh),
    );
    let mut accounts = Table::new();
    accounts.insert("max_devices".into(), int(c.accounts.max_devices));
    accounts.insert(
        "companion_lapse_days".into(),
        int((c.accounts.companion_lapse.as_secs() / 86_400) as u32),
    );
    accounts.insert("link_code_ttl_secs".into(), secs(c.accounts.link_code_ttl));
    accounts.insert(
        "link_joins_per_address_hour".into(),
        int(c.accounts.link_joins_per_address_hour),
    );
    let mut groups = Table::new();
    groups.insert("max_members".into(), int(c.groups.max_members));
    groups.insert(
        "changes_per_account_hour".into(),
        int(c.groups.changes_per_account_hour),
    );
    groups.insert("max_meta_bytes".into(), int(c.groups.max_meta_bytes));
    let a = &c.attachments;
    let mut attachments = Table::new();
    attachments.insert("max_bytes".into(), uint(a.max_bytes));
    attachments.insert(
        "max_stored_bytes_per_account".into(),
        uint(a.max_stored_bytes_per_account),
    );
    attachments.insert(
        "max_in_flight_bytes_per_account".into(),
        uint(a.max_in_flight_bytes_per_account),
    );
    attachments.insert(
        "transfer_window_bytes".into(),
        uint(a.transfer_window_bytes),
    );
    attachments.insert(
        "delete_when_downloaded".into(),
        Value::Boolean(a.delete_when_downloaded),
    );
    attachments.insert("incomplete_ttl_secs".into(), secs(a.incomplete_ttl));
    let mut metrics = Table::new();
    metrics.insert("enabled".into(), Value::Boolean(c.metrics.enabled));
    metrics.insert("listen".into(), text(c.metrics.listen.to_string()));
    let mut cluster = Table::new();
    cluster.insert(
        "nats".into(),
        Value::Array(
            c.cluster
                .nats
                .iter()
                .map(|u| text(if mask { masked_url(u) } else { u.clone() }))
                .collect(),
        ),
    );
    cluster.insert("replicas".into(), uint(c.cluster.replicas as u64));
    cluster.insert(
        "removal_delay_ms".into(),
        uint(c.cluster.removal_delay.as_millis() as u64),
    );
    if let Some(login) = &c.cluster.login {
        cluster.insert("user".into(), text(login.user.clone()));
        cluster.insert(
            "password_file".into(),
            text(login.password_file.display().to_string()),
        );
    }
    if let Some(ca) = &c.cluster.tls_ca {
        cluster.insert("tls_ca".into(), text(ca.display().to_string()));
    }
    if let Some(files) = &c.cluster.client_cert {
        cluster.insert("tls_cert".into(), text(files.cert.display().to_string()));
        cluster.insert("tls_key".into(), text(files.key.display().to_string()));
    }
    let mut log = Table::new();
    log.insert("format".into(), text(c.log.format.name()));
    let mut file = Table::new();
    for (name, table) in [
        ("server", server),
        ("limits", limits),
        ("verification", verification),
        ("messages", messages),
        ("storage", storage),
        ("discovery", discovery),
        ("accounts", accounts),
        ("groups", groups),
        ("attachments", attachments),
        ("cluster", cluster),
        ("metrics", metrics),
        ("log", log),
    ] {
        file.insert(name.into(), Value::Table(table));
    }
    toml::to_string(&file).unwrap_or_else(|e| format!("# cannot print the settings: {e}\n"))
}
