//! Private contact discovery: the oblivious PRF and the membership filter.
//!
//! Following Kales et al., "Mobile Private Contact Discovery at Scale" (USENIX Security
//! 2019): the node holds a key `k` and indexes every account under `PRF(k, number)`,
//! the OPRF of RFC 9497 in its base mode with the ristretto255-SHA512 suite (the
//! `voprf` crate). A client blinds each number it wants to check; the node evaluates
//! the blinded points without learning the numbers; the client unblinds and gets the
//! PRF values. The node also publishes a binary fuse filter (`xorf`) of the first 8
//! bytes of every indexed PRF value, so a client can tell, locally, which of its
//! contacts may be registered, and asks the node only about those.
//!
//! Used by the store (the index and its key), the node (evaluation, the filter) and
//! the client (blinding, the filter check).

use bincode::{Decode, Encode};
use voprf::{BlindedElement, EvaluationElement, OprfClient, OprfServer, Ristretto255};
use xorf::{BinaryFuse8, Filter};

/// A PRF value as indexed: the first 32 bytes of the 64-byte OPRF output.
pub type Prf = [u8; 32];

/// A blinded or evaluated group element, as it travels (a compressed ristretto point).
pub type Element = [u8; 32];

/// Why a discovery step failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    #[error("not a valid group element")]
    BadElement,
    #[error("the stored discovery key is damaged")]
    BadKey,
    #[error("the system random generator failed")]
    Random,
    #[error("the number is empty or too long to evaluate")]
    BadInput,
    #[error("the membership filter is malformed: {0}")]
    BadFilter(&'static str),
}

/// The node's OPRF key and its version (bumped by each rotation).
pub struct DiscoveryKey {
    server: OprfServer<Ristretto255>,
    version: u32,
}

impl DiscoveryKey {
    /// A fresh random key.
    pub fn generate(version: u32) -> Result<DiscoveryKey, DiscoveryError> {
        let server = OprfServer::new(&mut rand_core::OsRng).map_err(|_| DiscoveryError::Random)?;
        Ok(DiscoveryKey { server, version })
    }

    /// The key derived from `seed` (RFC 9497's DeriveKeyPair): the same seed gives
    /// the same key, so nodes sharing a seed share the key without storing it.
    pub fn from_seed(seed: &[u8; 32], version: u32) -> Result<DiscoveryKey, DiscoveryError> {
        let info = format!("switchboard discovery key {version}");
        let server =
            OprfServer::new_from_seed(seed, info.as_bytes()).map_err(|_| DiscoveryError::BadKey)?;
        Ok(DiscoveryKey { server, version })
    }

