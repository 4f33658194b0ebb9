//! Test harness: nodes as processes or in-process, CLI runs, and helpers.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchboard::client::{Client, ClientError};
use switchboard::config::Config;
use switchboard::node::Node;
use switchboard::phone::Number;
use switchboard::proto::{Channel, ErrorKind};
use switchboard::tls::{Credentials, Fingerprint};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Test numbers and their fixed codes, in every test config.
pub const ALICE: &str = "+14155550100";
pub const BOB: &str = "+14155550101";
pub const CAROL: &str = "+14155550102";
pub const CODE: &str = "123456";

/// A config with the three test numbers and `extra` TOML appended to their section
/// (extra sections may follow).
pub fn config_text(extra: &str) -> String {
    format!(
        "[verification.test_numbers]\n\"{ALICE}\" = \"{CODE}\"\n\"{BOB}\" = \"{CODE}\"\n\"{CAROL}\" = \"{CODE}\"\n{extra}"
    )
}

/// A node running as a child process of the test.
pub struct ProcessNode {
    pub dir: tempfile::TempDir,
    /// The data dir, when not the default `dir/data`.
    data: Option<PathBuf>,
    /// `RUST_LOG` for the node.
    log_level: &'static str,
    child: Option<Child>,
    pub addr: String,
    pub fingerprint: Fingerprint,
    /// The metrics endpoint's URL, when the config turns it on.
    pub metrics: Option<String>,
    metrics_enabled: bool,
}

impl ProcessNode {
    /// Starts a node with `config` (TOML) and a fresh data dir.
    pub fn start(config: &str) -> ProcessNode {
        ProcessNode::start_with_data(config, None)
    }

    /// Starts a node with `config` and its data in `data` (for example a small
    /// filesystem), or in a fresh temp dir.
    pub fn start_with_data(config: &str, data: Option<PathBuf>) -> ProcessNode {
        ProcessNode::start_full(config, data, "info")
    }

    /// Starts a node that logs everything, at every level, from every crate.
    pub fn start_traced(config: &str) -> ProcessNode {
        ProcessNode::start_full(config, None, "trace")
    }

