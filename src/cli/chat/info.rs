//! `/info`: what the app knows of the open conversation, or of one message (who
//! has it, who has read it: "read by n of m" in a group, on demand).

use std::collections::HashMap;

use switchboard::client::content::Content;
use switchboard::client::history::{Entry, State};
use switchboard::client::messenger::{Conversation, cached_profile_in};
use switchboard::client::{Messenger, groups};
use switchboard::proto::GroupMember;

use super::state::Popup;
use crate::cli::conversation::timer_text;
use crate::cli::messaging::time;

/// The lines of `/info ID`: `members` is the group as the node has it now (none for
/// a 1:1 message, or when the node cannot be asked).
pub fn message_lines(
    e: &Entry,
    me: &str,
    members: Option<&[GroupMember]>,
    name: impl Fn(&str) -> String,
) -> Vec<String> {
    let author = match &e.group {
        Some(g) => g.author.as_str(),
        None if e.outgoing => me,
        None => e.peer.as_str(),
    };
    let who = if e.outgoing {
        "you".to_string()
    } else {
        name(author)
    };
    let mut out = vec![
        format!("message {}", hex::encode(e.id)),
        format!("from {who}, {}", time(e.at_ms)),
    ];
    if let Some(Content::Attachment(a)) = &e.content {
        out.push(format!(
            "{} ({}, {}): /open {id} or /save {id}",
            a.name,
            a.mime,
            indicatif::HumanBytes(a.size),
            id = &hex::encode(e.id)[..8]
        ));
    }
    if e.outgoing {
        let state = match e.state {
            State::Sending => "waiting to be sent",
            State::Sent => "sent",
            State::Delivered => "delivered",
            State::Failed => "not sent",
            State::Received | State::Undecryptable => "",
        };
        out.push(match (&e.group, &e.problem) {
            (_, Some(p)) if e.state == State::Failed => format!("{state}: {p}"),
            (Some(g), _) => format!("{state}: on {} of {} devices", g.delivered, g.of),
            (None, _) => match e.delivered.iter().map(|&(_, at)| at).min() {
                Some(at) => format!("{state}, first device {}", time(at)),
                None => state.to_string(),
            },
        });
        let read: Vec<String> = e
            .read
            .iter()
            .map(|(who, at)| format!("{} {}", name(who), time(*at)))
            .collect();
        match (&e.group, members) {
            (Some(_), Some(members)) => {
                let others: Vec<&GroupMember> = members.iter().filter(|m| m.number != me).collect();
                // Only those in the group now count (someone who read it and left
                // is not one of the m).
                let read_now = others
                    .iter()
                    .filter(|m| e.read.iter().any(|(who, _)| *who == m.number))
                    .count();
                out.push(format!("read by {read_now} of {}", others.len()));
                out.extend(read.iter().map(|r| format!("  read: {r}")));
                let unread: Vec<String> = others
                    .iter()
                    .filter(|m| !e.read.iter().any(|(who, _)| *who == m.number))
                    .map(|m| name(&m.number))
                    .collect();
                if !unread.is_empty() {
                    out.push(format!("  not yet: {}", unread.join(", ")));
                }
            }
            (Some(_), None) => {
                out.push(format!(
                    "read by {} (members unknown offline)",
                    e.read.len()
                ));
                out.extend(read.iter().map(|r| format!("  read: {r}")));
            }
            (None, _) => out.push(match read.first() {
                Some(r) => format!("read: {r}"),
                None => "not read yet".into(),
            }),
        }
    }
    if e.edited_at_ms.is_some() {
        out.push(format!(
            "edited {}",
            e.edited_at_ms.map(time).unwrap_or_default()
        ));
    }
    for (who, emoji) in &e.reactions {
        out.push(format!("{emoji} {}", name(who)));
    }
    if let Some(until) = e.expires_at_ms {
        out.push(format!("disappears {}", time(until)));
    }
    out
}

/// `/info ID`.
pub async fn message(
    m: &Messenger,
    me: &str,
    id: &str,
    names: &HashMap<String, String>,
) -> anyhow::Result<Popup> {
    let e = m.find_message(id).await?;
    let members = match &e.group {
        Some(g) if e.outgoing => m.group_info(g.group_id).await.ok().map(|(i, _)| i.members),
        _ => None,
    };
    let name = |n: &str| names.get(n).cloned().unwrap_or_else(|| n.to_string());
    Ok(Popup {
        title: "message".into(),
        lines: message_lines(&e, me, members.as_deref(), name),
    })
}