    /// The key as stored (a 32-byte scalar).
    pub fn from_bytes(bytes: &[u8], version: u32) -> Result<DiscoveryKey, DiscoveryError> {
        let server = OprfServer::deserialize(bytes).map_err(|_| DiscoveryError::BadKey)?;
        Ok(DiscoveryKey { server, version })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.server.serialize().to_vec()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// `PRF(k, number)`, computed directly (for the index: the node knows the numbers
    /// it registers).
    pub fn prf(&self, number: &str) -> Result<Prf, DiscoveryError> {
        let out = self
            .server
            .evaluate(number.as_bytes())
            .map_err(|_| DiscoveryError::BadInput)?;
        Ok(truncate(&out))
    }

    /// Evaluates one blinded element from a client. A point that does not decode (or
    /// is the identity) is refused.
    pub fn evaluate(&self, blinded: &Element) -> Result<Element, DiscoveryError> {
        let element = BlindedElement::<Ristretto255>::deserialize(blinded)
            .map_err(|_| DiscoveryError::BadElement)?;
        let evaluated = self.server.blind_evaluate(&element);
        to_element(&evaluated.serialize())
    }
}

fn truncate(out: &[u8]) -> Prf {
    let mut prf = [0u8; 32];
    prf.copy_from_slice(&out[..32]);
    prf
}

fn to_element(bytes: &[u8]) -> Result<Element, DiscoveryError> {
    bytes.try_into().map_err(|_| DiscoveryError::BadElement)
}

/// The client's half of one evaluation: what it sends, and what it keeps to unblind.
pub struct Blinded {
    state: OprfClient<Ristretto255>,
    /// The blinded element to send to the node.
    pub element: Element,
}

/// Blinds `number` (E.164) with a fresh random factor.
pub fn blind(number: &str) -> Result<Blinded, DiscoveryError> {
    let result = OprfClient::<Ristretto255>::blind(number.as_bytes(), &mut rand_core::OsRng)
        .map_err(|_| DiscoveryError::BadInput)?;
    Ok(Blinded {
        element: to_element(&result.message.serialize())?,
        state: result.state,
    })
}

impl Blinded {
    /// Unblinds the node's evaluation of this element into `PRF(k, number)`.
    pub fn finalize(&self, number: &str, evaluated: &Element) -> Result<Prf, DiscoveryError> {
        let element = EvaluationElement::<Ristretto255>::deserialize(evaluated)
            .map_err(|_| DiscoveryError::BadElement)?;
        let out = self
            .state
            .finalize(number.as_bytes(), &element)
            .map_err(|_| DiscoveryError::BadInput)?;
        Ok(truncate(&out))
    }
}

/// The filter's key for a PRF value.
pub fn filter_key(prf: &Prf) -> u64 {
    u64::from_be_bytes([
        prf[0], prf[1], prf[2], prf[3], prf[4], prf[5], prf[6], prf[7],
    ])
}

/// A binary fuse filter (8-bit fingerprints, about 1.13 bytes per entry, false
/// positives below 0.4%) over the filter keys of every indexed PRF value.
#[derive(Debug, Clone)]
pub struct MembershipFilter {
    /// `None` for an empty index.
    inner: Option<BinaryFuse8>,
}

/// The filter as it travels: the fuse descriptor and the fingerprints.
#[derive(Encode, Decode)]
struct WireFilter {
    seed: u64,
    segment_length: u32,
    segment_length_mask: u32,
    segment_count_length: u32,
    fingerprints: Vec<u8>,
}

impl MembershipFilter {
    /// Builds the filter from filter keys (duplicates are removed first: a binary fuse
    /// filter cannot be built over repeated keys).
    pub fn build(mut keys: Vec<u64>) -> Result<MembershipFilter, DiscoveryError> {
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(MembershipFilter { inner: None });
        }
        let inner = BinaryFuse8::try_from(&keys).map_err(DiscoveryError::BadFilter)?;
        Ok(MembershipFilter { inner: Some(inner) })
    }