    fn start_full(config: &str, data: Option<PathBuf>, log_level: &'static str) -> ProcessNode {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("node.toml"), config).expect("write config");
        let mut node = ProcessNode {
            dir,
            data,
            log_level,
            child: None,
            addr: String::new(),
            fingerprint: Fingerprint([0; 32]),
            metrics: None,
            metrics_enabled: switchboard::config::Config::parse(config)
                .map(|c| c.metrics.enabled)
                .unwrap_or(false),
        };
        node.spawn();
        node
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// Everything the node has logged so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the node process (again) on the same data dir, config and port.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// [`ProcessNode::spawn`], saying why when the node does not start.
    pub fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open log");
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("node.toml"))
            .arg("--data")
            .arg(self.data_dir())
            .arg("--listen")
            // A restart comes back on the same port, as a real node would.
            .arg(if self.addr.is_empty() {
                "127.0.0.1:0"
            } else {
                &self.addr
            })
            .env("RUST_LOG", self.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let second = lines.next().and_then(Result::ok).unwrap_or_default();
        let addr = first.strip_prefix("listening on ");
        let fp = second.strip_prefix("fingerprint ");
        let (Some(addr), Some(fp)) = (addr, fp) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "node did not start: stdout {first:?} / {second:?}\nlog:\n{}",
                self.log()
            ));
        };
        self.addr = addr.to_string();
        self.fingerprint = fp.parse().expect("fingerprint line");
        if self.metrics_enabled {
            let third = lines.next().and_then(Result::ok).unwrap_or_default();
            self.metrics = Some(
                third
                    .strip_prefix("metrics on ")
                    .unwrap_or_else(|| panic!("no metrics line: {third:?}"))
                    .to_string(),
            );
        }
        self.child = Some(child);
        Ok(())
    }

    /// How the node process ended, if it has (it is then no longer held).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Stops the node with SIGTERM and waits; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node did not stop within 20 s of SIGTERM\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the node with SIGKILL: no chance to flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The node process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the node with SIGKILL and starts it again on the same data dir, config
    /// and port: a crash and a supervisor's restart.
    pub fn crash_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the node again on the same data dir, config and port.
    pub fn restart(&mut self) {
        assert!(
            self.stop(),
            "node exited with an error\nlog:\n{}",
            self.log()
        );
        self.spawn();
    }

    /// Registers `number` (a test number) from the client home `home` with the CLI,
    /// with `global` options (such as `--passphrase-file F`) first; asserts success.
    pub fn register_cli(&self, home: &Path, global: &[&str], number: &str) -> Output {
        let mut args = global.to_vec();
        args.extend(["register", number, "--server", &self.addr, "--code", CODE]);
        let out = self.cli(home, &args, "");
        assert!(out.status.success(), "{}", show(&args, &out));
        out
    }

    /// Runs the CLI on `home` with `args`, asserts it succeeded; its stdout.
    pub fn ok(&self, home: &Path, args: &[&str]) -> String {
        let out = self.cli(home, args, "");
        assert!(out.status.success(), "{}", show(args, &out));
        stdout(&out)
    }

    /// A client home `name` in the node's temp dir, registered as `number` with the
    /// CLI.
    pub fn home(&self, name: &str, number: &str) -> PathBuf {
        let home = self.dir.path().join(name);
        self.register_cli(&home, &[], number);
        home
    }

    /// A library client with the device key `creds`, registered as `number` (a test
    /// number) on this node.
    pub async fn registered_as(&self, creds: &Credentials, number: &str) -> Client {
        let client = Client::connect(&self.addr, creds, Some(self.fingerprint))
            .await
            .expect("connect");
        register(&client, number).await;
        client
    }

    /// A library client with a fresh device key, registered as `number`.
    pub async fn registered(&self, number: &str) -> Client {
        let (creds, _) = Credentials::generate_device().expect("device key");
        self.registered_as(&creds, number).await
    }

    /// Runs the CLI with `home` and `args`, feeding `stdin`.
    pub fn cli(&self, home: &Path, args: &[&str], stdin: &str) -> Output {
        cli(home, args, stdin)
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}

