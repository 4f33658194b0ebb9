//! The chat app's state and what keys do to it: no terminal, no network, so tests
//! drive it key by key.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use switchboard::client::content::Content;
use switchboard::client::history::{Entry, State};
use switchboard::client::messenger::{Conversation, ConversationSummary};

/// Which pane has the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    List,
    Compose,
}

/// One conversation of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub conversation: Conversation,
    pub title: String,
    pub last: String,
    pub unread: usize,
}

/// What the app asks of its host after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// Show this conversation (load its messages, mark it read).
    Open(Conversation),
    /// Send this to the open conversation.
    Send(Conversation, Content),
    /// A message id the user typed, to resolve and act on (`/react`, `/edit`…).
    Act(Conversation, ActKind, String, String),
    /// Send this file.
    File(Conversation, String),
}

/// The compose-line commands that name a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    Reply,
    React,
    Edit,
    Delete,
}

pub struct App {
    pub me: String,
    pub server: String,
    pub rows: Vec<Row>,
    pub selected: usize,
    pub open: Option<Conversation>,
    pub open_title: String,
    pub messages: Vec<Entry>,
    /// Lines scrolled back from the newest.
    pub scroll: u16,
    pub focus: Focus,
    pub compose: String,
    /// The list's search box, while it is typed in.
    pub search: Option<String>,
    pub help: bool,
    pub status: String,
    /// Who is typing in the open conversation, until when.
    pub typing: Option<(String, std::time::Instant)>,
    /// Shown names of numbers (address book, profiles).
    pub names: std::collections::HashMap<String, String>,
    pub colour: bool,
}

impl App {
    pub fn new(me: String, server: String) -> App {
        App {
            me,
            server,
            rows: Vec::new(),
            selected: 0,
            open: None,
            open_title: String::new(),
            messages: Vec::new(),
            scroll: 0,
            focus: Focus::List,
            compose: String::new(),
            search: None,
            help: false,
            status: "connecting…".into(),
            typing: None,
            names: Default::default(),
            colour: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    /// The list's rows that match the search, as indices.
    pub fn visible(&self) -> Vec<usize> {
        let needle = self.search.as_deref().unwrap_or("").to_lowercase();
        (0..self.rows.len())
            .filter(|&i| {
                needle.is_empty()
                    || self.rows[i].title.to_lowercase().contains(&needle)
                    || self.rows[i].last.to_lowercase().contains(&needle)
            })
            .collect()
    }

    /// Replaces the list (keeping the selection on the same conversation).
    pub fn set_rows(&mut self, summaries: Vec<(ConversationSummary, String, String)>) {
        let current = self.rows.get(self.selected).map(|r| r.conversation.clone());
        self.rows = summaries
            .into_iter()
            .map(|(s, title, last)| Row {
                conversation: s.conversation,
                title,
                last,
                unread: s.unread,
            })
            .collect();
        if let Some(c) = current
            && let Some(i) = self.rows.iter().position(|r| r.conversation == c)
        {
            self.selected = i;
        }
        self.selected = self.selected.min(self.rows.len().saturating_sub(1));
    }

    /// A name for `number`.
    pub fn name(&self, number: &str) -> String {
        self.names
            .get(number)
            .cloned()
            .unwrap_or_else(|| number.to_string())
    }

    pub fn key(&mut self, key: KeyEvent) -> Action {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('q')) {
            return Action::Quit;
        }
        if self.help {
            // Any key closes the help screen.
            self.help = false;
            return Action::None;
        }
        match key.code {
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Focus::List if self.open.is_some() => Focus::Compose,
                    _ => Focus::List,
                };
                return Action::None;
            }
            KeyCode::PageUp => {
                self.scroll = self.scroll.saturating_add(10);
                return Action::None;
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(10);
                return Action::None;
            }
            _ => {}
        }
        match self.focus {
            Focus::List => self.list_key(key),
            Focus::Compose => self.compose_key(key),
        }
    }

    fn list_key(&mut self, key: KeyEvent) -> Action {
        if let Some(search) = &mut self.search {
            match key.code {
                KeyCode::Esc => self.search = None,
                KeyCode::Backspace => {
                    search.pop();
                }
                KeyCode::Char(c) => search.push(c),
                KeyCode::Enter => return self.open_selected(),
                KeyCode::Up | KeyCode::Down => self.move_selection(key.code == KeyCode::Down),
                _ => {}
            }
            self.keep_selection_visible();
            return Action::None;
        }
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(false),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(true),
            KeyCode::Enter | KeyCode::Right => return self.open_selected(),
            KeyCode::Char('/') => self.search = Some(String::new()),
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            _ => {}
        }
        Action::None
    }

    fn move_selection(&mut self, down: bool) {
        let visible = self.visible();
        let at = visible
            .iter()
            .position(|&i| i == self.selected)
            .unwrap_or(0);
        let next = if down {
            (at + 1).min(visible.len().saturating_sub(1))
        } else {
            at.saturating_sub(1)
        };
        if let Some(&i) = visible.get(next) {
            self.selected = i;
        }
    }

    fn keep_selection_visible(&mut self) {
        let visible = self.visible();
        if !visible.contains(&self.selected)
            && let Some(&first) = visible.first()
        {
            self.selected = first;
        }
    }

    fn open_selected(&mut self) -> Action {
        let Some(row) = self.rows.get(self.selected) else {
            return Action::None;
        };
        self.search = None;
        self.focus = Focus::Compose;
        self.scroll = 0;
        self.open = Some(row.conversation.clone());
        self.open_title = row.title.clone();
        Action::Open(row.conversation.clone())
    }

    fn compose_key(&mut self, key: KeyEvent) -> Action {
        let alt_or_shift = key
            .modifiers
            .intersects(KeyModifiers::ALT | KeyModifiers::SHIFT);
        match key.code {
            KeyCode::Enter if alt_or_shift => self.compose.push('\n'),
            KeyCode::Enter => return self.submit(),
            KeyCode::Backspace => {
                self.compose.pop();
            }
            KeyCode::Esc => self.focus = Focus::List,
            KeyCode::Char(c) => self.compose.push(c),
            _ => {}
        }
        Action::None
    }

    /// The compose line, sent: a text, or a command.
    fn submit(&mut self) -> Action {
        let Some(conv) = self.open.clone() else {
            return Action::None;
        };
        let line = std::mem::take(&mut self.compose);
        let text = line.trim();
        if text.is_empty() {
            return Action::None;
        }
        self.scroll = 0;
        let mut words = text.splitn(3, ' ');
        let command = words.next().unwrap_or("");
        let (first, rest) = (
            words.next().unwrap_or("").to_string(),
            words.next().unwrap_or("").to_string(),
        );
        match command {
            "/quit" => Action::Quit,
            "/reply" => Action::Act(conv, ActKind::Reply, first, rest),
            "/react" => Action::Act(conv, ActKind::React, first, rest),
            "/edit" => Action::Act(conv, ActKind::Edit, first, rest),
            "/delete" => Action::Act(conv, ActKind::Delete, first, rest),
            "/file" => Action::File(conv, text.trim_start_matches("/file").trim().to_string()),
            _ => Action::Send(conv, Content::Text(line.trim_end().to_string())),
        }
    }
}

