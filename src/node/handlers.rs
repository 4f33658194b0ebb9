//! Request handlers: one function per request kind, no quinn types.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Shared;
use super::conn::Session;
use crate::phone::Number;
use crate::proto::messages::{FILTER_CHUNK_BYTES, MAX_DISCOVERY_BATCH};
use crate::proto::{
    Accepted, Bundle, Bundles, Channel, CodeSent, ErrorKind, Identity, IdentityKeys, KeyUpload,
    NodeError, Outgoing, Registered, Reply, Request, Response, SignedKey,
};
use crate::store::records::{LockRecord, StoredKey};
use crate::store::{
    AppendOutcome, AppendPolicy, DeviceIdentity, DeviceRef, HandOff, InMemory, Judgement,
    KeysRefusal, NewDevice, Store, StoreError, TicketWaiter, VerifyOutcome,
};
use crate::verify::{self, Delivery, Refusal, gateway, provider};

/// Answers one request.
/// `answer`: set by a `Send` whose answer carries delivery receipts or leaves a
/// sent-id record; the caller confirms it once the reply reached the client
/// ([`Waiting::answered`]), or drops it to queue the receipts instead and keep the
/// record.
pub async fn handle(
    request: Request,
    shared: &Arc<Shared>,
    session: &Session,
    answer: &mut Option<Waiting>,
) -> Reply {
    let result = match request {
        Request::RequestCode {
            number,
            channel,
            locale,
        } => {
            let result = request_code(shared, session, &number, channel, &locale).await;
            shared.metrics.code_request(&result);
            result
        }
        Request::VerifyCode { number, code } => {
            verify_code(shared, session, &number, &code, None).await
        }
        Request::VerifyCodeWithPin { number, code, pin } => {
            verify_code(shared, session, &number, &code, Some(&pin)).await
        }
        Request::SetLock { pin } => set_lock(shared, session, pin).await,
        Request::ClearLock => clear_lock(shared, session).await,
        Request::WhoAmI => whoami(shared, session).await,
        Request::PublishKeys(upload) => publish_keys(shared, session, upload).await,
        Request::FetchBundles { number, claim } => {
            fetch_bundles(shared, session, &number, claim).await
        }
        Request::Send(outgoing) => send(shared, session, outgoing, answer).await,
        // The connection layer turns a Subscribe stream into a delivery stream before
        // it gets here; a Subscribe that arrives here is a bug, answered as one.
        Request::Subscribe => Err(NodeError::new(
            ErrorKind::Internal,
            "subscribe is not a plain request",
        )),
        Request::Evaluate { blinded } => evaluate(shared, session, blinded).await,
        Request::FetchFilter { have, offset } => fetch_filter(shared, session, have, offset).await,
        Request::Resolve { prfs } => resolve(shared, session, prfs).await,
    };
    match result {
        Ok(response) => Reply::Ok(response),
        Err(error) => Reply::Err(error),
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn secs(d: Duration) -> u32 {
    // Round up: "retry after 0 seconds" while still refusing would be a lie.
    u32::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u32::MAX)
}

fn parse_number(number: &str) -> Result<Number, NodeError> {
    Number::parse_e164(number).map_err(|e| NodeError::new(ErrorKind::InvalidNumber, e.to_string()))
}

pub(crate) fn internal(e: StoreError) -> NodeError {
    tracing::error!(error = %e, "storage failure");
    NodeError::new(
        ErrorKind::Internal,
        "the node's storage failed; nothing was changed",
    )
}

/// Runs a store operation on the store thread, so sled never blocks an async worker.
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, NodeError> {
    shared.worker.run(op).await.map_err(internal)
}

/// Runs a read-only store operation on the reader thread, beside the writes.
pub(crate) async fn read<T: Send + 'static>(
    shared: &Arc<Shared>,
    op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, NodeError> {
    shared.reader.run(op).await.map_err(internal)
}

fn refusal(r: Refusal) -> NodeError {
    match r {
        Refusal::Cooldown { retry_after } => NodeError::new(
            ErrorKind::RateLimited {
                retry_after_secs: secs(retry_after),
            },
            format!(
                "a code was sent to this number moments ago; wait {} seconds before asking for another",
                secs(retry_after)
            ),
        ),
        Refusal::Locked {
            tries_left,
            lapses_in,
            wrong_pin,
        } => {
            let lapse = humantime::format_duration(Duration::from_secs(lapses_in.as_secs()));
            let message = match (tries_left, wrong_pin) {
                (0, _) => format!(
                    "this number has a registration lock and too many wrong PINs were given: \
                     no PIN is accepted until the lock lapses, in {lapse} if its devices stay away"
                ),
                (n, true) => format!("wrong registration-lock PIN; {n} tries left"),
                (n, false) => format!(
                    "this number has a registration lock: registering it needs its PIN as well \
                     ({n} tries left); the lock lapses in {lapse} if its devices stay away"
                ),
            };
            NodeError::new(
                ErrorKind::RegistrationLocked {
                    tries_left,
                    lapses_in_secs: lapses_in.as_secs(),
                },
                message,
            )
        }
        Refusal::Wrong { tries_left } => NodeError::new(
            ErrorKind::WrongCode { tries_left },
            match tries_left {
                0 => "wrong code; no tries left: this code is dead, request a new one".to_string(),
                1 => "wrong code; 1 try left".to_string(),
                n => format!("wrong code; {n} tries left"),
            },
        ),
        Refusal::Expired => NodeError::new(
            ErrorKind::CodeExpired,
            "the code has expired; request a new one",
        ),
        Refusal::Exhausted { retry_after } => NodeError::new(
            ErrorKind::TooManyAttempts {
                retry_after_secs: secs(retry_after),
            },
            format!(
                "too many wrong codes: this code is dead even if it is right; request a new one{}",
                match secs(retry_after) {
                    0 => String::new(),
                    s => format!(" in {s} seconds"),
                }
            ),
        ),
    }
}

/// The abuse limits on sending a code to `number` for a client at `source`; counts
/// this code when they allow it, and returns the keys it was counted under.
async fn check_code_limits(
    shared: &Arc<Shared>,
    number: &Number,
    source: std::net::IpAddr,
    now: u64,
) -> Result<[String; 4], NodeError> {
    let v = &shared.config.verification;
    if let Err(why) = verify::limits::country_allowed(&v.limits, number) {
        tracing::warn!(%number, %source, "code refused: country not served");
        shared.metrics.code_limited("country_denied");
        return Err(NodeError::new(ErrorKind::InvalidNumber, why));
    }
    let keys = verify::limits::keys(number, source);
    let (limits, cooldown) = (v.limits.clone(), v.resend_cooldown);
    let counted = keys.clone();
    let judged = blocking(shared, move |store| {
        store.record_code_send(&counted, now, verify::limits::KEEP_MS, |times| {
            verify::limits::judge(&limits, cooldown, times, now)
        })
    })
    .await?;
    judged.map(|()| keys).map_err(|limited| {
        tracing::warn!(%number, %source, limit = %limited.limit, "code refused by a limit");
        shared.metrics.code_limited(limited.name);
        let wait = Duration::from_secs(limited.retry_after.as_secs().max(1));
        NodeError::new(
            ErrorKind::RateLimited {
                retry_after_secs: secs(wait),
            },
            format!(
                "no code sent: {}; try again in {}",
                limited.limit,
                humantime::format_duration(wait)
            ),
        )
    })
}

async fn request_code(
    shared: &Arc<Shared>,
    session: &Session,
    number: &str,
    channel: Channel,
    locale: &str,
) -> Result<Response, NodeError> {
    let number = parse_number(number)?;
    tracing::info!(%number, channel = channel.name(), source = %session.remote.ip(), "code requested");
    let code = shared.codes.generate(&number);
    let now = now_ms();
    // Test numbers are not counted: their codes are never sent.
    let counted = if shared.codes.is_test_number(&number) {
        None
    } else {
        Some(check_code_limits(shared, &number, session.remote.ip(), now).await?)
    };
    let record = {
        let (shared2, number2, code2) = (shared.clone(), number.clone(), code.clone());
        blocking(shared, move |store| {
            store.replace_code(number2.as_str(), |current| {
                shared2.codes.issue(&number2, &code2, current, now)
            })
        })
        .await?
        .map_err(|r| {
            if matches!(r, Refusal::Cooldown { .. }) {
                shared.metrics.code_limited("cooldown");
            }
            refusal(r)
        })?
    };
    if shared.codes.is_test_number(&number) {
        tracing::info!(%number, "code requested for a test number; its fixed code is not delivered");
    } else {
        let ttl_minutes = shared.codes.ttl().as_secs().div_ceil(60);
        let template = provider::template(&shared.config.verification.messages, locale);
        let delivery = Delivery {
            message: provider::message(template, &code, ttl_minutes),
            number: number.clone(),
            channel,
            code,
        };
        let provider = match channel {
            Channel::Sms => shared.providers.sms.as_ref(),
            Channel::Voice => shared.providers.voice.as_ref(),
        };
        let retries = shared.config.verification.retries;
        if let Err(e) = gateway::deliver_with_retries(provider, &delivery, retries).await {
            tracing::error!(
                provider = provider.name(),
                %number,
                tries = retries + 1,
                error = %e,
                "code delivery failed; the client was told to try later"
            );
            // Nothing was sent: the code goes, and so does its count against the limits.
            let number2 = number.clone();
            blocking(shared, move |store| {
                store.remove_code(number2.as_str())?;
                match &counted {
                    Some(keys) => store.forget_code_send(keys, now),
                    None => Ok(()),
                }
            })
            .await?;
            return Err(NodeError::new(
                ErrorKind::DeliveryFailed,
                "could not send the code; try again later",
            ));
        }
    }
    Ok(Response::CodeSent(CodeSent {
        expires_in_secs: secs(Duration::from_millis(
            record.expires_at_ms.saturating_sub(now),
        )),
        resend_after_secs: secs(shared.codes.cooldown()),
        tries: record.tries_left,
    }))
}

/// What a registration lock in force says of this attempt: `None` when the PIN is
/// right. `lapses_at` is when the lock lapses (ms).
async fn lock_refusal(
    shared: &Arc<Shared>,
    record: &LockRecord,
    lapses_at: u64,
    pin: Option<&str>,
    now: u64,
) -> Option<Refusal> {
    let lapses_in = Duration::from_millis(lapses_at.saturating_sub(now));
    let left = shared
        .config
        .verification
        .max_pin_tries
        .saturating_sub(record.wrong_tries);
    let Some(pin) = pin.filter(|_| left > 0) else {
        return Some(Refusal::Locked {
            tries_left: left,
            lapses_in,
            wrong_pin: false,
        });
    };
    let (pin, hash) = (pin.to_string(), record.pin_hash.clone());
    let right = tokio::task::spawn_blocking(move || verify::pin::verify(&pin, &hash))
        .await
        .unwrap_or(false);
    (!right).then_some(Refusal::Locked {
        tries_left: left - 1,
        lapses_in,
        wrong_pin: true,
    })
}

async fn verify_code(
    shared: &Arc<Shared>,
    session: &Session,
    number: &str,
    code: &str,
    pin: Option<&str>,
) -> Result<Response, NodeError> {
    let number = parse_number(number)?;
    if !verify::well_formed(code) {
        return Err(NodeError::new(ErrorKind::InvalidCode, "a code is 6 digits"));
    }
    let now = now_ms();
    let number3 = number.clone();
    let lock = blocking(shared, move |store| {
        store.registration_lock(number3.as_str())
    })
    .await?;
    // A lock lapses once the account's devices have stayed away for the lapse time.
    let lapse = shared.config.verification.lock_lapse.as_millis() as u64;
    let in_force = lock
        .as_ref()
        .map(|(_, record, seen)| (record, seen.saturating_add(lapse)))
        .filter(|(_, lapses_at)| now < *lapses_at);
    let locked = match in_force {
        Some((record, lapses_at)) => lock_refusal(shared, record, lapses_at, pin, now).await,
        None => None,
    };
    let lock_in_force = in_force.is_some();
    let device = NewDevice {
        key_id: session.key_id,
        public_key: session.public_key.clone(),
    };
    let (shared2, number2, code2) = (shared.clone(), number.clone(), code.to_string());
    // Invalidate directory caches before the change and again after it, so that no
    // cache filled in between outlives it.
    shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
    let outcome = blocking(shared, move |store| {
        store.verify_and_register(number2.as_str(), &device, now, |record| {
            match (shared2.codes.judge(&number2, &code2, record, now), &locked) {
                // The code is right, but the lock holds: keep the code for a try with
                // the PIN.
                (Judgement::Accept, Some(refusal)) => Judgement::Reject {
                    update: Some(record.clone()),
                    error: refusal.clone(),
                },
                (judgement, _) => judgement,
            }
        })
    })
    .await;
    shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
    let outcome = outcome?;
    match outcome {
        VerifyOutcome::NoCode => Err(NodeError::new(
            ErrorKind::NoCodePending,
            "no code is pending for this number; request one first",
        )),
        VerifyOutcome::Rejected(r) => {
            if let (
                Refusal::Locked {
                    wrong_pin: true, ..
                },
                Some((account, record, _)),
            ) = (&r, &lock)
            {
                let (account, mut record) = (*account, record.clone());
                record.wrong_tries += 1;
                tracing::warn!(
                    account,
                    wrong_tries = record.wrong_tries,
                    "wrong registration-lock PIN"
                );
                blocking(shared, move |store| {
                    store.set_registration_lock(account, Some(&record))
                })
                .await?;
                shared.commit.durable().await.map_err(commit_failed)?;
            }
            Err(refusal(r))
        }
        VerifyOutcome::Registered {
            device,
            took_over,
            signed_out,
            revoked_keys,
        } => {
            // A lock that let this through (right PIN) starts counting afresh; one that
            // had lapsed goes. Either way the account was seen now.
            let lock_update = match lock {
                Some((account, _, _)) if !lock_in_force => Some((account, None)),
                Some((account, record, _)) if record.wrong_tries > 0 => Some((
                    account,
                    Some(LockRecord {
                        wrong_tries: 0,
                        ..record
                    }),
                )),
                _ => None,
            };
            let account = device.account_id;
            blocking(shared, move |store| {
                if let Some((locked_account, update)) = &lock_update {
                    store.set_registration_lock(*locked_account, update.as_ref())?;
                }
                store.mark_seen(account, now)
            })
            .await?;
            // What the node held for signed-out devices goes: their queues can never
            // be read again, and their keys must not be handed out.
            for old in signed_out.iter().copied() {
                let dropped = blocking(shared, move |store| store.drop_device(old)).await?;
                tracing::info!(
                    account = old.account_id,
                    device = old.device_id,
                    dropped,
                    "device signed out"
                );
            }
            if !took_over {
                shared.discovery.mark_dirty();
            }
            // The device must not be told it is registered before that is durable.
            shared.commit.durable().await.map_err(commit_failed)?;
            // Signed-out devices lose their live connections at once, not at their
            // next request.
            let closed = shared.connections.sign_out(&revoked_keys);
            if closed > 0 {
                tracing::info!(
                    connections = closed,
                    "closed the connections of signed-out devices"
                );
            }
            tracing::info!(
                %number,
                account = device.account_id,
                device = device.device_id,
                took_over,
                signed_out = signed_out.len(),
                "device registered"
            );
            Ok(Response::Registered(Registered {
                number: number.to_string(),
                account_id: device.account_id,
                device_id: device.device_id,
                took_over,
            }))
        }
    }
}

/// The registered device behind this connection's key, or `Unauthenticated`.
pub(crate) async fn authenticated(
    shared: &Arc<Shared>,
    session: &Session,
) -> Result<DeviceIdentity, NodeError> {
    let epoch = shared.directory_epoch.load(Ordering::Acquire);
    let cached = match session.identity.lock() {
        Ok(cached) => cached
            .as_ref()
            .filter(|(at, _)| *at == epoch)
            .map(|(_, identity)| identity.clone()),
        Err(_) => None,
    };
    let identity = match cached {
        Some(identity) => identity,
        None => {
            let key_id = session.key_id;
            let found = blocking(shared, move |store| store.device_by_key(&key_id)).await?;
            let identity = found.ok_or_else(|| {
                NodeError::new(
                    ErrorKind::Unauthenticated,
                    "this device is not registered on this node: it was signed out because its number was registered on another device, or it never registered",
                )
            })?;
            if let Ok(mut cached) = session.identity.lock() {
                *cached = Some((epoch, identity.clone()));
            }
            identity
        }
    };
    note_seen(shared, session, identity.device.account_id).await?;
    Ok(identity)
}

/// Records the account as seen (a registration lock lapses when it is not), at most
/// hourly per connection.
async fn note_seen(shared: &Arc<Shared>, session: &Session, account: u64) -> Result<(), NodeError> {
    const HOUR_MS: u64 = 3_600_000;
    let now = now_ms();
    let last = session.seen_marked.load(Ordering::Relaxed);
    if now < last.saturating_add(HOUR_MS)
        || session
            .seen_marked
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return Ok(());
    }
    blocking(shared, move |store| store.mark_seen(account, now)).await
}

