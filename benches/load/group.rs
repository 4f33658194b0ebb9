//! The `group` scenario: one group of `members` accounts × `devices` devices; `senders`
//! members send 256-byte group messages (one upload each, fanned out by the node to
//! every other device), beside bare quinn fanning the same bytes out to the same
//! connections; then the data dir's bytes per group message queued for offline devices.

use switchboard::proto::{ErrorKind, group_devices_digest};

use super::*;

pub async fn run(
    members: usize,
    devices: usize,
    senders: usize,
    window: usize,
    duration: Duration,
    size: usize,
) -> Result<()> {
    let members = members.max(2);
    let devices = devices.clamp(1, 5);
    let senders = senders.clamp(1, members);
    let fan_out = members * devices - 1;
    println!(
        "group: {members} members × {devices} devices, {senders} senders, window {window}, \
         {size}-byte messages, {duration:?} per phase"
    );
    let nums = numbers(members);
    let (server, fp) = start_node_lines(
        &nums,
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
         [accounts]\nlink_joins_per_address_hour = 1000000\n\
         [groups]\nchanges_per_account_hour = 1000000\n\
         [messages]\nenvelopes_per_account_minute = 1000000000",
        2,
    )?;
    let eps = endpoints(4)?;
    let (primaries, took) = register_all(&server.addr, fp, &nums, &eps, 64).await?;
    println!(
        "  node: registered {} devices in {:.1}s",
        primaries.len(),
        took.as_secs_f64()
    );
    let all = relay::link_companions(&server.addr, fp, primaries, devices, &eps).await?;
    let mut clients = Vec::new();
    for (i, d) in all.iter().enumerate() {
        let client = Client::connect_via(&eps[i % eps.len()], &server.addr, &d.creds, Some(fp))
            .await
            .map_err(err)?;
        clients.push(Arc::new(client));
    }
    let group = clients[0]
        .create_group(&nums[1..], vec![0; 64])
        .await
        .map_err(err)?
        .group_id;
    // Each sender's digest of the devices its messages go to, as the node lists them.
    let sending: Vec<Arc<Client>> = (0..senders).map(|m| clients[m * devices].clone()).collect();
    let mut digests = Vec::new();
    for c in &sending {
        match c
            .send_group(
                group,
                switchboard::client::e2e::new_message_id(),
                vec![],
                [0; 32],
            )
            .await
        {
            Err(ClientError::Node(e)) => match e.kind {
                ErrorKind::GroupDevicesChanged { members } => {
                    digests.push(group_devices_digest(&members))
                }
                other => return Err(format!("expected the group's devices, got {other:?}")),
            },
            other => return Err(format!("expected the group's devices, got {other:?}")),
        }
    }
    let digests = Arc::new(digests);

    let base = Instant::now();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = tokio::task::JoinSet::new();
    for client in &clients {
        let mut sub = client.subscribe().await.map_err(err)?;
        let (tally, stop) = (tally.clone(), stop.clone());
        receivers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(Some(push))) =
                    tokio::time::timeout(Duration::from_millis(500), sub.next()).await
                else {
                    continue;
                };
                let seqs: Vec<u64> = push.items.iter().map(|d| d.seq).collect();
                for d in &push.items {
                    if let Item::GroupMessage(g) = &d.item {
                        tally.record(latency_of(base, &g.body));
                    }
                }
                if !seqs.is_empty() && sub.ack(seqs).await.is_err() {
                    break;
                }
            }
            let _ = sub.finish().await;
        });
    }
    let send_one = {
        let digests = digests.clone();
        move |client: Arc<Client>, me: usize| {
            let digest = digests[me];
            async move {
                client
                    .send_group(
                        group,
                        switchboard::client::e2e::new_message_id(),
                        payload(base, size),
                        digest,
                    )
                    .await
                    .is_ok()
            }
        }
    };
    let node = relay::measure(
        &sending,
        &tally,
        window,
        duration,
        &[server.pid()],
        relay::Offered {
            half_rate: None,
            envelopes_per_send: fan_out,
        },
        send_one,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while receivers.join_next().await.is_some() {}

    // Everyone away: what the data dir grows by per group message queued for all.
    let data = server
        ._dir
        .as_ref()
        .ok_or("no data dir")?
        .path()
        .join("data");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = dir_bytes(&data);
    const OFFLINE: usize = 500;
    for _ in 0..OFFLINE {
        sending[0]
            .send_group(
                group,
                switchboard::client::e2e::new_message_id(),
                payload(base, size),
                digests[0],
            )
            .await
            .map_err(err)?;
    }
    let grown = dir_bytes(&data).saturating_sub(before) as f64 / OFFLINE as f64;
    let goal = (size + 64 * fan_out) as f64;
    drop((sending, clients));
    drop(server);

    let bare = bare_run(
        members * devices,
        &sending_indices(senders, devices),
        window,
        duration,
        size,
        fan_out,
        node.half_rate,
    )
    .await?;
    let p = |v: &[u64], q| percentile(v, q) / 1000.0;
    let figures = vec![
        Figure {
            scenario: "group",
            metric: format!(
                "delivered envelopes/s, {members} members × {devices} devices, saturated"
            ),
            unit: "msg/s",
            node: node.saturated,
            limit: Some(bare.saturated),
        },
        Figure {
            scenario: "group",
            metric: "delivered per recipient device, saturated".into(),
            unit: "msg/s",
            node: node.saturated / fan_out as f64,
            limit: Some(bare.saturated / fan_out as f64),
        },
        Figure {
            scenario: "group",
            metric: "latency p50 at the node's half load".into(),
            unit: "µs",
            node: p(&node.latencies.sorted, 0.50),
            limit: Some(p(&bare.latencies.sorted, 0.50)),
        },
        Figure {
            scenario: "group",
            metric: "latency p99 at the node's half load".into(),
            unit: "µs",
            node: p(&node.latencies.sorted, 0.99),
            limit: Some(p(&bare.latencies.sorted, 0.99)),
        },
        Figure {
            scenario: "group",
            metric: "server CPU per delivered envelope".into(),
            unit: "µs",
            node: node.cpu_per_message_us,
            limit: Some(bare.cpu_per_message_us),
        },
        Figure {
            scenario: "group",
            metric: format!("data dir bytes per group message queued for {fan_out} devices"),
            unit: "B",
            node: grown,
            limit: Some(goal),
        },
    ];
    let notes = vec![
        "limit: bare quinn relay fanning each message out to the same connections (one stream from the sender carrying the inbox ids); no storage, no auth, no acks, no counts".to_string(),
        format!("data dir limit: the goal, one {size}-byte body + 64 B per recipient device; measured over {OFFLINE} messages to offline devices"),
        format!("switchboard saturated: cores used: server {:.2}, load generator {:.2}; {}", node.saturated_cores.0, node.saturated_cores.1, node.sends),
        format!("bare quinn saturated: cores used: server {:.2}, load generator {:.2}", bare.saturated_cores.0, bare.saturated_cores.1),
    ];
    report(&figures, &notes);
    Ok(())
}