/// `/info` of the open conversation: who it is with (names, about, safety), the
/// group's members and admins, the timer.
pub async fn conversation(
    m: &Messenger,
    conv: &Conversation,
    names: &HashMap<String, String>,
) -> anyhow::Result<Popup> {
    let name = |n: &str| names.get(n).cloned().unwrap_or_else(|| n.to_string());
    let timer = m.timer(conv).await?;
    let mut lines = Vec::new();
    match conv {
        Conversation::With(number) => {
            let number = number.to_string();
            lines.push(format!("{} ({number})", name(&number)));
            match cached_profile_in(m.db(), &number)? {
                Some(k) => {
                    lines.push(format!("profile name: {}", k.profile.name));
                    if !k.profile.about.is_empty() {
                        lines.push(format!("about: {}", k.profile.about));
                    }
                    if let Some(seen) = k.last_seen_ms {
                        lines.push(format!("last seen around {}", time(seen)));
                    }
                }
                None => lines.push("no profile yet".into()),
            }
            lines.push(format!("safety number: switchboard safety {number}"));
        }
        Conversation::Group(group_id) => {
            let known = m.db().read(|tx| groups::known(tx, *group_id))?;
            lines.push(known.map_or_else(|| format!("group {group_id}"), |k| k.name));
            match m.group_info(*group_id).await {
                Ok((info, _)) => {
                    lines.push(format!("{} members", info.members.len()));
                    for member in &info.members {
                        lines.push(format!(
                            "  {} ({}){}",
                            name(&member.number),
                            member.number,
                            if member.admin { " · admin" } else { "" }
                        ));
                    }
                }
                Err(e) => lines.push(format!("members unknown: {e}")),
            }
        }
    }
    lines.push(format!("disappearing messages: {}", timer_text(timer)));
    Ok(Popup {
        title: "conversation".into(),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use switchboard::client::history::GroupPart;

    use super::*;

    const ME: &str = "+14155550100";

    fn member(number: &str) -> GroupMember {
        GroupMember {
            number: number.into(),
            admin: false,
            joined_at_ms: 0,
        }
    }

    #[test]
    fn a_group_message_is_read_by_n_of_m_with_the_names_of_those_who_have_not() {
        let e = Entry {
            seq: 1,
            peer: "group".into(),
            outgoing: true,
            device: 1,
            id: [0xab; 16],
            at_ms: 1_700_000_000_000,
            content: Some(Content::Text("hi".into())),
            state: State::Delivered,
            delivered: vec![],
            problem: None,
            to_identity: None,
            group: Some(GroupPart {
                group_id: 7,
                author: ME.into(),
                delivered: 3,
                of: 4,
            }),
            reactions: vec![("+14155550101".into(), "👍".into())],
            edited_at_ms: None,
            read: vec![("+14155550101".into(), 1_700_000_060_000)],
            expires_in_secs: 0,
            expires_at_ms: None,
        };
        let members = [
            member(ME),
            member("+14155550101"),
            member("+14155550102"),
            member("+14155550103"),
        ];
        let name = |n: &str| match n {
            "+14155550101" => "Bob".to_string(),
            "+14155550102" => "Carol".to_string(),
            other => other.to_string(),
        };
        let lines = message_lines(&e, ME, Some(&members), name);
        assert!(
            lines.contains(&"delivered: on 3 of 4 devices".to_string()),
            "{lines:?}"
        );
        assert!(lines.contains(&"read by 1 of 3".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"  not yet: Carol, +14155550103".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("  read: Bob 2023-")),
            "{lines:?}"
        );
        assert!(lines.contains(&"👍 Bob".to_string()), "{lines:?}");
        // Someone who read it and has left is not counted among the m.
        let mut left = e.clone();
        left.read.push(("+14155550199".into(), 1_700_000_070_000));
        let lines = message_lines(&left, ME, Some(&members), name);
        assert!(lines.contains(&"read by 1 of 3".to_string()), "{lines:?}");
        // Offline: the count without the members.
        let lines = message_lines(&e, ME, None, |n: &str| n.to_string());
        assert!(
            lines.contains(&"read by 1 (members unknown offline)".to_string()),
            "{lines:?}"
        );
    }
}
