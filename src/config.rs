//! Node configuration: one TOML file, parsed into validated types when it is loaded.
//!
//! Every setting has a default, so a node runs with no file at all; `config/switchboard.toml`
//! documents each one and a test checks that it parses to exactly [`Config::default`].
//! Unknown keys are errors, and every error names the key it is about.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::phone::Number;
use crate::proto::HARD_MAX_FRAME_BYTES;

/// The validated configuration of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: Server,
    pub limits: Limits,
    pub verification: Verification,
    pub messages: Messages,
    pub storage: Storage,
    pub discovery: Discovery,
    pub metrics: Metrics,
    pub log: Log,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// Off by default: metrics say how busy the node is and when people are online.
    pub enabled: bool,
    /// TCP address of the endpoint (`GET /metrics`); keep it local or firewalled.
    pub listen: SocketAddr,
}

/// How the node logs (to stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, with the span fields in front.
    Text,
    /// One JSON object per line, with the current span and its parents.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Private contact discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// Numbers an account may turn into accounts per day (UTC): each blinded element
    /// evaluated, and each distinct number looked up by a send or a key fetch.
    pub daily_budget: u32,
    /// How often the membership filter is rebuilt when registrations changed it.
    pub filter_refresh: Duration,
}

/// How the database meets the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// `fdatasync` sled's log in every group commit, so an acknowledged write survives
    /// a power cut and not only a crash of the process.
    pub power_loss_sync: bool,
    /// Below this much free space on the data dir's filesystem the node refuses new
    /// messages ("storage full") and keeps the rest for acknowledgements and keys.
    pub min_free_bytes: u64,
}

/// Queues, envelopes and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Messages {
    /// Largest ciphertext for one device, in bytes.
    pub max_envelope_bytes: u32,
    /// Items (messages and receipts) a device's queue may hold before sends to it fail.
    pub max_queued_per_device: u32,
    /// Queued items older than this are dropped by the sweep.
    pub ttl: Duration,
    /// How often the sweep runs.
    pub sweep_interval: Duration,
    /// Items per push frame on a delivery stream.
    pub delivery_batch: u32,
    /// One-time keys a device may keep on the node.
    pub max_one_time_keys: u32,
    /// Below this many one-time keys the node tells the device to top up.
    pub one_time_keys_low: u32,
}

/// Where the node listens and keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// UDP address to listen on. `[::]` listens on IPv6 and IPv4 both.
    pub listen: SocketAddr,
    /// Directory of the node's database, certificate and keys.
    pub data_dir: PathBuf,
    /// An operator's own certificate and key (PEM); `None` means a self-signed one
    /// generated on first start and kept in the data dir.
    pub tls: Option<TlsFiles>,
}

/// PEM files of a certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits that keep one client, or many, from exhausting the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_connections_per_address: u32,
    pub max_streams_per_connection: u32,
    pub max_frame_bytes: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a client has to send a whole request once it opened a stream.
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight requests before closing connections.
    pub shutdown_grace: Duration,
}

/// Verification codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// How codes go out by SMS.
    pub sms: Provider,
    /// How codes go out by voice call.
    pub voice: Provider,
    /// Further tries after a failed delivery, with doubling waits from 500 ms.
    pub retries: u32,
    /// The message text per language (BCP 47 primary tag, e.g. `en`, `de`), with the
    /// placeholders `{code}` and `{minutes}`. `en` is always there.
    pub messages: BTreeMap<String, String>,
    pub code_ttl: Duration,
    pub max_attempts: u32,
    pub resend_cooldown: Duration,
    /// Numbers whose code is fixed and never delivered, for development and tests.
    pub test_numbers: BTreeMap<Number, String>,
    /// Limits on code requests, against SMS pumping and account takeover.
    pub limits: CodeLimits,
    /// A registration lock lapses once the account's devices have not been seen for
    /// this long, so a member who lost both phone and PIN is not locked out forever.
    pub lock_lapse: Duration,
    /// Wrong PINs accepted before the lock refuses every PIN until it lapses.
    pub max_pin_tries: u32,
}

