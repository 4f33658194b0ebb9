//! Request handlers: one function per request kind, no quinn types.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Shared;
use super::conn::Session;
use crate::phone::Number;
use crate::proto::{
    Channel, CodeSent, ErrorKind, Identity, NodeError, Registered, Reply, Request, Response,
};
use crate::store::{NewDevice, Store, StoreError, VerifyOutcome};
use crate::verify::{self, Delivery, Refusal, provider};

/// Answers one request.
pub async fn handle(request: Request, shared: &Arc<Shared>, session: &Session) -> Reply {
    let result = match request {
        Request::RequestCode {
            number,
            channel,
            locale,
        } => request_code(shared, session, &number, channel, &locale).await,
        Request::VerifyCode { number, code } => verify_code(shared, session, &number, &code).await,
        Request::WhoAmI => whoami(shared, session).await,
    };
    match result {
        Ok(response) => Reply::Ok(response),
        Err(error) => Reply::Err(error),
    }
}

fn now_ms() -> u64 {
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

fn internal(e: StoreError) -> NodeError {
    tracing::error!(error = %e, "storage failure");
    NodeError::new(
        ErrorKind::Internal,
        "the node's storage failed; nothing was changed",
    )
}

/// Runs a store operation on a blocking thread, so sled never blocks an async worker.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, NodeError> {
    let store = shared.store.clone();
    match tokio::task::spawn_blocking(move || op(&store)).await {
        Ok(result) => result.map_err(internal),
        Err(e) => Err(internal(StoreError::Corrupt(format!(
            "storage task failed: {e}"
        )))),
    }
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

async fn request_code(
    shared: &Arc<Shared>,
    session: &Session,
    number: &str,
    channel: Channel,
    _locale: &str,
) -> Result<Response, NodeError> {
    let number = parse_number(number)?;
    tracing::info!(%number, channel = channel.name(), source = %session.remote.ip(), "code requested");
    let code = shared.codes.generate(&number);
    let now = now_ms();
    let record = {
        let (shared2, number2, code2) = (shared.clone(), number.clone(), code.clone());
        blocking(shared, move |store| {
            store.replace_code(number2.as_str(), |current| {
                shared2.codes.issue(&number2, &code2, current, now)
            })
        })
        .await?
        .map_err(refusal)?
    };
    if shared.codes.is_test_number(&number) {
        tracing::info!(%number, "code requested for a test number; its fixed code is not delivered");
    } else {
        let ttl_minutes = shared.codes.ttl().as_secs().div_ceil(60);
        let delivery = Delivery {
            message: provider::message(&code, ttl_minutes),
            number: number.clone(),
            channel,
            code,
        };
        if let Err(e) = shared.provider.deliver(&delivery).await {
            tracing::warn!(provider = shared.provider.name(), %number, error = %e, "code delivery failed");
            let number2 = number.clone();
            blocking(shared, move |store| store.remove_code(number2.as_str())).await?;
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

async fn verify_code(
    shared: &Arc<Shared>,
    session: &Session,
    number: &str,
    code: &str,
) -> Result<Response, NodeError> {
    let number = parse_number(number)?;
    if !verify::well_formed(code) {
        return Err(NodeError::new(ErrorKind::InvalidCode, "a code is 6 digits"));
    }
    let now = now_ms();
    let device = NewDevice {
        key_id: session.key_id,
        public_key: session.public_key.clone(),
    };
    let (shared2, number2, code2) = (shared.clone(), number.clone(), code.to_string());
    let outcome = blocking(shared, move |store| {
        store.verify_and_register(number2.as_str(), &device, now, |record| {
            shared2.codes.judge(&number2, &code2, record, now)
        })
    })
    .await?;
    match outcome {
        VerifyOutcome::NoCode => Err(NodeError::new(
            ErrorKind::NoCodePending,
            "no code is pending for this number; request one first",
        )),
        VerifyOutcome::Rejected(r) => Err(refusal(r)),
        VerifyOutcome::Registered {
            device,
            took_over,
            signed_out,
        } => {
            // The device must not be told it is registered before that is durable.
            shared.store.flush().await.map_err(internal)?;
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

async fn whoami(shared: &Arc<Shared>, session: &Session) -> Result<Response, NodeError> {
    let key_id = session.key_id;
    let found = blocking(shared, move |store| store.device_by_key(&key_id)).await?;
    match found {
        Some(identity) => Ok(Response::Identity(Identity {
            number: identity.number,
            account_id: identity.device.account_id,
            device_id: identity.device.device_id,
        })),
        None => Err(NodeError::new(
            ErrorKind::Unauthenticated,
            "this device is not registered on this node (never registered, or its number was registered on another device since)",
        )),
    }
}
