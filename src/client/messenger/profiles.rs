//! Profiles, presence and typing, as the messenger keeps and sends them.
//!
//! This account's profile key is made with its first profile and given (a job, over
//! Olm) to everyone this device writes to, 1:1 or in a group, once per key; setting
//! the profile again tells them so (the same message), and they fetch it anew.
//! Profiles of others are fetched with the key they gave, and cached: `contacts list`
//! reads the cache, never the node.

use bincode::{Decode, Encode};

use super::{Client, Event, Job, Messenger, MessengerError, e2e, encode, now_ms};
use crate::client::content::{Body, Plaintext};
use crate::client::db::{DbError, Table, Tx};
use crate::client::profile::{self, Profile, ProfileKey};
use crate::phone::Number;
use crate::proto::{MessageId, TypingTo};

use super::acts::Conversation;

const MY_KEY: &[u8] = b"profile_key";
const MY_PROFILE: &[u8] = b"profile";
const PRESENCE_HOUR: &[u8] = b"presence_hour";

/// Another account's profile, as last fetched.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct KnownProfile {
    pub profile: Profile,
    /// The name before the last change, if it changed.
    pub previous_name: Option<String>,
    /// The hour they were last seen, when they share it (and so does this account).
    pub last_seen_ms: Option<u64>,
    pub fetched_at_ms: u64,
}

/// Someone this account wrote to, and whether they have its current profile key.
#[derive(Encode, Decode)]
struct Talked {
    number: String,
    /// The version of the profile key they were given (zeros: none yet).
    given: [u8; 32],
}

fn talked_prefix(tx: &Tx<'_>) -> Vec<u8> {
    tx.hash(b"profile-talked", &[]).to_vec()
}

fn talked_key(tx: &Tx<'_>, number: &str) -> Vec<u8> {
    let mut key = talked_prefix(tx);
    key.extend_from_slice(&tx.hash(b"profile-talked-to", &[number.as_bytes()]));
    key
}

fn their_key(tx: &Tx<'_>, number: &str) -> Vec<u8> {
    tx.hash(b"profile-key", &[number.as_bytes()]).to_vec()
}

fn cache_key(tx: &Tx<'_>, number: &str) -> Vec<u8> {
    tx.hash(b"profile-cache", &[number.as_bytes()]).to_vec()
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 1 << 20 }>()
}

fn decode<T: Decode<()>>(bytes: &[u8], what: &str) -> Result<T, MessengerError> {
    bincode::decode_from_slice(bytes, config())
        .map(|(v, _)| v)
        .map_err(|e| MessengerError::History(format!("{what}: {e}")))
}

/// This account's profile key, if it has set a profile.
fn my_key(tx: &Tx<'_>) -> Result<Option<ProfileKey>, DbError> {
    Ok(tx
        .get(Table::Kv, MY_KEY)?
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .map(ProfileKey::from_bytes))
}

/// This device wrote to `numbers` (1:1 or in a group): each that lacks this account's
/// current profile key gets it (a job). Remembered either way, so a profile set later
/// reaches them.
pub(super) fn talked_to(tx: &Tx<'_>, numbers: &[&str], now: u64) -> Result<bool, MessengerError> {
    let version = my_key(tx)?.map(|k| k.version());
    let mut jobs = false;
    for number in numbers {
        jobs |= give_key(tx, number, version, false, now)?;
    }
    Ok(jobs)
}