async fn whoami(shared: &Arc<Shared>, session: &Session) -> Result<Response, NodeError> {
    let identity = authenticated(shared, session).await?;
    Ok(Response::Identity(Identity {
        number: identity.number,
        account_id: identity.device.account_id,
        device_id: identity.device.device_id,
    }))
}

fn bad_keys(message: impl Into<String>) -> NodeError {
    NodeError::new(ErrorKind::BadKeys, message)
}

async fn set_lock(
    shared: &Arc<Shared>,
    session: &Session,
    pin: String,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    verify::pin::check_new(&pin).map_err(|why| NodeError::new(ErrorKind::Malformed, why))?;
    let hash = tokio::task::spawn_blocking(move || verify::pin::hash(&pin))
        .await
        .map_err(|e| NodeError::new(ErrorKind::Internal, format!("hashing task failed: {e}")))?
        .map_err(|why| NodeError::new(ErrorKind::Internal, why))?;
    let record = LockRecord {
        pin_hash: hash,
        set_at_ms: now_ms(),
        wrong_tries: 0,
    };
    let account = me.device.account_id;
    blocking(shared, move |store| {
        store.set_registration_lock(account, Some(&record))
    })
    .await?;
    shared.commit.durable().await.map_err(commit_failed)?;
    tracing::info!(account, "registration lock set");
    Ok(Response::LockSet {
        lapse_days: (shared.config.verification.lock_lapse.as_secs() / 86_400) as u32,
    })
}

