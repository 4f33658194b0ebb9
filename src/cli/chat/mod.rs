//! `switchboard chat`: a terminal app to chat in, on the client library (the
//! messenger a phone app would use too). `state` is what keys do, `ui` draws it; this
//! file runs them against the terminal, the messenger and the clock.

mod config;
mod info;
mod state;
mod ui;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyEventKind, MouseEvent};
use switchboard::client::contacts::Book;
use switchboard::client::content::Content;
use switchboard::client::groups;
use switchboard::client::messenger::{
    Conversation, TYPING_SHOWN_FOR, cached_profile_in, shown_name,
};
use switchboard::client::{Event, Home, Messenger};
use switchboard::proto::MessageId;

use config::{ChatConfig, Notify};
use state::{ActKind, Action, App, Popup};

#[derive(Debug, clap::Args)]
pub struct ChatArgs {}

/// What wakes the app's loop.
enum Wake {
    Key(ratatui::crossterm::event::KeyEvent),
    Mouse(MouseEvent),
    Paste(String),
    /// The terminal gained (true) or lost the focus.
    Focus(bool),
    Resize,
    /// Something to show in a box (`/info`).
    Popup(Popup),
    /// Something to say on the status line.
    Status(String),
    Event(Box<Event>),
    /// A send (or act) finished: its error, if any.
    Done(Option<String>),
}

/// How long typing in the compose line waits before it says so again.
const TYPING_EVERY: Duration = Duration::from_secs(4);
/// Messages of the open conversation loaded.
const PAGE: usize = 500;

