//! Drawing the chat app: a conversation list, the open conversation with its compose
//! line, and a status line; one pane at a time below 60 columns.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph};
use switchboard::client::content::Content;
use switchboard::client::history::Entry;
use unicode_width::UnicodeWidthChar;

use super::state::{App, Areas, Focus, ticks};

/// Below this many columns, one pane at a time.
const NARROW: u16 = 60;

/// Every key, for the help screen.
pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓ / j k", "move in the conversation list"),
    ("Enter", "open the conversation / send the message"),
    ("Shift-Enter, Alt-Enter", "a new line in the message"),
    ("Tab", "between the list and the compose line"),
    ("PgUp PgDn", "scroll back through the conversation"),
    ("/", "search the conversations (Esc ends)"),
    ("Esc", "back to the list"),
    ("?", "this help"),
    ("q, Ctrl-C", "quit"),
    (
        "/reply ID TEXT",
        "reply to a message (ID: its first digits)",
    ),
    ("/react ID EMOJI", "react to a message"),
    ("/edit ID TEXT", "change your message (15 minutes)"),
    ("/delete ID", "delete your message for everyone"),
    ("/file PATH", "send a file"),
    ("/open ID", "open a message's file with the system's opener"),
    (
        "/save ID [DIR]",
        "save a message's file (default: HOME/attachments)",
    ),
    ("/info [ID]", "the conversation, or who has read a message"),
    (
        "/group add NUMBER…",
        "add people to the open group (admins)",
    ),
    ("//text", "send a text that starts with /"),
    ("/quit", "quit"),
    ("mouse", "wheel scrolls, click opens (Shift selects text)"),
    (
        "vi keys (chat.toml)",
        "Esc: normal mode; j k, Ctrl-d Ctrl-u, g G scroll;",
    ),
    ("", "i or a types, : starts a command, h the list"),
];

fn style(app: &App, s: Style) -> Style {
    if app.colour { s } else { Style::new() }
}

/// A colour per sender, the same every time.
fn sender_colour(number: &str) -> Color {
    const COLOURS: [Color; 6] = [
        Color::Cyan,
        Color::Magenta,
        Color::Yellow,
        Color::Green,
        Color::Blue,
        Color::Red,
    ];
    let h = number
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    COLOURS[h % COLOURS.len()]
}

/// `text` cut into lines of at most `width` columns (wide characters count two).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(2);
    let mut out = Vec::new();
    for para in text.split('\n') {
        let (mut line, mut used) = (String::new(), 0);
        for c in para.chars() {
            let w = if c.is_control() {
                0
            } else {
                c.width().unwrap_or(0)
            };
            if used + w > width {
                out.push(std::mem::take(&mut line));
                used = 0;
            }
            if !c.is_control() {
                line.push(c);
                used += w;
            }
        }
        out.push(line);
    }
    out
}

/// What a message shows.
pub fn text_of(app: &App, e: &Entry) -> String {
    let body = match &e.content {
        None => "[could not be decrypted]".to_string(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Reply { to, text }) => {
            let quoted = app
                .messages
                .iter()
                .find(|m| m.id == *to)
                .and_then(|m| m.content.as_ref())
                .and_then(|c| c.text())
                .unwrap_or("…");
            let short: String = quoted.chars().take(30).collect();
            format!("↪ “{short}” {text}")
        }
        Some(Content::Attachment(a)) => {
            let what = match a.mime.split('/').next() {
                Some("image") => "photo",
                Some("video") => "video",
                Some("audio") => "voice note",
                _ => "file",
            };
            format!(
                "[{what}: {}, {}] {}",
                a.name,
                indicatif::HumanBytes(a.size),
                a.caption
            )
        }
        Some(Content::Deleted) => "this message was deleted".into(),
        Some(Content::Timer { secs }) => format!(
            "[disappearing messages: {}]",
            super::super::conversation::timer_text(*secs)
        ),
        Some(Content::Unsupported { kind }) => format!("[unsupported message (kind {kind})]"),
        Some(other) => format!("{other:?}"),
    };
    let mut text = body;
    if e.edited_at_ms.is_some() {
        text.push_str(" (edited)");
    }
    if !e.reactions.is_empty() {
        let r: Vec<&str> = e
            .reactions
            .iter()
            .map(|(_, emoji)| emoji.as_str())
            .collect();
        text.push_str(&format!("  [{}]", r.join(" ")));
    }
    text
}

