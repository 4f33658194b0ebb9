//! The file as written: every field optional, unknown fields refused.

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
    pub accounts: Accounts,
    pub groups: Groups,
    pub attachments: Attachments,
    pub cluster: Cluster,
    pub metrics: Metrics,
    pub log: Log,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    pub nats: Option<Vec<String>>,
    pub replicas: Option<u64>,
    pub removal_delay_ms: Option<u64>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Accounts {
    pub max_devices: Option<u32>,
    pub companion_lapse_days: Option<u32>,
    pub link_code_ttl_secs: Option<u64>,
    pub link_joins_per_address_hour: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Groups {
    pub max_members: Option<u32>,
    pub changes_per_account_hour: Option<u32>,
    pub max_meta_bytes: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Attachments {
    pub max_bytes: Option<u64>,
    pub max_stored_bytes_per_account: Option<u64>,
    pub max_in_flight_bytes_per_account: Option<u64>,
    pub transfer_window_bytes: Option<u64>,
    pub delete_when_downloaded: Option<bool>,
    pub incomplete_ttl_secs: Option<u64>,
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
    pub key_claims_per_pair_per_hour: Option<u32>,
    pub key_claims_per_account_per_hour: Option<u32>,
    pub envelopes_per_account_minute: Option<u32>,
    pub max_profile_bytes: Option<u32>,
    pub handoff_ms: Option<u64>,
    pub handoff_max_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub udp_buffer_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_connections_per_address: Option<u32>,
    pub ipv6_prefix_len: Option<u8>,
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
                let program = self
                    .program
                    .ok_or_else(|| format!("key `{key}.program`: a command provider needs it"))?;
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

/// The largest daily discovery budget in cluster mode.
const MAX_CLUSTER_BUDGET: u32 = 50_000;

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
        let tls = match (self.server.tls_cert, self.server.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (Some(_), None) => {
                return Err(
                    "key `server.tls_key`: missing; `server.tls_cert` needs its key".into(),
                );
            }
            (None, Some(_)) => {
                return Err(
                    "key `server.tls_cert`: missing; `server.tls_key` needs its certificate".into(),
                );
            }
        };
        let server = super::Server {
            listen: self.server.listen.unwrap_or(d.server.listen),
            data_dir: self.server.data_dir.unwrap_or(d.server.data_dir),
            tls,
            udp_buffer_bytes: in_range(
                "server.udp_buffer_bytes",
                self.server.udp_buffer_bytes,
                d.server.udp_buffer_bytes,
                0,
                1 << 30,
            )?,
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
            ipv6_prefix_len: in_range(
                "limits.ipv6_prefix_len",
                l.ipv6_prefix_len,
                dl.ipv6_prefix_len,
                32,
                128,
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
            key_claims_per_pair_per_hour: in_range(
                "messages.key_claims_per_pair_per_hour",
                m.key_claims_per_pair_per_hour,
                dm.key_claims_per_pair_per_hour,
                1,
                1_000_000,
            )?,
            key_claims_per_account_per_hour: in_range(
                "messages.key_claims_per_account_per_hour",
                m.key_claims_per_account_per_hour,
                dm.key_claims_per_account_per_hour,
                1,
                1_000_000,
            )?,
            envelopes_per_account_minute: in_range(
                "messages.envelopes_per_account_minute",
                m.envelopes_per_account_minute,
                dm.envelopes_per_account_minute,
                1,
                1_000_000_000,
            )?,
            max_profile_bytes: in_range(
                "messages.max_profile_bytes",
                m.max_profile_bytes,
                dm.max_profile_bytes,
                1024,
                512 * 1024,
            )?,
            handoff_window: millis(
                "messages.handoff_ms",
                m.handoff_ms,
                dm.handoff_window,
                0,
                10_000,
            )?,
            handoff_max_bytes: in_range(
                "messages.handoff_max_bytes",
                m.handoff_max_bytes,
                dm.handoff_max_bytes,
                0,
                1 << 40,
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
        let a = &self.accounts;
        let accounts = super::Accounts {
            max_devices: in_range(
                "accounts.max_devices",
                a.max_devices,
                d.accounts.max_devices,
                1,
                64,
            )?,
            companion_lapse: Duration::from_secs(
                u64::from(in_range(
                    "accounts.companion_lapse_days",
                    a.companion_lapse_days,
                    (d.accounts.companion_lapse.as_secs() / 86_400) as u32,
                    1,
                    3_650,
                )?) * 86_400,
            ),
            link_code_ttl: secs(
                "accounts.link_code_ttl_secs",
                a.link_code_ttl_secs,
                d.accounts.link_code_ttl,
                10,
                3_600,
            )?,
            link_joins_per_address_hour: in_range(
                "accounts.link_joins_per_address_hour",
                a.link_joins_per_address_hour,
                d.accounts.link_joins_per_address_hour,
                1,
                1_000_000,
            )?,
        };
        let g = &self.groups;
        let groups = super::Groups {
            max_members: in_range(
                "groups.max_members",
                g.max_members,
                d.groups.max_members,
                2,
                100_000,
            )?,
            changes_per_account_hour: in_range(
                "groups.changes_per_account_hour",
                g.changes_per_account_hour,
                d.groups.changes_per_account_hour,
                1,
                1_000_000,
            )?,
            max_meta_bytes: in_range(
                "groups.max_meta_bytes",
                g.max_meta_bytes,
                d.groups.max_meta_bytes,
                64,
                1 << 20,
            )?,
        };
        let at = &self.attachments;
        let max_bytes = in_range(
            "attachments.max_bytes",
            at.max_bytes,
            d.attachments.max_bytes,
            1024,
            1 << 40,
        )?;
        let attachments = super::Attachments {
            max_bytes,
            max_stored_bytes_per_account: in_range(
                "attachments.max_stored_bytes_per_account",
                at.max_stored_bytes_per_account,
                d.attachments.max_stored_bytes_per_account,
                max_bytes,
                1 << 44,
            )?,
            max_in_flight_bytes_per_account: in_range(
                "attachments.max_in_flight_bytes_per_account",
                at.max_in_flight_bytes_per_account,
                d.attachments.max_in_flight_bytes_per_account,
                max_bytes,
                1 << 44,
            )?,
            transfer_window_bytes: in_range(
                "attachments.transfer_window_bytes",
                at.transfer_window_bytes,
                d.attachments.transfer_window_bytes,
                64 << 10,
                256 << 20,
            )?,
            delete_when_downloaded: at
                .delete_when_downloaded
                .unwrap_or(d.attachments.delete_when_downloaded),
            incomplete_ttl: secs(
                "attachments.incomplete_ttl_secs",
                at.incomplete_ttl_secs,
                d.attachments.incomplete_ttl,
                60,
                30 * 86_400,
            )?,
        };
        let nats = self.cluster.nats.clone().unwrap_or_default();
        for url in &nats {
            let rest = url
                .strip_prefix("nats://")
                .or_else(|| url.strip_prefix("tls://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return Err(format!(
                    "key `cluster.nats`: {url:?} is not a NATS address like \"nats://10.0.0.1:4222\""
                ));
            }
        }
        if !nats.is_empty() && server.tls.is_none() {
            return Err(
                "key `cluster.nats`: cluster mode needs `server.tls_cert` and `server.tls_key`: \
                 every node serves the same certificate, so that clients pin one fingerprint"
                    .into(),
            );
        }
        let c = &self.cluster;
        let login = match (&c.user, &c.password_file) {
            (Some(user), Some(password_file)) => Some(super::NatsLogin {
                user: user.clone(),
                password_file: password_file.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(
                    "keys `cluster.user` and `cluster.password_file` go together (the password \
                     is read from the file, never written in the config)"
                        .into(),
                );
            }
        };
        let client_cert = match (&c.tls_cert, &c.tls_key) {
            (Some(cert), Some(key)) => Some(super::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => return Err("keys `cluster.tls_cert` and `cluster.tls_key` go together".into()),
        };
        if client_cert.is_some() && c.tls_ca.is_none() {
            return Err(
                "key `cluster.tls_cert`: a client certificate for NATS needs `cluster.tls_ca`, \
                 the authority the NATS servers' certificates are checked against"
                    .into(),
            );
        }
        let cluster = super::Cluster {
            login,
            tls_ca: c.tls_ca.clone(),
            client_cert,
            nats,
            replicas: usize::try_from(in_range(
                "cluster.replicas",
                self.cluster.replicas,
                d.cluster.replicas as u64,
                1,
                5,
            )?)
            .unwrap_or(d.cluster.replicas),
            removal_delay: millis(
                "cluster.removal_delay_ms",
                self.cluster.removal_delay_ms,
                d.cluster.removal_delay,
                0,
                1_000,
            )?,
        };
        // The cluster keeps a day's looked-up numbers in one entry (under NATS's 1 MiB
        // message limit at this many).
        if cluster.enabled() && discovery.daily_budget > MAX_CLUSTER_BUDGET {
            return Err(format!(
                "key `discovery.daily_budget`: at most {MAX_CLUSTER_BUDGET} in cluster mode"
            ));
        }
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
            accounts,
            groups,
            attachments,
            cluster,
            metrics,
            log,
        })
    }
}
