//! `drain`: a device comes online to a backlog and drains it through the client
//! library (decrypt, write to the history, acknowledge: `Messenger::receive`), beside
//! a bare vodozemac loop decrypting the same envelopes with the same account in the
//! same run.

use std::collections::HashMap;

use switchboard::client::{Event, Home, Messenger, Registration, e2e};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};

use super::*;

/// A home registered as `number` on the node, with its keys published.
async fn home(dir: &Path, addr: &str, fp: Fingerprint, number: &Number) -> Result<Home> {
    let (creds, pem) = Credentials::generate_device().map_err(err)?;
    let client = Client::connect(addr, &creds, Some(fp)).await.map_err(err)?;
    client
        .request_code(number, Channel::Sms, "en")
        .await
        .map_err(err)?;
    let registered = client.verify_code(number, CODE).await.map_err(err)?;
    let home = Home::new(Some(dir.to_path_buf())).map_err(err)?;
    let reg = Registration {
        server: addr.to_string(),
        fingerprint: fp,
        number: number.clone(),
        account_id: registered.account_id,
        device_id: registered.device_id,
        credentials: creds,
    };
    home.save(&reg, &pem).map_err(err)?;
    let db = home.db().map_err(err)?;
    e2e::publish(&db, &client, (reg.account_id, reg.device_id), 0)
        .await
        .map_err(err)?;
    client.close().await;
    Ok(home)
}

pub async fn run(messages: usize, senders: usize, size: usize) -> Result<()> {
    println!(
        "drain: {messages} messages of {size} bytes from {senders} senders, received through \
         the client library"
    );
    let senders = senders.max(1);
    let nums = numbers(senders + 1);
    let extra = format!(
        "[messages]\nmax_queued_per_device = {}\nenvelopes_per_account_minute = 1000000000\n",
        messages * 2 + 1000
    );
    let (server, fp) = start_node(&nums, &extra)?;
    let tmp = tempfile::tempdir().map_err(err)?;
    let receiver = home(&tmp.path().join("receiver"), &server.addr, fp, &nums[0]).await?;

    // The senders write through the library too (one session each, real Olm).
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, number) in nums[1..].iter().enumerate() {
        let dir = tmp.path().join(format!("sender{i}"));
        let sender = home(&dir, &server.addr, fp, number).await?;
        let to = nums[0].clone();
        let count = messages / senders + usize::from(i < messages % senders);
        tasks.spawn(async move {
            let messenger = Messenger::open(&sender).map_err(err)?;
            for n in 0..count {
                let mut text = format!("{i}/{n} ");
                text.extend(std::iter::repeat_n('x', size.saturating_sub(text.len())));
                messenger.send_text(&to, &text).await.map_err(err)?;
            }
            messenger.close().await;
            Ok::<_, String>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(err)??;
    }
    println!(
        "  sent in {:.1}s through the library",
        started.elapsed().as_secs_f64()
    );

    // The same envelopes for the bare loop: read once from the node without being
    // acknowledged (they stay queued), with the receiver's account as it is now.
    let reg = receiver.load().map_err(err)?;
    let account = e2e::account_pickle(&receiver.db().map_err(err)?).map_err(err)?;
    let raw = Client::connect(&reg.server, &reg.credentials, Some(fp))
        .await
        .map_err(err)?;
    let mut sub = raw.subscribe().await.map_err(err)?;
    let mut envelopes = Vec::with_capacity(messages);
    loop {
        let push = sub.next().await.map_err(err)?.ok_or("the stream ended")?;
        for d in push.items {
            if let Item::Message(m) = d.item {
                envelopes.push(m);
            }
        }
        if push.backlog_end {
            break;
        }
    }
    sub.finish().await.map_err(err)?;
    raw.close().await;
    if envelopes.len() != messages {
        return Err(format!(
            "{} envelopes queued, expected {messages}",
            envelopes.len()
        ));
    }

    // Bare: vodozemac alone, sessions in a map, nothing stored.
    let started = Instant::now();
    let mut account = Account::from_pickle(account);
    let mut sessions: HashMap<(String, u32), Session> = HashMap::new();
    let mut decrypted = 0usize;
    for m in &envelopes {
        let (&kind, body) = m.body.split_first().ok_or("an empty envelope")?;
        let message = OlmMessage::from_parts(kind as usize, body).map_err(err)?;
        let key = (m.from.clone(), m.from_device);
        let plaintext = match (sessions.get_mut(&key), &message) {
            (Some(session), _) => session.decrypt(&message).map_err(err)?,
            (None, OlmMessage::PreKey(pre_key)) => {
                let created = account
                    .create_inbound_session(
                        SessionConfig::version_1(),
                        pre_key.identity_key(),
                        pre_key,
                    )
                    .map_err(err)?;
                sessions.insert(key, created.session);
                created.plaintext
            }
            (None, OlmMessage::Normal(_)) => {
                return Err("a normal message without a session".into());
            }
        };
        decrypted += usize::from(!plaintext.is_empty());
    }
    let bare = started.elapsed();

    // The library: connect, drain, decrypt, store, acknowledge.
    let messenger = Messenger::open(&receiver).map_err(err)?;
    let started = Instant::now();
    let mut received = 0usize;
    let mut problems = 0usize;
    messenger
        .receive(false, std::future::pending(), |e| match e {
            Event::Message(_) => received += 1,
            Event::Waiting { .. } | Event::Undecryptable(_) | Event::Warning(_) => problems += 1,
            _ => {}
        })
        .await
        .map_err(err)?;
    let library = started.elapsed();
    messenger.close().await;
    if received != messages || decrypted != messages || problems > 0 {
        return Err(format!(
            "the library received {received} ({problems} problems), the bare loop \
             decrypted {decrypted}, of {messages}"
        ));
    }
    let rate = |d: Duration| messages as f64 / d.as_secs_f64();
    report(
        &[
            Figure {
                scenario: "drain",
                metric: format!("{messages} messages: decrypted and stored per second"),
                unit: "msg/s",
                node: rate(library),
                limit: Some(rate(bare)),
            },
            Figure {
                scenario: "drain",
                metric: "time to drain the backlog".into(),
                unit: "ms",
                node: library.as_secs_f64() * 1000.0,
                limit: Some(bare.as_secs_f64() * 1000.0),
            },
        ],
        &[
            "limit: vodozemac decrypting the same envelopes in a loop, in memory (sessions \
             in a map, nothing written)"
                .into(),
            "switchboard: Messenger::receive from connect to the backlog's end: pushes, \
             decryption, one SQLite transaction per batch (history, seen ids, sessions; \
             fsynced), acknowledgements"
                .into(),
        ],
    );
    Ok(())
}
