//! Load generator: `cargo bench --bench load -- <scenario> [options]`.
//!
//! The node runs as a separate release process on 127.0.0.1 (its CPU and memory are
//! its own, read from /proc), driven by many client connections multiplexed over a few
//! QUIC endpoints in this process. Payloads are opaque pre-made bytes: the node never
//! decrypts, so this measures the node, not the client's crypto. Each scenario also
//! measures its bare limit in the same run (a minimal quinn relay with no storage and
//! no auth, or raw sled) and prints a table plus one JSON line per figure.
//! Every loop is bounded in count and in time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use switchboard::client::{Client, ClientError};
use switchboard::phone::Number;
use switchboard::proto::{Channel, DeviceEnvelope, Item, Outgoing};
use switchboard::tls::{Credentials, Fingerprint};
use tokio::sync::Semaphore;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const CODE: &str = "123456";

#[derive(Parser)]
#[command(about = "Switchboard load generator")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Ignored: cargo passes `--bench` to every bench target.
    #[arg(long, hide = true, global = true)]
    bench: bool,
    /// Extra TOML for the node's config file, e.g. `[storage]\npower_loss_sync = false`,
    /// to measure what a setting costs.
    #[arg(long, global = true)]
    node_config: Option<String>,
}

/// `--node-config`, for [`start_node`].
static NODE_CONFIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Scenario {
    /// Online pairs relaying 256-byte envelopes; the same over bare quinn.
    Relay {
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Sends in flight per device at saturation.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// Idle authenticated devices: node memory per connection and handshakes per second.
    Connections {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// QUIC endpoints (UDP sockets) the devices share.
        #[arg(long, default_value_t = 8)]
        endpoints: usize,
    },
    /// Envelopes queued for an offline device, then drained when it connects.
    Backlog {
        #[arg(long, default_value_t = 100_000)]
        envelopes: usize,
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// Envelopes through the store (append, then acknowledge), against raw sled.
    Storage {
        #[arg(long, default_value_t = 1_000_000)]
        envelopes: usize,
        #[arg(long, default_value_t = 1_000_000)]
        accounts: usize,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// How many times the volume goes through the queues (at least 2).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=20))]
        volumes: u64,
    },
    /// A 1,000-contact discovery sync against indexes of 100,000 and 1,000,000 accounts.
    Discovery {
        /// Index sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 1_000_000])]
        accounts: Vec<usize>,
        #[arg(long, default_value_t = 1_000)]
        contacts: usize,
    },
    /// Backup and restore of a store with queued envelopes, against raw sled
    /// (iterate every tree into a file; insert it all into a new database).
    Backup {
        #[arg(long, default_value_t = 200_000)]
        envelopes: usize,
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// A backlog drained through the client library (decrypted, written to the
    /// history, acknowledged), beside a bare vodozemac decrypt loop over the same
    /// envelopes.
    Drain {
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        #[arg(long, default_value_t = 10)]
        senders: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Authenticated reconnects per second (connect, WhoAmI, close): resumed TLS
    /// sessions, full handshakes, and bare quinn handshakes.
    Reconnect {
        #[arg(long, default_value_t = 64)]
        devices: usize,
        /// Reconnect loops running at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
    /// Internal: the bare quinn relay, run as its own process.
    #[command(hide = true)]
    BareServer,
}

fn main() {
    let args = Args::parse();
    let _ = NODE_CONFIG.set(args.node_config.clone().unwrap_or_default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match args.scenario {
            Scenario::Relay {
                pairs,
                window,
                duration,
                size,
            } => relay::run(pairs, window, Duration::from_secs(duration), size).await,
            Scenario::Connections { devices, endpoints } => {
                connections::run(devices, endpoints).await
            }
            Scenario::Backlog { envelopes, size } => backlog::run(envelopes, size).await,
            Scenario::Discovery { accounts, contacts } => discovery::run(&accounts, contacts).await,
            Scenario::Storage {
                envelopes,
                accounts,
                size,
                volumes,
            } => storage::run(envelopes, accounts, size, volumes),
            Scenario::Backup {
                envelopes,
                accounts,
                size,
            } => backup::run(envelopes, accounts, size),
            Scenario::Drain {
                messages,
                senders,
                size,
            } => drain::run(messages, senders, size).await,
            Scenario::Reconnect {
                devices,
                concurrency,
                duration,
            } => reconnect::run(devices, concurrency, Duration::from_secs(duration)).await,
            Scenario::BareServer => bare::serve().await,
        }
    });
    if let Err(e) = result {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, String>;

#[path = "load/drain.rs"]
mod drain;
#[path = "load/reconnect.rs"]
mod reconnect;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------
// Reporting

/// One figure, printed as a table row and a JSON line.
struct Figure {
    scenario: &'static str,
    metric: String,
    unit: &'static str,
    node: f64,
    limit: Option<f64>,
}

fn report(figures: &[Figure], notes: &[String]) {
    println!();
    println!(
        "{:<12} {:<44} {:>14} {:>14} {:>8}",
        "scenario", "metric", "switchboard", "limit", "ratio"
    );
    for f in figures {
        let limit = f.limit.map(|l| format!("{l:.1}")).unwrap_or("-".into());
        let ratio = f
            .limit
            .filter(|l| *l != 0.0)
            .map(|l| format!("{:.2}", f.node / l))
            .unwrap_or("-".into());
        println!(
            "{:<12} {:<44} {:>14.1} {:>14} {:>8}",
            f.scenario,
            format!("{} ({})", f.metric, f.unit),
            f.node,
            limit,
            ratio
        );
    }
    for note in notes {
        println!("  {note}");
    }
    for f in figures {
        let json = serde_json::json!({
            "scenario": f.scenario,
            "metric": f.metric,
            "unit": f.unit,
            "switchboard": f.node,
            "limit": f.limit,
            "ratio": f.limit.filter(|l| *l != 0.0).map(|l| f.node / l),
        });
        println!("{json}");
    }
}

// ---------------------------------------------------------------------------------
// Processes under test

/// CPU time (user + system) and resident memory of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ")".
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn rss_bytes(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

/// A child process that printed `listening on ADDR` (and maybe more lines).
struct Server {
    child: Child,
    addr: String,
    lines: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(
        mut command: Command,
        dir: Option<tempfile::TempDir>,
        extra_lines: usize,
    ) -> Result<Server> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .map_err(err)?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::new();
        for _ in 0..=extra_lines {
            let mut line = String::new();
            reader.read_line(&mut line).map_err(err)?;
            lines.push(line.trim().to_string());
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        let addr = lines[0]
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("server did not start: {lines:?}"))?
            .to_string();
        Ok(Server {
            child,
            addr,
            lines,
            _dir: dir,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release node with `numbers` as test numbers and limits opened up for load.
fn start_node(numbers: &[Number], extra: &str) -> Result<(Server, Fingerprint)> {
    start_node_lines(numbers, extra, 1)
}

/// [`start_node`] for a config that makes the node print `extra_lines` lines after
/// `listening on` (1: the fingerprint; 2: also the metrics address).
fn start_node_lines(
    numbers: &[Number],
    extra: &str,
    extra_lines: usize,
) -> Result<(Server, Fingerprint)> {
    let dir = tempfile::tempdir().map_err(err)?;
    let mut config = String::from(
        "[limits]\nmax_connections = 1000000\nmax_connections_per_address = 1000000\n\
         idle_timeout_ms = 120000\n",
    );
    config.push_str("[verification]\nresend_cooldown_secs = 0\n");
    config.push_str(extra);
    config.push('\n');
    config.push_str(NODE_CONFIG.get().map_or("", String::as_str));
    config.push_str("\n[verification.test_numbers]\n");
    for n in numbers {
        config.push_str(&format!("\"{n}\" = \"{CODE}\"\n"));
    }
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).map_err(err)?;
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "warn");
    let server = Server::spawn(command, Some(dir), extra_lines)?;
    let fp = server.lines[1]
        .strip_prefix("fingerprint ")
        .ok_or("no fingerprint line")?
        .parse()
        .map_err(err)?;
    Ok((server, fp))
}

fn start_bare() -> Result<(Server, Vec<u8>)> {
    let exe = std::env::current_exe().map_err(err)?;
    let mut command = Command::new(exe);
    command.arg("bare-server");
    let server = Server::spawn(command, None, 1)?;
    let cert = server.lines[1]
        .strip_prefix("cert ")
        .and_then(|h| hex::decode(h).ok())
        .ok_or("bare server printed no certificate")?;
    Ok((server, cert))
}

/// Test numbers for `n` devices: +1 415 2xx xxxx.
fn numbers(n: usize) -> Vec<Number> {
    (0..n)
        .map(|i| {
            Number::parse_e164(&format!("+1415{:07}", 2_000_000 + i)).expect("valid bench number")
        })
        .collect()
}

/// A registered device of the load generator.
struct Device {
    number: Number,
    creds: Credentials,
    device_id: u32,
}

/// Registers every number (on its own connection, `concurrency` at a time); returns
/// the devices and the elapsed time.
async fn register_all(
    addr: &str,
    fp: Fingerprint,
    numbers: &[Number],
    endpoints: &[quinn::Endpoint],
    concurrency: usize,
) -> Result<(Vec<Device>, Duration)> {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, number) in numbers.iter().cloned().enumerate() {
        let gate = gate.clone();
        let endpoint = endpoints[i % endpoints.len()].clone();
        let addr = addr.to_string();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            let (creds, _) = Credentials::generate_device().map_err(err)?;
            let n = number.to_string();
            let step = |what: &'static str| {
                let n = n.clone();
                move |e: ClientError| format!("{what} {n}: {e}")
            };
            // A handshake can be lost when thousands are in flight on a 2-core box;
            // retry a bounded number of times before giving up on the run.
            let mut attempt = 0;
            let client = loop {
                match Client::connect_via(&endpoint, &addr, &creds, Some(fp)).await {
                    Ok(c) => break c,
                    Err(e) if attempt >= 3 => return Err(step("connecting")(e)),
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                }
            };
            let registered = tokio::time::timeout(Duration::from_secs(30), async {
                client
                    .request_code(&number, Channel::Sms, "en")
                    .await
                    .map_err(step("requesting a code for"))?;
                client
                    .verify_code(&number, CODE)
                    .await
                    .map_err(step("verifying"))
            })
            .await
            .map_err(|_| format!("registering {number} timed out"))?;
            let reg = registered?;
            client.close().await;
            Ok::<_, String>((
                i,
                Device {
                    number,
                    creds,
                    device_id: reg.device_id,
                },
            ))
        });
    }
    let mut devices: Vec<Option<Device>> = (0..numbers.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, d) = done.map_err(err)??;
        devices[i] = Some(d);
    }
    let devices = devices.into_iter().flatten().collect();
    Ok((devices, started.elapsed()))
}

/// The load generator's client endpoints. Their sockets get the node's default UDP
/// buffers, like the node and the bare relay, so that no side drops for want of them.
fn endpoints(n: usize) -> Result<Vec<quinn::Endpoint>> {
    (0..n.max(1))
        .map(|_| udp_endpoint("0.0.0.0:0", None))
        .collect()
}

/// A quinn endpoint on a socket with the node's default UDP buffer size.
fn udp_endpoint(addr: &str, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let buffer = switchboard::config::Config::default()
        .server
        .udp_buffer_bytes as usize;
    let (endpoint, _) =
        switchboard::quic::endpoint(addr.parse().map_err(err)?, buffer, server).map_err(err)?;
    Ok(endpoint)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

/// The clock that phase seconds are counted on.
static BENCH_CLOCK: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Nanoseconds since the run started, for latency stamps inside payloads.
fn stamp(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

fn payload(base: Instant, size: usize) -> Vec<u8> {
    let mut body = vec![0xA5u8; size.max(8)];
    body[..8].copy_from_slice(&stamp(base).to_le_bytes());
    body
}

fn latency_of(base: Instant, body: &[u8]) -> Option<u64> {
    let sent = u64::from_le_bytes(*body.first_chunk::<8>()?);
    Some(stamp(base).saturating_sub(sent))
}

/// What receivers record while a phase runs.
#[derive(Default)]
struct Tally {
    measuring: AtomicBool,
    delivered: AtomicU64,
    /// When the measured phase started, as a [`stamp`] of the bench's clock (read on
    /// every delivery, so an atomic rather than a lock).
    started_ns: AtomicU64,
    /// (second of the phase it arrived in, latency in ns)
    latencies: Mutex<Vec<(u32, u64)>>,
}

/// A phase's latencies: all of them sorted, and the p99 of each second.
struct Latencies {
    sorted: Vec<u64>,
    p99_per_second: Vec<f64>,
}

impl Tally {
    fn record(&self, latency: Option<u64>) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let since = stamp(*BENCH_CLOCK).saturating_sub(self.started_ns.load(Ordering::Relaxed));
        let second = (since / 1_000_000_000) as u32;
        if let Some(l) = latency
            && let Ok(mut v) = self.latencies.lock()
        {
            v.push((second, l));
        }
    }

    /// Runs a measured phase of `duration`: returns delivered/s and the latencies.
    async fn phase(&self, duration: Duration) -> (f64, Latencies) {
        self.delivered.store(0, Ordering::Relaxed);
        if let Ok(mut v) = self.latencies.lock() {
            v.clear();
        }
        let started = Instant::now();
        self.started_ns
            .store(stamp(*BENCH_CLOCK), Ordering::Relaxed);
        self.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(duration).await;
        self.measuring.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let rate = self.delivered.load(Ordering::Relaxed) as f64 / elapsed;
        let all = self.latencies.lock().map(|v| v.clone()).unwrap_or_default();
        let seconds = all.iter().map(|&(s, _)| s as usize + 1).max().unwrap_or(0);
        let mut buckets = vec![Vec::new(); seconds];
        for &(s, l) in &all {
            buckets[s as usize].push(l);
        }
        let p99_per_second = buckets
            .iter_mut()
            .map(|b| {
                b.sort_unstable();
                percentile(b, 0.99)
            })
            .collect();
        let mut sorted: Vec<u64> = all.into_iter().map(|(_, l)| l).collect();
        sorted.sort_unstable();
        (
            rate,
            Latencies {
                sorted,
                p99_per_second,
            },
        )
    }
}

/// How long sends took to be answered, and how many failed.
#[derive(Default)]
struct Sends {
    failed: AtomicU64,
    micros: Mutex<Vec<u64>>,
}

impl Sends {
    fn record(&self, took: Duration, ok: bool) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut v) = self.micros.lock() {
            v.push(took.as_micros() as u64);
        }
    }

    /// "n sends, f failed, answered in p50 / p99 / max ms".
    fn summary(&self) -> String {
        let mut v = self.micros.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_unstable();
        format!(
            "{} sends, {} failed, answered in p50 {:.1} / p99 {:.1} / max {:.1} ms",
            v.len(),
            self.failed.load(Ordering::Relaxed),
            percentile(&v, 0.5) / 1e3,
            percentile(&v, 0.99) / 1e3,
            v.last().copied().unwrap_or(0) as f64 / 1e3
        )
    }
}

/// How senders pace themselves.
#[derive(Clone, Copy)]
enum Pace {
    /// `window` sends in flight per device, back to back.
    Saturate { window: usize },
    /// Open loop: one send every `interval` per device, at most `window` in flight.
    Rate { interval: Duration, window: usize },
}

mod relay {
    use super::*;

    /// Results of one system (node or bare) at saturation and at half load.
    struct Run {
        saturated: f64,
        half_rate: f64,
        latencies: Latencies,
        cpu_per_message_us: f64,
        /// Cores used while saturated and at half load: (server, load generator).
        saturated_cores: (f64, f64),
        half_load_cores: (f64, f64),
        /// The saturated phase's sends (with warm-up and drain).
        sends: String,
        /// The node's `switchboard_handoff_items_total` by outcome, over the whole run.
        handoff: Vec<(String, f64)>,
        /// What went over the wire per delivered message while saturated.
        wire: String,
    }

    /// A load generator's connection to the system under test.
    trait Wire {
        fn quic(&self) -> &quinn::Connection;
    }

    impl Wire for Client {
        fn quic(&self) -> &quinn::Connection {
            self.connection()
        }
    }

    impl Wire for quinn::Connection {
        fn quic(&self) -> &quinn::Connection {
            self
        }
    }

    /// The generator's connections' statistics, summed: what the server sent is what
    /// they received.
    #[derive(Default, Clone, Copy)]
    struct WireCount {
        server_datagrams: u64,
        client_datagrams: u64,
        server_acks: u64,
        server_stream_frames: u64,
        server_flow_frames: u64,
        client_acks: u64,
        /// STOP_SENDING, RESET_STREAM, PING, blocked and other control frames.
        other: u64,
    }

    impl WireCount {
        fn of<C: Wire>(clients: &[Arc<C>]) -> Self {
            let mut c = Self::default();
            for client in clients {
                let s = client.quic().stats();
                c.server_datagrams += s.udp_rx.datagrams;
                c.client_datagrams += s.udp_tx.datagrams;
                c.server_acks += s.frame_rx.acks;
                c.server_stream_frames += s.frame_rx.stream;
                c.server_flow_frames +=
                    s.frame_rx.max_data + s.frame_rx.max_stream_data + s.frame_rx.max_streams_bidi;
                c.client_acks += s.frame_tx.acks;
                let f = s.frame_rx;
                c.other += f.ping
                    + f.immediate_ack
                    + f.ack_frequency
                    + f.stream_data_blocked
                    + f.data_blocked
                    + f.streams_blocked_bidi
                    + f.new_connection_id
                    + f.reset_stream
                    + f.stop_sending;
            }
            c
        }

        /// Per message delivered between `self` (earlier) and `later`.
        fn per_message(&self, later: &Self, messages: f64) -> String {
            let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / messages.max(1.0);
            format!(
                "per message: server sent {:.2} datagrams ({:.2} ACK, {:.2} STREAM, {:.2} flow-control frames, {:.2} other frames), received {:.2} ({:.2} ACK frames)",
                per(self.server_datagrams, later.server_datagrams),
                per(self.server_acks, later.server_acks),
                per(self.server_stream_frames, later.server_stream_frames),
                per(self.server_flow_frames, later.server_flow_frames),
                per(self.other, later.other),
                per(self.client_datagrams, later.client_datagrams),
                per(self.client_acks, later.client_acks),
            )
        }
    }

    /// The hand-off counters from the node's metrics endpoint.
    fn handoff_counts(url: &str) -> Vec<(String, f64)> {
        let Ok(mut response) = ureq::get(url).call() else {
            return Vec::new();
        };
        let Ok(text) = response.body_mut().read_to_string() else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("switchboard_handoff_items_total{outcome=\"")?;
                let (outcome, value) = rest.split_once("\"} ")?;
                Some((outcome.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    pub async fn run(pairs: usize, window: usize, duration: Duration, size: usize) -> Result<()> {
        let pairs = pairs.max(1);
        println!(
            "relay: {pairs} pairs, window {window}, {size}-byte envelopes, {duration:?} per phase"
        );
        let node = node_run(pairs, window, duration, size).await?;
        // The bare relay's latency is measured at the node's half load, the same
        // absolute rate, so the two latencies compare like with like.
        let bare = bare_run(pairs, window, duration, size, node.half_rate).await?;
        let p = |v: &[u64], q| percentile(v, q) / 1000.0;
        let figures = vec![
            Figure {
                scenario: "relay",
                metric: format!("delivered messages/s, {pairs} pairs, saturated"),
                unit: "msg/s",
                node: node.saturated,
                limit: Some(bare.saturated),
            },
            Figure {
                scenario: "relay",
                metric: "offered load for the latency phase".into(),
                unit: "msg/s",
                node: node.half_rate,
                limit: Some(bare.half_rate),
            },
            Figure {
                scenario: "relay",
                metric: "latency p50 at the node's half load".into(),
                unit: "µs",
                node: p(&node.latencies.sorted, 0.50),
                limit: Some(p(&bare.latencies.sorted, 0.50)),
            },
            Figure {
                scenario: "relay",
                metric: "latency p99 at the node's half load".into(),
                unit: "µs",
                node: p(&node.latencies.sorted, 0.99),
                limit: Some(p(&bare.latencies.sorted, 0.99)),
            },
            Figure {
                scenario: "relay",
                metric: "latency p99.9 at the node's half load".into(),
                unit: "µs",
                node: p(&node.latencies.sorted, 0.999),
                limit: Some(p(&bare.latencies.sorted, 0.999)),
            },
            Figure {
                scenario: "relay",
                metric: "server CPU per delivered message".into(),
                unit: "µs",
                node: node.cpu_per_message_us,
                limit: Some(bare.cpu_per_message_us),
            },
        ];
        let mut notes = vec![
            "limit: bare quinn relay (same streams and frames, same UDP buffers and ACK frequency; no storage, no auth, no acks, no receipts)".to_string(),
            "switchboard answers a send once every recipient device acknowledged it or it is durable (group commit), and answers every delivery with a receipt".to_string(),
        ];
        for (name, r) in [("switchboard", &node), ("bare quinn", &bare)] {
            notes.push(format!(
                "{name} saturated: cores used: server {:.2}, load generator {:.2}; {}",
                r.saturated_cores.0, r.saturated_cores.1, r.sends
            ));
            notes.push(format!("{name} saturated, {}", r.wire));
            let per_second: Vec<String> = r
                .latencies
                .p99_per_second
                .iter()
                .map(|ns| format!("{:.1}", ns / 1e6))
                .collect();
            notes.push(format!(
                "{name} at half load: p99 of each second (ms) [{}]; cores used: server {:.2}, load generator {:.2}",
                per_second.join(", "),
                r.half_load_cores.0,
                r.half_load_cores.1
            ));
        }
        if !node.handoff.is_empty() {
            let counts: Vec<String> = node
                .handoff
                .iter()
                .map(|(outcome, n)| format!("{outcome} {n}"))
                .collect();
            notes.push(format!(
                "hand-off (messages and receipts held in memory), whole run: {}",
                counts.join(", ")
            ));
        }
        report(&figures, &notes);
        Ok(())
    }

    async fn node_run(pairs: usize, window: usize, duration: Duration, size: usize) -> Result<Run> {
        let nums = numbers(2 * pairs);
        let (server, fp) = start_node_lines(
            &nums,
            "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"",
            2,
        )?;
        let metrics_url = server.lines[2]
            .strip_prefix("metrics on ")
            .ok_or("no metrics line")?
            .to_string();
        let eps = endpoints(4)?;
        let (devices, took) = register_all(&server.addr, fp, &nums, &eps, 64).await?;
        println!(
            "  node: registered {} devices in {:.1}s",
            devices.len(),
            took.as_secs_f64()
        );
        let base = Instant::now();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let client = Client::connect_via(&eps[i % eps.len()], &server.addr, &d.creds, Some(fp))
                .await
                .map_err(err)?;
            clients.push(Arc::new(client));
        }
        // Receivers: every device subscribes and acknowledges each push as it comes.
        // (Acknowledging all pushes already there in one `Ack`, with
        // `Subscription::ready`, made no difference we could measure: 0.38-0.46 of
        // bare quinn in four runs, 0.43 in a run of the same hour without it.)
        let mut receivers = tokio::task::JoinSet::new();
        for client in &clients {
            let mut sub = client.subscribe().await.map_err(err)?;
            let (tally, stop) = (tally.clone(), stop.clone());
            receivers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Ok(Some(first))) =
                        tokio::time::timeout(Duration::from_millis(500), sub.next()).await
                    else {
                        continue;
                    };
                    let mut seqs = Vec::with_capacity(first.items.len());
                    for d in &first.items {
                        seqs.push(d.seq);
                        if let Item::Message(m) = &d.item {
                            tally.record(latency_of(base, &m.body));
                        }
                    }
                    if !seqs.is_empty() && sub.ack(seqs).await.is_err() {
                        break;
                    }
                }
            });
        }
        let send_one = {
            let devices: Arc<Vec<(String, u32)>> = Arc::new(
                devices
                    .iter()
                    .map(|d| (d.number.to_string(), d.device_id))
                    .collect(),
            );
            move |client: Arc<Client>, me: usize| {
                let devices = devices.clone();
                async move {
                    let partner = me ^ 1;
                    let (to, device_id) = devices[partner].clone();
                    let outgoing = Outgoing {
                        id: switchboard::client::e2e::new_message_id(),
                        to,
                        envelopes: vec![DeviceEnvelope {
                            device_id,
                            body: payload(base, size),
                        }],
                    };
                    client.send(outgoing).await.is_ok()
                }
            }
        };
        let pid = server.pid();
        let mut run = measure(&clients, &tally, window, duration, pid, None, send_one).await;
        stop.store(true, Ordering::Relaxed);
        while receivers.join_next().await.is_some() {}
        run.handoff = handoff_counts(&metrics_url);
        Ok(run)
    }

    async fn bare_run(
        pairs: usize,
        window: usize,
        duration: Duration,
        size: usize,
        half_rate: f64,
    ) -> Result<Run> {
        let (server, cert) = start_bare()?;
        let eps = endpoints(4)?;
        let base = Instant::now();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        let mut receivers = tokio::task::JoinSet::new();
        for i in 0..2 * pairs {
            let conn = bare::connect(&eps[i % eps.len()], &server.addr, &cert).await?;
            let mut inbox = bare::subscribe(&conn, i as u32).await?;
            let (tally, stop) = (tally.clone(), stop.clone());
            receivers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Ok(Some(body))) = tokio::time::timeout(
                        Duration::from_millis(500),
                        switchboard::proto::frame::read::<Vec<u8>, _>(&mut inbox, 1 << 20),
                    )
                    .await
                    else {
                        continue;
                    };
                    tally.record(latency_of(base, &body));
                }
            });
            clients.push(Arc::new(conn));
        }
        let send_one = move |conn: Arc<quinn::Connection>, me: usize| async move {
            bare::send(&conn, (me ^ 1) as u32, payload(base, size))
                .await
                .is_ok()
        };
        let pid = server.pid();
        let run = measure(
            &clients,
            &tally,
            window,
            duration,
            pid,
            Some(half_rate),
            send_one,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        while receivers.join_next().await.is_some() {}
        Ok(run)
    }

    /// Saturation phase, then a latency phase at `half_rate` (default: half the
    /// measured saturation); both bounded by `duration`.
    async fn measure<C, F, Fut>(
        clients: &[Arc<C>],
        tally: &Arc<Tally>,
        window: usize,
        duration: Duration,
        pid: u32,
        half_rate: Option<f64>,
        send_one: F,
    ) -> Run
    where
        C: Wire + Send + Sync + 'static,
        F: Fn(Arc<C>, usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        // Saturation.
        let phase_stop = Arc::new(AtomicBool::new(false));
        let sends = Arc::new(Sends::default());
        let senders = spawn_senders(
            clients,
            &phase_stop,
            Pace::Saturate { window },
            &sends,
            send_one.clone(),
        );
        tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
        let me = std::process::id();
        let (cpu0, generator0, wall0) = (cpu_seconds(pid), cpu_seconds(me), Instant::now());
        let wire0 = WireCount::of(clients);
        let (saturated, _) = tally.phase(duration).await;
        let wire = wire0.per_message(
            &WireCount::of(clients),
            saturated * wall0.elapsed().as_secs_f64(),
        );
        let cpu = cpu_seconds(pid) - cpu0;
        let wall = wall0.elapsed().as_secs_f64();
        let saturated_cores = (cpu / wall, (cpu_seconds(me) - generator0) / wall);
        let delivered = saturated * duration.as_secs_f64();
        phase_stop.store(true, Ordering::Relaxed);
        drain(senders).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Half load, open loop.
        let half_rate = half_rate.unwrap_or(saturated / 2.0);
        let per_device = (half_rate / clients.len() as f64).max(0.1);
        let interval = Duration::from_secs_f64(1.0 / per_device);
        let phase_stop = Arc::new(AtomicBool::new(false));
        let senders = spawn_senders(
            clients,
            &phase_stop,
            Pace::Rate {
                interval,
                window: window * 4,
            },
            &Arc::new(Sends::default()),
            send_one,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (server0, generator0, wall0) = (cpu_seconds(pid), cpu_seconds(me), Instant::now());
        let (_, latencies) = tally.phase(duration).await;
        let wall = wall0.elapsed().as_secs_f64();
        let half_load_cores = (
            (cpu_seconds(pid) - server0) / wall,
            (cpu_seconds(me) - generator0) / wall,
        );
        phase_stop.store(true, Ordering::Relaxed);
        drain(senders).await;
        Run {
            wire,
            sends: sends.summary(),
            handoff: Vec::new(),
            saturated,
            half_rate,
            latencies,
            half_load_cores,
            saturated_cores,
            cpu_per_message_us: if delivered > 0.0 {
                cpu / delivered * 1e6
            } else {
                0.0
            },
        }
    }

    async fn drain(mut set: tokio::task::JoinSet<()>) {
        // Bounded: senders check the stop flag between sends, each send times out.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(None) = tokio::time::timeout(Duration::from_secs(1), set.join_next()).await {
                return;
            }
        }
        set.abort_all();
    }

    fn spawn_senders<C, F, Fut>(
        clients: &[Arc<C>],
        stop: &Arc<AtomicBool>,
        pace: Pace,
        sends: &Arc<Sends>,
        send_one: F,
    ) -> tokio::task::JoinSet<()>
    where
        C: Send + Sync + 'static,
        F: Fn(Arc<C>, usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for (me, client) in clients.iter().enumerate() {
            match pace {
                Pace::Saturate { window } => {
                    for _ in 0..window {
                        let (client, stop, send_one, sends) = (
                            client.clone(),
                            stop.clone(),
                            send_one.clone(),
                            sends.clone(),
                        );
                        set.spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                let started = Instant::now();
                                let sent = tokio::time::timeout(
                                    Duration::from_secs(10),
                                    send_one(client.clone(), me),
                                )
                                .await;
                                sends.record(started.elapsed(), matches!(sent, Ok(true)));
                                if !matches!(sent, Ok(true)) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        });
                    }
                }
                Pace::Rate { interval, window } => {
                    let (client, stop, send_one) = (client.clone(), stop.clone(), send_one.clone());
                    set.spawn(async move {
                        let gate = Arc::new(Semaphore::new(window));
                        // Spread the devices' ticks over one interval.
                        let offset = interval.mul_f64((me % 97) as f64 / 97.0);
                        tokio::time::sleep(offset).await;
                        let mut ticks = tokio::time::interval(interval);
                        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                        while !stop.load(Ordering::Relaxed) {
                            ticks.tick().await;
                            let Ok(permit) = gate.clone().try_acquire_owned() else {
                                continue;
                            };
                            let (client, send_one) = (client.clone(), send_one.clone());
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(10),
                                    send_one(client, me),
                                )
                                .await;
                                drop(permit);
                            });
                        }
                    });
                }
            }
        }
        set
    }
}