async fn clear_lock(shared: &Arc<Shared>, session: &Session) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let account = me.device.account_id;
    blocking(shared, move |store| {
        store.set_registration_lock(account, None)
    })
    .await?;
    shared.commit.durable().await.map_err(commit_failed)?;
    tracing::info!(account, "registration lock cleared");
    Ok(Response::LockCleared)
}

/// Refuses a write that would grow the store when the disk is nearly full.
fn check_space(shared: &Shared) -> Result<(), NodeError> {
    if shared.space.full() {
        return Err(NodeError::new(
            ErrorKind::StorageFull,
            "storage full: the node's disk is nearly full and it takes no new messages or keys \
             until space is freed; try again later",
        ));
    }
    Ok(())
}

async fn publish_keys(
    shared: &Arc<Shared>,
    session: &Session,
    upload: KeyUpload,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    check_space(shared)?;
    let max = shared.config.messages.max_one_time_keys;
    if upload.one_time_keys.len() > max as usize {
        return Err(bad_keys(format!(
            "{} one-time keys in one upload; the node keeps at most {max} per device",
            upload.one_time_keys.len()
        )));
    }
    // The node cannot tell good keys from bad, but it can refuse keys whose signature
    // does not verify: they would only make every fetcher fail later.
    if let Some(fallback) = &upload.fallback
        && !fallback.verify(&upload.identity, SignedKey::FALLBACK)
    {
        return Err(bad_keys("the fallback key's signature does not verify"));
    }
    if let Some(i) = upload
        .one_time_keys
        .iter()
        .position(|k| !k.verify(&upload.identity, SignedKey::ONE_TIME))
    {
        return Err(bad_keys(format!(
            "one-time key {i}'s signature does not verify"
        )));
    }
    let stored = |k: &SignedKey| StoredKey {
        key: k.key,
        signature: k.signature,
    };
    let fallback = upload.fallback.as_ref().map(stored);
    let otks: Vec<StoredKey> = upload.one_time_keys.iter().map(stored).collect();
    let identity = upload.identity;
    let now = now_ms();
    let device = me.device;
    let result = blocking(shared, move |store| {
        store.publish_keys(
            device,
            (identity.curve25519, identity.ed25519),
            fallback,
            &otks,
            max,
            now,
        )
    })
    .await?;
    match result {
        Ok(count) => {
            shared.commit.durable().await.map_err(commit_failed)?;
            Ok(Response::KeysStored {
                one_time_keys: count,
            })
        }
        Err(KeysRefusal::TooMany { stored, max }) => Err(bad_keys(format!(
            "the node already holds {stored} one-time keys for this device and keeps at most {max}"
        ))),
    }
}

