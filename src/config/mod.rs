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
    pub accounts: Accounts,
    pub groups: Groups,
    pub attachments: Attachments,
    pub cluster: Cluster,
    pub metrics: Metrics,
    pub log: Log,
}

/// Cluster mode: several nodes over one NATS JetStream cluster instead of each
/// on its own sled database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The NATS servers to connect to (`nats://host:port`; the client learns the
    /// other members from them). Empty: one node on its own sled database.
    pub nats: Vec<String>,
    /// Replicas of each stream and bucket the node creates (1 to 5; 3 survives
    /// the loss of one member).
    pub replicas: usize,
    /// Acknowledged queue items are removed this long after their ack, together (one
    /// purge of the device's queue for several acks instead of a delete per item).
    /// Zero: at once.
    pub removal_delay: Duration,
    /// The NATS user the node logs in as, and the file holding its password.
    pub login: Option<NatsLogin>,
    /// The authority the NATS servers' certificates are checked against: set, the
    /// node talks to NATS over TLS only.
    pub tls_ca: Option<PathBuf>,
    /// The node's own certificate for NATS, where the servers ask for one.
    pub client_cert: Option<TlsFiles>,
}

/// A NATS user and where its password is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsLogin {
    pub user: String,
    pub password_file: PathBuf,
}

impl Cluster {
    /// Whether the node runs on the cluster.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }
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

/// Accounts and their devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accounts {
    /// Devices one account may have, the primary (the phone that registered the
    /// number) included.
    pub max_devices: u32,
    /// A linked device (not the primary) that stays away this long is unlinked.
    pub companion_lapse: Duration,
    /// How long a link code works.
    pub link_code_ttl: Duration,
    /// Link codes one IP address (an IPv6 network) may try to join with in an hour.
    pub link_joins_per_address_hour: u32,
}

/// Groups: their size and how often their members may change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    /// Members one group may have.
    pub max_members: u32,
    /// Group creations and membership changes one account may make in an hour.
    pub changes_per_account_hour: u32,
    /// Bytes of a group's encrypted name, description and picture reference.
    pub max_meta_bytes: u32,
}

