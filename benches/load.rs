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
        /// Devices per account (the primary and linked ones): every device sends, each
        /// send is one envelope per device of the partner account (fan-out).
        #[arg(long, default_value_t = 1)]
        devices: usize,
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
    /// One group: members send group messages (one upload each) that the node fans
    /// out to every member device; the same over bare quinn; and the data dir's bytes
    /// per group message.
    Group {
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 2)]
        devices: usize,
        /// Members that send (each from its first device).
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Sends in flight per sender at saturation.
        #[arg(long, default_value_t = 4)]
        window: usize,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// Attachments: a big file and many small ones up and down through the node,
    /// beside bare quinn streams moving the same bytes; the node's RSS meanwhile.
    Attachments {
        /// MiB of the big file.
        #[arg(long, default_value_t = 100)]
        big_mib: usize,
        /// Small files, and their KiB.
        #[arg(long, default_value_t = 1000)]
        small: usize,
        #[arg(long, default_value_t = 100)]
        small_kib: usize,
        /// Small transfers at a time.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// The relay through 3 nodes in cluster mode over a 3-member NATS JetStream
    /// cluster on 127.0.0.1; bare async-nats publish-with-ack to the same cluster;
    /// the relay through one sled node.
    Cluster {
        #[arg(long, default_value_t = 30)]
        pairs: usize,
        /// Sends in flight per device at saturation (8, the relay's, overloads the
        /// cluster on 2 cores: acknowledgements of publishes time out).
        #[arg(long, default_value_t = 2)]
        window: usize,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Delivered messages/s offered in the latency phase (default: half the
        /// saturated rate); to compare builds at one rate.
        #[arg(long)]
        rate: Option<f64>,
        /// The nodes' `cluster.removal_delay_ms` (default: the config's).
        #[arg(long)]
        removal_delay_ms: Option<u64>,
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
                devices,
            } => relay::run(pairs, window, Duration::from_secs(duration), size, devices).await,
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
            Scenario::Group {
                members,
                devices,
                senders,
                window,
                duration,
                size,
            } => {
                group::run(
                    members,
                    devices,
                    senders,
                    window,
                    Duration::from_secs(duration),
                    size,
                )
                .await
            }
            Scenario::Attachments {
                big_mib,
                small,
                small_kib,
                concurrency,
            } => attachments::run(big_mib, small, small_kib, concurrency).await,
            Scenario::Cluster {
                pairs,
                window,
                duration,
                size,
                rate,
                removal_delay_ms,
            } => {
                let duration = Duration::from_secs(duration);
                cluster::run(pairs, window, duration, size, rate, removal_delay_ms).await
            }
            Scenario::BareServer => bare::serve().await,
        }
    });
    if let Err(e) = result {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, String>;

#[path = "load/attachments.rs"]
mod attachments;
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

    /// The last `n` lines the server logged (nodes only).
    fn log_tail(&self, n: usize) -> Vec<String> {
        let Some(dir) = &self._dir else {
            return Vec::new();
        };
        let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<String> = log.lines().map(str::to_string).collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }

    fn spawn(
        mut command: Command,
        dir: Option<tempfile::TempDir>,
        extra_lines: usize,
    ) -> Result<Server> {
        // A node's log (RUST_LOG=warn) goes to `stderr.log` in its dir.
        let stderr = match &dir {
            Some(d) => {
                Stdio::from(std::fs::File::create(d.path().join("stderr.log")).map_err(err)?)
            }
            None => Stdio::null(),
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
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
    /// Deliveries seen, measured or not.
    seen: AtomicU64,
    /// Delivery streams the node ended during the run (none, in a good run).
    streams_ended: AtomicU64,
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
        self.seen.fetch_add(1, Ordering::Relaxed);
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

    /// Waits until nothing was delivered for half a second (what a phase left queued
    /// has arrived), for at most two minutes.
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let before = self.seen.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.seen.load(Ordering::Relaxed) == before || Instant::now() >= deadline {
                return;
            }
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

#[path = "load/relay.rs"]
mod relay;

#[path = "load/group.rs"]
mod group;

#[path = "load/connections.rs"]
mod connections;

#[path = "load/backlog.rs"]
mod backlog;

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

#[path = "load/storage.rs"]
mod storage;

#[path = "load/discovery.rs"]
mod discovery;

#[path = "load/bare.rs"]
mod bare;

#[path = "load/cluster.rs"]
mod cluster;
/// The test suite's NATS cluster support, shared.
#[allow(dead_code)]
#[path = "../tests/it/nats.rs"]
mod nats;

#[path = "load/backup.rs"]
mod backup;
