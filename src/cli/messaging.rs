//! `switchboard send`, `recv` and `safety`: end-to-end encrypted messaging.

use std::io::{Read, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use switchboard::client::contacts::Book;
use switchboard::client::e2e::{self, Content, ONE_TIME_KEY_TARGET, Opened, Vault};
use switchboard::client::{Client, Home, Registration};
use switchboard::phone::{Number, Region};
use switchboard::proto::{Item, Push};

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The recipient: a number (a national number is read in your own region unless
    /// --region says otherwise), or the name of a contact (`switchboard contacts`).
    number: String,
    /// The message; `-` reads it from stdin.
    text: String,
    /// Region for a number in national form (two letters: US, GB, DE...).
    #[arg(long)]
    region: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// Stay connected and print messages as they arrive (until Ctrl-C).
    #[arg(long)]
    follow: bool,
    /// One JSON object a line: `id`, `from`, `sent_at`, `text`; receipts as
    /// `{"delivered": {...}}`.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SafetyArgs {
    /// The contact's number.
    number: String,
    /// Region for a number in national form.
    #[arg(long)]
    region: Option<String>,
}

/// The number meant by `who`: a phone number, or else a contact's name.
fn contact(
    home: &Home,
    reg: &Registration,
    who: &str,
    region: Option<&str>,
) -> anyhow::Result<Number> {
    let region = match region {
        Some(r) => Some(r.parse::<Region>()?),
        None => reg.number.region(),
    };
    let not_a_number = match Number::parse(who, region) {
        Ok(n) => return Ok(n),
        Err(e) => e,
    };
    let book = Book::load(home.dir())?;
    let matches = book.by_name(who);
    match matches.as_slice() {
        [] => Err(anyhow::anyhow!(
            "{not_a_number}, and no contact is called {who:?}"
        )),
        [one] => Ok(Number::parse_e164(&one.number)?),
        many => {
            let numbers: Vec<&str> = many.iter().map(|c| c.number.as_str()).collect();
            bail!(
                "{} contacts are called {who:?} ({}); give the number instead",
                many.len(),
                numbers.join(", ")
            )
        }
    }
}

async fn connect(reg: &Registration) -> anyhow::Result<Client> {
    Ok(Client::connect(&reg.server, &reg.credentials, Some(reg.fingerprint)).await?)
}

/// Publishes this device's keys if this vault has not done so for this registration.
async fn ensure_published(
    vault: &mut Vault,
    client: &Client,
    reg: &Registration,
) -> anyhow::Result<()> {
    let device = (reg.account_id, reg.device_id);
    if !vault.published_for(device) {
        vault
            .publish(client, device, 0)
            .await
            .context("publishing this device's encryption keys")?;
    }
    Ok(())
}

pub async fn send(home: Home, args: SendArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let to = contact(&home, &reg, &args.number, args.region.as_deref())?;
    if to == reg.number {
        bail!("{to} is this device's own number; send to someone else");
    }
    let text = if args.text == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the message from stdin")?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        text
    } else {
        args.text
    };
    if text.is_empty() {
        bail!("the message is empty");
    }
    let mut vault = Vault::open_with(home.dir(), home.passphrase())?;
    let client = connect(&reg).await?;
    let result = async {
        ensure_published(&mut vault, &client, &reg).await?;
        Ok::<_, anyhow::Error>(vault.send(&client, &to, &Content::Text(text)).await?)
    }
    .await;
    client.close().await;
    let sent = result.with_context(|| format!("sending to {to}"))?;
    if sent.identity_changed {
        eprintln!(
            "warning: {to}'s identity key has changed (new phone, or someone in between); \
             compare `switchboard safety {to}` with them in person"
        );
    }
    println!("{}", hex::encode(sent.id));
    if !sent.delivered.is_empty() {
        // The receipts of these devices came with the answer; `recv` shows none.
        eprintln!("delivered to {to} (devices {:?})", sent.delivered);
    }
    Ok(())
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Text safe to print on a terminal: control characters (escape sequences, newlines)
/// are shown escaped, so a message cannot forge lines or drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Prints one push; returns the seqs to acknowledge.
fn show(
    push: &Push,
    vault: &mut Vault,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<Vec<u64>> {
    let mut seqs = Vec::with_capacity(push.items.len());
    for delivery in &push.items {
        seqs.push(delivery.seq);
        let at = time(delivery.queued_at_ms);
        match &delivery.item {
            Item::Message(incoming) => match vault.open_envelope(incoming) {
                Opened::Message(m) => {
                    if m.identity_changed {
                        eprintln!(
                            "warning: {}'s identity key has changed (new phone, or someone in \
                             between); compare `switchboard safety {}` with them in person",
                            m.from, m.from
                        );
                    }
                    let Content::Text(text) = &m.content;
                    if json {
                        let line = serde_json::json!({
                            "id": hex::encode(m.id),
                            "from": m.from,
                            "sent_at": at,
                            "text": text,
                        });
                        writeln!(out, "{line}")?;
                    } else {
                        writeln!(out, "{at} {} {}", m.from, printable(text))?;
                    }
                }
                Opened::Duplicate => {}
                Opened::Unreadable(reason) => eprintln!(
                    "warning: a message from {} ({}) could not be decrypted: {reason}",
                    incoming.from,
                    hex::encode(incoming.id)
                ),
            },
            Item::Delivered(receipt) => {
                if json {
                    let line = serde_json::json!({
                        "delivered": {
                            "id": hex::encode(receipt.id),
                            "to": receipt.to,
                            "device": receipt.device_id,
                            "at": at,
                        }
                    });
                    writeln!(out, "{line}")?;
                } else {
                    // Second field "delivered", never a number: tells receipts from
                    // messages at a glance and to scripts.
                    writeln!(
                        out,
                        "{at} delivered to {} (id {})",
                        receipt.to,
                        hex::encode(receipt.id)
                    )?;
                }
            }
        }
    }
    out.flush()?;
    Ok(seqs)
}

pub async fn recv(home: Home, args: RecvArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let mut vault = Vault::open_with(home.dir(), home.passphrase())?;
    let client = connect(&reg).await?;
    let result = receive(&client, &mut vault, &reg, &args).await;
    client.close().await;
    result
}

async fn receive(
    client: &Client,
    vault: &mut Vault,
    reg: &Registration,
    args: &RecvArgs,
) -> anyhow::Result<()> {
    ensure_published(vault, client, reg).await?;
    let mut sub = client.subscribe().await?;
    let stdout = std::io::stdout();
    let stop = super::interrupted();
    tokio::pin!(stop);
    loop {
        let push = tokio::select! {
            push = sub.next() => push?,
            () = &mut stop => break,
        };
        let Some(push) = push else {
            bail!("the node ended the delivery stream (is it shutting down?)");
        };
        let seqs = show(&push, vault, args.json, &mut stdout.lock())?;
        // What was shown is remembered before the node may forget it: a crash between
        // the two redelivers, and the remembered id drops the copy.
        vault.save()?;
        if !seqs.is_empty() {
            sub.ack(seqs).await?;
        }
        if let Some(left) = push.one_time_keys_left {
            let device = (reg.account_id, reg.device_id);
            let top_up = ONE_TIME_KEY_TARGET.saturating_sub(left);
            if let Err(e) = vault.publish(client, device, top_up).await {
                eprintln!("warning: could not top up one-time keys: {e}");
            }
        }
        if push.backlog_end && !args.follow {
            break;
        }
    }
    sub.finish().await?;
    Ok(())
}

pub async fn safety(home: Home, args: SafetyArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let them = contact(&home, &reg, &args.number, args.region.as_deref())?;
    let mut vault = Vault::open_with(home.dir(), home.passphrase())?;
    let client = connect(&reg).await?;
    let bundles = client.fetch_bundles(&them, false).await;
    client.close().await;
    let bundles = bundles.with_context(|| format!("fetching {them}'s keys"))?;
    for bundle in &bundles.devices {
        let digits = vault.safety_number(&reg.number, &them, &bundle.identity);
        if vault.note_identity(&them, &bundle.identity) {
            eprintln!("warning: {them}'s identity key has changed since this device last saw it");
        }
        if bundles.devices.len() > 1 {
            println!("device {}:", bundle.device_id);
        }
        println!("{}", e2e::format_safety_number(&digits));
    }
    vault.save()?;
    Ok(())
}