fn clock(ms: u64) -> String {
    let t = super::super::messaging::time(ms);
    t.get(11..16).unwrap_or("").to_string()
}

/// Where the list and the conversation go on a screen of `full` (one of them below
/// 60 columns), and the status line.
fn panes(full: Rect, app: &App) -> (Option<Rect>, Option<Rect>, Rect) {
    let [main, status] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(full);
    app.narrow.set(main.width < NARROW);
    if main.width < NARROW {
        if app.open.is_some() && app.focus == Focus::Compose {
            (None, Some(main), status)
        } else {
            (Some(main), None, status)
        }
    } else {
        let left = (main.width / 3).clamp(20, 36);
        let [l, r] = Layout::horizontal([Constraint::Length(left), Constraint::Min(1)]).areas(main);
        (Some(l), Some(r), status)
    }
}

/// The conversation pane cut into messages, typing line and compose box.
fn conversation_parts(area: Rect) -> [Rect; 3] {
    Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(3),
    ])
    .areas(area)
}

/// Where the panes are on a screen of `full`, for the mouse.
pub fn areas(full: Rect, app: &App) -> Areas {
    let (list, conversation, _) = panes(full, app);
    let parts = conversation.map(conversation_parts);
    Areas {
        list,
        messages: parts.map(|[m, _, _]| m),
        compose: parts.map(|[_, _, c]| c),
    }
}

pub fn draw(frame: &mut Frame, app: &App) {
    let (l, r, status) = panes(frame.area(), app);
    if let Some(l) = l {
        list(frame, app, l);
    }
    if let Some(r) = r {
        conversation(frame, app, r);
    }
    let line = format!(" {} · {} · ? help", app.status, app.server);
    frame.render_widget(
        Paragraph::new(line).style(style(app, Style::new().add_modifier(Modifier::REVERSED))),
        status,
    );
    if app.help {
        help(frame, app);
    } else if let Some(p) = &app.popup {
        popup(frame, app, &p.title, &p.lines);
    }
}

fn list(frame: &mut Frame, app: &App, area: Rect) {
    let title = match &app.search {
        Some(s) => format!(" search: {s}_ "),
        None => " Chats ".into(),
    };
    let focused = app.focus == Focus::List;
    let block = Block::default()
        .borders(Borders::ALL)
        .title(title)
        .border_style(style(
            app,
            if focused {
                Style::new().fg(Color::Cyan)
            } else {
                Style::new()
            },
        ));
    let width = usize::from(area.width.saturating_sub(4));
    let visible = app.visible();
    let items: Vec<ListItem> = visible
        .iter()
        .map(|&i| {
            let r = &app.rows[i];
            let unread = if r.unread > 0 {
                format!(" ({})", r.unread)
            } else {
                String::new()
            };
            let head = first_line(&format!("{}{unread}", r.title), width);
            let last = first_line(&r.last, width);
            ListItem::new(vec![
                Line::from(Span::styled(
                    head,
                    style(app, Style::new().add_modifier(Modifier::BOLD)),
                )),
                Line::from(last),
            ])
        })
        .collect();
    let mut state = ListState::default();
    state.select(visible.iter().position(|&i| i == app.selected));
    let list = List::new(items)
        .block(block)
        .highlight_style(style(app, Style::new().add_modifier(Modifier::REVERSED)))
        .highlight_symbol("");
    frame.render_stateful_widget(list, area, &mut state);
    if app.rows.is_empty() {
        let inner = area.inner(ratatui::layout::Margin::new(1, 1));
        frame.render_widget(Paragraph::new("no conversations yet"), inner);
    }
}

fn first_line(text: &str, width: usize) -> String {
    let flat = text.replace('\n', " ");
    wrap(&flat, width).into_iter().next().unwrap_or_default()
}