fn commit_failed(e: String) -> NodeError {
    tracing::error!(error = %e, "group commit failed");
    NodeError::new(
        ErrorKind::Internal,
        "the node could not make the write durable; send again",
    )
}

/// For a number `recipient` found no account for (it is valid E.164 by then).
fn unknown_recipient(number: &str) -> NodeError {
    NodeError::new(
        ErrorKind::UnknownRecipient,
        format!("{number} is not registered on this node"),
    )
}

async fn fetch_bundles(
    shared: &Arc<Shared>,
    session: &Session,
    number: &str,
    claim: bool,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    charge_lookup(shared, &me, number)?;
    let Some((account_id, devices)) = recipient(shared, number).await? else {
        return Err(unknown_recipient(number));
    };
    let claimed = blocking(shared, move |store| {
        store.fetch_bundles(account_id, &devices, claim)
    })
    .await?;
    if claimed.is_empty() {
        return Err(NodeError::new(
            ErrorKind::NoKeys,
            format!("{number} has not published its keys yet; it must connect once first"),
        ));
    }
    if claim {
        for c in &claimed {
            shared.mailboxes.keys_claimed(DeviceRef {
                account_id,
                device_id: c.device_id,
            });
        }
    }
    let signed = |k: StoredKey| SignedKey {
        key: k.key,
        signature: k.signature,
    };
    Ok(Response::Bundles(Bundles {
        number: number.to_string(),
        devices: claimed
            .into_iter()
            .map(|c| Bundle {
                device_id: c.device_id,
                identity: IdentityKeys {
                    curve25519: c.keys.curve25519,
                    ed25519: c.keys.ed25519,
                },
                one_time_key: c.one_time_key.map(signed),
                fallback: c.keys.fallback.map(signed),
            })
            .collect(),
    }))
}

