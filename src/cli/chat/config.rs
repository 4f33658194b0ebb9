//! The chat app's own settings: `chat.toml` in the home, every key optional.
//!
//! ```toml
//! # "default" (arrows, Enter, Tab) or "vi": in the conversation, Esc leaves the
//! # compose line for a normal mode (j k scroll, Ctrl-d Ctrl-u half a page, g G
//! # oldest and newest, i or a to type again, h back to the list).
//! keys = "default"
//! # The wheel scrolls, a click opens a conversation or moves to the compose line.
//! # Off, the terminal selects text as usual (with it on, most terminals select
//! # with Shift held).
//! mouse = true
//! # On a message from a conversation that is not open: "off", "bell" (the
//! # terminal's), or "desktop" (notify-send or osascript; only who wrote, never
//! # what).
//! notify = "off"
//! ```

use std::path::Path;

use serde::Deserialize;

const FILE: &str = "chat.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keys {
    #[default]
    Default,
    Vi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Notify {
    #[default]
    Off,
    Bell,
    Desktop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    pub keys: Keys,
    pub mouse: bool,
    pub notify: Notify,
}

impl Default for ChatConfig {
    fn default() -> ChatConfig {
        ChatConfig {
            keys: Keys::Default,
            mouse: true,
            notify: Notify::Off,
        }
    }
}

impl ChatConfig {
    /// The settings of the home `dir` (the defaults when it has no `chat.toml`).
    pub fn load(dir: &Path) -> anyhow::Result<ChatConfig> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                ChatConfig::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ChatConfig::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    pub fn parse(text: &str) -> Result<ChatConfig, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_clear_errors() {
        assert_eq!(ChatConfig::parse("").unwrap(), ChatConfig::default());
        let vi = ChatConfig::parse("keys = \"vi\"\nnotify = \"bell\"\nmouse = false").unwrap();
        assert_eq!(
            vi,
            ChatConfig {
                keys: Keys::Vi,
                mouse: false,
                notify: Notify::Bell
            }
        );
        let e = ChatConfig::parse("keys = \"emacs\"").unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
        let e = ChatConfig::parse("colour = true").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }
}