mod connections {
    use super::*;

    pub async fn run(devices: usize, endpoint_count: usize) -> Result<()> {
        println!("connections: {devices} devices over {endpoint_count} endpoints");
        let nums = numbers(devices);
        let (server, fp) = start_node(&nums, "")?;
        let eps = endpoints(endpoint_count)?;
        let (registered, took) = register_all(&server.addr, fp, &nums, &eps, 128).await?;
        let reg_rate = registered.len() as f64 / took.as_secs_f64();
        println!(
            "  registered {} devices in {:.1}s",
            registered.len(),
            took.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = server.pid();
        let base_rss = rss_bytes(pid);

        // Connect every device, 256 handshakes in flight; then each proves it is
        // authenticated with a whoami. A device whose handshake fails tries again, as a
        // real client would, up to CONNECT_TRIES times; one whose whoami fails connects
        // again the same way.
        const CONNECT_TRIES: usize = 3;
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(256));
        let mut tasks = tokio::task::JoinSet::new();
        let registered = Arc::new(registered);
        let connect = {
            let (registered, eps, addr) = (registered.clone(), eps.clone(), server.addr.clone());
            move |i: usize| {
                let (registered, endpoint, addr) =
                    (registered.clone(), eps[i % eps.len()].clone(), addr.clone());
                async move {
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        match Client::connect_via(&endpoint, &addr, &registered[i].creds, Some(fp))
                            .await
                        {
                            Ok(c) => return Ok((c, tries)),
                            Err(e) if tries >= CONNECT_TRIES => return Err(err(e)),
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
            }
        };
        for i in 0..registered.len() {
            let (gate, connect) = (gate.clone(), connect.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(err)?;
                connect(i).await.map(|(c, tries)| (i, c, tries))
            });
        }
        let mut clients = Vec::with_capacity(devices);
        let (mut failed, mut retried) = (0usize, 0usize);
        while let Some(done) = tasks.join_next().await {
            match done.map_err(err)? {
                Ok((i, c, tries)) => {
                    retried += tries - 1;
                    clients.push((i, c));
                }
                Err(_) => failed += 1,
            }
        }
        let handshake_rate = clients.len() as f64 / started.elapsed().as_secs_f64();
        let mut authenticated = 0usize;
        let mut unproven = Vec::new();
        for (chunk_no, chunk) in clients.chunks(512).enumerate() {
            let answers = futures_all(chunk.iter().map(|(_, c)| c.whoami())).await;
            for (j, answer) in answers.iter().enumerate() {
                match answer {
                    Ok(_) => authenticated += 1,
                    Err(e) => {
                        eprintln!("  whoami failed: {e}");
                        unproven.push(chunk_no * 512 + j);
                    }
                }
            }
        }
        for slot in unproven {
            if let Ok((c, more)) = connect(clients[slot].0).await
                && c.whoami().await.is_ok()
            {
                retried += more;
                authenticated += 1;
                clients[slot].1 = c;
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_bytes(pid);
        let per_conn = (rss - base_rss) / clients.len().max(1) as f64;
        println!(
            "  node: {} connected ({failed} failed after {CONNECT_TRIES} tries, {retried} retries), {authenticated} authenticated; RSS {:.0} MiB -> {:.0} MiB",
            clients.len(),
            base_rss / 1048576.0,
            rss / 1048576.0
        );
        for (_, c) in clients.drain(..) {
            c.connection().close(0u32.into(), b"done");
        }
        drop(server);

        // Bare quinn: the same number of plain connections.
        let (bare_server, cert) = start_bare()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bare_pid = bare_server.pid();
        let bare_base = rss_bytes(bare_pid);
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(256));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..devices {
            let gate = gate.clone();
            let endpoint = eps[i % eps.len()].clone();
            let (addr, cert) = (bare_server.addr.clone(), cert.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(err)?;
                bare::connect(&endpoint, &addr, &cert).await
            });
        }
        let mut bare_conns = Vec::with_capacity(devices);
        while let Some(done) = tasks.join_next().await {
            if let Ok(Ok(c)) = done {
                bare_conns.push(c);
            }
        }
        let bare_rate = bare_conns.len() as f64 / started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let bare_rss = rss_bytes(bare_pid);
        let bare_per_conn = (bare_rss - bare_base) / bare_conns.len().max(1) as f64;
        println!("  bare: {} connected", bare_conns.len());

        report(
            &[
                Figure {
                    scenario: "connections",
                    metric: format!("idle devices held ({devices} tried)"),
                    unit: "count",
                    node: authenticated as f64,
                    limit: Some(bare_conns.len() as f64),
                },
                Figure {
                    scenario: "connections",
                    metric: "server memory per idle connection".into(),
                    unit: "KiB",
                    node: per_conn / 1024.0,
                    limit: Some(bare_per_conn / 1024.0),
                },
                Figure {
                    scenario: "connections",
                    metric: "handshakes per second (mTLS for the node)".into(),
                    unit: "1/s",
                    node: handshake_rate,
                    limit: Some(bare_rate),
                },
                Figure {
                    scenario: "connections",
                    metric: "registrations per second (setup)".into(),
                    unit: "1/s",
                    node: reg_rate,
                    limit: None,
                },
            ],
            &["limit: bare quinn server, default transport config, server-only TLS".into()],
        );
        Ok(())
    }

    async fn futures_all<F: std::future::Future>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut out = Vec::new();
        // Sequential polling of a bounded chunk; each future is one request.
        let futures: Vec<F> = futures.collect();
        let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
        let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (i, f) in pinned.iter_mut().enumerate() {
                if results[i].is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => results[i] = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.extend(results.into_iter().flatten());
        out
    }
}

mod backlog {
    use super::*;