/// The account of `number` (as sent on the wire) and its device ids (sorted), from
/// the directory cache when it is current. Only registered numbers, which were valid
/// E.164 when they registered, are ever cached, so a hit needs no parsing; a miss is
/// validated (`InvalidNumber`) before the store is asked.
async fn recipient(
    shared: &Arc<Shared>,
    number: &str,
) -> Result<Option<(u64, Vec<u32>)>, NodeError> {
    const MAX_CACHED: usize = 100_000;
    let epoch = shared.directory_epoch.load(Ordering::Acquire);
    if let Ok(cache) = shared.directory.lock()
        && cache.0 == epoch
        && let Some(hit) = cache.1.get(number)
    {
        return Ok(Some(hit.clone()));
    }
    let n = parse_number(number)?;
    let found = blocking(shared, move |store| store.account_by_number(n.as_str())).await?;
    let Some((account_id, account)) = found else {
        return Ok(None);
    };
    let mut devices: Vec<u32> = account.devices.iter().map(|d| d.device_id).collect();
    devices.sort_unstable();
    if let Ok(mut cache) = shared.directory.lock() {
        if cache.0 != epoch || cache.1.len() >= MAX_CACHED {
            *cache = (epoch, std::collections::HashMap::new());
        }
        cache
            .1
            .insert(number.to_string(), (account_id, devices.clone()));
    }
    Ok(Some((account_id, devices)))
}