/// Remembers `number` as written to, and gives them the profile key of `version`
/// (a job) unless they have it; `again`: even if they have it (the profile changed).
/// Whether a job was added.
fn give_key(
    tx: &Tx<'_>,
    number: &str,
    version: Option<[u8; 32]>,
    again: bool,
    now: u64,
) -> Result<bool, MessengerError> {
    let key = talked_key(tx, number);
    let stored = tx.get(Table::Peer, &key)?;
    let known = stored.is_some();
    let mut record = match stored {
        Some(v) => decode::<Talked>(&v, "a profile recipient")?,
        None => Talked {
            number: number.to_string(),
            given: [0; 32],
        },
    };
    match version {
        Some(v) if again || record.given != v => {
            record.given = v;
            let job = Job::ProfileKey {
                to: number.to_string(),
                node_id: e2e::new_message_id(),
            };
            tx.add_job(now, &encode(&job))?;
            tx.put(Table::Peer, &key, &encode(&record))?;
            Ok(true)
        }
        _ if !known => {
            tx.put(Table::Peer, &key, &encode(&record))?;
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// `from` gave their profile key (their profile is new or changed): kept, and their
/// profile fetched (a job).
pub(super) fn key_received(
    tx: &Tx<'_>,
    from: &str,
    key: [u8; 32],
    now: u64,
) -> Result<(), MessengerError> {
    tx.put(Table::Peer, &their_key(tx, from), &key)?;
    let job = Job::FetchProfile {
        number: from.to_string(),
    };
    tx.add_job(now, &encode(&job))?;
    Ok(())
}

/// Decodes `bytes` as each value kept here (for the fuzz target).
pub(super) fn decode_stored(bytes: &[u8]) {
    let _ = decode::<KnownProfile>(bytes, "a cached profile");
    let _ = decode::<Talked>(bytes, "a profile recipient");
    let _ = decode::<Profile>(bytes, "this account's profile");
}

/// `number`'s cached profile.
fn cached(tx: &Tx<'_>, number: &str) -> Result<Option<KnownProfile>, MessengerError> {
    tx.get(Table::Peer, &cache_key(tx, number))?
        .map(|v| decode(&v, "a cached profile"))
        .transpose()
}

impl Messenger {
    /// Sets this account's profile (a photo is the image file's bytes: it is shrunk
    /// and re-encoded first) and tells everyone this device has written to that it
    /// changed. Makes the profile key with the first profile.
    pub async fn set_profile(
        &self,
        name: &str,
        about: &str,
        photo: Option<&[u8]>,
    ) -> Result<Profile, MessengerError> {
        let photo = match photo {
            Some(file) => Some(profile::prepare_photo(file).map_err(refused)?),
            None => None,
        };
        let new = Profile {
            name: name.trim().to_string(),
            about: about.trim().to_string(),
            photo,
        };
        profile::check(&new).map_err(refused)?;
        let key = self
            .inner
            .db
            .write_async(|tx| {
                if let Some(k) = my_key(tx)? {
                    return Ok::<_, MessengerError>(k);
                }
                let k = ProfileKey::generate();
                tx.put(Table::Kv, MY_KEY, &k.to_bytes())?;
                Ok(k)
            })
            .await?;
        let me = self.inner.me.number.to_string();
        let sealed = key.seal_profile(&me, &new);
        let client = self.client().await?;
        client.set_profile(key.version(), sealed).await?;
        let stored = new.clone();
        self.inner
            .db
            .write_async(move |tx| {
                tx.put(Table::Kv, MY_PROFILE, &encode(&stored))?;
                // A new profile holds no presence: it goes up again.
                tx.delete(Table::Kv, PRESENCE_HOUR)?;
                // Everyone written to hears of it (they fetch it anew).
                let (now, version) = (now_ms(), my_key(tx)?.map(|k| k.version()));
                for (_, value) in tx.scan(Table::Peer, &talked_prefix(tx))? {
                    let t: Talked = decode(&value, "a profile recipient")?;
                    give_key(tx, &t.number, version, true, now)?;
                }
                Ok::<_, MessengerError>(())
            })
            .await?;
        let events = self.run_jobs(&client).await;
        self.stash(events);
        if self.inner.settings.share_last_seen {
            self.share_presence(&client).await?;
        }
        Ok(new)
    }

    /// This account's own profile, as last set from this device.
    pub async fn my_profile(&self) -> Result<Option<Profile>, MessengerError> {
        self.inner
            .db
            .read_async(|tx| {
                tx.get(Table::Kv, MY_PROFILE)?
                    .map(|v| decode(&v, "this account's profile"))
                    .transpose()
            })
            .await
    }

    /// `number`'s profile as last fetched (no network): what `contacts list` shows.
    pub async fn cached_profile(
        &self,
        number: &Number,
    ) -> Result<Option<KnownProfile>, MessengerError> {
        let number = number.to_string();
        self.inner
            .db
            .read_async(move |tx| cached(tx, &number))
            .await
    }

    /// `number`'s profile, fetched now with the key they gave; `None` when they gave
    /// none (they never wrote to this account) or have no profile.
    pub async fn profile_of(
        &self,
        number: &Number,
    ) -> Result<Option<KnownProfile>, MessengerError> {
        let client = self.client().await?;
        let (profile, event) = self.refresh_profile(&client, number).await?;
        self.stash(event.into_iter().collect());
        Ok(profile)
    }

    /// Fetches `number`'s profile into the cache: it, and the event if it is new or
    /// its name changed.
    pub(super) async fn refresh_profile(
        &self,
        client: &Client,
        number: &Number,
    ) -> Result<(Option<KnownProfile>, Option<Event>), MessengerError> {
        let peer = number.to_string();
        let key = self
            .inner
            .db
            .read_async({
                let peer = peer.clone();
                move |tx| {
                    Ok::<_, MessengerError>(
                        tx.get(Table::Peer, &their_key(tx, &peer))?
                            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()),
                    )
                }
            })
            .await?;
        let Some(key) = key.map(ProfileKey::from_bytes) else {
            return Ok((None, None));
        };
        let Some((sealed, presence)) = client.fetch_profile(number, key.version()).await? else {
            return Ok((None, None));
        };
        let fetched = key.open_profile(&peer, &sealed).map_err(refused)?;
        // Last seen shows only to those who share theirs (as on WhatsApp).
        let last_seen_ms = if self.inner.settings.share_last_seen && !presence.is_empty() {
            key.open_presence(&peer, &presence).ok()
        } else {
            None
        };
        self.inner
            .db
            .write_async(move |tx| {
                let before = cached(tx, &peer)?;
                let old_name = before.as_ref().map(|b| b.profile.name.clone());
                let renamed = old_name.as_deref() != Some(fetched.name.as_str());
                let previous_name = if renamed {
                    old_name.clone()
                } else {
                    before.and_then(|b| b.previous_name)
                };
                let known = KnownProfile {
                    profile: fetched,
                    previous_name,
                    last_seen_ms,
                    fetched_at_ms: now_ms(),
                };
                tx.put(Table::Peer, &cache_key(tx, &peer), &encode(&known))?;
                let event = renamed.then(|| Event::ProfileChanged {
                    number: peer.clone(),
                    old_name,
                    name: known.profile.name.clone(),
                });
                Ok::<_, MessengerError>((Some(known), event))
            })
            .await
    }

    /// Gives `to` this account's profile key, as `node_id`.
    pub(super) async fn give_profile_key(
        &self,
        client: &Client,
        to: &Number,
        node_id: MessageId,
    ) -> Result<(), MessengerError> {
        let key = self.inner.db.read_async(my_key).await?;
        let Some(key) = key else {
            return Ok(());
        };
        let body = Body::ProfileKey {
            key: key.to_bytes(),
        };
        let plain = Plaintext::new(node_id, now_ms(), body).encode();
        self.transmit(client, to, node_id, plain, super::CONTROL)
            .await
    }

    /// Gives this account's profile key to the members of group `group_id` that lack
    /// it (their numbers come from the node).
    pub(super) async fn share_profile_with_group(
        &self,
        client: &Client,
        group_id: u64,
    ) -> Result<(), MessengerError> {
        let flag = move |tx: &Tx<'_>| tx.hash(b"profile-group", &[&group_id.to_be_bytes()]);
        let pending = self
            .inner
            .db
            .read_async(move |tx| {
                let Some(key) = my_key(tx)? else {
                    return Ok::<_, MessengerError>(false);
                };
                let given = tx.get(Table::Peer, &flag(tx))?;
                Ok(given.as_ref().map(|v| v.as_slice()) != Some(&key.version()[..]))
            })
            .await?;
        if !pending {
            return Ok(());
        }
        let info = client.fetch_group(group_id).await?;
        let me = self.inner.me.number.to_string();
        let numbers: Vec<String> = info
            .members
            .into_iter()
            .map(|m| m.number)
            .filter(|n| *n != me)
            .collect();
        let jobs = self
            .inner
            .db
            .write_async(move |tx| {
                let refs: Vec<&str> = numbers.iter().map(String::as_str).collect();
                let jobs = talked_to(tx, &refs, now_ms())?;
                if let Some(key) = my_key(tx)? {
                    tx.put(Table::Peer, &flag(tx), &key.version())?;
                }
                Ok::<_, MessengerError>(jobs)
            })
            .await?;
        if jobs {
            let events = self.run_jobs(client).await;
            self.stash(events);
        }
        Ok(())
    }

    /// Puts this account's last-seen hour on the node, if it shares it, has a
    /// profile, and has not done so this hour.
    pub(super) async fn share_presence(&self, client: &Client) -> Result<(), MessengerError> {
        if !self.inner.settings.share_last_seen {
            return Ok(());
        }
        let now = now_ms();
        let hour = now - now % profile::PRESENCE_GRAIN_MS;
        let key = self
            .inner
            .db
            .read_async(move |tx| {
                let done = tx
                    .get(Table::Kv, PRESENCE_HOUR)?
                    .is_some_and(|v| v.as_slice() == hour.to_be_bytes());
                Ok::<_, MessengerError>(if done { None } else { my_key(tx)? })
            })
            .await?;
        let Some(key) = key else {
            return Ok(());
        };
        let me = self.inner.me.number.to_string();
        client.set_presence(key.seal_presence(&me, now)).await?;
        self.inner
            .db
            .write_async(move |tx| tx.put(Table::Kv, PRESENCE_HOUR, &hour.to_be_bytes()))
            .await?;
        Ok(())
    }

    /// Tells `conversation` this device is typing (or stopped): only devices connected
    /// now see it, and the node keeps nothing. How many devices were told.
    pub async fn typing(
        &self,
        conversation: &Conversation,
        typing: bool,
    ) -> Result<u32, MessengerError> {
        let client = self.client().await?;
        let to = match conversation {
            Conversation::With(n) => TypingTo::Account(n.to_string()),
            Conversation::Group(g) => TypingTo::Group(*g),
        };
        Ok(client.typing(to, typing).await?)
    }
}

/// `number`'s cached profile in home database `db` (no network, no messenger).
pub fn cached_profile_in(
    db: &crate::client::db::HomeDb,
    number: &str,
) -> Result<Option<KnownProfile>, MessengerError> {
    db.read(|tx| cached(tx, number))
}

/// How a contact is shown: the address-book name with the profile name beside it
/// (`Mum (Alice A.)`), either alone, or `None` when there is neither. A name that
/// changed says so (`Mum (Alice A., was Alice)`).
pub fn shown_name(book: Option<&str>, known: Option<&KnownProfile>) -> Option<String> {
    let profile = known.map(|k| match &k.previous_name {
        Some(old) => format!("{}, was {old}", k.profile.name),
        None => k.profile.name.clone(),
    });
    match (book, profile) {
        (Some(b), Some(p)) if b != p => Some(format!("{b} ({p})")),
        (Some(b), _) => Some(b.to_string()),
        (None, Some(p)) => Some(p),
        (None, None) => None,
    }
}

fn refused(e: profile::ProfileError) -> MessengerError {
    MessengerError::Refused(e.to_string())
}
