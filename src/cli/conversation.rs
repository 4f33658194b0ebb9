//! `switchboard react`, `edit`, `delete`, `timer`, `typing` and `profile`: the rest of
//! a conversation.

use std::io::Write;

use anyhow::{Context, bail};
use switchboard::client::content::Content;
use switchboard::client::messenger::{Conversation, TIMERS, shown_name};
use switchboard::client::{Home, Messenger};

use super::messaging::{contact, printable, time, warn_events};

#[derive(Debug, clap::Args)]
pub struct ReactArgs {
    /// The message (its id as `history` shows it, or the first digits of it).
    id: String,
    /// One emoji; an empty string takes your reaction back.
    emoji: String,
}

#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// Your message (its id, or the first digits of it), sent less than 15 minutes ago.
    id: String,
    /// The new text (`-` reads it from stdin).
    text: String,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Your message (its id, or the first digits of it), sent less than 15 minutes
    /// ago: deleted for everyone.
    id: String,
}

#[derive(Debug, clap::Args)]
pub struct TimerArgs {
    /// The conversation (a number or contact; not with --group) and the timer:
    /// `off`, `1d`, `7d` or `90d`.
    #[arg(num_args = 1..=2, value_names = ["WITH", "TIMER"], required = true)]
    args: Vec<String>,
    /// A group's conversation (its name or id): only its admins may.
    #[arg(long)]
    group: Option<String>,
    /// Region for a number in national form.
    #[arg(long)]
    region: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct TypingArgs {
    /// The contact (not with --group).
    #[arg(required_unless_present = "group")]
    to: Option<String>,
    #[arg(long, conflicts_with = "to")]
    group: Option<String>,
    /// Say typing stopped.
    #[arg(long)]
    stop: bool,
    /// Region for a number in national form.
    #[arg(long)]
    region: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ProfileCommand {
    /// Set your name, about line and photo (end-to-end encrypted: only people you
    /// write to can read them).
    Set {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        about: String,
        /// An image file (JPEG, PNG or WebP): shrunk and re-encoded, without its
        /// metadata (location, camera).
        #[arg(long)]
        photo: Option<std::path::PathBuf>,
    },
    /// Show your profile, or a contact's (fetched with the key they gave you).
    Show {
        number: Option<String>,
        /// Save the photo to this file.
        #[arg(long)]
        save_photo: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        region: Option<String>,
    },
}

/// Sends `content` to the conversation of message `id`'s entry; prints its id.
async fn act(
    home: Home,
    id: &str,
    content: impl FnOnce([u8; 16]) -> Content,
) -> anyhow::Result<()> {
    let messenger = Messenger::open(&home)?;
    let result = async {
        let target = messenger.find_message(id).await?;
        let conversation = Conversation::of(&target)?;
        messenger.send_to(&conversation, content(target.id)).await
    }
    .await;
    warn_events(&messenger);
    messenger.close().await;
    println!("{}", hex::encode(result?));
    Ok(())
}

pub async fn react(home: Home, args: ReactArgs) -> anyhow::Result<()> {
    let emoji = args.emoji.trim().to_string();
    act(home, &args.id, |to| Content::Reaction { to, emoji }).await
}

pub async fn edit(home: Home, args: EditArgs) -> anyhow::Result<()> {
    let text = super::messaging::message_text(args.text)?;
    act(home, &args.id, |to| Content::Edit { to, text }).await
}

pub async fn delete(home: Home, args: DeleteArgs) -> anyhow::Result<()> {
    act(home, &args.id, |to| Content::Delete { to }).await
}

/// The seconds of a timer as people write it.
fn timer_secs(text: &str) -> anyhow::Result<u32> {
    let secs = match text.trim().to_ascii_lowercase().as_str() {
        "off" | "0" => 0,
        "1d" | "24h" => 86_400,
        "7d" | "1w" => 7 * 86_400,
        "90d" => 90 * 86_400,
        other => bail!("{other:?} is not a timer: give off, 1d, 7d or 90d"),
    };
    debug_assert!(TIMERS.contains(&secs));
    Ok(secs)
}

/// How a timer reads.
pub fn timer_text(secs: u32) -> String {
    match secs {
        0 => "off".into(),
        s if s % 86_400 == 0 => format!("{} day{}", s / 86_400, if s == 86_400 { "" } else { "s" }),
        s => format!("{s} seconds"),
    }
}

/// The conversation meant by a contact or `--group`.
async fn conversation(
    messenger: &Messenger,
    home: &Home,
    with: Option<&str>,
    group: Option<&str>,
    region: Option<&str>,
) -> anyhow::Result<Conversation> {
    match (group, with) {
        (Some(g), None) => Ok(Conversation::Group(
            super::group::group_id(messenger, g).await?,
        )),
        (None, Some(who)) => {
            let reg = home.load()?;
            Ok(Conversation::With(contact(
                messenger.db(),
                &reg,
                who,
                region,
            )?))
        }
        _ => bail!("give a contact or --group, not both"),
    }
}

pub async fn timer(home: Home, args: TimerArgs) -> anyhow::Result<()> {
    let messenger = Messenger::open(&home)?;
    let (with, timer) = match (args.group.is_some(), args.args.as_slice()) {
        (true, [t]) => (None, t.as_str()),
        (false, [w, t]) => (Some(w.as_str()), t.as_str()),
        _ => bail!("give the conversation and the timer: `timer WITH 7d` or `timer --group G 7d`"),
    };
    let secs = timer_secs(timer)?;
    let result = async {
        let conv = conversation(
            &messenger,
            &home,
            with,
            args.group.as_deref(),
            args.region.as_deref(),
        )
        .await?;
        messenger
            .set_timer(&conv, secs)
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    warn_events(&messenger);
    messenger.close().await;
    result?;
    println!("disappearing messages: {}", timer_text(secs));
    Ok(())
}

pub async fn typing(home: Home, args: TypingArgs) -> anyhow::Result<()> {
    let messenger = Messenger::open(&home)?;
    let result = async {
        let conv = conversation(
            &messenger,
            &home,
            args.to.as_deref(),
            args.group.as_deref(),
            args.region.as_deref(),
        )
        .await?;
        messenger
            .typing(&conv, !args.stop)
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    messenger.close().await;
    let devices = result?;
    eprintln!("told {devices} connected device(s)");
    Ok(())
}

pub async fn profile(home: Home, command: ProfileCommand) -> anyhow::Result<()> {
    let messenger = Messenger::open(&home)?;
    let result = match command {
        ProfileCommand::Set { name, about, photo } => {
            let photo = match photo {
                Some(path) => {
                    let meta = std::fs::metadata(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if meta.len() > switchboard::client::profile::MAX_PHOTO_FILE_BYTES {
                        bail!("{} is too big for a photo", path.display());
                    }
                    Some(
                        std::fs::read(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                }
                None => None,
            };
            let set = messenger.set_profile(&name, &about, photo.as_deref()).await;
            warn_events(&messenger);
            set.map(|p| {
                println!(
                    "profile set: {}{}",
                    printable(&p.name),
                    p.photo
                        .as_ref()
                        .map(|b| format!(" (photo, {} bytes)", b.len()))
                        .unwrap_or_default()
                );
            })
            .map_err(anyhow::Error::from)
        }
        ProfileCommand::Show {
            number,
            save_photo,
            json,
            region,
        } => show(&messenger, &home, number, save_photo, json, region).await,
    };
    messenger.close().await;
    result
}

async fn show(
    messenger: &Messenger,
    home: &Home,
    number: Option<String>,
    save_photo: Option<std::path::PathBuf>,
    json: bool,
    region: Option<String>,
) -> anyhow::Result<()> {
    let (who, profile, last_seen, book_name, previous) = match number {
        None => {
            let Some(p) = messenger.my_profile().await? else {
                bail!("you have no profile yet: `switchboard profile set --name NAME`");
            };
            (home.load()?.number.to_string(), p, None, None, None)
        }
        Some(n) => {
            let reg = home.load()?;
            let n = contact(messenger.db(), &reg, &n, region.as_deref())?;
            let book = switchboard::client::contacts::Book::load(messenger.db())?;
            let book_name = book
                .contacts
                .iter()
                .find(|c| c.number == n.as_str())
                .map(|c| c.name.clone());
            let Some(k) = messenger.profile_of(&n).await? else {
                bail!(
                    "{n}'s profile cannot be read: they have not given you their profile key \
                     (it comes with their messages), or they have no profile"
                );
            };
            let shown = shown_name(book_name.as_deref(), Some(&k));
            (
                n.to_string(),
                k.profile,
                k.last_seen_ms,
                shown,
                k.previous_name,
            )
        }
    };
    if let Some(path) = &save_photo {
        let Some(photo) = &profile.photo else {
            bail!("{who} has no photo");
        };
        std::fs::write(path, photo).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "number": who,
            "name": profile.name,
            "about": profile.about,
            "photo_bytes": profile.photo.as_ref().map(Vec::len),
            "shown_as": book_name,
            "previous_name": previous,
            "last_seen": last_seen.map(time),
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "{who}: {}",
            printable(book_name.as_deref().unwrap_or(&profile.name))
        )?;
        writeln!(out, "  name:  {}", printable(&profile.name))?;
        if !profile.about.is_empty() {
            writeln!(out, "  about: {}", printable(&profile.about))?;
        }
        if let Some(p) = &profile.photo {
            writeln!(out, "  photo: {} bytes (JPEG)", p.len())?;
        }
        if let Some(at) = last_seen {
            writeln!(out, "  last seen: around {}", time(at))?;
        }
    }
    Ok(())
}