    pub async fn run(envelopes: usize, size: usize) -> Result<()> {
        println!("backlog: {envelopes} envelopes of {size} bytes for one offline device");
        let senders = 16usize;
        let nums = numbers(senders + 1);
        let extra = format!(
            "[messages]\nmax_queued_per_device = {}\n",
            envelopes * 2 + 1000
        );
        let (server, fp) = start_node(&nums, &extra)?;
        let eps = endpoints(4)?;
        let (devices, _) = register_all(&server.addr, fp, &nums, &eps, 32).await?;
        let (receiver, senders_devs) = devices.split_first().ok_or("no devices")?;
        let to = receiver.number.to_string();
        let device_id = receiver.device_id;

        // Fill the queue: 16 senders with 32 sends in flight each.
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, d) in senders_devs.iter().enumerate() {
            let client = Arc::new(
                Client::connect_via(&eps[i % eps.len()], &server.addr, &d.creds, Some(fp))
                    .await
                    .map_err(err)?,
            );
            for _ in 0..32 {
                let (client, next, to) = (client.clone(), next.clone(), to.clone());
                tasks.spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < envelopes as u64 {
                        let outgoing = Outgoing {
                            id: switchboard::client::e2e::new_message_id(),
                            to: to.clone(),
                            envelopes: vec![DeviceEnvelope {
                                device_id,
                                body: vec![0x5A; size],
                            }],
                        };
                        client.send(outgoing).await.map_err(err)?;
                    }
                    Ok::<_, String>(())
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(err)??;
        }
        let fill = started.elapsed();
        let cpu0 = cpu_seconds(server.pid());

        // The receiver connects and drains.
        let client = Client::connect_via(&eps[0], &server.addr, &receiver.creds, Some(fp))
            .await
            .map_err(err)?;
        let started = Instant::now();
        let mut sub = client.subscribe().await.map_err(err)?;
        let queued = sub.queued;
        let mut got = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while got < envelopes && Instant::now() < deadline {
            let push = sub.next().await.map_err(err)?.ok_or("stream ended")?;
            got += push.items.len();
            sub.ack(push.items.iter().map(|d| d.seq).collect())
                .await
                .map_err(err)?;
        }
        let received = started.elapsed();
        sub.finish().await.map_err(err)?;
        let acked = started.elapsed();
        let cpu = cpu_seconds(server.pid()) - cpu0;
        println!(
            "  queued {queued}, received {got}; filled in {:.2}s ({:.0} durable sends/s)",
            fill.as_secs_f64(),
            envelopes as f64 / fill.as_secs_f64()
        );
        report(
            &[
                Figure {
                    scenario: "backlog",
                    metric: format!("time to receive {envelopes} queued envelopes"),
                    unit: "ms",
                    node: received.as_secs_f64() * 1000.0,
                    limit: None,
                },
                Figure {
                    scenario: "backlog",
                    metric: "time until all are acknowledged and durable".into(),
                    unit: "ms",
                    node: acked.as_secs_f64() * 1000.0,
                    limit: None,
                },
                Figure {
                    scenario: "backlog",
                    metric: "node CPU for the drain".into(),
                    unit: "ms",
                    node: cpu * 1000.0,
                    limit: None,
                },
                Figure {
                    scenario: "backlog",
                    metric: "filling: durable sends per second (16x32 in flight)".into(),
                    unit: "msg/s",
                    node: envelopes as f64 / fill.as_secs_f64(),
                    limit: None,
                },
            ],
            &[],
        );
        Ok(())
    }
}

/// The release node on an existing data dir, with `config` if given.
fn node_on(data: &Path, config: Option<&Path>) -> Result<Server> {
    let mut command = Command::new(BIN);
    command.arg("serve");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .arg("--data")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "warn");
    Server::spawn(command, None, 1)
}

