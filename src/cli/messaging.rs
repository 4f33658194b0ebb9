//! `switchboard send`, `recv`, `history` and `safety`: end-to-end encrypted messaging.

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use switchboard::client::contacts::Book;
use switchboard::client::content::Content;
use switchboard::client::db::HomeDb;
use switchboard::client::e2e::{self, Olm};
use switchboard::client::groups;
use switchboard::client::history::{Entry, GroupPart, State};
use switchboard::client::{Event, Home, Messenger, Registration};
use switchboard::phone::{Number, Region};

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The recipient and the message: `TO TEXT`, or just `TEXT` with --group. TO is a
    /// number (a national number is read in your own region unless --region says
    /// otherwise) or the name of a contact (`switchboard contacts`); a TEXT of `-`
    /// reads the message from stdin.
    #[arg(num_args = 0..=2, value_names = ["TO", "TEXT"])]
    args: Vec<String>,
    /// Send this file (a photo, a voice note, a document) instead of a text: encrypted
    /// here, uploaded, then announced. `send TO --file PATH`.
    #[arg(long, value_name = "PATH")]
    file: Option<std::path::PathBuf>,
    /// A caption for --file.
    #[arg(long, requires = "file")]
    caption: Option<String>,
    /// Send to this group (its name or id; `switchboard group list`) instead.
    #[arg(long)]
    group: Option<String>,
    /// Region for a number in national form (two letters: US, GB, DE...).
    #[arg(long)]
    region: Option<String>,
    /// Reply to this message (its id as `history` shows it, or the first digits):
    /// the reply quotes it.
    #[arg(long, value_name = "ID")]
    reply_to: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// Stay connected and print messages as they arrive (until Ctrl-C), reconnecting
    /// by itself when the connection goes.
    #[arg(long)]
    follow: bool,
    /// One JSON object a line: `id`, `from`, `sent_at`, `text` (and `group`,
    /// `group_name` for a group message); receipts as `{"delivered": {...}}`, counts
    /// of a group message's deliveries as `{"group_delivered": {...}}`, undecryptable
    /// messages as `{"undecryptable": {...}}`, read receipts as `{"read": {...}}`,
    /// reactions, edits and deletes as `{"changed": {...}}`, typing as
    /// `{"typing": {...}}`, profile changes as `{"profile": {...}}`.
    #[arg(long)]
    json: bool,
    /// Where attachments are saved (default: `attachments` in the home).
    #[arg(long, value_name = "DIR")]
    save_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum AttachmentCommand {
    /// Download a message's attachment again, while the node still has it.
    Get {
        /// The message (its id, or the first digits of it).
        id: String,
        /// Where to save it (default: `attachments` in the home).
        #[arg(long, value_name = "DIR")]
        save_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The contact: a number or a contact's name (not with --group).
    #[arg(required_unless_present = "group")]
    number: Option<String>,
    /// A group's conversation instead (its name or id).
    #[arg(long, conflicts_with = "number")]
    group: Option<String>,
    /// The last N messages.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// One JSON object a line.
    #[arg(long)]
    json: bool,
    /// Region for a number in national form.
    #[arg(long)]
    region: Option<String>,
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
pub(crate) fn contact(
    db: &HomeDb,
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
    let book = Book::load(db)?;
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

/// Prints the warnings of background work (an earlier message sent at last, a retry
/// that failed) on stderr.
pub(crate) fn warn_events(messenger: &Messenger) {
    for event in messenger.take_events() {
        match event {
            Event::Warning(w) => eprintln!("warning: {w}"),
            Event::NewDevice { number, device } => eprintln!(
                "{number} linked a new device (device {device}); their safety number is unchanged"
            ),
            _ => {}
        }
    }
}

/// The message given on the command line (`-`: stdin, without its last newline).
pub(crate) fn message_text(text: String) -> anyhow::Result<String> {
    let text = if text == "-" {
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
        text
    };
    if text.is_empty() {
        bail!("the message is empty");
    }
    Ok(text)
}

pub async fn send(home: Home, args: SendArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let messenger = Messenger::open(&home)?;
    let mut words = args.args.into_iter();
    let (first, second) = (words.next(), words.next());
    if let Some(path) = args.file {
        let conversation = match (&args.group, first, second) {
            (Some(g), None, None) => switchboard::client::messenger::Conversation::Group(
                super::group::group_id(&messenger, g).await?,
            ),
            (None, Some(to), None) => {
                let to = contact(messenger.db(), &reg, &to, args.region.as_deref())?;
                if to == reg.number {
                    bail!("{to} is this device's own number; send to someone else");
                }
                switchboard::client::messenger::Conversation::With(to)
            }
            _ => bail!(
                "with --file, give the recipient (or --group) and no text:                  `send TO --file PATH [--caption TEXT]`"
            ),
        };
        let size = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let bar = (size > 4 << 20 && std::io::stderr().is_terminal()).then(|| bytes_bar(size));
        let mut progress = |done: u64, total: u64| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
        };
        let caption = args.caption.unwrap_or_default();
        let result = messenger
            .send_file(&conversation, &path, &caption, &mut progress)
            .await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        warn_events(&messenger);
        messenger.close().await;
        let id = result.with_context(|| format!("sending {}", path.display()))?;
        println!("{}", hex::encode(id));
        return Ok(());
    }
    if let Some(group) = args.group {
        let (Some(text), None) = (first, second) else {
            bail!("with --group, give just the message: `send --group GROUP TEXT`");
        };
        let text = message_text(text)?;
        let id = super::group::group_id(&messenger, &group).await?;
        let content = with_reply(&messenger, args.reply_to.as_deref(), text).await?;
        let result = messenger.send_group_content(id, content).await;
        warn_events(&messenger);
        messenger.close().await;
        let sent = result.with_context(|| format!("sending to group {group}"))?;
        println!("{}", hex::encode(sent.id));
        return Ok(());
    }
    let (Some(to), Some(text)) = (first, second) else {
        bail!("give the recipient and the message: `send TO TEXT` (or `send --group GROUP TEXT`)");
    };
    let to = contact(messenger.db(), &reg, &to, args.region.as_deref())?;
    if to == reg.number {
        bail!("{to} is this device's own number; send to someone else");
    }
    let text = message_text(text)?;
    let content = with_reply(&messenger, args.reply_to.as_deref(), text).await?;
    let result = messenger.send_content(&to, content).await;
    warn_events(&messenger);
    messenger.close().await;
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

/// A progress bar of bytes, on stderr.
fn bytes_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Sizes as people read them.
fn size_text(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// `text`, as a reply to message `reply_to` when one is given.
async fn with_reply(
    messenger: &Messenger,
    reply_to: Option<&str>,
    text: String,
) -> anyhow::Result<Content> {
    Ok(match reply_to {
        Some(id) => Content::Reply {
            to: messenger.find_message(id).await?.id,
            text,
        },
        None => Content::Text(text),
    })
}

pub(crate) fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Text safe to print on a terminal: control characters (escape sequences, newlines)
/// are shown escaped, so a message cannot forge lines or drive the terminal.
pub(crate) fn printable(text: &str) -> String {
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

/// The text shown for `content` (`quoted`: the text of the message a reply answers).
fn shown(content: &Content) -> String {
    match content {
        Content::Text(text) => text.clone(),
        Content::Reply { text, .. } => text.clone(),
        Content::Unsupported { kind } => {
            format!("[unsupported message (kind {kind}): it needs a newer switchboard]")
        }
        Content::Deleted => "this message was deleted".into(),
        Content::Timer { secs } => format!(
            "[disappearing messages: {}]",
            super::conversation::timer_text(*secs)
        ),
        Content::Reaction { emoji, .. } => format!("[reaction {emoji}]"),
        Content::Edit { text, .. } => format!("[edit] {text}"),
        Content::Delete { .. } => "[delete]".into(),
        Content::Attachment(a) => {
            let file = format!("[file: {}, {}]", a.name, size_text(a.size));
            if a.caption.is_empty() {
                file
            } else {
                format!("{file} {}", a.caption)
            }
        }
    }
}

/// The text of `entry` as a line shows it: a reply starts with what it quotes.
fn line_text(db: &HomeDb, entry: &Entry) -> String {
    let Some(content) = &entry.content else {
        return String::new();
    };
    let mut text = shown(content);
    if let Content::Reply { to, .. } = content {
        let quoted = tokio::task::block_in_place(|| {
            db.read(|tx| switchboard::client::history::find(tx, &entry.peer, to))
        })
        .ok()
        .flatten()
        .and_then(|q| q.content.as_ref().map(shown))
        .unwrap_or_else(|| format!("message {}", &hex::encode(to)[..8]));
        let short: String = quoted.chars().take(40).collect();
        let more = if quoted.chars().count() > 40 {
            "…"
        } else {
            ""
        };
        text = format!("[reply to “{short}{more}”] {text}");
    }
    if entry.edited_at_ms.is_some() {
        text.push_str(" (edited)");
    }
    text
}

/// The reactions on `entry`, as `  [👍 +1415…, ❤ +1…]`, or nothing.
fn reactions(entry: &Entry) -> String {
    if entry.reactions.is_empty() {
        return String::new();
    }
    let all: Vec<String> = entry
        .reactions
        .iter()
        .map(|(who, emoji)| format!("{emoji} {who}"))
        .collect();
    format!("  [{}]", printable(&all.join(", ")))
}

/// How `number` is shown beside it on a line: ` (Mum (Alice A.))` once their profile
/// is known, else nothing (the number says it).
fn name_of(db: &HomeDb, number: &str) -> String {
    let known = tokio::task::block_in_place(|| {
        switchboard::client::messenger::cached_profile_in(db, number)
    })
    .ok()
    .flatten();
    let Some(known) = known else {
        return String::new();
    };
    let book = Book::load(db).ok();
    let book_name = book
        .as_ref()
        .and_then(|b| b.contacts.iter().find(|c| c.number == number))
        .map(|c| c.name.as_str());
    switchboard::client::messenger::shown_name(book_name, Some(&known))
        .map(|n| format!(" ({})", printable(&n)))
        .unwrap_or_default()
}

/// What this device calls group `group_id` (its id, if it does not know it).
fn group_name(db: &HomeDb, group_id: u64) -> String {
    tokio::task::block_in_place(|| db.read(|tx| groups::known(tx, group_id)))
        .ok()
        .flatten()
        .map_or_else(|| format!("group {group_id}"), |g| g.name)
}

/// Prints a group message of `recv`: `<time> [<group>] <from> <text>`.
fn print_group_message(
    db: &HomeDb,
    m: &Entry,
    g: &GroupPart,
    name: &str,
    json: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let at = time(m.at_ms);
    let text = line_text(db, m);
    if json {
        let line = serde_json::json!({
            "id": hex::encode(m.id),
            "group": g.group_id,
            "group_name": name,
            "from": g.author,
            "from_device": m.device,
            "sent_at": at,
            "text": text,
        });
        writeln!(out, "{line}")
    } else {
        writeln!(
            out,
            "{at} [{}] {}{} {}",
            printable(name),
            g.author,
            name_of(db, &g.author),
            printable(&text)
        )
    }
}

/// Prints one event of `recv`: messages and receipts on stdout, the rest on stderr.
fn print_event(db: &HomeDb, event: Event, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    match event {
        Event::Message(m) if m.group.is_some() => {
            let g = m.group.clone().unwrap_or_else(|| unreachable!("matched"));
            print_group_message(db, &m, &g, &group_name(db, g.group_id), json, out)?;
        }
        Event::GroupDelivered {
            group_id,
            id,
            delivered,
            of,
        } => {
            let name = group_name(db, group_id);
            if json {
                let line = serde_json::json!({
                    "group_delivered": {
                        "id": hex::encode(id),
                        "group": group_id,
                        "group_name": name,
                        "delivered": delivered,
                        "of": of,
                    }
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{} delivered to {delivered} of {of} devices in [{}] (id {})",
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                    printable(&name),
                    hex::encode(id)
                )?;
            }
        }
        Event::Message(m) => {
            let at = time(m.at_ms);
            let text = line_text(db, &m);
            if json && m.outgoing {
                let line = serde_json::json!({
                    "id": hex::encode(m.id),
                    "to": m.peer,
                    "from_device": m.device,
                    "sent_at": at,
                    "text": text,
                });
                writeln!(out, "{line}")?;
            } else if json {
                let line = serde_json::json!({
                    "id": hex::encode(m.id),
                    "from": m.peer,
                    "sent_at": at,
                    "text": text,
                });
                writeln!(out, "{line}")?;
            } else if m.outgoing {
                // Sent by another device of this account: second field "to".
                writeln!(
                    out,
                    "{at} to {} {} (sent from your device {})",
                    m.peer,
                    printable(&text),
                    m.device
                )?;
            } else {
                writeln!(
                    out,
                    "{at} {}{} {}",
                    m.peer,
                    name_of(db, &m.peer),
                    printable(&text)
                )?;
            }
        }
        Event::Changed { by, act, entry } => {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let what = match &act {
                Content::Reaction { emoji, .. } if emoji.is_empty() => "unreacted".to_string(),
                Content::Reaction { emoji, .. } => format!("reacted {}", printable(emoji)),
                Content::Edit { .. } => "edited".into(),
                _ => "deleted".into(),
            };
            if json {
                let line = serde_json::json!({
                    "changed": {
                        "id": hex::encode(entry.id),
                        "by": by,
                        "what": match &act {
                            Content::Reaction { .. } => "reaction",
                            Content::Edit { .. } => "edit",
                            _ => "delete",
                        },
                        "emoji": match &act { Content::Reaction { emoji, .. } => Some(emoji), _ => None },
                        "text": line_text(db, &entry),
                        "group": entry.group.as_ref().map(|g| g.group_id),
                    }
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{now} {by} {what}: {} (id {})",
                    printable(&line_text(db, &entry)),
                    hex::encode(entry.id)
                )?;
            }
        }
        Event::Read { by, entry } => {
            let at = entry
                .read
                .iter()
                .find(|(who, _)| *who == by)
                .map_or(entry.at_ms, |(_, at)| *at);
            if json {
                let line = serde_json::json!({
                    "read": {
                        "id": hex::encode(entry.id),
                        "by": by,
                        "at": time(at),
                        "group": entry.group.as_ref().map(|g| g.group_id),
                    }
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{} read by {by} (id {})",
                    time(at),
                    hex::encode(entry.id)
                )?;
            }
        }
        Event::Typing {
            from,
            device,
            group_id,
            typing,
        } => {
            if json {
                let line = serde_json::json!({
                    "typing": { "from": from, "device": device, "group": group_id, "typing": typing }
                });
                writeln!(out, "{line}")?;
            } else if typing {
                let place = group_id.map(|g| format!(" in [{}]", printable(&group_name(db, g))));
                eprintln!("{from} is typing{}…", place.unwrap_or_default());
            }
        }
        Event::ProfileChanged {
            number,
            old_name,
            name,
        } => {
            if json {
                let line = serde_json::json!({
                    "profile": { "number": number, "name": name, "previous_name": old_name }
                });
                writeln!(out, "{line}")?;
            } else {
                match old_name {
                    Some(old) => writeln!(
                        out,
                        "{number} changed their profile name from “{}” to “{}”",
                        printable(&old),
                        printable(&name)
                    )?,
                    None => writeln!(out, "{number} is “{}”", printable(&name))?,
                }
            }
        }
        Event::Delivered {
            to,
            device,
            id,
            at_ms,
        } => {
            let at = time(at_ms);
            if json {
                let line = serde_json::json!({
                    "delivered": {
                        "id": hex::encode(id),
                        "to": to,
                        "device": device,
                        "at": at,
                    }
                });
                writeln!(out, "{line}")?;
            } else {
                // Second field "delivered", never a number: tells receipts from
                // messages at a glance and to scripts.
                writeln!(
                    out,
                    "{at} delivered to {to} device {device} (id {})",
                    hex::encode(id)
                )?;
            }
        }
        Event::Undecryptable(m) => {
            let problem = m.problem.unwrap_or_default();
            if json {
                let line = serde_json::json!({
                    "undecryptable": {
                        "id": hex::encode(m.id),
                        "from": m.peer,
                        "sent_at": time(m.at_ms),
                        "reason": problem,
                    }
                });
                writeln!(out, "{line}")?;
            }
            eprintln!(
                "warning: a message from {} (id {}, {}) could not be decrypted: {problem}",
                m.peer,
                hex::encode(m.id),
                time(m.at_ms)
            );
        }
        Event::Waiting { from, id, reason } => eprintln!(
            "waiting for a message from {from} (id {}): {reason}; asked their device to \
             send it again",
            hex::encode(id)
        ),
        Event::IdentityChanged { number } => eprintln!(
            "warning: {number}'s identity key has changed (new phone, or someone in \
             between); compare `switchboard safety {number}` with them in person"
        ),
        Event::RemovedFromGroup { group_id, name, by } => {
            if json {
                let line = serde_json::json!({
                    "removed_from_group": { "group": group_id, "name": name, "by": by }
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{by} removed you from {} (group {group_id})",
                    printable(&name)
                )?;
            }
        }
        Event::AddedToGroup { group_id, name, by } => {
            if json {
                let line = serde_json::json!({
                    "added_to_group": { "group": group_id, "name": name, "by": by }
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{by} added you to {} (group {group_id})",
                    printable(&name)
                )?;
            }
        }
        Event::NewDevice { number, device } => eprintln!(
            "{number} linked a new device (device {device}); their safety number is unchanged"
        ),
        Event::Reconnecting { reason, retry_in } => eprintln!(
            "reconnecting… ({reason}; next try in {:.1} s)",
            retry_in.as_secs_f64()
        ),
        Event::Connected => eprintln!("connected"),
        Event::Warning(w) => eprintln!("warning: {w}"),
    }
    out.flush()
}

/// Waits until stdout can take a line without blocking (on a pipe: room for
/// PIPE_BUF bytes, which a write of up to that size takes whole and at once), so
/// that marking a message shown and printing it are never separated by a wait: a
/// kill in between would cost that line on the screen.
fn wait_until_stdout_takes_a_line() {
    #[cfg(unix)]
    {
        use rustix::event::{PollFd, PollFlags, poll};
        let stdout = std::io::stdout();
        let mut fds = [PollFd::new(&stdout, PollFlags::OUT)];
        // An error (stdout closed) shows itself when the line is written.
        let _ = poll(&mut fds, None);
    }
}

pub async fn recv(home: Home, args: RecvArgs) -> anyhow::Result<()> {
    let messenger = Messenger::open(&home)?;
    let stdout = std::io::stdout();
    let mut broken = None;
    // Read receipts for what this recv showed, and its attachments, fetched beside
    // the receiving.
    let mut receipts = tokio::task::JoinSet::new();
    let messenger_for_saves = messenger.clone();
    let save_dir = args
        .save_dir
        .clone()
        .unwrap_or_else(|| home.dir().join("attachments"));
    // Each message is printed by exactly one `recv`: the one that marks it shown
    // first. So messages that a `recv` killed earlier had stored but not printed are
    // printed now, and two `recv`s at once print each message once.
    let mut show = |event: Event| {
        let seq = match &event {
            Event::Message(m) | Event::Undecryptable(m) => Some(m.seq),
            _ => None,
        };
        if let Some(seq) = seq {
            wait_until_stdout_takes_a_line();
            match tokio::task::block_in_place(|| messenger.claim_shown(seq)) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => eprintln!("warning: {e}"),
            }
        }
        if let Event::Message(m) = &event
            && !m.outgoing
        {
            let (messenger, shown) = (messenger.clone(), vec![m.clone()]);
            receipts.spawn(async move { messenger.mark_read(&shown).await.map(|_| ()) });
            if let Some(Content::Attachment(att)) = &m.content {
                let (messenger, att, dir) =
                    (messenger_for_saves.clone(), att.clone(), save_dir.clone());
                receipts.spawn(async move {
                    let saved = messenger.save_attachment(&att, &dir, &mut |_, _| {}).await;
                    match &saved {
                        Ok(path) => eprintln!(
                            "saved {} ({}) to {}",
                            printable(&att.name),
                            size_text(att.size),
                            path.display()
                        ),
                        Err(e) => eprintln!(
                            "warning: {} was not saved ({e}); `switchboard attachment get {}` tries again",
                            printable(&att.name),
                            &hex::encode(att.id)[..8]
                        ),
                    }
                    saved.map(|_| ())
                });
            }
        }
        // The whole line in one write: a line on a pipe (up to PIPE_BUF bytes) then
        // comes whole or not at all, even if the process is killed right then.
        let mut line = Vec::new();
        if broken.is_none()
            && let Err(e) =
                print_event(messenger.db(), event, args.json, &mut line).and_then(|()| {
                    let mut out = stdout.lock();
                    out.write_all(&line)?;
                    out.flush()
                })
        {
            // Everything is in the history already; `history` shows it.
            broken = Some(e);
        }
    };
    for entry in messenger.unshown(100_000).await? {
        let event = if entry.content.is_some() {
            Event::Message(entry)
        } else {
            Event::Undecryptable(entry)
        };
        show(event);
    }
    let result = messenger
        .receive(args.follow, super::interrupted(), &mut show)
        .await;
    while let Some(done) = receipts.join_next().await {
        if let Ok(Err(e)) = done
            && !matches!(e, switchboard::client::MessengerError::Attachment(_))
        {
            eprintln!("warning: read receipts not sent yet ({e}); they go with the next command");
        }
    }
    warn_events(&messenger);
    messenger.close().await;
    result?;
    if let Some(e) = broken {
        return Err(anyhow::Error::new(e).context("writing to stdout"));
    }
    Ok(())
}

/// How a history entry's state is shown after its text (`members`: the other
/// members of its group, for "read by n of m").
fn mark(entry: &Entry, members: usize) -> String {
    let mut mark = delivery_mark(entry);
    if entry.outgoing && !entry.read.is_empty() {
        match &entry.group {
            Some(_) => mark.push_str(&format!(" · read by {} of {members}", entry.read.len())),
            None => mark.push_str(" · read"),
        }
    }
    if let Some(until) = entry.expires_at_ms {
        mark.push_str(&format!(" · disappears {}", time(until)));
    }
    mark
}

fn delivery_mark(entry: &Entry) -> String {
    match entry.state {
        State::Sending => "  (not sent yet)".into(),
        State::Sent => "  (sent)".into(),
        State::Delivered => match &entry.group {
            Some(g) => format!("  (delivered to {} of {})", g.delivered, g.of),
            None => "  (delivered)".into(),
        },
        State::Failed => format!(
            "  (not sent: {})",
            entry.problem.as_deref().unwrap_or("refused")
        ),
        State::Received | State::Undecryptable => String::new(),
    }
}

pub async fn history(home: Home, args: HistoryArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let me = reg.number.to_string();
    let (peer, shown_as, members) = match (&args.group, &args.number) {
        (Some(group), _) => {
            let messenger = Messenger::open(&home)?;
            let id = super::group::group_id(&messenger, group).await?;
            let name = group_name(messenger.db(), id);
            // For "read by n of m": the node knows the members now.
            let members = match messenger.group_info(id).await {
                Ok((info, _)) => info.members.len().saturating_sub(1),
                Err(_) => 0,
            };
            messenger.close().await;
            (switchboard::client::history::group_peer(id), name, members)
        }
        (None, Some(number)) => {
            let db = home.db()?;
            let n = contact(&db, &reg, number, args.region.as_deref())?;
            (n.to_string(), n.to_string(), 1)
        }
        (None, None) => bail!("give a contact or --group"),
    };
    let db = home.db()?;
    // What disappeared goes first, even without a connection.
    db.write(|tx| switchboard::client::history::sweep_expired(tx, wall_ms()))?;
    let entries = db.read(|tx| switchboard::client::history::page(tx, &peer, None, args.limit))?;
    let mut out = std::io::stdout().lock();
    for e in &entries {
        let (from, to) = match (&e.group, e.outgoing) {
            (Some(g), _) => (g.author.as_str(), shown_as.as_str()),
            (None, true) => (me.as_str(), e.peer.as_str()),
            (None, false) => (e.peer.as_str(), me.as_str()),
        };
        let text = match &e.content {
            Some(_) => line_text(&db, e),
            None => format!(
                "[could not be decrypted: {}]",
                e.problem.as_deref().unwrap_or("unknown reason")
            ),
        };
        if args.json {
            let delivered: Vec<_> = e
                .delivered
                .iter()
                .map(|(device, at)| serde_json::json!({"device": device, "at": time(*at)}))
                .collect();
            let line = serde_json::json!({
                "seq": e.seq,
                "id": hex::encode(e.id),
                "direction": if e.outgoing { "sent" } else { "received" },
                "from": from,
                "to": to,
                "at": time(e.at_ms),
                "text": text,
                "state": e.state.name(),
                "delivered_to": delivered,
                "group": e.group.as_ref().map(|g| serde_json::json!({
                    "group": g.group_id,
                    "delivered": g.delivered,
                    "of": g.of,
                    "read": e.read.len(),
                    "members": members,
                })),
                "reply_to": match &e.content {
                    Some(Content::Reply { to, .. }) => Some(hex::encode(to)),
                    _ => None,
                },
                "reactions": e.reactions.iter().map(|(by, emoji)| serde_json::json!({"by": by, "emoji": emoji})).collect::<Vec<_>>(),
                "edited": e.edited_at_ms.is_some(),
                "deleted": matches!(e.content, Some(Content::Deleted)),
                "read_by": e.read.iter().map(|(by, at)| serde_json::json!({"by": by, "at": time(*at)})).collect::<Vec<_>>(),
                "expires_at": e.expires_at_ms.map(time),
                "problem": e.problem,
            });
            writeln!(out, "{line}")?;
        } else {
            let id = hex::encode(e.id);
            writeln!(
                out,
                "{} {from} {}{}{}  ({})",
                time(e.at_ms),
                printable(&text),
                reactions(e),
                mark(e, members),
                &id[..8]
            )?;
        }
    }
    if entries.is_empty() && !args.json {
        writeln!(out, "no messages with {shown_as} yet")?;
    }
    Ok(())
}

pub async fn safety(home: Home, args: SafetyArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let db = home.db()?;
    let them = contact(&db, &reg, &args.number, args.region.as_deref())?;
    // One number per pair of accounts: it covers the account identities (each
    // primary's), whichever devices either account has linked.
    let mine = db.write(|tx| {
        let mut olm = Olm::new(tx);
        let keys = olm.account_identity()?;
        olm.flush()?;
        Ok::<_, e2e::E2eError>(keys)
    })?;
    let client = reg.connect().await?;
    let bundles = client.fetch_bundles(&them, false).await;
    client.close().await;
    let bundles = bundles.with_context(|| format!("fetching {them}'s keys"))?;
    let Some(account) = bundles.devices.iter().find(|b| b.primary) else {
        bail!("{them}'s primary device has not published its keys yet");
    };
    let digits = e2e::safety_number(&reg.number, &mine, &them, &account.identity);
    let changed = db.write(|tx| {
        let mut olm = Olm::new(tx);
        let changed = olm.note_identity(them.as_str(), &account.identity)?;
        olm.flush()?;
        Ok::<_, e2e::E2eError>(changed)
    })?;
    if changed {
        eprintln!("warning: {them}'s identity key has changed since this device last saw it");
    }
    println!("{}", e2e::format_safety_number(&digits));
    Ok(())
}

/// Now, in ms since the Unix epoch.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `attachment get`: a message's attachment, downloaded again.
pub async fn attachment(home: Home, command: AttachmentCommand) -> anyhow::Result<()> {
    let AttachmentCommand::Get { id, save_dir } = command;
    let messenger = Messenger::open(&home)?;
    let result = async {
        let entry = messenger.find_message(&id).await?;
        let Some(Content::Attachment(att)) = entry.content else {
            bail!("message {id} has no attachment");
        };
        let dir = save_dir.unwrap_or_else(|| home.dir().join("attachments"));
        let bar =
            (att.size > 4 << 20 && std::io::stderr().is_terminal()).then(|| bytes_bar(att.size));
        let mut progress = |done: u64, total: u64| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
        };
        let path = messenger.save_attachment(&att, &dir, &mut progress).await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok((att, path?))
    }
    .await;
    messenger.close().await;
    let (att, path) = result?;
    println!("{}", path.display());
    eprintln!("saved {} ({})", printable(&att.name), size_text(att.size));
    Ok(())
}