fn conversation(frame: &mut Frame, app: &App, area: Rect) {
    let [messages, typing, compose] = conversation_parts(area);
    let title = if app.open.is_some() {
        format!(" {} ", app.open_title)
    } else {
        " no conversation open: Enter on one ".into()
    };
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(messages);
    frame.render_widget(block, messages);
    let width = usize::from(inner.width.max(1));
    let group = matches!(
        app.open,
        Some(switchboard::client::messenger::Conversation::Group(_))
    );
    let mut lines: Vec<Line> = Vec::new();
    for e in &app.messages {
        let author = match &e.group {
            Some(g) => g.author.clone(),
            None if e.outgoing => app.me.clone(),
            None => e.peer.clone(),
        };
        let who = if author == app.me {
            "you".to_string()
        } else {
            app.name(&author)
        };
        let head = format!("{} {who}: ", clock(e.at_ms));
        let full = format!(
            "{head}{}{}  {}",
            text_of(app, e),
            ticks(e),
            &hex::encode(e.id)[..4]
        );
        let colour = if group || author != app.me {
            sender_colour(&author)
        } else {
            Color::Gray
        };
        for (n, piece) in wrap(&full, width).into_iter().enumerate() {
            if n == 0 && piece.len() >= head.len() && piece.is_char_boundary(head.len()) {
                let (h, rest) = piece.split_at(head.len());
                lines.push(Line::from(vec![
                    Span::styled(h.to_string(), style(app, Style::new().fg(colour))),
                    Span::raw(rest.to_string()),
                ]));
            } else {
                lines.push(Line::from(piece));
            }
        }
    }
    let height = usize::from(inner.height);
    let max_scroll = lines.len().saturating_sub(height);
    app.max_scroll
        .set(u16::try_from(max_scroll).unwrap_or(u16::MAX));
    app.page_height.set(inner.height);
    let scroll = usize::from(app.scroll).min(max_scroll);
    let end = lines.len().saturating_sub(scroll);
    let start = end.saturating_sub(height);
    let shown: Vec<Line> = lines.drain(start..end).collect();
    frame.render_widget(Paragraph::new(shown), inner);
    if let Some((who, until)) = &app.typing
        && *until > std::time::Instant::now()
    {
        frame.render_widget(
            Paragraph::new(format!(" {} is typing…", app.name(who)))
                .style(style(app, Style::new().add_modifier(Modifier::ITALIC))),
            typing,
        );
    }
    let focused = app.focus == Focus::Compose;
    let block = Block::default()
        .borders(Borders::ALL)
        .title(if app.normal {
            " -- NORMAL -- (i types) "
        } else {
            " message (Enter sends) "
        })
        .border_style(style(
            app,
            if focused {
                Style::new().fg(Color::Cyan)
            } else {
                Style::new()
            },
        ));
    let inner = block.inner(compose);
    let shown = app.compose.replace('\n', "⏎");
    let pieces = wrap(&shown, usize::from(inner.width.max(1)));
    let last = pieces.last().cloned().unwrap_or_default();
    frame.render_widget(block, compose);
    frame.render_widget(Paragraph::new(last.clone()), inner);
    if focused {
        let x = inner.x
            + u16::try_from(last.chars().map(|c| c.width().unwrap_or(0)).sum::<usize>())
                .unwrap_or(0)
                .min(inner.width.saturating_sub(1));
        frame.set_cursor_position((x, inner.y));
    }
}

fn help(frame: &mut Frame, app: &App) {
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{k:<24}"),
                    style(app, Style::new().add_modifier(Modifier::BOLD)),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    boxed(frame, " keys (any key closes) ", lines, 76);
}

fn popup(frame: &mut Frame, app: &App, title: &str, text: &[String]) {
    let width = usize::from(frame.area().width.min(64).saturating_sub(2)).max(1);
    let mut lines = Vec::new();
    for (n, t) in text.iter().enumerate() {
        for piece in wrap(t, width) {
            lines.push(if n == 0 {
                Line::from(Span::styled(
                    piece,
                    style(app, Style::new().add_modifier(Modifier::BOLD)),
                ))
            } else {
                Line::from(piece)
            });
        }
    }
    boxed(frame, &format!(" {title} (any key closes) "), lines, 64);
}