/// Copies the directory `from` (files and subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(err)?;
    for entry in std::fs::read_dir(from).map_err(err)? {
        let entry = entry.map_err(err)?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(err)?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(err)?;
        }
    }
    Ok(())
}

/// Registers `nums` directly in `store`, through the registration transaction (which
/// also writes the discovery index), and flushes.
fn register_accounts(store: &switchboard::store::Store, nums: &[Number]) -> Result<()> {
    use switchboard::store::{Judgement, NewDevice};
    for (i, n) in nums.iter().enumerate() {
        let code = switchboard::store::records::CodeRecord {
            hash: [0; 32],
            sent_at_ms: 0,
            expires_at_ms: u64::MAX,
            tries_left: 5,
        };
        store
            .replace_code::<()>(n.as_str(), |_| Ok(code.clone()))
            .map_err(err)?
            .map_err(|_| "code")?;
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).to_be_bytes());
        store
            .verify_and_register::<()>(
                n.as_str(),
                &NewDevice {
                    key_id: key,
                    public_key: vec![0; 44],
                },
                0,
                |_| Judgement::Accept,
            )
            .map_err(err)?;
    }
    store.flush_blocking().map_err(err)?;
    Ok(())
}

mod storage {
    use switchboard::store::{DeviceRef, Store, layout};