async fn send(
    shared: &Arc<Shared>,
    session: &Session,
    outgoing: Outgoing,
    answer: &mut Option<Waiting>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let to = outgoing.to.as_str();
    let limits = &shared.config.messages;
    let max = limits.max_envelope_bytes;
    if outgoing
        .envelopes
        .iter()
        .any(|e| e.body.len() > max as usize)
    {
        return Err(NodeError::new(
            ErrorKind::EnvelopeTooLarge { max },
            format!("a message may be at most {max} bytes once encrypted"),
        ));
    }
    charge_lookup(shared, &me, to)?;
    let Some((account_id, devices)) = recipient(shared, to).await? else {
        return Err(unknown_recipient(to));
    };
    check_space(shared)?;
    let mut given: Vec<u32> = outgoing.envelopes.iter().map(|e| e.device_id).collect();
    given.sort_unstable();
    if given != devices {
        return Err(NodeError::new(
            ErrorKind::StaleDevices { devices },
            format!("{to}'s devices have changed; fetch their keys and send again"),
        ));
    }
    let recipients: Vec<DeviceRef> = outgoing
        .envelopes
        .iter()
        .map(|e| DeviceRef {
            account_id,
            device_id: e.device_id,
        })
        .collect();
    let envelopes: Vec<(DeviceRef, Vec<u8>)> = recipients
        .iter()
        .copied()
        .zip(outgoing.envelopes.into_iter().map(|e| e.body))
        .collect();
    let (id, now) = (outgoing.id, now_ms());
    let sender = me.device;
    let sender_number = me.number;
    let policy = AppendPolicy {
        max_queued: limits.max_queued_per_device.into(),
        handoff: (!limits.handoff_window.is_zero()).then(|| HandOff {
            online: recipients
                .iter()
                .copied()
                .filter(|d| shared.mailboxes.is_open(*d))
                .collect(),
            max_bytes: usize::try_from(limits.handoff_max_bytes).unwrap_or(usize::MAX),
        }),
    };
    // To online devices that keep up, the send is staged right here; anything that
    // needs a write goes through the store thread.
    let (outcome, waiter) = match shared
        .store
        .append_in_memory(sender, &sender_number, id, envelopes, now, &policy)
        .map_err(internal)?
    {
        InMemory::Done(outcome, waiter) => (outcome, waiter),
        InMemory::NeedsStore(envelopes) => {
            blocking(shared, move |store| {
                store.append_with(sender, &sender_number, id, envelopes, now, policy)
            })
            .await?
        }
    };
    let mut waiting = Waiting {
        shared: shared.clone(),
        waiter,
        sent: None,
    };
    let (accepted_at_ms, duplicate) = match outcome {
        AppendOutcome::Queued { accepted_at_ms } => {
            // Online recipients get it now; the sender hears back once it is durable
            // or acknowledged by every recipient device.
            for device in &recipients {
                shared.mailboxes.wake(*device);
            }
            (accepted_at_ms, false)
        }
        AppendOutcome::Duplicate { accepted_at_ms } => (accepted_at_ms, true),
        AppendOutcome::QueueFull { device_id } => {
            return Err(NodeError::new(
                ErrorKind::QueueFull { device_id },
                format!(
                    "{to}'s queue is full; it must receive its messages before more can be sent"
                ),
            ));
        }
    };
    // Also for a duplicate: the first copy may not be durable yet. Items handed over
    // in memory settle first: acknowledged by their device (then no disk is needed)
    // or written.
    let written = match &waiting.waiter {
        Some(waiter) => {
            waiter.settled().await;
            waiter.written()
        }
        None => true,
    };
    if written {
        shared.commit.durable().await.map_err(commit_failed)?;
    }
    if !duplicate {
        shared.metrics.messages_accepted.inc();
    }
    let delivered = waiting
        .waiter
        .as_ref()
        .map(TicketWaiter::delivered)
        .unwrap_or_default();
    // A written send left a sent-id record (a send acknowledged from memory left
    // none), which can go once the client has this answer.
    waiting.sent = written.then_some((sender, id, accepted_at_ms));
    if !delivered.is_empty() || waiting.sent.is_some() {
        *answer = Some(waiting);
    }
    Ok(Response::Accepted(Accepted {
        id,
        accepted_at_ms,
        duplicate,
        delivered,
    }))
}