pub async fn run(home: Home, _args: ChatArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let config = ChatConfig::load(home.dir())?;
    let messenger = Messenger::open(&home)?;
    let mut app = App::new(reg.number.to_string(), reg.server.clone());
    app.config = config;
    let saves = home.dir().join("attachments");
    let mut receipted: HashSet<MessageId> = HashSet::new();
    refresh(&mut app, &messenger, &mut receipted).await?;

    let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel::<Wake>();
    let keys = wake.clone();
    std::thread::spawn(move || {
        loop {
            let sent = match event::read() {
                Ok(TermEvent::Key(k)) if k.kind != KeyEventKind::Release => keys.send(Wake::Key(k)),
                Ok(TermEvent::Resize(..)) => keys.send(Wake::Resize),
                Ok(TermEvent::Mouse(m)) => keys.send(Wake::Mouse(m)),
                Ok(TermEvent::FocusGained) => keys.send(Wake::Focus(true)),
                Ok(TermEvent::FocusLost) => keys.send(Wake::Focus(false)),
                // A paste arrives whole, and goes into the compose line whole.
                Ok(TermEvent::Paste(text)) => keys.send(Wake::Paste(text)),
                Ok(_) => Ok(()),
                Err(_) => break,
            };
            if sent.is_err() {
                break;
            }
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let receiver = {
        let (messenger, wake) = (messenger.clone(), wake.clone());
        tokio::spawn(async move {
            messenger
                .receive(
                    true,
                    async {
                        let _ = stopped.await;
                    },
                    move |e| {
                        let _ = wake.send(Wake::Event(Box::new(e)));
                    },
                )
                .await
        })
    };
    app.status = match messenger.client().await {
        Ok(_) => "connected".into(),
        Err(e) => format!("offline ({e})"),
    };

    let mut terminal = ratatui::init();
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::EnableBracketedPaste,
        ratatui::crossterm::event::EnableFocusChange
    );
    if config.mouse {
        let _ = ratatui::crossterm::execute!(
            std::io::stdout(),
            ratatui::crossterm::event::EnableMouseCapture
        );
    }
    let mut typing_said: Option<Instant> = None;
    let mut focused = true;
    let result: anyhow::Result<()> = async {
        loop {
            terminal.draw(|f| ui::draw(f, &app))?;
            let woke = tokio::select! {
                w = woken.recv() => w,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let Some(woke) = woke else { break };
            let action = match woke {
                Wake::Resize => Action::None,
                Wake::Focus(f) => {
                    focused = f;
                    app.focused = f;
                    if f {
                        // What arrived meanwhile is read now that it can be seen.
                        refresh(&mut app, &messenger, &mut receipted).await?;
                    }
                    Action::None
                }
                Wake::Paste(text) => {
                    app.paste(&text);
                    Action::None
                }
                Wake::Popup(p) => {
                    app.popup = Some(p);
                    Action::None
                }
                Wake::Status(s) => {
                    app.status = s;
                    Action::None
                }
                Wake::Done(Some(e)) => {
                    app.status = format!("not sent: {e}");
                    Action::None
                }
                Wake::Done(None) => {
                    refresh(&mut app, &messenger, &mut receipted).await?;
                    Action::None
                }
                Wake::Event(e) => {
                    if let Event::Message(entry) = e.as_ref() {
                        notify(&app, entry, focused);
                    }
                    on_event(&mut app, *e, &messenger, &mut receipted).await?;
                    Action::None
                }
                Wake::Mouse(m) => {
                    let size = terminal.size()?;
                    let areas = ui::areas(
                        ratatui::layout::Rect::new(0, 0, size.width, size.height),
                        &app,
                    );
                    app.mouse(m, &areas)
                }
                Wake::Key(k) => {
                    let before = app.compose.len();
                    let action = app.key(k);
                    // Typing says so, every few seconds at most.
                    if app.compose.len() > before
                        && let Some(conv) = app.open.clone()
                        && typing_said.is_none_or(|t| t.elapsed() >= TYPING_EVERY)
                    {
                        typing_said = Some(Instant::now());
                        let m = messenger.clone();
                        tokio::spawn(async move {
                            let _ = m.typing(&conv, true).await;
                        });
                    }
                    action
                }
            };
            match action {
                Action::Quit => break,
                Action::None => {}
                Action::Open(_) => refresh(&mut app, &messenger, &mut receipted).await?,
                Action::Send(conv, content) => spawn_send(&messenger, &wake, conv, content),
                Action::Act(conv, kind, id, rest) => {
                    spawn_act(&messenger, &wake, conv, kind, id, rest);
                }
                Action::File(conv, path) => {
                    let (m, wake) = (messenger.clone(), wake.clone());
                    tokio::spawn(async move {
                        let sent = m
                            .send_file(&conv, std::path::Path::new(&path), "", &mut |_, _| {})
                            .await;
                        let _ = wake.send(Wake::Done(sent.err().map(|e| e.to_string())));
                    });
                }
                Action::Info(conv, id) => {
                    let names = app.names.clone();
                    spawn_info(&messenger, &wake, app.me.clone(), conv, id, names);
                }
                Action::GroupAdd(group_id, numbers) => {
                    spawn_group_add(&messenger, &wake, reg.clone(), group_id, numbers);
                }
                Action::OpenFile(id) => spawn_save(&messenger, &wake, id, saves.clone(), true),
                Action::SaveFile(id, dir) => {
                    let dir = if dir.trim().is_empty() {
                        saves.clone()
                    } else {
                        std::path::PathBuf::from(dir.trim())
                    };
                    spawn_save(&messenger, &wake, id, dir, false);
                }
            }
        }
        Ok(())
    }
    .await;
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::DisableBracketedPaste,
        ratatui::crossterm::event::DisableFocusChange,
        ratatui::crossterm::event::DisableMouseCapture
    );
    ratatui::restore();
    let _ = stop.send(());
    let _ = receiver.await;
    messenger.close().await;
    result
}

fn spawn_send(
    messenger: &Messenger,
    wake: &tokio::sync::mpsc::UnboundedSender<Wake>,
    conv: Conversation,
    content: Content,
) {
    let (m, wake) = (messenger.clone(), wake.clone());
    tokio::spawn(async move {
        let sent = m.send_to(&conv, content).await;
        let _ = wake.send(Wake::Done(sent.err().map(|e| e.to_string())));
    });
}

fn spawn_act(
    messenger: &Messenger,
    wake: &tokio::sync::mpsc::UnboundedSender<Wake>,
    conv: Conversation,
    kind: ActKind,
    id: String,
    rest: String,
) {
    let (m, wake) = (messenger.clone(), wake.clone());
    tokio::spawn(async move {
        let done = async {
            let to = m.find_message(&id).await?.id;
            let content = match kind {
                ActKind::Reply => Content::Reply { to, text: rest },
                ActKind::React => Content::Reaction { to, emoji: rest },
                ActKind::Edit => Content::Edit { to, text: rest },
                ActKind::Delete => Content::Delete { to },
            };
            m.send_to(&conv, content).await
        }
        .await;
        let _ = wake.send(Wake::Done(done.err().map(|e| e.to_string())));
    });
}

fn spawn_info(
    messenger: &Messenger,
    wake: &tokio::sync::mpsc::UnboundedSender<Wake>,
    me: String,
    conv: Conversation,
    id: String,
    names: std::collections::HashMap<String, String>,
) {
    let (m, wake) = (messenger.clone(), wake.clone());
    tokio::spawn(async move {
        let shown = if id.is_empty() {
            info::conversation(&m, &conv, &names).await
        } else {
            info::message(&m, &me, &id, &names).await
        };
        let _ = wake.send(match shown {
            Ok(p) => Wake::Popup(p),
            Err(e) => Wake::Status(format!("/info: {e}")),
        });
    });
}

fn spawn_group_add(
    messenger: &Messenger,
    wake: &tokio::sync::mpsc::UnboundedSender<Wake>,
    reg: switchboard::client::Registration,
    group_id: u64,
    typed: String,
) {
    let (m, wake) = (messenger.clone(), wake.clone());
    tokio::spawn(async move {
        let said = async {
            // Contact names may hold spaces: commas part them when there are any.
            let words: Vec<&str> = if typed.contains(',') {
                typed.split(',').collect()
            } else {
                typed.split_whitespace().collect()
            };
            let numbers = words
                .iter()
                .map(|w| w.trim())
                .filter(|w| !w.is_empty())
                .map(|w| crate::cli::messaging::contact(m.db(), &reg, w, None))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if numbers.is_empty() {
                anyhow::bail!("name the numbers to add: /group add +15551234567 …");
            }
            let info = m.add_to_group(group_id, &numbers).await?;
            Ok::<_, anyhow::Error>(format!(
                "added {} (the group has {} members)",
                numbers.len(),
                info.members.len()
            ))
        }
        .await;
        let _ = wake.send(Wake::Status(match said {
            Ok(s) => s,
            Err(e) => format!("/group add: {e}"),
        }));
    });
}

/// Downloads the attachment of message `id` into `dir`, then opens it with the
/// system's opener if `open`.
fn spawn_save(
    messenger: &Messenger,
    wake: &tokio::sync::mpsc::UnboundedSender<Wake>,
    id: String,
    dir: std::path::PathBuf,
    open: bool,
) {
    let (m, wake) = (messenger.clone(), wake.clone());
    tokio::spawn(async move {
        let said = async {
            let e = m.find_message(&id).await?;
            let Some(Content::Attachment(att)) = e.content else {
                anyhow::bail!("message {id} has no file");
            };
            let _ = wake.send(Wake::Status(format!("downloading {}…", att.name)));
            let path = m.save_attachment(&att, &dir, &mut |_, _| {}).await?;
            if open {
                opener(&path)?;
                Ok(format!("opened {}", path.display()))
            } else {
                Ok(format!("saved {}", path.display()))
            }
        }
        .await;
        let _ = wake.send(Wake::Status(match said {
            Ok(s) => s,
            Err(e) => format!("file: {e}"),
        }));
    });
}

/// Opens `path` with the system's opener, in the background (its output is not
/// ours: it would draw over the screen).
fn opener(path: &std::path::Path) -> anyhow::Result<()> {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    spawn_quiet(program, [path.as_os_str()])
        .map_err(|e| anyhow::anyhow!("{program} {}: {e}", path.display()))
}

/// Starts `program` in the background with no terminal of ours: its output would
/// draw over the screen.
fn spawn_quiet(
    program: &str,
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> std::io::Result<()> {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(drop)
}

/// The bell or a desktop notification for a message from someone else, unless it
/// is in the open conversation of a focused terminal. A desktop notification
/// says who, never what.
fn notify(app: &App, e: &switchboard::client::history::Entry, focused: bool) {
    if e.outgoing || app.config.notify == Notify::Off {
        return;
    }
    let here = app.open.as_ref().is_some_and(|c| c.peer() == e.peer);
    if here && focused {
        return;
    }
    let author = e
        .group
        .as_ref()
        .map_or(e.peer.as_str(), |g| g.author.as_str());
    let desktop = app.config.notify == Notify::Desktop && {
        let who = app.name(author);
        let (program, args): (&str, Vec<String>) = if cfg!(target_os = "macos") {
            (
                "osascript",
                vec![
                    "-e".into(),
                    format!(
                        "display notification \"new message\" with title \"{}\"",
                        who.replace(['"', '\\'], "")
                    ),
                ],
            )
        } else {
            (
                "notify-send",
                vec!["--app-name=switchboard".into(), who, "new message".into()],
            )
        };
        spawn_quiet(program, args).is_ok()
    };
    if !desktop {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\x07");
        let _ = out.flush();
    }
}

async fn on_event(
    app: &mut App,
    event: Event,
    messenger: &Messenger,
    receipted: &mut HashSet<MessageId>,
) -> anyhow::Result<()> {
    match event {
        Event::Connected => app.status = "connected".into(),
        Event::Reconnecting { reason, .. } => app.status = format!("reconnecting… ({reason})"),
        Event::Typing {
            from,
            group_id,
            typing,
            ..
        } => {
            let here = match (&app.open, group_id) {
                (Some(Conversation::Group(g)), Some(id)) => *g == id,
                (Some(Conversation::With(n)), None) => n.as_str() == from,
                _ => false,
            };
            if here {
                app.typing = typing.then(|| (from, Instant::now() + TYPING_SHOWN_FOR));
            }
        }
        Event::Warning(_) | Event::Waiting { .. } => {}
        _ => {
            if matches!(event, Event::Message(_)) {
                app.typing = None;
            }
            refresh(app, messenger, receipted).await?;
        }
    }
    Ok(())
}

/// Loads the list and the open conversation again; what the open conversation shows
/// of others' messages is read (receipts go, once each).
async fn refresh(
    app: &mut App,
    messenger: &Messenger,
    receipted: &mut HashSet<MessageId>,
) -> anyhow::Result<()> {
    let db = messenger.db().clone();
    let book = Book::load(&db).ok();
    let name_of = |number: &str| -> String {
        let book_name = book
            .as_ref()
            .and_then(|b| b.contacts.iter().find(|c| c.number == number))
            .map(|c| c.name.clone());
        let known = cached_profile_in(&db, number).ok().flatten();
        shown_name(book_name.as_deref(), known.as_ref()).unwrap_or_else(|| number.to_string())
    };
    let summaries = messenger.conversations().await?;
    let mut rows = Vec::new();
    for s in summaries {
        let title = match &s.conversation {
            Conversation::With(n) => name_of(n.as_str()),
            Conversation::Group(g) => db
                .read(|tx| groups::known(tx, *g))
                .ok()
                .flatten()
                .map_or_else(|| format!("group {g}"), |k| k.name),
        };
        let last = ui::text_of(app, &s.last);
        rows.push((s, title, last));
    }
    app.set_rows(rows);
    if let Some(conv) = app.open.clone() {
        app.messages = messenger.page(&conv, PAGE).await?;
        for e in &app.messages {
            let author = e
                .group
                .as_ref()
                .map_or(e.peer.as_str(), |g| g.author.as_str());
            app.names.insert(author.to_string(), name_of(author));
        }
        // Read only what can be seen: not while the terminal is in the background,
        // nor below 60 columns while the list is shown instead.
        let seen = app.focused && !(app.narrow.get() && app.focus == state::Focus::List);
        if !seen {
            return Ok(());
        }
        if let Some(last) = app.messages.last() {
            messenger.mark_conversation_read(&conv, last.seq).await?;
        }
        let fresh: Vec<_> = app
            .messages
            .iter()
            .filter(|e| !e.outgoing && !receipted.contains(&e.id))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            receipted.extend(fresh.iter().map(|e| e.id));
            let m = messenger.clone();
            tokio::spawn(async move {
                let _ = m.mark_read(&fresh).await;
            });
        }
        // The list's unread count of the open one is now 0.
        if let Some(row) = app.rows.iter_mut().find(|r| r.conversation == conv) {
            row.unread = 0;
        }
    }
    Ok(())
}