    use super::*;

    const BATCH: usize = 1000;
    const RECIPIENTS: u64 = 1000;

    pub fn run(envelopes: usize, accounts: usize, size: usize, volumes: u64) -> Result<()> {
        println!(
            "storage: {envelopes} envelopes of {size} bytes, {accounts} accounts, {volumes} volumes"
        );
        let tmp = tempfile::tempdir().map_err(err)?;
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).map_err(err)?;
        let db_path = data.join("db");
        let store = Store::open(&db_path).map_err(err)?;

        // Accounts, through the registration transaction.
        let started = Instant::now();
        let nums = numbers(accounts.max(RECIPIENTS as usize + 1));
        register_accounts(&store, &nums)?;
        let accounts_took = started.elapsed();
        let after_accounts = switchboard::admin::dir_size(&db_path);

        let sender = DeviceRef {
            account_id: 1,
            device_id: 1,
        };
        let recipient = |i: usize| DeviceRef {
            account_id: 2 + (i as u64 % RECIPIENTS),
            device_id: 1,
        };
        let body = vec![0x3Cu8; size];
        let append = |round: u64| -> Result<(Duration, u64)> {
            let started = Instant::now();
            let mut live = 0u64;
            for chunk in 0..envelopes.div_ceil(BATCH) {
                let batch = chunk * BATCH..((chunk + 1) * BATCH).min(envelopes);
                for i in batch.clone() {
                    store
                        .append(
                            sender,
                            "+14152000000",
                            message_id(round, i),
                            vec![(recipient(i), body.clone())],
                            1,
                            u64::MAX,
                        )
                        .map_err(err)?;
                    // key 20 + value: time 8 + item (tag, ids, number, id, body)
                    live += 20 + 8 + 1 + 1 + 1 + 13 + 16 + 3 + size as u64;
                }
                store.flush_blocking().map_err(err)?; // the group commit
                // The sender has its answers: the node drops their sent-id records
                // (not flushed; the next group commit carries the removals).
                for i in batch {
                    store
                        .forget_sent(sender, message_id(round, i), 1)
                        .map_err(err)?;
                }
            }
            Ok((started.elapsed(), live))
        };
        let ack_all = || -> Result<Duration> {
            let started = Instant::now();
            for r in 0..RECIPIENTS {
                let device = DeviceRef {
                    account_id: 2 + r,
                    device_id: 1,
                };
                loop {
                    let page = store.queue_page(device, None, 256).map_err(err)?;
                    if page.is_empty() {
                        break;
                    }
                    let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
                    store.ack(device, "+14152000001", &seqs, 2).map_err(err)?;
                }
                // Receipts pile up in the sender's queue; it acknowledges them too.
                loop {
                    let page = store.queue_page(sender, None, 256).map_err(err)?;
                    if page.is_empty() {
                        break;
                    }
                    let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
                    store.ack(sender, "+14152000000", &seqs, 2).map_err(err)?;
                }
            }
            store.flush_blocking().map_err(err)?;
            Ok(started.elapsed())
        };

