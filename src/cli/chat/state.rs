//! The chat app's state and what keys do to it: no terminal, no network, so tests
//! drive it key by key.

use std::cell::Cell;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEvent, MouseEventKind};
use ratatui::layout::{Position, Rect};
use switchboard::client::content::Content;
use switchboard::client::history::{Entry, State};
use switchboard::client::messenger::{Conversation, ConversationSummary};

use super::config::{ChatConfig, Keys};

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
    /// Show the open conversation's details, or (with an id) a message's.
    Info(Conversation, String),
    /// Add these numbers (as typed) to the open group.
    GroupAdd(u64, String),
    /// Download the attachment of message `id` and open it with the system opener.
    OpenFile(String),
    /// Download the attachment of message `id` into a directory ("": the default).
    SaveFile(String, String),
}

/// Where the panes are on the screen now (drawn by `ui::areas`), for the mouse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Areas {
    pub list: Option<Rect>,
    pub messages: Option<Rect>,
    pub compose: Option<Rect>,
}

/// A box over the panes that any key closes: `/info`'s answer, or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Popup {
    pub title: String,
    pub lines: Vec<String>,
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
    pub popup: Option<Popup>,
    pub status: String,
    /// Who is typing in the open conversation, until when.
    pub typing: Option<(String, std::time::Instant)>,
    /// Shown names of numbers (address book, profiles).
    pub names: std::collections::HashMap<String, String>,
    pub colour: bool,
    pub config: ChatConfig,
    /// The terminal has the focus (crossterm's focus events; true until told).
    pub focused: bool,
    /// The screen was last drawn one pane at a time.
    pub narrow: Cell<bool>,
    /// vi keys: the compose line is in normal mode (keys scroll, `i` types).
    pub normal: bool,
    /// How far back the open conversation can scroll, as last drawn.
    pub max_scroll: Cell<u16>,
    /// The open conversation's message rows, as last drawn.
    pub page_height: Cell<u16>,
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
            popup: None,
            status: "connecting…".into(),
            typing: None,
            names: Default::default(),
            colour: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            config: ChatConfig::default(),
            focused: true,
            narrow: Cell::new(false),
            normal: false,
            max_scroll: Cell::new(u16::MAX),
            page_height: Cell::new(20),
        }
    }

    fn vi(&self) -> bool {
        self.config.keys == Keys::Vi
    }

    /// Pasted text: into the compose line of the open conversation as it is (never
    /// read as keys: a `q` in it must not quit).
    pub fn paste(&mut self, text: &str) {
        if self.open.is_none() {
            return;
        }
        self.focus = Focus::Compose;
        self.normal = false;
        self.help = false;
        self.popup = None;
        self.compose
            .push_str(&text.replace("\r\n", "\n").replace('\r', "\n"));
    }

    /// Scrolls back (`up`) or forward by `lines`, within what there is.
    pub fn scroll_by(&mut self, lines: u16, up: bool) {
        // Clamped first: the history may have shrunk, or the pane grown.
        let scroll = self.scroll.min(self.max_scroll.get());
        self.scroll = if up {
            scroll.saturating_add(lines).min(self.max_scroll.get())
        } else {
            scroll.saturating_sub(lines)
        };
    }

    /// What a mouse event does, given where the panes are.
    pub fn mouse(&mut self, m: MouseEvent, areas: &Areas) -> Action {
        if self.help || self.popup.is_some() {
            if matches!(m.kind, MouseEventKind::Down(_)) {
                self.help = false;
                self.popup = None;
            }
            return Action::None;
        }
        let at = Position::new(m.column, m.row);
        let inside = |r: Option<Rect>| r.is_some_and(|r| r.contains(at));
        match m.kind {
            MouseEventKind::ScrollUp | MouseEventKind::ScrollDown => {
                let up = m.kind == MouseEventKind::ScrollUp;
                if inside(areas.list) {
                    self.move_selection(!up);
                } else if inside(areas.messages) {
                    self.scroll_by(3, up);
                }
                Action::None
            }
            MouseEventKind::Down(_) => {
                if let Some(list) = areas.list
                    && list.contains(at)
                {
                    return self.click_list(list, at.y);
                }
                if inside(areas.compose) && self.open.is_some() {
                    self.focus = Focus::Compose;
                    self.normal = false;
                }
                Action::None
            }
            _ => Action::None,
        }
    }

    /// A click on line `y` of the list: opens the conversation drawn there (each
    /// takes two lines inside the border, scrolled as ratatui's `List` scrolls to
    /// keep the selection in view).
    fn click_list(&mut self, list: Rect, y: u16) -> Action {
        // What is drawn: the search's matches, if one is typed.
        let visible = self.visible();
        let fit = usize::from(list.height.saturating_sub(2) / 2).max(1);
        let at = visible
            .iter()
            .position(|&i| i == self.selected)
            .unwrap_or(0);
        let first = (at + 1).saturating_sub(fit);
        let Some(line) = y.checked_sub(list.y + 1) else {
            return Action::None;
        };
        if usize::from(line / 2) >= fit {
            // The bottom border, or a last line too short for a conversation.
            return Action::None;
        }
        match visible.get(first + usize::from(line / 2)) {
            Some(&i) => {
                self.selected = i;
                self.open_selected()
            }
            None => Action::None,
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
        if self.help || self.popup.is_some() {
            // Any key closes the help screen or the popup.
            self.help = false;
            self.popup = None;
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
            KeyCode::PageUp | KeyCode::PageDown => {
                let page = self.page_height.get().saturating_sub(2).max(1);
                self.scroll_by(page, key.code == KeyCode::PageUp);
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
            KeyCode::Char('l') if self.vi() => return self.open_selected(),
            KeyCode::Char('g') if self.vi() => {
                if let Some(&i) = self.visible().first() {
                    self.selected = i;
                }
            }
            KeyCode::Char('G') if self.vi() => {
                if let Some(&i) = self.visible().last() {
                    self.selected = i;
                }
            }
            KeyCode::Char('/') => self.search = Some(String::new()),
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('q') => return Action::Quit,
            // vi users press Esc a few times to be sure: it must not quit.
            KeyCode::Esc if !self.vi() => return Action::Quit,
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
        self.normal = false;
        self.scroll = 0;
        self.open = Some(row.conversation.clone());
        self.open_title = row.title.clone();
        Action::Open(row.conversation.clone())
    }

    fn compose_key(&mut self, key: KeyEvent) -> Action {
        if self.vi() && self.normal {
            return self.normal_key(key);
        }
        if self.vi() && key.code == KeyCode::Esc {
            self.normal = true;
            return Action::None;
        }
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

    /// vi keys, normal mode: move through the conversation.
    fn normal_key(&mut self, key: KeyEvent) -> Action {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let half = (self.page_height.get() / 2).max(1);
        match key.code {
            KeyCode::Char('i') | KeyCode::Char('a') => self.normal = false,
            KeyCode::Char(':') => {
                // A command, unless a message is half typed (then it goes on).
                self.normal = false;
                if self.compose.is_empty() {
                    self.compose = "/".into();
                }
            }
            KeyCode::Char('d') if ctrl => self.scroll_by(half, false),
            KeyCode::Char('u') if ctrl => self.scroll_by(half, true),
            KeyCode::Char('j') | KeyCode::Down => self.scroll_by(1, false),
            KeyCode::Char('k') | KeyCode::Up => self.scroll_by(1, true),
            KeyCode::Char('G') => self.scroll = 0,
            KeyCode::Char('g') => self.scroll = self.max_scroll.get(),
            KeyCode::Char('h') | KeyCode::Char('q') | KeyCode::Esc | KeyCode::Left => {
                self.normal = false;
                self.focus = Focus::List;
            }
            KeyCode::Char('?') => self.help = true,
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
            "/info" => Action::Info(conv, first),
            "/open" => Action::OpenFile(first),
            "/save" => Action::SaveFile(first, rest),
            "/group" if first == "add" => match conv {
                Conversation::Group(g) => Action::GroupAdd(g, rest),
                Conversation::With(_) => {
                    self.status = "/group add: open the group first".into();
                    Action::None
                }
            },
            "/group" => {
                self.status = "/group add NUMBER…: the only /group command here".into();
                Action::None
            }
            _ if command.starts_with('/') && !command.starts_with("//") => {
                // A typo of a command is not sent as a message.
                self.compose = line.clone();
                self.status = format!("no command {command}: ? lists them (// sends a /)");
                Action::None
            }
            _ if command.starts_with("//") => Action::Send(
                conv,
                Content::Text(line.trim_end().trim_start().replacen("//", "/", 1)),
            ),
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
        // A page is the conversation's height less two lines kept in view.
        app.page_height.set(12);
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

    fn type_in(app: &mut App, text: &str) -> Action {
        for c in text.chars() {
            app.key(press(KeyCode::Char(c)));
        }
        app.key(press(KeyCode::Enter))
    }

    #[test]
    fn the_newer_commands_and_a_typo_that_is_not_sent() {
        let mut app = app_with(&["Bob", "Family"]);
        app.rows[0].conversation =
            Conversation::With(switchboard::phone::Number::parse_e164("+14155550101").unwrap());
        app.key(press(KeyCode::Down));
        app.key(press(KeyCode::Enter));
        let family = Conversation::Group(2);
        assert_eq!(
            type_in(&mut app, "/info"),
            Action::Info(family.clone(), String::new())
        );
        assert_eq!(
            type_in(&mut app, "/info 5f0c"),
            Action::Info(family.clone(), "5f0c".into())
        );
        assert_eq!(
            type_in(&mut app, "/group add Aunt May, +14155550123"),
            Action::GroupAdd(2, "Aunt May, +14155550123".into())
        );
        assert_eq!(
            type_in(&mut app, "/open 5f0c"),
            Action::OpenFile("5f0c".into())
        );
        assert_eq!(
            type_in(&mut app, "/save 5f0c /tmp/x"),
            Action::SaveFile("5f0c".into(), "/tmp/x".into())
        );
        // A mistyped command stays in the compose line, and says why.
        assert_eq!(type_in(&mut app, "/raect 5f0c 👍"), Action::None);
        assert_eq!(app.compose, "/raect 5f0c 👍");
        assert!(app.status.contains("no command /raect"), "{}", app.status);
        app.compose.clear();
        assert_eq!(
            type_in(&mut app, "//shrug"),
            Action::Send(family, Content::Text("/shrug".into()))
        );
        // `/group add` outside a group.
        app.key(press(KeyCode::Esc));
        app.key(press(KeyCode::Up));
        app.key(press(KeyCode::Enter));
        assert_eq!(type_in(&mut app, "/group add +14155550123"), Action::None);
        assert!(app.status.contains("open the group"), "{}", app.status);
    }

    #[test]
    fn vi_keys_scroll_in_normal_mode_and_type_in_insert_mode() {
        let mut app = app_with(&["Bob", "Family"]);
        app.config.keys = Keys::Vi;
        app.max_scroll.set(100);
        app.page_height.set(20);
        // The list: G last, g first, l opens.
        app.key(press(KeyCode::Char('G')));
        assert_eq!(app.selected, 1);
        app.key(press(KeyCode::Char('g')));
        assert_eq!(app.selected, 0);
        assert_eq!(
            app.key(press(KeyCode::Char('l'))),
            Action::Open(Conversation::Group(1))
        );
        // Opened in insert mode: keys type.
        app.key(press(KeyCode::Char('k')));
        assert_eq!(app.compose, "k");
        app.key(press(KeyCode::Esc));
        assert!(app.normal);
        assert_eq!(
            app.focus,
            Focus::Compose,
            "Esc leaves insert mode, not the pane"
        );
        app.key(press(KeyCode::Char('k')));
        app.key(press(KeyCode::Char('k')));
        assert_eq!(app.scroll, 2);
        assert_eq!(app.compose, "k", "normal mode does not type");
        let mut ctrl_u = press(KeyCode::Char('u'));
        ctrl_u.modifiers = KeyModifiers::CONTROL;
        app.key(ctrl_u);
        assert_eq!(app.scroll, 12);
        app.key(press(KeyCode::Char('g')));
        assert_eq!(app.scroll, 100, "the oldest, no further");
        app.key(press(KeyCode::PageUp));
        assert_eq!(app.scroll, 100);
        app.key(press(KeyCode::Char('G')));
        assert_eq!(app.scroll, 0);
        app.key(press(KeyCode::Char(':')));
        assert!(!app.normal);
        assert_eq!(app.compose, "k", "a half-typed message is kept");
        app.compose.clear();
        app.key(press(KeyCode::Esc));
        app.key(press(KeyCode::Char(':')));
        assert_eq!(app.compose, "/");
        app.key(press(KeyCode::Esc));
        app.key(press(KeyCode::Char('h')));
        assert_eq!(app.focus, Focus::List);
        // Default keys: Esc goes back to the list at once.
        let mut plain = app_with(&["Bob"]);
        plain.key(press(KeyCode::Enter));
        plain.key(press(KeyCode::Esc));
        assert_eq!(plain.focus, Focus::List);
        assert!(!plain.normal);
    }

    #[test]
    fn the_mouse_scrolls_and_opens_what_it_clicks() {
        use ratatui::crossterm::event::MouseButton;
        let mouse = |kind, column, row| MouseEvent {
            kind,
            column,
            row,
            modifiers: KeyModifiers::NONE,
        };
        let areas = Areas {
            list: Some(Rect::new(0, 0, 30, 10)),
            messages: Some(Rect::new(30, 0, 50, 6)),
            compose: Some(Rect::new(30, 7, 50, 3)),
        };
        let mut app = app_with(&["Bob", "Family", "Book club", "Work", "Five", "Six"]);
        app.max_scroll.set(50);
        // Inside the border, two lines a conversation: row 3 is the second.
        assert_eq!(
            app.mouse(mouse(MouseEventKind::Down(MouseButton::Left), 5, 3), &areas),
            Action::Open(Conversation::Group(2))
        );
        app.mouse(mouse(MouseEventKind::ScrollUp, 40, 2), &areas);
        app.mouse(mouse(MouseEventKind::ScrollUp, 40, 2), &areas);
        assert_eq!(app.scroll, 6);
        app.mouse(mouse(MouseEventKind::ScrollDown, 40, 2), &areas);
        assert_eq!(app.scroll, 3);
        // The wheel over the list moves through it.
        app.mouse(mouse(MouseEventKind::ScrollDown, 5, 5), &areas);
        assert_eq!(app.selected, 2);
        // Scrolled: four fit, the sixth selected shows the third to the sixth.
        app.selected = 5;
        assert_eq!(
            app.mouse(mouse(MouseEventKind::Down(MouseButton::Left), 5, 1), &areas),
            Action::Open(Conversation::Group(3))
        );
        app.focus = Focus::List;
        app.mouse(
            mouse(MouseEventKind::Down(MouseButton::Left), 40, 8),
            &areas,
        );
        assert_eq!(app.focus, Focus::Compose);
        // A popup: a click closes it and does nothing else.
        app.popup = Some(Popup {
            title: "x".into(),
            lines: vec![],
        });
        assert_eq!(
            app.mouse(mouse(MouseEventKind::Down(MouseButton::Left), 5, 3), &areas),
            Action::None
        );
        assert!(app.popup.is_none());
    }

    #[test]
    fn clicks_on_search_results_pastes_and_esc_do_what_is_seen() {
        use ratatui::crossterm::event::MouseButton;
        let click = |row| MouseEvent {
            kind: MouseEventKind::Down(MouseButton::Left),
            column: 3,
            row,
            modifiers: KeyModifiers::NONE,
        };
        let areas = Areas {
            list: Some(Rect::new(0, 0, 30, 10)),
            messages: None,
            compose: None,
        };
        let mut app = app_with(&["Bob", "Family", "Book club", "Work"]);
        // Searching "wo": only Work is drawn, first; a click there opens Work.
        app.key(press(KeyCode::Char('/')));
        app.key(press(KeyCode::Char('w')));
        app.key(press(KeyCode::Char('o')));
        assert_eq!(
            app.mouse(click(1), &areas),
            Action::Open(Conversation::Group(4))
        );
        // The bottom border (row 9 of 10: four conversations fit, rows 1-8).
        app.focus = Focus::List;
        assert_eq!(app.mouse(click(9), &areas), Action::None);
        // A paste goes into the compose line whole: its q quits nothing.
        app.focus = Focus::List;
        app.paste("quit?\r\nno");
        assert_eq!(app.focus, Focus::Compose);
        assert_eq!(app.compose, "quit?\nno");
        // Scrolling forward after the history shrank moves at once.
        app.scroll = 40;
        app.max_scroll.set(10);
        app.scroll_by(3, false);
        assert_eq!(app.scroll, 7);
        // vi keys: Esc in the list does not quit (q does).
        app.config.keys = Keys::Vi;
        app.focus = Focus::List;
        assert_eq!(app.key(press(KeyCode::Esc)), Action::None);
        assert_eq!(app.key(press(KeyCode::Char('q'))), Action::Quit);
    }
}