/// Runs `switchboard --home HOME ARGS...` with `stdin` and returns its output.
pub fn cli(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SWITCHBOARD_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    {
        let mut input = child.stdin.take().expect("stdin");
        // The CLI may exit before reading all of it; that is not the test's concern.
        let _ = input.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("wait cli")
}

/// Describes a CLI run for assertion messages.
pub fn show(args: &[&str], out: &Output) -> String {
    format!(
        "switchboard {}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A node running inside the test process, for library tests.
pub struct InProcessNode {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub fingerprint: Fingerprint,
    /// The metrics endpoint's URL, when the config turns it on.
    pub metrics: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessNode {
    /// Starts a node on 127.0.0.1:0 with `config` (TOML) and a fresh data dir.
    pub async fn start(config: &str) -> InProcessNode {
        Self::start_in(tempfile::tempdir().expect("temp dir"), config).await
    }

    /// Starts a node on the data dir kept in `dir` (a restart when it has one).
    pub async fn start_in(dir: tempfile::TempDir, config: &str) -> InProcessNode {
        Self::start_on(dir, "127.0.0.1:0", config).await
    }

    /// Starts a node listening on `listen` (a loopback or wildcard address, port 0).
    pub async fn start_on(dir: tempfile::TempDir, listen: &str, config: &str) -> InProcessNode {
        Self::start_edited(dir, listen, config, |_| {}).await
    }

    /// [`InProcessNode::start`] with settings no config file can give (sub-second
    /// lapses), set by `edit`.
    pub async fn start_with(config: &str, edit: impl FnOnce(&mut Config)) -> InProcessNode {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_edited(dir, "127.0.0.1:0", config, edit).await
    }

    async fn start_edited(
        dir: tempfile::TempDir,
        listen: &str,
        config: &str,
        edit: impl FnOnce(&mut Config),
    ) -> InProcessNode {
        let mut config = Config::parse(config).expect("test config");
        edit(&mut config);
        config.server.listen = listen.parse().expect("addr");
        config.server.data_dir = dir.path().join("data");
        let node = Node::bind(config).await.expect("bind node");
        let addr = node.local_addr().expect("local addr").to_string();
        let fingerprint = node.fingerprint();
        let metrics = node.metrics_addr().map(|a| format!("http://{a}/metrics"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            node.run(async {
                let _ = stopped.await;
            })
            .await
            .expect("node run");
        });
        InProcessNode {
            dir,
            addr,
            fingerprint,
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The value of metric `series` now (the config must turn metrics on).
    pub async fn metric(&self, series: &str) -> f64 {
        let url = self
            .metrics
            .clone()
            .expect("metrics are on in this node's config");
        let (_, _, text) = tokio::task::spawn_blocking(move || http_get(&url))
            .await
            .expect("metrics");
        sample(&parse_openmetrics(&text), series)
    }

    /// Connects a client with a fresh device key, pinned to this node.
    pub async fn connect(&self) -> Client {
        let (creds, _) = Credentials::generate_device().expect("device key");
        self.connect_as(&creds).await
    }

    pub async fn connect_as(&self, creds: &Credentials) -> Client {
        Client::connect(&self.addr, creds, Some(self.fingerprint))
            .await
            .expect("connect")
    }

    /// A client registered as `number` (a test number).
    pub async fn registered(&self, number: &str) -> Client {
        let client = self.connect().await;
        register(&client, number).await;
        client
    }

    /// Stops the node gracefully and waits for it.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    /// Stops the node gracefully and hands back its directory, for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("node task");
        }
        self.dir
    }
}

/// A message to `to`'s device 1 with an opaque body.
pub fn outgoing(
    to: &str,
    id: switchboard::proto::MessageId,
    body: Vec<u8>,
) -> switchboard::proto::Outgoing {
    switchboard::proto::Outgoing {
        expires_in_secs: 0,
        id,
        to: to.into(),
        envelopes: vec![switchboard::proto::DeviceEnvelope { device_id: 1, body }],
    }
}

/// Sends message `i` to `to`: 32 KiB whose first four bytes are `i`.
pub async fn send_numbered(from: &Client, to: &str, i: u32) -> Result<(), ClientError> {
    let mut body = vec![0x42; 32 * 1024];
    body[..4].copy_from_slice(&i.to_be_bytes());
    let id = switchboard::client::e2e::new_message_id();
    from.send(outgoing(to, id, body)).await.map(|_| ())
}

/// A client home registered as `number` (a test number) on the node at `addr`, with
/// its keys published, as `switchboard register` leaves it.
pub async fn registered_home(
    addr: &str,
    fingerprint: Fingerprint,
    number: &str,
) -> (tempfile::TempDir, switchboard::client::Home) {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = registered_home_in(dir.path(), addr, fingerprint, number).await;
    (dir, home)
}

/// [`registered_home`] in the directory `dir`.
pub async fn registered_home_in(
    dir: &Path,
    addr: &str,
    fingerprint: Fingerprint,
    number: &str,
) -> switchboard::client::Home {
    let (creds, pem) = Credentials::generate_device().expect("device key");
    let client = Client::connect(addr, &creds, Some(fingerprint))
        .await
        .expect("connect");
    let n = Number::parse(number, None).expect("number");
    client
        .request_code(&n, Channel::Sms, "en")
        .await
        .expect("request code");
    let registered = client.verify_code(&n, CODE).await.expect("verify");
    let home = switchboard::client::Home::new(Some(dir.to_path_buf())).expect("home");
    let reg = switchboard::client::Registration {
        server: addr.to_string(),
        fingerprint,
        number: n,
        account_id: registered.account_id,
        device_id: registered.device_id,
        credentials: creds,
    };
    home.save(&reg, &pem).expect("save home");
    let db = home.db().expect("home db");
    switchboard::client::e2e::publish(&db, &client, (reg.account_id, reg.device_id), 0)
        .await
        .expect("publish keys");
    client.close().await;
    home
}

/// The texts of the messages among `events`, in order.
pub fn texts(events: &[switchboard::client::Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            switchboard::client::Event::Message(m) => match &m.content {
                Some(switchboard::client::content::Content::Text(t)) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Receives this messenger's backlog; returns every event.
/// Links the new home `new` to the account of the primary `primary` through the
/// library (both sides at once, as on two devices); returns the new device's id.
pub async fn link_home(
    primary: &switchboard::client::Home,
    new: &switchboard::client::Home,
    addr: &str,
    fingerprint: Fingerprint,
    name: &str,
) -> u32 {
    use switchboard::client::link;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opened = link::link_device(primary, move |code, _| {
        let _ = tx.send(*code);
    });
    let joined = async {
        let code = rx.await.expect("a code");
        link::join_account(new, code, addr, name, Some(fingerprint)).await
    };
    let (linked, joined) = tokio::join!(opened, joined);
    let linked = linked.expect("devices link");
    let joined = joined.expect("devices join");
    assert_eq!(linked.device_id, joined.device_id);
    link::welcome(primary, linked.device_id)
        .await
        .expect("history to the new device");
    linked.device_id
}

pub async fn receive_backlog(
    messenger: &switchboard::client::Messenger,
) -> Vec<switchboard::client::Event> {
    let mut events = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        messenger.receive(false, std::future::pending(), |e| events.push(e)),
    )
    .await
    .expect("the backlog within 30 s")
    .expect("receive");
    events
}

/// Registers `client`'s device as `number`, a test number (its code is [`CODE`]).
pub async fn register(client: &Client, number: &str) {
    let number = Number::parse(number, None).expect("number");
    client
        .request_code(&number, Channel::Sms, "en")
        .await
        .expect("request code");
    client.verify_code(&number, CODE).await.expect("verify");
}

/// The next push on a delivery stream, within 10 s.
pub async fn next_push(sub: &mut switchboard::client::Subscription) -> switchboard::proto::Push {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a push within 10 s")
        .expect("delivery stream")
        .expect("the stream stays open")
}

/// The numbers of the numbered messages (see [`numbered`]) in `push`, in order.
pub fn push_numbers(push: &switchboard::proto::Push) -> Vec<u32> {
    push.items
        .iter()
        .filter_map(|d| match &d.item {
            switchboard::proto::Item::Message(m) => Some(numbered(&m.body)),
            _ => None,
        })
        .collect()
}

/// The `i` of a message from [`send_numbered`].
pub fn numbered(body: &[u8]) -> u32 {
    u32::from_be_bytes(body[..4].try_into().expect("a numbered message"))
}

pub fn number(s: &str) -> Number {
    Number::parse(s, None).expect("number")
}

/// The kind of the node error `result` must be.
pub fn kind<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorKind {
    match result {
        Err(ClientError::Node(e)) => e.kind,
        other => panic!("expected a node error, got {other:?}"),
    }
}

/// GET over plain HTTP/1.1; returns (status line, content-type, body).
pub fn http_get(url: &str) -> (String, String, String) {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut stream = std::net::TcpStream::connect(host).expect("connect metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    let status = head.lines().next().unwrap_or_default().to_string();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// The value of `series` in parsed metrics; panics when it is missing.
pub fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no sample {series}"))
}

/// Checks the OpenMetrics text exposition strictly enough to catch a broken one and
/// returns every sample as (name with labels, value).
pub fn parse_openmetrics(text: &str) -> Vec<(String, f64)> {
    let mut typed = BTreeSet::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (what, name) = (parts.next(), parts.next());
            assert!(
                matches!(what, Some("HELP" | "TYPE" | "UNIT")),
                "bad comment line: {line}"
            );
            if what == Some("TYPE") {
                let t = parts.next().expect("a type");
                assert!(
                    ["counter", "gauge", "histogram", "info", "unknown"].contains(&t),
                    "{line}"
                );
                typed.insert(name.expect("name").to_string());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().expect("name");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
            }
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| typed.contains(*base))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample without a TYPE: {line}");
        samples.push((series.to_string(), value));
    }
    samples
}

/// A UDP relay on 127.0.0.1 between one client and a node, for faults the network
/// makes: with [`LossyRelay::lose_replies`] on, the node's answers never reach the
/// client (nor do its acknowledgements, so the client's QUIC resends its own packets,
/// which still get through). [`LossyRelay::rebind`] is a NAT rebinding: what the client sends reaches the
/// node from a new port, so the node sees the client's address change; the old port
/// still passes the node's datagrams back until [`LossyRelay::forget_old_port`].
pub struct LossyRelay {
    pub addr: String,
    lose: std::sync::Arc<std::sync::atomic::AtomicBool>,
    commands: tokio::sync::mpsc::UnboundedSender<RelayCommand>,
    task: tokio::task::JoinHandle<()>,
}

enum RelayCommand {
    Rebind,
    ForgetOld,
}

impl LossyRelay {
    pub async fn start(node: &str) -> LossyRelay {
        let outer = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("relay socket");
        async fn towards(node: &str) -> tokio::net::UdpSocket {
            let inner = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("relay socket");
            inner.connect(node).await.expect("relay to node");
            inner
        }
        let mut inner = towards(node).await;
        let addr = outer.local_addr().expect("relay addr").to_string();
        let lose = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (commands, mut command) = tokio::sync::mpsc::unbounded_channel();
        let losing = lose.clone();
        let node = node.to_string();
        let task = tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            let (mut up, mut down, mut old_down) =
                (vec![0u8; 65536], vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            let mut old: Option<tokio::net::UdpSocket> = None;
            loop {
                let from_old = async {
                    match &old {
                        Some(o) => o.recv(&mut old_down).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    cmd = command.recv() => match cmd {
                        None => return,
                        Some(RelayCommand::Rebind) => {
                            old = Some(std::mem::replace(&mut inner, towards(&node).await));
                        }
                        Some(RelayCommand::ForgetOld) => old = None,
                    },
                    got = outer.recv_from(&mut up) => {
                        let Ok((n, from)) = got else { return };
                        client = Some(from);
                        let _ = inner.send(&up[..n]).await;
                    }
                    got = inner.recv(&mut down) => {
                        let Ok(n) = got else { return };
                        let lost = losing.load(SeqCst);
                        if let (Some(to), false) = (client, lost) {
                            let _ = outer.send_to(&down[..n], to).await;
                        }
                    }
                    got = from_old => {
                        let Ok(n) = got else { return };
                        if let Some(to) = client {
                            let _ = outer.send_to(&old_down[..n], to).await;
                        }
                    }
                }
            }
        });
        LossyRelay {
            addr,
            lose,
            commands,
            task,
        }
    }

    /// From now on, lose every datagram from the node (or pass them again).
    pub fn lose_replies(&self, lose: bool) {
        self.lose.store(lose, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sends on towards the node from a new local port.
    pub fn rebind(&self) {
        let _ = self.commands.send(RelayCommand::Rebind);
    }

    /// Closes the port used before the last [`LossyRelay::rebind`].
    pub fn forget_old_port(&self) {
        let _ = self.commands.send(RelayCommand::ForgetOld);
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP relay on 127.0.0.1 between one client and a node that behaves like a bad
/// network, from a seed (the same seed, the same fate for the same datagrams): each
/// datagram, either way, is lost with probability `loss`, sent twice with probability
/// `duplicate`, and held back for a random delay of up to `max_delay` (so datagrams
/// overtake each other). The delays are bounded, and so is everything it holds.
pub struct ChaosRelay {
    pub addr: String,
    /// Datagrams lost and sent twice so far.
    lost: std::sync::Arc<std::sync::atomic::AtomicU64>,
    doubled: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosRelay {
    pub async fn start(
        node: &str,
        seed: u64,
        loss: f64,
        duplicate: f64,
        max_delay: Duration,
    ) -> ChaosRelay {
        use rand::{RngExt, SeedableRng};
        let outer = std::sync::Arc::new(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("relay socket"),
        );
        let inner = std::sync::Arc::new(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("relay socket"),
        );
        inner.connect(node).await.expect("relay to node");
        let addr = outer.local_addr().expect("relay addr").to_string();
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let doubled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (losing, doubling) = (lost.clone(), doubled.clone());
        let task = tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let client = std::sync::Arc::new(std::sync::Mutex::new(None));
            loop {
                // (datagram, towards the node?)
                let (bytes, to_node) = tokio::select! {
                    got = outer.recv_from(&mut up) => {
                        let Ok((n, from)) = got else { return };
                        *client.lock().unwrap() = Some(from);
                        (up[..n].to_vec(), true)
                    }
                    got = inner.recv(&mut down) => {
                        let Ok(n) = got else { return };
                        (down[..n].to_vec(), false)
                    }
                };
                if rng.random_bool(loss) {
                    losing.fetch_add(1, Relaxed);
                    continue;
                }
                let copies = if rng.random_bool(duplicate) {
                    doubling.fetch_add(1, Relaxed);
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let delay = max_delay.mul_f64(rng.random_range(0.0..1.0));
                    let (outer, inner, client, bytes) =
                        (outer.clone(), inner.clone(), client.clone(), bytes.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if to_node {
                            let _ = inner.send(&bytes).await;
                        } else {
                            let to = *client.lock().unwrap();
                            if let Some(to) = to {
                                let _ = outer.send_to(&bytes, to).await;
                            }
                        }
                    });
                }
            }
        });
        ChaosRelay {
            addr,
            lost,
            doubled,
            task,
        }
    }

    /// (datagrams lost, datagrams sent twice) so far.
    pub fn faults(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.lost.load(Relaxed), self.doubled.load(Relaxed))
    }
}

impl Drop for ChaosRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A registered home and its messenger.
pub async fn person(
    node: &InProcessNode,
    number: &str,
) -> (
    tempfile::TempDir,
    switchboard::client::Home,
    switchboard::client::Messenger,
) {
    let (dir, home) = registered_home(&node.addr, node.fingerprint, number).await;
    let messenger = switchboard::client::Messenger::open(&home).expect("messenger");
    (dir, home, messenger)
}

/// A new device linked to `primary`'s account ("laptop"), with its messenger, its
/// backlog (the history the primary sent) taken.
pub async fn linked_laptop(
    node: &InProcessNode,
    primary: &switchboard::client::Home,
) -> (tempfile::TempDir, switchboard::client::Messenger) {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = switchboard::client::Home::new(Some(dir.path().to_path_buf())).expect("home");
    link_home(primary, &home, &node.addr, node.fingerprint, "laptop").await;
    let laptop = switchboard::client::Messenger::open(&home).expect("messenger");
    receive_backlog(&laptop).await;
    (dir, laptop)
}

/// `devices link` of `primary`, running: the process, the link code it printed
/// first, and the rest of its stdout (to read once the other side joined).
pub fn start_link(
    primary: &Path,
) -> (
    Child,
    String,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(primary)
        .args(["devices", "link"])
        .env_remove("SWITCHBOARD_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn devices link");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let code = lines.next().expect("a line").expect("read");
    (child, code, lines)
}

/// Asks `client`'s node, by hand, for an upload of `size` bytes of ciphertext
/// (resuming `resume` if given): the stream to write the chunks on, and the id and
/// offset the node answered with. A test breaks an upload off with it.
pub async fn begin_upload(
    client: &Client,
    size: u64,
    resume: Option<[u8; 16]>,
) -> (quinn::SendStream, quinn::RecvStream, [u8; 16], u64) {
    use switchboard::proto::{Reply, Request, Response, frame};
    let (mut send, mut recv) = client.connection().open_bi().await.expect("a stream");
    let upload = Request::Upload {
        size,
        downloads: 0,
        resume,
    };
    frame::write(&mut send, &upload).await.expect("the request");
    match frame::read::<Reply, _>(&mut recv, 1 << 20).await {
        Ok(Some(Reply::Ok(Response::UploadReady { id, offset }))) => (send, recv, id, offset),
        other => panic!("no upload: {other:?}"),
    }
}