/// The client indices of the sending devices: each sender member's first device.
fn sending_indices(senders: usize, devices: usize) -> Vec<usize> {
    (0..senders).map(|m| m * devices).collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

async fn bare_run(
    connections: usize,
    senders: &[usize],
    window: usize,
    duration: Duration,
    size: usize,
    fan_out: usize,
    half_rate: f64,
) -> Result<relay::Run> {
    let (server, cert) = start_bare()?;
    let eps = endpoints(4)?;
    let base = Instant::now();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (conns, mut receivers) =
        relay::bare_inboxes(connections, &eps, &server, &cert, base, &tally, &stop).await?;
    let sending: Vec<Arc<quinn::Connection>> = senders.iter().map(|&i| conns[i].clone()).collect();
    let inboxes: Arc<Vec<Vec<u32>>> = Arc::new(
        senders
            .iter()
            .map(|&s| {
                (0..connections as u32)
                    .filter(|&i| i as usize != s)
                    .collect()
            })
            .collect(),
    );
    let send_one = move |conn: Arc<quinn::Connection>, me: usize| {
        let inboxes = inboxes.clone();
        async move {
            bare::send_many(&conn, &inboxes[me], payload(base, size))
                .await
                .is_ok()
        }
    };
    let run = relay::measure(
        &sending,
        &tally,
        window,
        duration,
        &[server.pid()],
        relay::Offered {
            half_rate: Some(half_rate),
            envelopes_per_send: fan_out,
        },
        send_one,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while receivers.join_next().await.is_some() {}
    Ok(run)
}