        let (append1, live) = append(1)?;
        let with_live = switchboard::admin::dir_size(&db_path);
        let queued_bytes = with_live.saturating_sub(after_accounts);
        let ack1 = ack_all()?;
        // The queue part (the data dir less its size with the accounts alone) after
        // each volume went through and was acknowledged.
        let mut emptied =
            vec![switchboard::admin::dir_size(&db_path).saturating_sub(after_accounts)];
        let mut later = (Duration::ZERO, Duration::ZERO);
        for round in 2..=volumes {
            let (append_took, _) = append(round)?;
            let ack_took = ack_all()?;
            later = (append_took, ack_took);
            emptied.push(switchboard::admin::dir_size(&db_path).saturating_sub(after_accounts));
        }
        // Leave 1M live envelopes for the open test.
        let (_, _) = append(volumes + 1)?;
        let with_live_again = switchboard::admin::dir_size(&db_path);
        // A clean shutdown's last write, as the node's.
        store.save_queue_totals().map_err(err)?;
        store.flush_blocking().map_err(err)?;
        drop(store);
        // sled lets go of its file lock within its 500 ms flush interval.
        std::thread::sleep(Duration::from_secs(1));

        // sled 0.34 writes its page-table snapshot only while it opens a database, so
        // an open replays every log write since the previous open: here, the whole
        // fill. A copy of the data dir as it is now lets sled alone replay the same log.
        let copy = tmp.path().join("copy");
        copy_dir(&db_path, &copy)?;

        // The node's first start after that clean shutdown (queue totals saved).
        let started = Instant::now();
        let node = node_on(&data, None)?;
        let open_took = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let open_rss = rss_bytes(node.pid());
        drop(node); // killed: what follows is a start after a crash
        // A start after a crash: no totals saved, so the node counts the queues; the
        // log since the previous open is short.
        let started = Instant::now();
        let node = node_on(&data, None)?;
        let crash_open_took = started.elapsed();
        drop(node);
        // The bare limits: sled alone opening the copy (the same replay as the node's
        // first start), then the data dir after the node's starts (a short replay).
        let started = Instant::now();
        let reopened = sled::open(&copy).map_err(err)?;
        let sled_first_open = started.elapsed();
        drop(reopened);
        std::fs::remove_dir_all(&copy).map_err(err)?;
        let started = Instant::now();
        let reopened = sled::open(&db_path).map_err(err)?;
        let sled_open_again = started.elapsed();
        drop(reopened);

        // Raw sled with the same keys, value sizes and group commit.
        let value_len = (live / envelopes.max(1) as u64) as usize - 20;
        let raw = raw_churn(&tmp.path().join("raw"), envelopes, value_len, volumes)?;

        let growth = |sizes: &[u64]| match sizes {
            [.., before, last] => *last as f64 / (*before).max(1) as f64,
            _ => 1.0,
        };
        let last = |sizes: &[u64]| sizes.last().copied().unwrap_or(0);
        let per_sec = |d: Duration| envelopes as f64 / d.as_secs_f64();
        let mib = |b: u64| b as f64 / 1048576.0;
        report(
            &[
                Figure {
                    scenario: "storage",
                    metric: "appends per second (group commit every 1000)".into(),
                    unit: "1/s",
                    node: per_sec(append1),
                    limit: Some(per_sec(raw.append_took)),
                },
                Figure {
                    scenario: "storage",
                    metric: "acknowledgements per second (256 a batch)".into(),
                    unit: "1/s",
                    node: per_sec(ack1),
                    limit: None,
                },
                Figure {
                    scenario: "storage",
                    metric: "queue bytes on disk per live envelope".into(),
                    unit: "B",
                    node: queued_bytes as f64 / envelopes.max(1) as f64,
                    limit: Some(raw.filled as f64 / envelopes.max(1) as f64),
                },
                Figure {
                    scenario: "storage",
                    metric: "data dir / live bytes (queue part)".into(),
                    unit: "x",
                    node: queued_bytes as f64 / live.max(1) as f64,
                    limit: Some(raw.filled as f64 / live.max(1) as f64),
                },
                Figure {
                    scenario: "storage",
                    metric: "queue part after all acknowledged".into(),
                    unit: "MiB",
                    node: mib(emptied[0]),
                    limit: Some(mib(raw.emptied[0])),
                },
                Figure {
                    scenario: "storage",
                    metric: format!("queue part after volume {volumes}, acknowledged"),
                    unit: "MiB",
                    node: mib(last(&emptied)),
                    limit: Some(mib(last(&raw.emptied))),
                },
                Figure {
                    scenario: "storage",
                    metric: format!("growth from volume {volumes}"),
                    unit: "x",
                    node: growth(&emptied),
                    limit: Some(growth(&raw.emptied)),
                },
                Figure {
                    scenario: "storage",
                    metric: format!(
                        "open: node start with {accounts} accounts + {envelopes} queued"
                    ),
                    unit: "ms",
                    node: open_took.as_secs_f64() * 1000.0,
                    limit: Some(sled_first_open.as_secs_f64() * 1000.0),
                },
                Figure {
                    scenario: "storage",
                    metric: "open: restart after a crash (counts the queues)".into(),
                    unit: "ms",
                    node: crash_open_took.as_secs_f64() * 1000.0,
                    limit: Some(sled_open_again.as_secs_f64() * 1000.0),
                },
                Figure {
                    scenario: "storage",
                    metric: "node RSS after opening".into(),
                    unit: "MiB",
                    node: open_rss / 1048576.0,
                    limit: None,
                },
            ],
            &[
                format!(
                    "accounts: {accounts} registered in {:.1}s ({:.0} MiB on disk)",
                    accounts_took.as_secs_f64(),
                    mib(after_accounts)
                ),
                format!(
                    "data dir with accounts and {envelopes} live envelopes: {:.0} MiB; last volume append {:.1}s, ack {:.1}s; then filled again: {:.0} MiB",
                    mib(with_live),
                    later.0.as_secs_f64(),
                    later.1.as_secs_f64(),
                    mib(with_live_again)
                ),
                format!(
                    "queue part after each volume (MiB): node {}; raw sled {}",
                    sizes(&emptied),
                    sizes(&raw.emptied)
                ),
                "live bytes: key + value of each queue entry; queue part: the data dir less its size with the accounts alone (so it holds the sent-id records too, each removed once its sender has the answer); limit: raw sled, same key and value sizes and flush cadence, the same churn (filled and emptied as often)".into(),
                "open: the first start after the fill and a clean shutdown (sled replays the whole log: it snapshots only at open), then a restart after the node was killed; limits: sled::open alone on a copy made before the first start, then on the data dir after the restarts".into(),
            ],
        );
        Ok(())
    }

    /// The client message id of envelope `i` of fill `round`.
    fn message_id(round: u64, i: usize) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&round.to_be_bytes());
        id[8..].copy_from_slice(&(i as u64).to_be_bytes());
        id
    }

    /// Sizes in MiB, comma-separated.
    fn sizes(bytes: &[u64]) -> String {
        let mib: Vec<String> = bytes
            .iter()
            .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
            .collect();
        mib.join(", ")
    }

    /// Data dir sizes of raw sled through the same churn as the node's queues.
    struct RawChurn {
        append_took: Duration,
        /// With every envelope live.
        filled: u64,
        /// After each volume, all removed.
        emptied: Vec<u64>,
    }

    /// Raw sled in `dir`: `envelopes` queue entries (the node's key layout, values of
    /// `value_len` bytes) inserted with a flush every BATCH, all removed (flushing every
    /// BATCH, like the acknowledgements), `volumes` times.
    fn raw_churn(dir: &Path, envelopes: usize, value_len: usize, volumes: u64) -> Result<RawChurn> {
        let db = sled::open(dir).map_err(err)?;
        let tree = db.open_tree("queue").map_err(err)?;
        let value = vec![0x3Cu8; value_len];
        let fill = || -> Result<()> {
            for chunk in 0..envelopes.div_ceil(BATCH) {
                for i in chunk * BATCH..((chunk + 1) * BATCH).min(envelopes) {
                    let recipient = layout::device(2 + (i as u64 % RECIPIENTS), 1);
                    let seq = db.generate_id().map_err(err)?;
                    tree.insert(layout::queue(recipient, seq), value.as_slice())
                        .map_err(err)?;
                }
                db.flush().map_err(err)?;
            }
            Ok(())
        };
        let remove_all = || -> Result<()> {
            let mut removed = 0;
            for key in tree.iter().keys() {
                tree.remove(key.map_err(err)?).map_err(err)?;
                removed += 1;
                if removed % BATCH == 0 {
                    db.flush().map_err(err)?;
                }
            }
            db.flush().map_err(err)?;
            Ok(())
        };
        let started = Instant::now();
        fill()?;
        let append_took = started.elapsed();
        let filled = switchboard::admin::dir_size(dir);
        remove_all()?;
        let mut emptied = vec![switchboard::admin::dir_size(dir)];
        for _ in 2..=volumes {
            fill()?;
            remove_all()?;
            emptied.push(switchboard::admin::dir_size(dir));
        }
        Ok(RawChurn {
            append_took,
            filled,
            emptied,
        })
    }
}

