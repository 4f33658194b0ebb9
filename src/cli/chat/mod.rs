//! `switchboard chat`: a terminal app to chat in, on the client library (the
//! messenger a phone app would use too). `state` is what keys do, `ui` draws it; this
//! file runs them against the terminal, the messenger and the clock.

mod state;
mod ui;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyEventKind};
use switchboard::client::contacts::Book;
use switchboard::client::content::Content;
use switchboard::client::groups;
use switchboard::client::messenger::{
    Conversation, TYPING_SHOWN_FOR, cached_profile_in, shown_name,
};
use switchboard::client::{Event, Home, Messenger};
use switchboard::proto::MessageId;

use state::{ActKind, Action, App};

#[derive(Debug, clap::Args)]
pub struct ChatArgs {}

/// What wakes the app's loop.
enum Wake {
    Key(ratatui::crossterm::event::KeyEvent),
    Resize,
    Event(Box<Event>),
    /// A send (or act) finished: its error, if any.
    Done(Option<String>),
}

/// How long typing in the compose line waits before it says so again.
const TYPING_EVERY: Duration = Duration::from_secs(4);
/// Messages of the open conversation loaded, and of the history scanned for the list.
const PAGE: usize = 500;
const LIST_SCAN: usize = 10_000;

pub async fn run(home: Home, _args: ChatArgs) -> anyhow::Result<()> {
    let reg = home.load()?;
    let messenger = Messenger::open(&home)?;
    let mut app = App::new(reg.number.to_string(), reg.server.clone());
    let mut receipted: HashSet<MessageId> = HashSet::new();
    refresh(&mut app, &messenger, &mut receipted).await?;

    let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel::<Wake>();
    let keys = wake.clone();
    std::thread::spawn(move || {
        loop {
            let sent = match event::read() {
                Ok(TermEvent::Key(k)) if k.kind != KeyEventKind::Release => keys.send(Wake::Key(k)),
                Ok(TermEvent::Resize(..)) => keys.send(Wake::Resize),
                Ok(TermEvent::Paste(text)) => {
                    // A paste arrives whole: typed in as characters.
                    text.chars().try_for_each(|c| {
                        keys.send(Wake::Key(ratatui::crossterm::event::KeyEvent::from(
                            ratatui::crossterm::event::KeyCode::Char(c),
                        )))
                    })
                }
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
        ratatui::crossterm::event::EnableBracketedPaste
    );
    let mut typing_said: Option<Instant> = None;
    let result: anyhow::Result<()> = async {
        loop {
            terminal.draw(|f| ui::draw(f, &app))?;
            let woke = tokio::select! {
                w = woken.recv() => w,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let Some(woke) = woke else { break };
            match woke {
                Wake::Resize => {}
                Wake::Done(Some(e)) => app.status = format!("not sent: {e}"),
                Wake::Done(None) => refresh(&mut app, &messenger, &mut receipted).await?,
                Wake::Event(e) => on_event(&mut app, *e, &messenger, &mut receipted).await?,
                Wake::Key(k) => {
                    let before = app.compose.len();
                    match app.key(k) {
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
                                    .send_file(
                                        &conv,
                                        std::path::Path::new(&path),
                                        "",
                                        &mut |_, _| {},
                                    )
                                    .await;
                                let _ = wake.send(Wake::Done(sent.err().map(|e| e.to_string())));
                            });
                        }
                    }
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
                }
            }
        }
        Ok(())
    }
    .await;
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::DisableBracketedPaste
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
    let summaries = messenger.conversations(LIST_SCAN).await?;
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
