//! Registration: codes, their verification, registration locks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{parse_number, secs};
use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::phone::Number;
use crate::proto::{Channel, CodeSent, ErrorKind, NodeError, Registered, Response};
use crate::store::records::LockRecord;
use crate::store::{Judgement, NewDevice, VerifyOutcome};
use crate::verify::{self, Delivery, Refusal, gateway, provider};

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
    let judged = engine::record_code_send(
        shared,
        keys.to_vec(),
        now,
        verify::limits::KEEP_MS,
        move |times| verify::limits::judge(&limits, cooldown, times, now),
    )
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

pub(super) async fn request_code(
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
        engine::replace_code(shared, number.to_string(), move |current| {
            shared2.codes.issue(&number2, &code2, current, now)
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
            let counted = counted.map(|keys| keys.to_vec());
            engine::withdraw_code(shared, number.to_string(), counted, now).await?;
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

/// Judges a registration-lock PIN against its Argon2id hash, on the blocking pool, at
/// most `PIN_CHECKS` at a time: each costs 19 MiB and tens of milliseconds, and only
/// someone who holds the right code gets here.
async fn pin_is_right(shared: &Arc<Shared>, pin: &str, hash: &str) -> Result<bool, NodeError> {
    let _permit = shared
        .pin_checks
        .acquire()
        .await
        .map_err(|_| NodeError::new(ErrorKind::Internal, "the node is stopping"))?;
    shared.metrics.pin_checked();
    let (pin, hash) = (pin.to_string(), hash.to_string());
    tokio::task::spawn_blocking(move || verify::pin::verify(&pin, &hash))
        .await
        .map_err(|e| NodeError::new(ErrorKind::Internal, format!("hashing task failed: {e}")))
}

/// What judging the code alone found, for a number with a registration lock.
#[derive(Debug, Clone)]
enum CodeCheck {
    /// The code is right; it stays pending for the registration that follows a
    /// right PIN.
    Right,
    Refused(Refusal),
}

pub(super) async fn verify_code(
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
    let lock = engine::registration_lock(shared, number.to_string()).await?;
    // A lock lapses once the account's devices have stayed away for the lapse time.
    let lapse = shared.config.verification.lock_lapse.as_millis() as u64;
    let in_force = lock
        .as_ref()
        .map(|(account, record, seen)| (*account, record.clone(), seen.saturating_add(lapse)))
        .filter(|(_, _, lapses_at)| now < *lapses_at);
    let Some((account, record, lapses_at)) = in_force else {
        // No lock, or one that lapsed (it goes with the registration).
        let lapsed = lock.map(|(account, _, _)| (account, None));
        return register(shared, session, &number, code, now, lapsed).await;
    };
    let lapses_in = Duration::from_millis(lapses_at.saturating_sub(now));
    let locked = |tries_left, wrong_pin| {
        refusal(Refusal::Locked {
            tries_left,
            lapses_in,
            wrong_pin,
        })
    };

    // The code first. A wrong one counts against the code, as for any number, and
    // never reaches the lock: so junk codes cost no Argon2 and tell nothing of the
    // lock, and the PIN is judged only for someone who holds the right code. A right
    // one stays pending for the registration below.
    let (number2, code2, shared2) = (number.clone(), code.to_string(), shared.clone());
    let checked = engine::judge_code(shared, number.to_string(), move |r| {
        match shared2.codes.judge(&number2, &code2, r, now) {
            Judgement::Accept => (Some(r.clone()), CodeCheck::Right),
            Judgement::Reject { update, error } => (update, CodeCheck::Refused(error)),
        }
    })
    .await?;
    match checked {
        None => return Err(no_code()),
        Some(CodeCheck::Refused(r)) => return Err(refusal(r)),
        Some(CodeCheck::Right) => {}
    }
    let max = shared.config.verification.max_pin_tries;
    let Some(pin) = pin else {
        return Err(locked(max.saturating_sub(record.wrong_tries), false));
    };
    // A try is taken, durably, before the PIN is judged: concurrent guesses each take
    // one, so no more than `max_pin_tries` PINs are ever judged.
    let Some((left, taken)) = engine::take_pin_try(shared, account, max).await? else {
        return Err(locked(0, false));
    };
    engine::durable(shared).await?;
    if !pin_is_right(shared, pin, &taken.pin_hash).await? {
        tracing::warn!(
            account,
            wrong_tries = taken.wrong_tries,
            "wrong registration-lock PIN"
        );
        return Err(locked(left, true));
    }
    // The PIN is right: register (the code is judged again, and is still right), and
    // the lock counts afresh.
    let reset = LockRecord {
        wrong_tries: 0,
        ..taken
    };
    register(
        shared,
        session,
        &number,
        code,
        now,
        Some((account, Some(reset))),
    )
    .await
}

fn no_code() -> NodeError {
    NodeError::new(
        ErrorKind::NoCodePending,
        "no code is pending for this number; request one first",
    )
}

/// Consumes the right code and registers this device as `number`; then applies
/// `lock_update` (a lapsed lock removed, or a lock's tries reset).
async fn register(
    shared: &Arc<Shared>,
    session: &Session,
    number: &Number,
    code: &str,
    now: u64,
    lock_update: Option<(u64, Option<LockRecord>)>,
) -> Result<Response, NodeError> {
    let device = NewDevice {
        key_id: session.key_id,
        public_key: session.public_key.clone(),
    };
    let (shared2, number2, code2) = (shared.clone(), number.clone(), code.to_string());
    let outcome =
        engine::verify_and_register(shared, number.to_string(), device, now, move |record| {
            shared2.codes.judge(&number2, &code2, record, now)
        })
        .await?;
    match outcome {
        VerifyOutcome::NoCode => Err(no_code()),
        VerifyOutcome::Rejected(r) => Err(refusal(r)),
        VerifyOutcome::Registered {
            device,
            took_over,
            signed_out,
            revoked_keys,
            indexed: (key_version, prf),
        } => {
            // Caches of who is registered are stale from now on (and only now: a
            // refused attempt changes no account).
            shared.directory_epoch.fetch_add(1, Ordering::AcqRel);
            if let Some((locked_account, update)) = lock_update {
                engine::set_registration_lock(shared, locked_account, update).await?;
            }
            engine::mark_device_seen(shared, device, now).await?;
            // What the node held for signed-out devices goes: their queues can never
            // be read again, and their keys must not be handed out.
            for old in signed_out.iter().copied() {
                let dropped = engine::drop_device(shared, old).await?;
                tracing::info!(
                    account = old.account_id,
                    device = old.device_id,
                    dropped,
                    "device signed out"
                );
            }
            // The device must not be told it is registered before that is durable.
            engine::durable(shared).await?;
            // The cluster's index is written again for a number taken over (the
            // same entry), so a crash before it the first time is mended.
            if !took_over || shared.cluster.is_some() {
                engine::index_number(shared, key_version, prf, device.account_id).await?;
            }
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

pub(super) async fn set_lock(
    shared: &Arc<Shared>,
    session: &Session,
    pin: String,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    verify::pin::check_new(&pin).map_err(|why| NodeError::new(ErrorKind::Malformed, why))?;
    let hash = {
        let _permit = shared
            .pin_checks
            .acquire()
            .await
            .map_err(|_| NodeError::new(ErrorKind::Internal, "the node is stopping"))?;
        tokio::task::spawn_blocking(move || verify::pin::hash(&pin))
            .await
            .map_err(|e| NodeError::new(ErrorKind::Internal, format!("hashing task failed: {e}")))?
            .map_err(|why| NodeError::new(ErrorKind::Internal, why))?
    };
    let record = LockRecord {
        pin_hash: hash,
        set_at_ms: now_ms(),
        wrong_tries: 0,
    };
    let account = me.device.account_id;
    engine::set_registration_lock(shared, account, Some(record)).await?;
    engine::durable(shared).await?;
    tracing::info!(account, "registration lock set");
    Ok(Response::LockSet {
        lapse_days: (shared.config.verification.lock_lapse.as_secs() / 86_400) as u32,
    })
}

pub(super) async fn clear_lock(
    shared: &Arc<Shared>,
    session: &Session,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let account = me.device.account_id;
    engine::set_registration_lock(shared, account, None).await?;
    engine::durable(shared).await?;
    tracing::info!(account, "registration lock cleared");
    Ok(Response::LockCleared)
}