/// The tick of a sent message: ✓ sent, ✓✓ delivered, ✓✓ read.
pub fn ticks(e: &Entry) -> &'static str {
    if !e.outgoing {
        return "";
    }
    if !e.read.is_empty() {
        return " ✓✓ read";
    }
    match e.state {
        State::Sending => " …",
        State::Sent => " ✓",
        State::Delivered => " ✓✓",
        State::Failed => " ✗ not sent",
        State::Received | State::Undecryptable => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::crossterm::event::KeyEventKind;

    pub fn press(code: KeyCode) -> KeyEvent {
        KeyEvent {
            code,
            modifiers: KeyModifiers::NONE,
            kind: KeyEventKind::Press,
            state: ratatui::crossterm::event::KeyEventState::NONE,
        }
    }

    pub fn app_with(rows: &[&str]) -> App {
        let mut app = App::new("+14155550100".into(), "127.0.0.1:4433".into());
        app.rows = rows
            .iter()
            .enumerate()
            .map(|(i, t)| Row {
                conversation: Conversation::Group(i as u64 + 1),
                title: t.to_string(),
                last: format!("last in {t}"),
                unread: i,
            })
            .collect();
        app
    }

    #[test]
    fn open_type_and_send() {
        let mut app = app_with(&["Bob", "Family"]);
        assert_eq!(app.key(press(KeyCode::Down)), Action::None);
        assert_eq!(
            app.key(press(KeyCode::Enter)),
            Action::Open(Conversation::Group(2))
        );
        assert_eq!(app.focus, Focus::Compose);
        for c in "hi all".chars() {
            app.key(press(KeyCode::Char(c)));
        }
        // Shift-Enter is a new line, Enter sends.
        let mut shift = press(KeyCode::Enter);
        shift.modifiers = KeyModifiers::SHIFT;
        app.key(shift);
        app.key(press(KeyCode::Char('x')));
        assert_eq!(
            app.key(press(KeyCode::Enter)),
            Action::Send(Conversation::Group(2), Content::Text("hi all\nx".into()))
        );
        assert!(app.compose.is_empty());
    }

    #[test]
    fn commands_search_scroll_and_help() {
        let mut app = app_with(&["Bob", "Family", "Book club"]);
        app.key(press(KeyCode::Char('/')));
        for c in "boo".chars() {
            app.key(press(KeyCode::Char(c)));
        }
        assert_eq!(app.visible(), vec![2]);
        assert_eq!(app.selected, 2);
        assert_eq!(
            app.key(press(KeyCode::Enter)),
            Action::Open(Conversation::Group(3))
        );
        for c in "/react 5f0c 👍".chars() {
            app.key(press(KeyCode::Char(c)));
        }
        assert_eq!(
            app.key(press(KeyCode::Enter)),
            Action::Act(
                Conversation::Group(3),
                ActKind::React,
                "5f0c".into(),
                "👍".into()
            )
        );
        app.key(press(KeyCode::PageUp));
        app.key(press(KeyCode::PageUp));
        assert_eq!(app.scroll, 20);
        app.key(press(KeyCode::PageDown));
        assert_eq!(app.scroll, 10);
        app.key(press(KeyCode::Tab));
        assert_eq!(app.focus, Focus::List);
        app.key(press(KeyCode::Char('?')));
        assert!(app.help);
        app.key(press(KeyCode::Char('x')));
        assert!(!app.help);
        assert_eq!(app.key(press(KeyCode::Char('q'))), Action::Quit);
    }
}