    /// Whether `prf` may be indexed (false positives possible, false negatives not).
    pub fn contains(&self, prf: &Prf) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|f| f.contains(&filter_key(prf)))
    }

    /// Bytes of fingerprints (the bulk of the encoded size).
    pub fn fingerprint_bytes(&self) -> usize {
        self.inner.as_ref().map_or(0, |f| f.fingerprints.len())
    }

    /// The filter as bytes (bincode, as everywhere on the wire).
    pub fn encode(&self) -> Vec<u8> {
        let wire = match &self.inner {
            None => WireFilter {
                seed: 0,
                segment_length: 0,
                segment_length_mask: 0,
                segment_count_length: 0,
                fingerprints: Vec::new(),
            },
            Some(f) => WireFilter {
                seed: f.descriptor.seed,
                segment_length: f.descriptor.segment_length,
                segment_length_mask: f.descriptor.segment_length_mask,
                segment_count_length: f.descriptor.segment_count_length,
                fingerprints: f.fingerprints.to_vec(),
            },
        };
        bincode::encode_to_vec(&wire, crate::proto::frame::bincode_config()).unwrap_or_default()
    }

    /// Decodes a filter from the node, checking that its shape is consistent, so that
    /// a lookup can never index outside the fingerprints.
    pub fn decode(bytes: &[u8]) -> Result<MembershipFilter, DiscoveryError> {
        let config = bincode::config::standard()
            .with_little_endian()
            .with_variable_int_encoding()
            .with_limit::<{ 64 << 20 }>();
        let (wire, used): (WireFilter, usize) = bincode::decode_from_slice(bytes, config)
            .map_err(|_| DiscoveryError::BadFilter("undecodable"))?;
        if used != bytes.len() {
            return Err(DiscoveryError::BadFilter("trailing bytes"));
        }
        if wire.fingerprints.is_empty() {
            return Ok(MembershipFilter { inner: None });
        }
        let len = wire.segment_length;
        // The lookup reads fingerprints[h] for h < segment_count_length + 2·len when
        // there is at least one segment and segments are whole (xorf's hash_of_hash).
        let consistent = len.is_power_of_two()
            && wire.segment_length_mask == len - 1
            && wire.segment_count_length >= len
            && wire.segment_count_length % len == 0
            && u64::from(wire.segment_count_length) + 2 * u64::from(len)
                == wire.fingerprints.len() as u64;
        if !consistent {
            return Err(DiscoveryError::BadFilter("inconsistent segment sizes"));
        }
        Ok(MembershipFilter {
            inner: Some(BinaryFuse8 {
                descriptor: xorf::Descriptor {
                    seed: wire.seed,
                    segment_length: wire.segment_length,
                    segment_length_mask: wire.segment_length_mask,
                    segment_count_length: wire.segment_count_length,
                },
                fingerprints: wire.fingerprints.into_boxed_slice(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_blinded_evaluation_equals_the_direct_prf() {
        let key = DiscoveryKey::generate(1).unwrap();
        let number = "+14155550101";
        let blinded = blind(number).unwrap();
        let evaluated = key.evaluate(&blinded.element).unwrap();
        assert_eq!(
            blinded.finalize(number, &evaluated).unwrap(),
            key.prf(number).unwrap()
        );
        // The node saw only the blinded point: blinding the same number again gives a
        // different one.
        assert_ne!(blind(number).unwrap().element, blinded.element);
        // Another key gives another PRF; the key survives storage.
        let other = DiscoveryKey::generate(2).unwrap();
        assert_ne!(other.prf(number).unwrap(), key.prf(number).unwrap());
        let stored = DiscoveryKey::from_bytes(&key.to_bytes(), 1).unwrap();
        assert_eq!(stored.prf(number).unwrap(), key.prf(number).unwrap());
    }

    #[test]
    fn bad_points_are_refused() {
        let key = DiscoveryKey::generate(1).unwrap();
        assert_eq!(key.evaluate(&[0; 32]), Err(DiscoveryError::BadElement));
        assert_eq!(key.evaluate(&[0xff; 32]), Err(DiscoveryError::BadElement));
    }

    #[test]
    fn the_filter_finds_members_and_survives_encoding() {
        let key = DiscoveryKey::generate(1).unwrap();
        let members: Vec<Prf> = (0..2000)
            .map(|i| key.prf(&format!("+1415555{i:04}")).unwrap())
            .collect();
        let mut keys: Vec<u64> = members.iter().map(filter_key).collect();
        keys.extend(keys.clone()); // duplicates are fine
        let filter =
            MembershipFilter::decode(&MembershipFilter::build(keys).unwrap().encode()).unwrap();
        assert!(members.iter().all(|m| filter.contains(m)));
        let strangers = (0..2000)
            .filter(|i| filter.contains(&key.prf(&format!("+4420794{i:05}")).unwrap()))
            .count();
        assert!(strangers < 40, "{strangers} false positives in 2000");
        assert!(
            filter.fingerprint_bytes() <= 2000 * 5 / 2,
            "over 2.5 bytes per entry"
        );
        let empty =
            MembershipFilter::decode(&MembershipFilter::build(Vec::new()).unwrap().encode())
                .unwrap();
        assert!(!empty.contains(&members[0]));
    }

    proptest! {
        /// A filter from a hostile node either fails to decode or answers lookups
        /// without panicking.
        #[test]
        fn any_decoded_filter_answers_without_panicking(
            seed in any::<u64>(),
            len_log in 0u32..8,
            segments in 0u32..8,
            extra in 0usize..3,
            probes in proptest::collection::vec(any::<[u8; 32]>(), 1..20),
        ) {
            let len = 1u32 << len_log;
            let count = segments * len;
            let wire = WireFilter {
                seed,
                segment_length: len,
                segment_length_mask: len - 1,
                segment_count_length: count,
                fingerprints: vec![7; (count + 2 * len) as usize + extra],
            };
            let bytes = bincode::encode_to_vec(&wire, crate::proto::frame::bincode_config()).unwrap();
            if let Ok(filter) = MembershipFilter::decode(&bytes) {
                for p in &probes {
                    let _ = filter.contains(p);
                }
            }
        }
    }
}