mod discovery {
    use switchboard::client::contacts::Book;
    use switchboard::store::Store;

    use super::*;

    /// The syncing member's number (a test number of the node).
    const MEMBER: &str = "+14159990000";

    pub async fn run(sizes: &[usize], contacts: usize) -> Result<()> {
        let mut figures = Vec::new();
        let mut notes = Vec::new();
        for &accounts in sizes {
            println!("discovery: {contacts} contacts against {accounts} accounts");
            let tmp = tempfile::tempdir().map_err(err)?;
            let data = tmp.path().join("data");
            std::fs::create_dir_all(&data).map_err(err)?;
            let started = Instant::now();
            {
                let store = Store::open(&data.join("db")).map_err(err)?;
                register_accounts(&store, &numbers(accounts))?;
            }
            println!(
                "  registered {accounts} accounts in {:.1?}",
                started.elapsed()
            );
            let config = tmp.path().join("node.toml");
            std::fs::write(
                &config,
                format!(
                    "[discovery]\ndaily_budget = 1000000\n[verification.test_numbers]\n\"{MEMBER}\" = \"{CODE}\"\n"
                ),
            )
            .map_err(err)?;
            let node = node_on(&data, Some(&config))?;
            let fp: Fingerprint = node.lines[1]
                .strip_prefix("fingerprint ")
                .ok_or("no fingerprint line")?
                .parse()
                .map_err(err)?;
            let (creds, _) = Credentials::generate_device().map_err(err)?;
            let client = Client::connect(&node.addr, &creds, Some(fp))
                .await
                .map_err(err)?;
            let me = Number::parse_e164(MEMBER).map_err(err)?;
            client
                .request_code(&me, switchboard::proto::Channel::Sms, "en")
                .await
                .map_err(err)?;
            client.verify_code(&me, CODE).await.map_err(err)?;
            // Let the node build its first filter (it does at start), so the sync
            // measures serving it, not building it.
            tokio::time::sleep(Duration::from_secs(2)).await;

            // The address book: one contact in ten is registered.
            let registered = numbers(accounts);
            let mut csv = String::from("Name,Phone\n");
            for i in 0..contacts {
                let number = if i % 10 == 0 {
                    registered[(i * 7919) % accounts].to_string()
                } else {
                    format!("+1212{:07}", 5_000_000 + i)
                };
                csv.push_str(&format!("Contact {i},{number}\n"));
            }
            let home = switchboard::client::db::HomeDb::open(&tmp.path().join("home"), None)
                .map_err(err)?;
            Book::import_into(&home, &csv, None).map_err(err)?;
            let stats_before = client.connection().stats();
            let cpu_before = cpu_seconds(node.pid());
            let started = Instant::now();
            let report = Book::sync(&home, &client, |_, _| {}).await.map_err(err)?;
            let took = started.elapsed();
            let cpu = cpu_seconds(node.pid()) - cpu_before;
            let stats = client.connection().stats();
            let sent = stats.udp_tx.bytes - stats_before.udp_tx.bytes;
            let received = stats.udp_rx.bytes - stats_before.udp_rx.bytes;
            client.close().await;
            drop(node);
            if report.registered != contacts.div_ceil(10) {
                return Err(format!(
                    "the sync found {} registered contacts, expected {}",
                    report.registered,
                    contacts.div_ceil(10)
                ));
            }

            // The bare limit in the same run: the OPRF's own work, one ristretto255
            // evaluation per contact, in this process.
            let key = switchboard::discovery::DiscoveryKey::generate(1).map_err(err)?;
            let blinded: Vec<_> = (0..contacts)
                .map(|i| switchboard::discovery::blind(&format!("+1212{:07}", 5_000_000 + i)))
                .collect::<std::result::Result<_, _>>()
                .map_err(err)?;
            let started = Instant::now();
            for b in &blinded {
                key.evaluate(&b.element).map_err(err)?;
            }
            let bare = started.elapsed().as_secs_f64();

            let label = |what: &str| format!("{what}, {accounts} accounts");
            figures.push(Figure {
                scenario: "discovery",
                metric: label("node CPU for the sync"),
                unit: "ms",
                node: cpu * 1e3,
                limit: Some(bare * 1e3),
            });
            figures.push(Figure {
                scenario: "discovery",
                metric: label("filter bytes per account"),
                unit: "B",
                node: report.filter_bytes as f64 / (accounts + 1) as f64,
                limit: None,
            });
            figures.push(Figure {
                scenario: "discovery",
                metric: label("bytes sent by the client"),
                unit: "KiB",
                node: sent as f64 / 1024.0,
                limit: None,
            });
            figures.push(Figure {
                scenario: "discovery",
                metric: label("bytes received by the client"),
                unit: "KiB",
                node: received as f64 / 1024.0,
                limit: Some(report.filter_bytes as f64 / 1024.0),
            });
            figures.push(Figure {
                scenario: "discovery",
                metric: label("sync wall time"),
                unit: "ms",
                node: took.as_secs_f64() * 1e3,
                limit: None,
            });
            notes.push(format!(
                "{accounts} accounts: {} contacts, {} evaluated, {} filter hits resolved, {} registered",
                report.contacts, report.evaluated, report.resolved, report.registered
            ));
        }
        notes.push(
            "limits: CPU = the same number of OPRF evaluations in-process (ristretto255 \
             alone); bytes received = the filter alone"
                .into(),
        );
        report(&figures, &notes);
        Ok(())
    }
}

/// The bare limit: a minimal quinn relay. A client opens one stream and writes its id
/// (the inbox); each message is a stream carrying `[to: u32][payload]`, answered with
/// one byte after it was handed to the recipient's inbox. No storage, no client
/// authentication, no acknowledgements.
mod bare {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use switchboard::proto::frame;

    use super::*;

    const ALPN: &[u8] = b"bare";

    type Inboxes = Arc<Mutex<HashMap<u32, tokio::sync::mpsc::Sender<Vec<u8>>>>>;