/// `lines` in a bordered box in the middle of the screen, at most `max_width` wide.
fn boxed(frame: &mut Frame, title: &str, lines: Vec<Line>, max_width: u16) {
    let area = frame.area();
    let w = area.width.min(max_width);
    let h = u16::try_from(lines.len() + 2)
        .unwrap_or(u16::MAX)
        .min(area.height);
    let at = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    frame.render_widget(Clear, at);
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)),
        at,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use switchboard::client::history::{GroupPart, State};
    use switchboard::client::messenger::Conversation;
    use switchboard::phone::Number;

    use super::*;
    use crate::cli::chat::state::Row;

    const ME: &str = "+14155550100";
    const BOB: &str = "+14155550101";
    const CAROL: &str = "+14155550102";

    fn entry(seq: i64, from_me: bool, text: &str, group: Option<&str>) -> Entry {
        Entry {
            seq,
            peer: if group.is_some() {
                "group:7".into()
            } else {
                BOB.into()
            },
            outgoing: from_me,
            device: 1,
            id: [seq as u8; 16],
            at_ms: 1_764_700_000_000 + seq as u64 * 60_000,
            content: Some(Content::Text(text.into())),
            state: if from_me {
                State::Delivered
            } else {
                State::Received
            },
            delivered: Vec::new(),
            problem: None,
            to_identity: None,
            group: group.map(|author| GroupPart {
                group_id: 7,
                author: author.into(),
                delivered: 1,
                of: 2,
            }),
            reactions: Vec::new(),
            edited_at_ms: None,
            read: Vec::new(),
            expires_in_secs: 0,
            expires_at_ms: None,
        }
    }

    fn screen(app: &App, w: u16, h: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| draw(f, app)).unwrap();
        let buf = terminal.backend().buffer().clone();
        // A wide character fills two cells: the second one is not read.
        (0..h)
            .map(|y| {
                let (mut line, mut x) = (String::new(), 0);
                while x < w {
                    let symbol = buf[(x, y)].symbol();
                    line.push_str(symbol);
                    x += u16::try_from(unicode_width::UnicodeWidthStr::width(symbol).max(1))
                        .unwrap_or(1);
                }
                line
            })
            .collect()
    }

    fn with_bob() -> App {
        let mut app = App::new(ME.into(), "127.0.0.1:4433".into());
        app.colour = false;
        app.rows = vec![
            Row {
                conversation: Conversation::With(Number::parse_e164(BOB).unwrap()),
                title: "Bob".into(),
                last: "see you".into(),
                unread: 2,
            },
            Row {
                conversation: Conversation::Group(7),
                title: "Family".into(),
                last: "dinner".into(),
                unread: 0,
            },
        ];
        app.names.insert(BOB.into(), "Bob".into());
        app.names.insert(CAROL.into(), "Carol".into());
        app.open = Some(app.rows[0].conversation.clone());
        app.open_title = "Bob".into();
        app.status = "connected".into();
        let mut read = entry(1, true, "hello Bob", None);
        read.read = vec![(BOB.into(), 1)];
        let mut reply = entry(2, false, "hi! how are you?", None);
        reply.reactions = vec![(ME.into(), "👍".into())];
        app.messages = vec![read, reply, entry(3, true, "fine", None)];
        app
    }

    #[test]
    fn a_conversation_with_names_ticks_reactions_and_the_compose_line() {
        let mut app = with_bob();
        app.compose = "typing th".into();
        app.focus = crate::cli::chat::state::Focus::Compose;
        let s = screen(&app, 80, 14).join("\n");
        assert!(s.contains("Bob (2)"), "{s}");
        assert!(s.contains("Family"), "{s}");
        assert!(s.contains("you: hello Bob ✓✓ read"), "{s}");
        assert!(s.contains("Bob: hi! how are you?  [👍]"), "{s}");
        assert!(s.contains("you: fine ✓✓"), "{s}");
        assert!(s.contains("typing th"), "{s}");
        assert!(s.contains("connected · 127.0.0.1:4433 · ? help"), "{s}");
    }

    #[test]
    fn a_typing_indicator_shows_until_its_time_runs_out() {
        let mut app = with_bob();
        let shown_at = std::time::Instant::now();
        app.typing = Some((
            BOB.into(),
            shown_at + switchboard::client::messenger::TYPING_SHOWN_FOR,
        ));
        let s = screen(&app, 80, 14).join("\n");
        assert!(s.contains("Bob is typing…"), "{s}");
        // No "stopped" ever came, and its time is up: it is gone by itself.
        app.typing = Some((BOB.into(), shown_at));
        let s = screen(&app, 80, 14).join("\n");
        assert!(!s.contains("is typing"), "{s}");
    }

    #[test]
    fn a_group_shows_each_senders_name() {
        let mut app = with_bob();
        app.open = Some(Conversation::Group(7));
        app.open_title = "Family".into();
        app.messages = vec![
            entry(1, false, "dinner at 8?", Some(BOB)),
            entry(2, false, "yes!", Some(CAROL)),
            entry(3, true, "see you", Some(ME)),
        ];
        let s = screen(&app, 80, 14).join("\n");
        assert!(s.contains("Bob: dinner at 8?"), "{s}");
        assert!(s.contains("Carol: yes!"), "{s}");
        assert!(s.contains("you: see you"), "{s}");
    }

    #[test]
    fn forty_columns_still_show_the_conversation_and_the_compose_line() {
        let mut app = with_bob();
        app.focus = crate::cli::chat::state::Focus::Compose;
        let lines = screen(&app, 40, 12);
        let s = lines.join("\n");
        assert!(s.contains("you: fine"), "{s}");
        assert!(s.contains("message (Enter sends)"), "{s}");
        assert!(
            lines
                .iter()
                .all(|l| unicode_width::UnicodeWidthStr::width(l.as_str()) == 40),
            "{s}"
        );
        // The list, when it has the keys.
        app.focus = crate::cli::chat::state::Focus::List;
        let s = screen(&app, 40, 12).join("\n");
        assert!(s.contains("Chats") && s.contains("Bob (2)"), "{s}");
    }

    #[test]
    fn wide_characters_wrap_without_breaking_the_layout() {
        let mut app = with_bob();
        app.messages = vec![
            entry(1, false, &"漢字とかなの混じった文章です。".repeat(4), None),
            entry(2, false, "emoji 👍🏽👨‍👩‍👧 and right-to-left: שלום עולם", None),
        ];
        let lines = screen(&app, 60, 16);
        let s = lines.join("\n");
        assert!(s.contains("漢字"), "{s}");
        assert!(s.contains("שלום"), "{s}");
        // Every row is still exactly the terminal's width in cells.
        for pieces in wrap(&"漢字".repeat(30), 17) {
            assert!(
                pieces
                    .chars()
                    .map(|c| c.width().unwrap_or(0))
                    .sum::<usize>()
                    <= 17
            );
        }
        assert_eq!(lines.len(), 16);
        // Help lists every key.
        app.help = true;
        let s = screen(&app, 80, 24).join("\n");
        assert!(
            s.contains("/react ID EMOJI") && s.contains("PgUp PgDn"),
            "{s}"
        );
    }

    #[test]
    fn scrolling_back_shows_older_messages() {
        let mut app = with_bob();
        app.messages = (1..=40)
            .map(|i| entry(i, i % 2 == 0, &format!("message {i}"), None))
            .collect();
        let s = screen(&app, 80, 12).join("\n");
        assert!(
            s.contains("message 40") && !s.contains("message 20 "),
            "{s}"
        );
        app.scroll = 20;
        let s = screen(&app, 80, 12).join("\n");
        assert!(s.contains("message 20") && !s.contains("message 40"), "{s}");
    }

    #[test]
    fn a_photo_shows_as_one_and_info_shows_in_a_box_at_40_columns() {
        let mut app = with_bob();
        let mut photo = entry(4, false, "", None);
        photo.content = Some(Content::Attachment(
            switchboard::client::attachment::Attachment {
                id: [1; 16],
                key: [2; 32],
                size: 204_800,
                digest: [3; 32],
                name: "beach.jpg".into(),
                mime: "image/jpeg".into(),
                thumbnail: None,
                caption: "us".into(),
            },
        ));
        app.messages.push(photo);
        let shown = screen(&app, 80, 12).join("\n");
        assert!(
            shown.contains("[photo: beach.jpg, 200.00 KiB] us"),
            "{shown}"
        );
        app.popup = Some(super::super::state::Popup {
            title: "message".into(),
            lines: vec![
                "message 0404".into(),
                "read by 1 of 3".into(),
                "  not yet: Carol, +14155550103".into(),
            ],
        });
        let shown = screen(&app, 40, 12);
        let text = shown.join("\n");
        assert!(text.contains(" message (any key closes) "), "{text}");
        assert!(text.contains("read by 1 of 3"), "{text}");
        // Wrapped inside the box, not cut off.
        assert!(text.contains("not yet: Carol,"), "{text}");
        assert!(text.contains("+14155550103"), "{text}");
        assert!(
            shown
                .iter()
                .all(|l| unicode_width::UnicodeWidthStr::width(l.as_str()) <= 40)
        );
    }
}