/// How many codes may be sent, per number, per source address, per country and in
/// all. Counted in the database, so a restart does not reset them. Test numbers are
/// not counted (their codes are never sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeLimits {
    pub per_number_10min: u32,
    pub per_number_hour: u32,
    /// Per IPv4 address, or per IPv6 /64.
    pub per_address_hour: u32,
    /// Per country calling code.
    pub per_country_day: u32,
    pub global_day: u32,
    /// Country calling codes that may receive codes; empty means all.
    pub allowed_countries: Vec<u16>,
    /// Country calling codes that never receive codes.
    pub denied_countries: Vec<u16>,
}

/// How codes reach people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// The code is written to the node's log, for an operator to pass on by hand.
    Log,
    /// An HTTP request to an SMS or voice gateway.
    Http(HttpProvider),
    /// A program run with arguments (e.g. `gammu-smsd-inject` for a USB modem).
    Command(CommandProvider),
}

/// An HTTP request template. Placeholders `{number}` (E.164), `{code}`, `{message}`
/// and `{channel}` (`sms`, `voice`) are filled in the URL (percent-encoded), the
/// headers, the form fields and the JSON body (JSON-escaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProvider {
    pub url: String,
    /// `GET`, `POST` or `PUT`.
    pub method: String,
    pub headers: BTreeMap<String, String>,
    /// HTTP basic authentication: user and password.
    pub basic_auth: Option<(String, String)>,
    pub body: HttpBody,
    pub timeout: Duration,
    /// Status codes that mean "sent"; any 2xx when empty.
    pub success_status: Vec<u16>,
}

/// The body of an HTTP provider's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpBody {
    None,
    /// `application/x-www-form-urlencoded` fields.
    Form(BTreeMap<String, String>),
    /// A JSON text with placeholders inside its strings.
    Json(String),
}

/// A program and its arguments (no shell), with placeholders in the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandProvider {
    pub program: String,
    pub args: Vec<String>,
    pub timeout: Duration,
}

/// The English message, and the one used when no other language matches.
pub const DEFAULT_MESSAGE: &str =
    "Your Switchboard code is {code}. It expires in {minutes} minutes. Do not share it.";

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Default for Config {
    fn default() -> Config {
        Config {
            server: Server {
                listen: SocketAddr::from(([0u16; 8], 4433)),
                data_dir: PathBuf::from("switchboard-data"),
                tls: None,
            },
            limits: Limits {
                max_connections: 10_000,
                max_connections_per_address: 256,
                max_streams_per_connection: 32,
                max_frame_bytes: 256 * 1024,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                request_timeout: Duration::from_secs(10),
                shutdown_grace: Duration::from_secs(5),
            },
            verification: Verification {
                sms: Provider::Log,
                voice: Provider::Log,
                retries: 2,
                messages: BTreeMap::from([("en".to_string(), DEFAULT_MESSAGE.to_string())]),
                code_ttl: Duration::from_secs(600),
                max_attempts: 5,
                resend_cooldown: Duration::from_secs(60),
                test_numbers: BTreeMap::new(),
                lock_lapse: Duration::from_secs(7 * 86_400),
                max_pin_tries: 5,
                limits: CodeLimits {
                    per_number_10min: 3,
                    per_number_hour: 5,
                    per_address_hour: 10,
                    per_country_day: 1_000,
                    global_day: 10_000,
                    allowed_countries: Vec::new(),
                    denied_countries: Vec::new(),
                },
            },
            messages: Messages {
                max_envelope_bytes: 64 * 1024,
                max_queued_per_device: 100_000,
                ttl: Duration::from_secs(30 * 86_400),
                sweep_interval: Duration::from_secs(3600),
                delivery_batch: 256,
                max_one_time_keys: 200,
                one_time_keys_low: 20,
            },
            storage: Storage {
                power_loss_sync: true,
                min_free_bytes: 64 * 1024 * 1024,
            },
            discovery: Discovery {
                daily_budget: 5_000,
                filter_refresh: Duration::from_secs(10),
            },
            metrics: Metrics {
                enabled: false,
                listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            },
            log: Log {
                format: LogFormat::Text,
            },
        }
    }
}