    pub async fn serve() -> Result<()> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(err)?;
        let cert_der = cert.cert.der().to_vec();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone().into()], key)
            .map_err(err)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // Session tickets as the node issues them, for the reconnect scenario.
        tls.ticketer = rustls::crypto::ring::Ticketer::new().map_err(err)?;
        let crypto = QuicServerConfig::try_from(tls).map_err(err)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(Duration::from_secs(120).try_into().map_err(err)?));
        // The node's transport tuning (ACK frequency, socket buffers), so the limit
        // is quinn configured as the node is.
        transport.ack_frequency_config(Some(switchboard::quic::ack_frequency()));
        config.transport_config(Arc::new(transport));
        let endpoint = udp_endpoint("127.0.0.1:0", Some(config))?;
        println!("listening on {}", endpoint.local_addr().map_err(err)?);
        println!("cert {}", hex::encode(&cert_der));
        let inboxes: Inboxes = Arc::default();
        while let Some(incoming) = endpoint.accept().await {
            let inboxes = inboxes.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(stream(send, recv, inboxes.clone()));
                }
            });
        }
        Ok(())
    }

    async fn stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, inboxes: Inboxes) {
        let Ok(Some(first)) = frame::read::<Vec<u8>, _>(&mut recv, 1 << 20).await else {
            return;
        };
        let Some((head, body)) = first.split_first_chunk::<4>() else {
            return;
        };
        let id = u32::from_be_bytes(*head);
        if body.is_empty() {
            // An inbox: forward everything sent to `id`.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
            if let Ok(mut map) = inboxes.lock() {
                map.insert(id, tx);
            }
            while let Some(msg) = rx.recv().await {
                if frame::write(&mut send, &msg).await.is_err() {
                    return;
                }
            }
        } else {
            let tx = inboxes.lock().ok().and_then(|m| m.get(&id).cloned());
            if let Some(tx) = tx {
                let _ = tx.send(body.to_vec()).await;
            }
            let _ = frame::write(&mut send, &vec![1u8]).await;
            let _ = send.finish();
            // As the node does: take the FIN, so dropping `recv` sends no STOP_SENDING.
            switchboard::quic::read_end(&mut recv);
        }
    }

    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: &str,
        cert: &[u8],
    ) -> Result<quinn::Connection> {
        let config = client_config(cert)?;
        connect_with(endpoint, addr, config).await
    }

    /// Connects with `config` (reused, it resumes the TLS sessions it holds tickets for).
    pub async fn connect_with(
        endpoint: &quinn::Endpoint,
        addr: &str,
        config: quinn::ClientConfig,
    ) -> Result<quinn::Connection> {
        let addr: std::net::SocketAddr = addr.parse().map_err(err)?;
        endpoint
            .connect_with(config, addr, "localhost")
            .map_err(err)?
            .await
            .map_err(err)
    }

    /// The bare client's configuration: the bare server's certificate as its root.
    pub fn client_config(cert: &[u8]) -> Result<quinn::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.to_vec().into()).map_err(err)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(err)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(15)));
        // The node's transport tuning (ACK frequency, socket buffers), so the limit
        // is quinn configured as the node is.
        transport.ack_frequency_config(Some(switchboard::quic::ack_frequency()));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// Opens the inbox of `id`; read frames of `Vec<u8>` from it.
    pub async fn subscribe(conn: &quinn::Connection, id: u32) -> Result<quinn::RecvStream> {
        let (mut send, recv) = conn.open_bi().await.map_err(err)?;
        frame::write(&mut send, &id.to_be_bytes().to_vec())
            .await
            .map_err(err)?;
        Ok(recv)
    }

    pub async fn send(conn: &quinn::Connection, to: u32, body: Vec<u8>) -> Result<()> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(err)?;
        let mut msg = to.to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        frame::write(&mut send, &msg).await.map_err(err)?;
        send.finish().map_err(err)?;
        frame::read::<Vec<u8>, _>(&mut recv, 1024)
            .await
            .map_err(err)?
            .ok_or("no reply")?;
        Ok(())
    }
}

mod backup {
    use std::io::Write;

    use switchboard::store::{DeviceRef, Store};

    use super::*;

    pub fn run(envelopes: usize, accounts: usize, size: usize) -> Result<()> {
        println!("backup: {envelopes} queued envelopes of {size} bytes, {accounts} accounts");
        let tmp = tempfile::tempdir().map_err(err)?;
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).map_err(err)?;
        let db_path = data.join("db");
        {
            let store = Store::open(&db_path).map_err(err)?;
            let nums = numbers(accounts.max(2));
            register_accounts(&store, &nums)?;
            let sender = DeviceRef {
                account_id: 1,
                device_id: 1,
            };
            let body = vec![0x3Cu8; size];
            for i in 0..envelopes {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&(i as u64).to_be_bytes());
                let to = DeviceRef {
                    account_id: 2 + (i as u64 % (accounts.max(2) as u64 - 1)),
                    device_id: 1,
                };
                store
                    .append(
                        sender,
                        "+14152000000",
                        id,
                        vec![(to, body.clone())],
                        1,
                        u64::MAX,
                    )
                    .map_err(err)?;
            }
            store.flush_blocking().map_err(err)?;
        }

        // Both read the same files; whichever runs first warms the page cache, so
        // the node's snapshot goes first (the raw limit gets the warm cache).
        // The node's snapshot: the code `admin backup` runs while writes wait.
        let backup_file = tmp.path().join("node.backup");
        let store = Store::open(&db_path).map_err(err)?;
        let started = Instant::now();
        let summary = {
            let mut out =
                std::io::BufWriter::new(std::fs::File::create(&backup_file).map_err(err)?);
            let s = store.write_backup(&mut out, &[], |_| {}).map_err(err)?;
            out.flush().map_err(err)?;
            s
        };
        let snapshot = started.elapsed();
        drop(store);

        // Bare limit: raw sled, every tree iterated into a buffered file.
        let bare_file = tmp.path().join("bare.out");
        let db = sled::open(&db_path).map_err(err)?;
        let started = Instant::now();
        let (bare_entries, bare_bytes) = {
            let mut out = std::io::BufWriter::with_capacity(
                256 * 1024,
                std::fs::File::create(&bare_file).map_err(err)?,
            );
            let (mut n, mut bytes) = (0u64, 0u64);
            for name in db.tree_names() {
                let tree = db.open_tree(&name).map_err(err)?;
                for entry in tree.iter() {
                    let (k, v) = entry.map_err(err)?;
                    out.write_all(&k).map_err(err)?;
                    out.write_all(&v).map_err(err)?;
                    n += 1;
                    bytes += (k.len() + v.len()) as u64;
                }
            }
            out.flush().map_err(err)?;
            (n, bytes)
        };
        let bare_iterate = started.elapsed();
        drop(db);

        // End to end: `switchboard admin backup` against the running release node.
        let node = node_on(&data, None)?;
        let cli_file = tmp.path().join("cli.backup");
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(["admin", "backup"])
            .arg(&cli_file)
            .arg("--data")
            .arg(&data)
            .output()
            .map_err(err)?;
        let cli_backup = started.elapsed();
        if !out.status.success() {
            return Err(format!(
                "admin backup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        drop(node);

        // Restore, against raw sled inserting the same entries in batches.
        let restored = tmp.path().join("restored");
        let started = Instant::now();
        let input = std::io::BufReader::new(std::fs::File::open(&backup_file).map_err(err)?);
        switchboard::store::backup::restore(input, &restored, |_| {}).map_err(err)?;
        let restore = started.elapsed();
        let started = Instant::now();
        {
            let src = sled::open(&db_path).map_err(err)?;
            let dst = sled::open(tmp.path().join("bare-restored")).map_err(err)?;
            for name in src.tree_names() {
                let from = src.open_tree(&name).map_err(err)?;
                let to = dst.open_tree(&name).map_err(err)?;
                let mut batch = sled::Batch::default();
                let mut pending = 0;
                for entry in from.iter() {
                    let (k, v) = entry.map_err(err)?;
                    batch.insert(k, v);
                    pending += 1;
                    if pending == 4096 {
                        to.apply_batch(std::mem::take(&mut batch)).map_err(err)?;
                        pending = 0;
                    }
                }
                to.apply_batch(batch).map_err(err)?;
            }
            dst.flush().map_err(err)?;
        }
        // Raw copy includes reading the source; the restore reads the backup file.
        let bare_restore = started.elapsed();

        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "entries: {} (raw sled {bare_entries}), live key+value bytes {}, backup file {} bytes",
            summary.entries, bare_bytes, summary.bytes
        );
        report(
            &[
                Figure {
                    scenario: "backup",
                    metric: "snapshot time (writes wait this long)".into(),
                    unit: "ms",
                    node: ms(snapshot),
                    limit: Some(ms(bare_iterate)),
                },
                Figure {
                    scenario: "backup",
                    metric: "`admin backup` on the running node, end to end".into(),
                    unit: "ms",
                    node: ms(cli_backup),
                    limit: Some(ms(bare_iterate)),
                },
                Figure {
                    scenario: "backup",
                    metric: "restore into an empty data dir".into(),
                    unit: "ms",
                    node: ms(restore),
                    limit: Some(ms(bare_restore)),
                },
            ],
            &[
                "limit for the snapshot: raw sled iterating every tree into a buffered file".into(),
                "limit for the restore: raw sled copying every tree into a new database in \
                 4096-entry batches"
                    .into(),
            ],
        );
        Ok(())
    }
}