/// What a send leaves waiting on its answer: its place in a staged send's ticket
/// (the receipts the answer carries) and its sent-id record. Kept until the answer
/// reached the sender ([`Waiting::answered`]). Dropped before that (the request was
/// cancelled or failed, or the reply was lost), it leaves the ticket: the receipts
/// are queued for the sender instead, whose delivery stream is woken; and the
/// record stays, so that the sender's resend queues nothing.
pub struct Waiting {
    shared: Arc<Shared>,
    waiter: Option<TicketWaiter>,
    /// The sender, id and accept time of a send whose sent-id record was written.
    sent: Option<(DeviceRef, [u8; 16], u64)>,
}

impl Waiting {
    /// The reply reached the sender: its receipts are delivered, and its sent-id
    /// record is removed (on the store thread; nobody waits for it).
    pub fn answered(mut self) {
        if let Some(waiter) = self.waiter.take() {
            waiter.answered();
        }
        if let Some((sender, id, at)) = self.sent.take() {
            self.shared
                .worker
                .detach("removing an answered sent-id", move |store| {
                    store.forget_sent(sender, id, at)
                });
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(sender) = self.waiter.take().and_then(TicketWaiter::leave) {
            self.shared.mailboxes.wake(sender);
        }
    }
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Turning a number into an account counts against the discovery budget, so sending
/// and key fetches cannot be used to enumerate around the OPRF.
fn charge_lookup(shared: &Shared, me: &DeviceIdentity, number: &str) -> Result<(), NodeError> {
    shared
        .discovery
        .charge_lookup(me.device.account_id, number, now_secs())
}

fn too_many(what: &str, n: usize) -> NodeError {
    NodeError::new(
        ErrorKind::Malformed,
        format!("{n} {what} in one request; at most {MAX_DISCOVERY_BATCH} are allowed"),
    )
}

async fn evaluate(
    shared: &Arc<Shared>,
    session: &Session,
    blinded: Vec<[u8; 32]>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    if blinded.len() > MAX_DISCOVERY_BATCH {
        return Err(too_many("blinded elements", blinded.len()));
    }
    let budget_left =
        shared
            .discovery
            .charge(me.device.account_id, blinded.len() as u32, now_secs())?;
    let key = shared.store.discovery_key();
    // About 50 µs of scalar multiplication per element: off the async workers.
    let evaluated = tokio::task::spawn_blocking(move || {
        blinded
            .iter()
            .map(|b| key.evaluate(b))
            .collect::<Result<Vec<_>, _>>()
            .map(|e| (key.version(), e))
    })
    .await
    .map_err(|e| NodeError::new(ErrorKind::Internal, format!("evaluation task failed: {e}")))?;
    match evaluated {
        Ok((key_version, evaluated)) => {
            shared
                .metrics
                .discovery_evaluations
                .inc_by(evaluated.len() as u64);
            Ok(Response::Evaluated {
                key_version,
                evaluated,
                budget_left,
            })
        }
        Err(_) => Err(NodeError::new(
            ErrorKind::Malformed,
            "a blinded element is not a valid ristretto255 point",
        )),
    }
}

async fn fetch_filter(
    shared: &Arc<Shared>,
    session: &Session,
    have: Option<u64>,
    offset: u32,
) -> Result<Response, NodeError> {
    authenticated(shared, session).await?;
    let filter = shared
        .discovery
        .filter(&shared.store)
        .await
        .map_err(internal)?;
    if have == Some(filter.version) {
        return Ok(Response::FilterUnchanged {
            version: filter.version,
            key_version: filter.key_version,
        });
    }
    let start = offset as usize;
    if start > filter.bytes.len() {
        return Err(NodeError::new(
            ErrorKind::Malformed,
            format!(
                "offset {offset} is past the end of the filter ({} bytes)",
                filter.bytes.len()
            ),
        ));
    }
    let end = (start + FILTER_CHUNK_BYTES).min(filter.bytes.len());
    Ok(Response::FilterChunk {
        version: filter.version,
        key_version: filter.key_version,
        total_len: filter.bytes.len() as u32,
        offset,
        chunk: filter.bytes[start..end].to_vec(),
    })
}

async fn resolve(
    shared: &Arc<Shared>,
    session: &Session,
    prfs: Vec<[u8; 32]>,
) -> Result<Response, NodeError> {
    authenticated(shared, session).await?;
    if prfs.len() > MAX_DISCOVERY_BATCH {
        return Err(too_many("PRF values", prfs.len()));
    }
    let registered = read(shared, move |store| {
        prfs.iter()
            .map(|p| store.discovery_lookup(p).map(|a| a.is_some()))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(Response::Resolved { registered })
}