/// Attachments: blobs of client-encrypted files, under the data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachments {
    /// The largest attachment, in bytes (of ciphertext, as the node sees it).
    pub max_bytes: u64,
    /// Bytes of attachments one account may have stored at once (whole or not).
    pub max_stored_bytes_per_account: u64,
    /// Bytes one account may be uploading at once.
    pub max_in_flight_bytes_per_account: u64,
    /// The flow-control window of a connection while it moves an attachment (each
    /// way): what may be in flight unacknowledged. Other connections keep windows
    /// of a few request frames.
    pub transfer_window_bytes: u64,
    /// Drop an attachment once every device it was for downloaded it (else it stays
    /// until `messages.ttl_secs`).
    pub delete_when_downloaded: bool,
    /// An upload left unfinished this long is dropped.
    pub incomplete_ttl: Duration,
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
    /// One-time keys one account may claim of another's in an hour; past it, bundles
    /// come with the fallback key only (so one client cannot drain a victim's keys).
    pub key_claims_per_pair_per_hour: u32,
    /// One-time keys all accounts together may claim of one account in an hour.
    pub key_claims_per_account_per_hour: u32,
    /// Envelopes one account (all its devices) may send in a minute; a group message
    /// counts once per device it goes to. Past it, sends are refused (`RateLimited`)
    /// as the budget refills.
    pub envelopes_per_account_minute: u32,
    /// Largest end-to-end encrypted profile (name, about line, photo) an account may
    /// store, in bytes.
    pub max_profile_bytes: u32,
    /// How long a message for an online device is held in memory before it is
    /// written; acknowledged within it, it is never written. Zero writes every
    /// message at once.
    pub handoff_window: Duration,
    /// Bytes held in memory for the hand-off, beyond which the oldest are written.
    pub handoff_max_bytes: u64,
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
    /// Receive and send buffer asked for the UDP socket (0: the system default). The
    /// kernel caps it at `net.core.rmem_max` / `wmem_max`.
    pub udp_buffer_bytes: u64,
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
    /// IPv6 clients count per network of this prefix length (one subscriber usually
    /// holds a whole /64, so counting full addresses would let one take every slot).
    pub ipv6_prefix_len: u8,
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
                udp_buffer_bytes: 4 * 1024 * 1024,
            },
            limits: Limits {
                max_connections: 10_000,
                max_connections_per_address: 256,
                ipv6_prefix_len: 64,
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
                key_claims_per_pair_per_hour: 10,
                key_claims_per_account_per_hour: 200,
                envelopes_per_account_minute: 60_000,
                max_profile_bytes: 128 * 1024,
                handoff_window: Duration::from_millis(500),
                handoff_max_bytes: 64 * 1024 * 1024,
            },
            storage: Storage {
                power_loss_sync: true,
                min_free_bytes: 64 * 1024 * 1024,
            },
            discovery: Discovery {
                daily_budget: 5_000,
                filter_refresh: Duration::from_secs(10),
            },
            accounts: Accounts {
                max_devices: 5,
                companion_lapse: Duration::from_secs(30 * 86_400),
                link_code_ttl: Duration::from_secs(300),
                link_joins_per_address_hour: 20,
            },
            groups: Groups {
                max_members: 1024,
                changes_per_account_hour: 60,
                max_meta_bytes: 16 * 1024,
            },
            attachments: Attachments {
                max_bytes: 100 << 20,
                max_stored_bytes_per_account: 2 << 30,
                max_in_flight_bytes_per_account: 512 << 20,
                transfer_window_bytes: 1 << 20,
                delete_when_downloaded: true,
                incomplete_ttl: Duration::from_secs(86_400),
            },
            cluster: Cluster {
                login: None,
                tls_ca: None,
                client_cert: None,
                nats: Vec::new(),
                replicas: 3,
                removal_delay: Duration::from_millis(50),
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
mod effective;

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
mod raw;

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
        let shipped = include_str!("../../config/switchboard.toml");
        let c = Config::parse(shipped).expect("shipped");
        assert_eq!(Config::parse(&c.to_toml(false)).expect("printed"), c);
        for example in [
            include_str!("../../config/providers/twilio-sms.toml"),
            include_str!("../../config/providers/twilio-voice.toml"),
            include_str!("../../config/providers/android-sms-gateway.toml"),
            include_str!("../../config/providers/gammu-modem.toml"),
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
        let shipped = include_str!("../../config/switchboard.toml");
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
    fn nats_login_and_tls_settings_go_together_and_read_back() {
        let base = "[server]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
                    [cluster]\nnats = [\"tls://10.0.0.1:4222\"]\n";
        check_err(&format!("{base}user = \"sb\"\n"), "cluster.password_file");
        check_err(
            &format!("[discovery]\ndaily_budget = 60000\n{base}"),
            "discovery.daily_budget",
        );
        check_err(&format!("{base}password_file = \"p\"\n"), "cluster.user");
        check_err(&format!("{base}tls_cert = \"n.pem\"\n"), "cluster.tls_key");
        check_err(
            &format!("{base}tls_cert = \"n.pem\"\ntls_key = \"n.key\"\n"),
            "cluster.tls_ca",
        );
        let c = Config::parse(&format!(
            "{base}user = \"sb\"\npassword_file = \"/etc/sb/nats-password\"\n\
             tls_ca = \"/etc/sb/ca.pem\"\ntls_cert = \"n.pem\"\ntls_key = \"n.key\"\n"
        ))
        .expect("config");
        let login = c.cluster.login.as_ref().expect("login");
        assert_eq!(login.user, "sb");
        assert_eq!(c.cluster.tls_ca, Some(PathBuf::from("/etc/sb/ca.pem")));
        assert!(c.cluster.client_cert.is_some());
        assert_eq!(Config::parse(&c.to_toml(false)).expect("printed"), c);
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
        check_err(
            "[server]\nudp_buffer_bytes = 2147483648\n",
            "server.udp_buffer_bytes",
        );
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
        check_err(
            "[cluster]\nremoval_delay_ms = 5000\n",
            "cluster.removal_delay_ms",
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