impl Config {
    /// Loads and validates a config file; settings it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and validates config text. The error names the offending key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let deserializer =
            toml::Deserializer::parse(text).map_err(|e| e.to_string().trim_end().to_string())?;
        let raw: raw::File = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            // toml's own message carries the line and a caret under the value.
            let inner = e.into_inner().to_string();
            let inner = suggest(inner.trim_end());
            if path == "." {
                inner
            } else {
                format!("key `{path}`: {inner}")
            }
        })?;
        raw.validate()
    }
}

/// The effective settings as a config file (every key, defaults included), so
/// `check-config` can show what a node would run with.
mod effective {
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
        let l = &c.limits;
        let ms = |d: Duration| uint(d.as_millis() as u64);
        let limits: Table = [
            ("max_connections", int(l.max_connections)),
            (
                "max_connections_per_address",
                int(l.max_connections_per_address),
            ),
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
                        .map(|(n, code)| {
                            (n.to_string(), text(if mask { MASK } else { code.as_str() }))
                        })
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
        let mut metrics = Table::new();
        metrics.insert("enabled".into(), Value::Boolean(c.metrics.enabled));
        metrics.insert("listen".into(), text(c.metrics.listen.to_string()));
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
            ("metrics", metrics),
            ("log", log),
        ] {
            file.insert(name.into(), Value::Table(table));
        }
        toml::to_string(&file).unwrap_or_else(|e| format!("# cannot print the settings: {e}\n"))
    }
}

/// The key of `known` nearest to `unknown`, if one is near enough to be a typo.
fn nearest<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" with "; did you mean `a`?"
/// added when one of the expected keys is near.
fn suggest(message: &str) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else {
        return message.to_string();
    };
    let Some((unknown, rest)) = rest.split_once('`') else {
        return message.to_string();
    };
    let known: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    match nearest(unknown, known) {
        Some(k) => format!("{message}; did you mean `{k}`?"),
        None => message.to_string(),
    }
}

impl Config {
    /// The settings as a complete config file; `mask_secrets` hides whatever may
    /// hold a gateway secret and the test numbers' codes.
    pub fn to_toml(&self, mask_secrets: bool) -> String {
        effective::to_toml(self, mask_secrets)
    }
}

