//! The key directory: publishing keys and fetching bundles.

use std::sync::Arc;

use super::send::{recipient, unknown_recipient};
use super::{charge_lookup, check_space};
use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::clock::now_secs;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::proto::{
    Bundle, Bundles, ErrorKind, IdentityKeys, KeyUpload, NodeError, Response, SignedKey,
};
use crate::store::keydir::Upload;
use crate::store::records::StoredKey;
use crate::store::{DeviceRef, KeysRefusal};

fn bad_keys(message: impl Into<String>) -> NodeError {
    NodeError::new(ErrorKind::BadKeys, message)
}

pub(super) async fn publish_keys(
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
    // A linked device's keys must carry the account identity's signature (the
    // primary's identity key vouching for them): contacts accept nothing less. The
    // primary's identity is the account's; it does not change under its companions.
    let account = me.device.account_id;
    let device = me.device;
    let (primary, primary_keys, companions) = match engine::account(shared, account).await? {
        None => (device.device_id, None, 0),
        Some(record) => {
            let primary = record
                .devices
                .first()
                .map_or(device.device_id, |d| d.device_id);
            let primary_device = DeviceRef {
                account_id: account,
                device_id: primary,
            };
            let keys = engine::identity_keys(shared, primary_device).await?;
            (primary, keys, record.devices.len().saturating_sub(1))
        }
    };
    let account_signature = if primary == me.device.device_id {
        if upload.account_signature.is_some() {
            return Err(bad_keys(
                "the primary's keys are the account identity: they carry no account signature",
            ));
        }
        if companions > 0
            && primary_keys.is_some_and(|(c, e)| {
                c != upload.identity.curve25519 || e != upload.identity.ed25519
            })
        {
            return Err(bad_keys(
                "the primary's identity key vouches for the linked devices and cannot change                  while any is linked: unlink them first",
            ));
        }
        None
    } else {
        let Some((curve25519, ed25519)) = primary_keys else {
            return Err(bad_keys(
                "the account's primary has not published its keys yet",
            ));
        };
        let account_identity = IdentityKeys {
            curve25519,
            ed25519,
        };
        match upload.account_signature {
            Some(sig) if account_identity.vouches_for(&me.number, &upload.identity, &sig) => {
                Some(sig)
            }
            Some(_) => {
                return Err(bad_keys(
                    "the account signature does not verify against the primary's identity key",
                ));
            }
            None => {
                return Err(bad_keys(
                    "a linked device's keys need the account identity's signature",
                ));
            }
        }
    };
    let stored = |k: &SignedKey| StoredKey {
        key: k.key,
        signature: k.signature,
    };
    let keys = Upload {
        identity: (upload.identity.curve25519, upload.identity.ed25519),
        fallback: upload.fallback.as_ref().map(stored),
        one_time_keys: upload.one_time_keys.iter().map(stored).collect(),
    };
    let result =
        engine::publish_keys(shared, device, keys, account_signature, max, now_ms()).await?;
    match result {
        Ok(count) => {
            engine::durable(shared).await?;
            Ok(Response::KeysStored {
                one_time_keys: count,
            })
        }
        Err(KeysRefusal::TooMany { stored, max }) => Err(bad_keys(format!(
            "the node already holds {stored} one-time keys for this device and keeps at most {max}"
        ))),
    }
}

pub(super) async fn fetch_bundles(
    shared: &Arc<Shared>,
    session: &Session,
    number: &str,
    claim: bool,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    charge_lookup(shared, &me, number).await?;
    let Some((account_id, devices)) = recipient(shared, number).await? else {
        return Err(unknown_recipient(number));
    };
    // Past the claim limits, the bundles carry the fallback key only.
    let claim = claim && {
        let allowed =
            engine::allow_claim(shared, me.device.account_id, account_id, now_secs()).await?;
        if !allowed {
            shared.metrics.key_claim_limited();
        }
        allowed
    };
    // The primary has the account's lowest device id: it registered the number, and
    // every device linked since got a higher one.
    let primary = devices.first().copied();
    let claimed = engine::fetch_bundles(shared, account_id, devices, claim).await?;
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
                primary: Some(c.device_id) == primary,
                account_signature: c.account_signature,
            })
            .collect(),
    }))
}