/// The file as written: every field optional, unknown fields refused.
mod raw {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct File {
        pub server: Server,
        pub limits: Limits,
        pub verification: Verification,
        pub messages: Messages,
        pub storage: Storage,
        pub discovery: Discovery,
        pub metrics: Metrics,
        pub log: Log,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Metrics {
        pub enabled: Option<bool>,
        pub listen: Option<SocketAddr>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Log {
        pub format: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Discovery {
        pub daily_budget: Option<u32>,
        pub filter_refresh_secs: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Storage {
        pub power_loss_sync: Option<bool>,
        pub min_free_bytes: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Messages {
        pub max_envelope_bytes: Option<u32>,
        pub max_queued_per_device: Option<u32>,
        pub ttl_secs: Option<u64>,
        pub sweep_interval_secs: Option<u64>,
        pub delivery_batch: Option<u32>,
        pub max_one_time_keys: Option<u32>,
        pub one_time_keys_low: Option<u32>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Server {
        pub listen: Option<SocketAddr>,
        pub data_dir: Option<PathBuf>,
        pub tls_cert: Option<PathBuf>,
        pub tls_key: Option<PathBuf>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Limits {
        pub max_connections: Option<u32>,
        pub max_connections_per_address: Option<u32>,
        pub max_streams_per_connection: Option<u32>,
        pub max_frame_bytes: Option<u32>,
        pub handshake_timeout_ms: Option<u64>,
        pub idle_timeout_ms: Option<u64>,
        pub request_timeout_ms: Option<u64>,
        pub shutdown_grace_ms: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Verification {
        pub provider: Option<String>,
        pub sms: Option<ProviderTable>,
        pub voice: Option<ProviderTable>,
        pub retries: Option<u32>,
        pub messages: BTreeMap<String, String>,
        pub limits: CodeLimits,
        pub lock_lapse_days: Option<u64>,
        pub max_pin_tries: Option<u32>,
        pub code_ttl_secs: Option<u64>,
        pub max_attempts: Option<u32>,
        pub resend_cooldown_secs: Option<u64>,
        pub test_numbers: BTreeMap<String, String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct CodeLimits {
        pub per_number_10min: Option<u32>,
        pub per_number_hour: Option<u32>,
        pub per_address_hour: Option<u32>,
        pub per_country_day: Option<u32>,
        pub global_day: Option<u32>,
        pub allowed_countries: Vec<u16>,
        pub denied_countries: Vec<u16>,
    }

    /// `[verification.sms]` or `[verification.voice]`.
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct ProviderTable {
        pub kind: Option<String>,
        pub url: Option<String>,
        pub method: Option<String>,
        pub headers: BTreeMap<String, String>,
        pub username: Option<String>,
        pub password: Option<String>,
        pub form: Option<BTreeMap<String, String>>,
        pub json: Option<String>,
        pub timeout_secs: Option<u64>,
        pub success_status: Vec<u16>,
        pub program: Option<String>,
        pub args: Vec<String>,
    }

    impl ProviderTable {
        fn validate(self, key: &str) -> Result<super::Provider, String> {
            let kind = self.kind.as_deref().unwrap_or("log");
            let timeout = secs(
                &format!("{key}.timeout_secs"),
                self.timeout_secs,
                Duration::from_secs(10),
                1,
                300,
            )?;
            let unused = |what: &str, present: bool| -> Result<(), String> {
                if present {
                    Err(format!(
                        "key `{key}.{what}`: not used by a {kind:?} provider"
                    ))
                } else {
                    Ok(())
                }
            };
            match kind {
                "log" => {
                    unused("url", self.url.is_some())?;
                    unused("program", self.program.is_some())?;
                    Ok(super::Provider::Log)
                }
                "http" => {
                    unused("program", self.program.is_some())?;
                    unused("args", !self.args.is_empty())?;
                    let url = self
                        .url
                        .ok_or_else(|| format!("key `{key}.url`: an http provider needs it"))?;
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(format!(
                            "key `{key}.url`: {url:?} is not an http:// or https:// URL"
                        ));
                    }
                    let method = self.method.unwrap_or_else(|| "POST".into()).to_uppercase();
                    if !["GET", "POST", "PUT"].contains(&method.as_str()) {
                        return Err(format!(
                            "key `{key}.method`: {method:?} is not GET, POST or PUT"
                        ));
                    }
                    let basic_auth = match (self.username, self.password) {
                        (None, None) => None,
                        (Some(u), Some(p)) => Some((u, p)),
                        _ => {
                            return Err(format!(
                                "key `{key}.username`: basic auth needs both username and password"
                            ));
                        }
                    };
                    let body = match (self.form, self.json) {
                        (None, None) => super::HttpBody::None,
                        (Some(f), None) => super::HttpBody::Form(f),
                        (None, Some(j)) => {
                            // The template must be JSON once filled in.
                            let sample = j
                                .replace("{number}", "+14155550100")
                                .replace("{code}", "123456")
                                .replace("{message}", "a message")
                                .replace("{channel}", "sms");
                            serde_json::from_str::<serde_json::Value>(&sample).map_err(|e| {
                                format!("key `{key}.json`: not JSON once filled in: {e}")
                            })?;
                            super::HttpBody::Json(j)
                        }
                        (Some(_), Some(_)) => {
                            return Err(format!(
                                "key `{key}.json`: give either `form` or `json`, not both"
                            ));
                        }
                    };
                    if method == "GET" && body != super::HttpBody::None {
                        return Err(format!("key `{key}.method`: a GET request has no body"));
                    }
                    if let Some(bad) = self
                        .success_status
                        .iter()
                        .find(|s| !(100..600).contains(*s))
                    {
                        return Err(format!(
                            "key `{key}.success_status`: {bad} is not an HTTP status"
                        ));
                    }
                    Ok(super::Provider::Http(super::HttpProvider {
                        url,
                        method,
                        headers: self.headers,
                        basic_auth,
                        body,
                        timeout,
                        success_status: self.success_status,
                    }))
                }
                "command" => {
                    unused("url", self.url.is_some())?;
                    let program = self.program.ok_or_else(|| {
                        format!("key `{key}.program`: a command provider needs it")
                    })?;
                    Ok(super::Provider::Command(super::CommandProvider {
                        program,
                        args: self.args,
                        timeout,
                    }))
                }
                other => Err(format!(
                    "key `{key}.kind`: unknown provider {other:?} (known: \"log\", \"http\", \"command\")"
                )),
            }
        }
    }

    fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
        key: &str,
        value: Option<T>,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, String> {
        let v = value.unwrap_or(default);
        if v < min || v > max {
            return Err(format!("key `{key}`: {v} is out of range ({min} to {max})"));
        }
        Ok(v)
    }

    fn millis(
        key: &str,
        value: Option<u64>,
        default: Duration,
        min: u64,
        max: u64,
    ) -> Result<Duration, String> {
        in_range(key, value, default.as_millis() as u64, min, max).map(Duration::from_millis)
    }

    fn secs(
        key: &str,
        value: Option<u64>,
        default: Duration,
        min: u64,
        max: u64,
    ) -> Result<Duration, String> {
        in_range(key, value, default.as_secs(), min, max).map(Duration::from_secs)
    }

    impl File {
        pub fn validate(self) -> Result<super::Config, String> {
            let d = super::Config::default();
            let tls =
                match (self.server.tls_cert, self.server.tls_key) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                    (Some(_), None) => {
                        return Err(
                            "key `server.tls_key`: missing; `server.tls_cert` needs its key".into(),
                        );
                    }
                    (None, Some(_)) => return Err(
                        "key `server.tls_cert`: missing; `server.tls_key` needs its certificate"
                            .into(),
                    ),
                };
            let server = super::Server {
                listen: self.server.listen.unwrap_or(d.server.listen),
                data_dir: self.server.data_dir.unwrap_or(d.server.data_dir),
                tls,
            };
            let l = self.limits;
            let dl = d.limits;
            let limits = super::Limits {
                max_connections: in_range(
                    "limits.max_connections",
                    l.max_connections,
                    dl.max_connections,
                    1,
                    10_000_000,
                )?,
                max_connections_per_address: in_range(
                    "limits.max_connections_per_address",
                    l.max_connections_per_address,
                    dl.max_connections_per_address,
                    1,
                    10_000_000,
                )?,
                max_streams_per_connection: in_range(
                    "limits.max_streams_per_connection",
                    l.max_streams_per_connection,
                    dl.max_streams_per_connection,
                    1,
                    10_000,
                )?,
                max_frame_bytes: in_range(
                    "limits.max_frame_bytes",
                    l.max_frame_bytes,
                    dl.max_frame_bytes,
                    1024,
                    HARD_MAX_FRAME_BYTES as u32,
                )?,
                handshake_timeout: millis(
                    "limits.handshake_timeout_ms",
                    l.handshake_timeout_ms,
                    dl.handshake_timeout,
                    100,
                    600_000,
                )?,
                idle_timeout: millis(
                    "limits.idle_timeout_ms",
                    l.idle_timeout_ms,
                    dl.idle_timeout,
                    1_000,
                    3_600_000,
                )?,
                request_timeout: millis(
                    "limits.request_timeout_ms",
                    l.request_timeout_ms,
                    dl.request_timeout,
                    100,
                    600_000,
                )?,
                shutdown_grace: millis(
                    "limits.shutdown_grace_ms",
                    l.shutdown_grace_ms,
                    dl.shutdown_grace,
                    0,
                    600_000,
                )?,
            };
            let v = self.verification;
            let dv = d.verification;
            match v.provider.as_deref() {
                None | Some("log") => {}
                Some(other) => {
                    return Err(format!(
                        "key `verification.provider`: unknown provider {other:?} (known: \"log\"; \
                         http and command providers are set in [verification.sms] and \
                         [verification.voice])"
                    ));
                }
            }
            let sms = v
                .sms
                .map_or(Ok(Provider::Log), |t| t.validate("verification.sms"))?;
            let voice = v
                .voice
                .map_or(Ok(Provider::Log), |t| t.validate("verification.voice"))?;
            let mut messages = dv.messages.clone();
            for (lang, text) in v.messages {
                if !text.contains("{code}") {
                    return Err(format!(
                        "key `verification.messages.{lang}`: the text must contain {{code}}"
                    ));
                }
                messages.insert(lang.to_ascii_lowercase(), text);
            }
            let mut test_numbers = BTreeMap::new();
            for (number, code) in v.test_numbers {
                let parsed = Number::parse(&number, None)
                    .map_err(|e| format!("key `verification.test_numbers.\"{number}\"`: {e}"))?;
                if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "key `verification.test_numbers.\"{number}\"`: the code must be 6 digits, not {code:?}"
                    ));
                }
                if test_numbers.insert(parsed.clone(), code).is_some() {
                    return Err(format!(
                        "key `verification.test_numbers.\"{number}\"`: {parsed} is listed twice"
                    ));
                }
            }
            let verification = super::Verification {
                sms,
                voice,
                retries: in_range("verification.retries", v.retries, dv.retries, 0, 10)?,
                messages,
                code_ttl: secs(
                    "verification.code_ttl_secs",
                    v.code_ttl_secs,
                    dv.code_ttl,
                    60,
                    86_400,
                )?,
                max_attempts: in_range(
                    "verification.max_attempts",
                    v.max_attempts,
                    dv.max_attempts,
                    1,
                    10,
                )?,
                resend_cooldown: secs(
                    "verification.resend_cooldown_secs",
                    v.resend_cooldown_secs,
                    dv.resend_cooldown,
                    0,
                    86_400,
                )?,
                test_numbers,
                lock_lapse: in_range(
                    "verification.lock_lapse_days",
                    v.lock_lapse_days,
                    dv.lock_lapse.as_secs() / 86_400,
                    0,
                    365,
                )
                .map(|d| Duration::from_secs(d * 86_400))?,
                max_pin_tries: in_range(
                    "verification.max_pin_tries",
                    v.max_pin_tries,
                    dv.max_pin_tries,
                    1,
                    20,
                )?,
                limits: {
                    let l = v.limits;
                    let dl = &dv.limits;
                    let count = |key: &str, value: Option<u32>, default: u32| {
                        in_range(
                            &format!("verification.limits.{key}"),
                            value,
                            default,
                            1,
                            10_000_000,
                        )
                    };
                    if let Some(cc) = l
                        .allowed_countries
                        .iter()
                        .chain(&l.denied_countries)
                        .find(|cc| !(1..=999).contains(*cc))
                    {
                        return Err(format!(
                            "key `verification.limits`: {cc} is not a country calling code (1 to 999)"
                        ));
                    }
                    super::CodeLimits {
                        per_number_10min: count(
                            "per_number_10min",
                            l.per_number_10min,
                            dl.per_number_10min,
                        )?,
                        per_number_hour: count(
                            "per_number_hour",
                            l.per_number_hour,
                            dl.per_number_hour,
                        )?,
                        per_address_hour: count(
                            "per_address_hour",
                            l.per_address_hour,
                            dl.per_address_hour,
                        )?,
                        per_country_day: count(
                            "per_country_day",
                            l.per_country_day,
                            dl.per_country_day,
                        )?,
                        global_day: count("global_day", l.global_day, dl.global_day)?,
                        allowed_countries: l.allowed_countries,
                        denied_countries: l.denied_countries,
                    }
                },
            };
            let m = self.messages;
            let dm = d.messages;
            let max_envelope_bytes = in_range(
                "messages.max_envelope_bytes",
                m.max_envelope_bytes,
                dm.max_envelope_bytes,
                256,
                HARD_MAX_FRAME_BYTES as u32 / 2,
            )?;
            if max_envelope_bytes + 1024 > limits.max_frame_bytes {
                return Err(format!(
                    "key `messages.max_envelope_bytes`: {max_envelope_bytes} does not fit in a frame; \
                     `limits.max_frame_bytes` ({}) must be at least 1024 bytes larger",
                    limits.max_frame_bytes
                ));
            }
            let max_one_time_keys = in_range(
                "messages.max_one_time_keys",
                m.max_one_time_keys,
                dm.max_one_time_keys,
                1,
                10_000,
            )?;
            let messages = super::Messages {
                max_envelope_bytes,
                max_queued_per_device: in_range(
                    "messages.max_queued_per_device",
                    m.max_queued_per_device,
                    dm.max_queued_per_device,
                    1,
                    100_000_000,
                )?,
                ttl: secs(
                    "messages.ttl_secs",
                    m.ttl_secs,
                    dm.ttl,
                    1,
                    10 * 365 * 86_400,
                )?,
                sweep_interval: secs(
                    "messages.sweep_interval_secs",
                    m.sweep_interval_secs,
                    dm.sweep_interval,
                    1,
                    86_400,
                )?,
                delivery_batch: in_range(
                    "messages.delivery_batch",
                    m.delivery_batch,
                    dm.delivery_batch,
                    1,
                    4096,
                )?,
                max_one_time_keys,
                one_time_keys_low: in_range(
                    "messages.one_time_keys_low",
                    m.one_time_keys_low,
                    dm.one_time_keys_low,
                    0,
                    max_one_time_keys,
                )?,
            };
            let storage = super::Storage {
                power_loss_sync: self
                    .storage
                    .power_loss_sync
                    .unwrap_or(d.storage.power_loss_sync),
                min_free_bytes: in_range(
                    "storage.min_free_bytes",
                    self.storage.min_free_bytes,
                    d.storage.min_free_bytes,
                    0,
                    1 << 50,
                )?,
            };
            let discovery = super::Discovery {
                daily_budget: in_range(
                    "discovery.daily_budget",
                    self.discovery.daily_budget,
                    d.discovery.daily_budget,
                    1,
                    10_000_000,
                )?,
                filter_refresh: secs(
                    "discovery.filter_refresh_secs",
                    self.discovery.filter_refresh_secs,
                    d.discovery.filter_refresh,
                    1,
                    86_400,
                )?,
            };
            let metrics = super::Metrics {
                enabled: self.metrics.enabled.unwrap_or(d.metrics.enabled),
                listen: self.metrics.listen.unwrap_or(d.metrics.listen),
            };
            let log = super::Log {
                format: match self.log.format.as_deref() {
                    None => d.log.format,
                    Some("text") => super::LogFormat::Text,
                    Some("json") => super::LogFormat::Json,
                    Some(other) => {
                        return Err(format!(
                            "key `log.format`: {other:?} is not \"text\" or \"json\""
                        ));
                    }
                },
            };
            Ok(super::Config {
                server,
                limits,
                verification,
                messages,
                storage,
                discovery,
                metrics,
                log,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_the_nearest_known_key() {
        let err = Config::parse("[server]\nlisen = \"127.0.0.1:1\"\n").expect_err("unknown key");
        assert!(err.contains("unknown field `lisen`"), "{err}");
        assert!(err.ends_with("did you mean `listen`?"), "{err}");
        let err = Config::parse("[metric]\nenabled = true\n").expect_err("unknown table");
        assert!(err.ends_with("did you mean `metrics`?"), "{err}");
        let err = Config::parse("[limits]\nmax_conections = 5\n").expect_err("unknown key");
        assert!(err.ends_with("did you mean `max_connections`?"), "{err}");
        // Nothing near: no guess.
        let err = Config::parse("[server]\nzzzzzzzz = 1\n").expect_err("unknown key");
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn printed_settings_mask_what_may_be_secret() {
        let c = Config::parse(
            "[verification.test_numbers]\n\"+14155550100\" = \"654321\"\n\
             [verification.sms]\nkind = \"http\"\n\
             url = \"https://user:pw1@gw.example/send/x@y?apikey=pw2\"\n\
             headers = { Authorization = \"Bearer pw3\" }\nform = { key = \"pw4\" }\n\
             [verification.voice]\nkind = \"command\"\nprogram = \"/bin/call\"\nargs = [\"--token=pw5\"]\n",
        )
        .expect("config");
        let masked = c.to_toml(true);
        for secret in ["pw1", "pw2", "pw3", "pw4", "pw5", "654321"] {
            assert!(!masked.contains(secret), "{secret} shown:\n{masked}");
        }
        assert!(
            masked.contains("https://********@gw.example/send/x@y?********"),
            "{masked}"
        );
        let shown = c.to_toml(false);
        assert!(
            ["pw1", "pw2", "pw3", "pw4", "pw5", "654321"]
                .iter()
                .all(|s| shown.contains(s))
        );
    }

    #[test]
    fn effective_settings_read_back_as_the_same_config() {
        let shipped = include_str!("../config/switchboard.toml");
        let c = Config::parse(shipped).expect("shipped");
        assert_eq!(Config::parse(&c.to_toml(false)).expect("printed"), c);
        for example in [
            include_str!("../config/providers/twilio-sms.toml"),
            include_str!("../config/providers/twilio-voice.toml"),
            include_str!("../config/providers/android-sms-gateway.toml"),
            include_str!("../config/providers/gammu-modem.toml"),
        ] {
            let c = Config::parse(example).expect("example");
            assert_eq!(Config::parse(&c.to_toml(false)).expect("printed"), c);
            let masked = c.to_toml(true);
            if let Provider::Http(h) = &c.verification.sms
                && let Some((_, password)) = &h.basic_auth
            {
                assert!(!masked.contains(password.as_str()), "{masked}");
            }
        }
    }

    #[test]
    fn shipped_file_documents_exactly_the_defaults() {
        let shipped = include_str!("../config/switchboard.toml");
        assert_eq!(Config::parse(shipped).unwrap(), Config::default());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    fn check_err(text: &str, needle: &str) {
        let err = Config::parse(text).expect_err(text);
        assert!(
            err.contains(needle),
            "error {err:?} does not mention {needle:?}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        check_err(
            "[limits]\nmax_connections = \"many\"\n",
            "limits.max_connections",
        );
        check_err("[limits]\nmax_conections = 5\n", "max_conections");
        check_err(
            "[limits]\nmax_frame_bytes = 999999999\n",
            "limits.max_frame_bytes",
        );
        check_err("[server]\nlisten = \"nowhere\"\n", "server.listen");
        check_err("[server]\ntls_cert = \"a.pem\"\n", "server.tls_key");
        check_err(
            "[verification]\nprovider = \"pigeon\"\n",
            "verification.provider",
        );
        check_err(
            "[verification.test_numbers]\n\"+1 23\" = \"123456\"\n",
            "+1 23",
        );
        check_err(
            "[verification.test_numbers]\n\"+14155550100\" = \"12\"\n",
            "6 digits",
        );
        check_err("[nonsense]\n", "nonsense");
        check_err("this is not toml", "line 1");
    }

    #[test]
    fn the_provider_examples_in_config_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/providers");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let real = |p: &Provider| !matches!(p, Provider::Log);
            assert!(
                real(&c.verification.sms) || real(&c.verification.voice),
                "{} sets no gateway",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 4);
    }

    #[test]
    fn bad_provider_tables_name_the_key() {
        check_err(
            "[verification.sms]\nkind = \"pigeon\"\n",
            "verification.sms.kind",
        );
        check_err(
            "[verification.sms]\nkind = \"http\"\n",
            "verification.sms.url",
        );
        check_err(
            "[verification.sms]\nkind = \"http\"\nurl = \"ftp://x\"\n",
            "verification.sms.url",
        );
        check_err(
            "[verification.voice]\nkind = \"http\"\nurl = \"http://x\"\njson = \"{nope\"\n",
            "verification.voice.json",
        );
        check_err(
            "[verification.sms]\nkind = \"http\"\nurl = \"http://x\"\nusername = \"u\"\n",
            "verification.sms.username",
        );
        check_err(
            "[verification.sms]\nkind = \"command\"\n",
            "verification.sms.program",
        );
        check_err(
            "[verification.messages]\nde = \"Kein Code\"\n",
            "verification.messages.de",
        );
    }

    #[test]
    fn test_numbers_are_normalised() {
        let c = Config::parse("[verification.test_numbers]\n\"+1 (415) 555-0100\" = \"123456\"\n")
            .unwrap();
        let n = Number::parse("+14155550100", None).unwrap();
        assert_eq!(
            c.verification.test_numbers.get(&n).map(String::as_str),
            Some("123456")
        );
    }
}
