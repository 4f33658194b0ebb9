//! Framing: a 4-byte big-endian length, then that many bytes of bincode.
//!
//! The length is checked against the limit before a single payload byte is read or
//! allocated, and bincode decodes with a hard allocation limit, so a hostile frame
//! announcing a huge vector cannot make the decoder reserve memory it never fills.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::{Decode, Encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// No frame may ever exceed this, whatever the configuration says. It also bounds
/// every allocation the decoder makes.
pub const HARD_MAX_FRAME_BYTES: usize = 1 << 20;

/// Bytes of the length prefix.
pub const PREFIX_BYTES: usize = 4;

/// The bincode configuration of every frame payload: little-endian varints (bincode's
/// standard), with decoding bounded by [`HARD_MAX_FRAME_BYTES`].
pub fn bincode_config() -> Configuration<LittleEndian, Varint, Limit<HARD_MAX_FRAME_BYTES>> {
    bincode::config::standard().with_limit::<HARD_MAX_FRAME_BYTES>()
}

/// What can go wrong with a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `value` as one frame (prefix included).
pub fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; PREFIX_BYTES];
    bincode::encode_into_std_write(value, &mut out, bincode_config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - PREFIX_BYTES;
    if len > HARD_MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: HARD_MAX_FRAME_BYTES,
        });
    }
    out[..PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one payload (no prefix). The whole payload must be consumed: trailing
/// bytes mean the peer and we disagree about the message, which is an error.
pub fn decode_payload<T: Decode<()>>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::decode_from_slice(payload, bincode_config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(value)
}

/// Checks a length prefix against `max`.
fn check_len(prefix: [u8; PREFIX_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    let max = max.min(HARD_MAX_FRAME_BYTES);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes the first frame of `buf`. Returns `Ok(None)` while the frame is not complete
/// (a partly received frame is not an error), else the value and the bytes used.
pub fn decode<T: Decode<()>>(buf: &[u8], max: usize) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = check_len(*prefix, max)?;
    let Some(payload) = buf[PREFIX_BYTES..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, PREFIX_BYTES + len)))
}

/// Reads one frame from `reader`. Returns `Ok(None)` when the stream ends cleanly
/// before the first byte of a frame.
pub async fn read<T, R>(reader: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    T: Decode<()>,
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut got = 0;
    while got < PREFIX_BYTES {
        let n = reader.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = check_len(prefix, max)?;
    // The buffer grows as bytes arrive, never from the prefix alone: a peer that
    // announces 8 MiB and sends 128 bytes holds 128 bytes (and a chunk) of memory.
    let mut payload = Vec::with_capacity(len.min(READ_CHUNK));
    while payload.len() < len {
        let want = (len - payload.len()).min(READ_CHUNK);
        let start = payload.len();
        payload.resize(start + want, 0);
        let n = reader.read(&mut payload[start..]).await?;
        payload.truncate(start + n);
        if n == 0 {
            return Err(FrameError::Truncated);
        }
    }
    decode_payload(&payload).map(Some)
}

/// Bytes read into a frame's buffer at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Writes one frame to `writer`.
pub async fn write<T, W>(writer: &mut W, value: &T) -> Result<(), FrameError>
where
    T: Encode,
    W: AsyncWrite + Unpin,
{
    let bytes = encode(value)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::messages::{Channel, GroupChange, Request};

    /// A peer that sends `data` and then nothing (the stream stays open), recording
    /// the most buffer space a read ever offered it.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        largest_offer: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.largest_offer = self.largest_offer.max(buf.remaining());
            if self.pos == self.data.len() {
                return std::task::Poll::Pending;
            }
            let n = buf.remaining().min(self.data.len() - self.pos);
            let (from, to) = (self.pos, self.pos + n);
            buf.put_slice(&self.data[from..to]);
            self.pos = to;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_length_prefix_alone_reserves_no_memory() {
        // The largest frame announced, then 128 bytes of it, then silence.
        let mut data = (HARD_MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
        data.extend([0x55; 128]);
        let mut peer = Trickle {
            data,
            pos: 0,
            largest_offer: 0,
        };
        {
            let read = std::pin::pin!(read::<Request, _>(&mut peer, HARD_MAX_FRAME_BYTES));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(read.poll(&mut cx).is_pending());
        }
        assert!(
            peer.largest_offer <= READ_CHUNK,
            "a buffer of {} bytes was made for 128 bytes received",
            peer.largest_offer
        );
    }

    fn sample_requests() -> impl Strategy<Value = Request> {
        prop_oneof![
            (".{0,40}", any::<bool>(), "[a-z]{0,5}").prop_map(|(number, voice, locale)| {
                Request::RequestCode {
                    number,
                    channel: if voice { Channel::Voice } else { Channel::Sms },
                    locale,
                }
            }),
            (".{0,40}", ".{0,10}").prop_map(|(number, code)| Request::VerifyCode { number, code }),
            Just(Request::WhoAmI),
            (
                any::<u32>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..4)
            )
                .prop_map(|(key_version, prfs)| Request::ResolveUnder { key_version, prfs }),
            any::<u64>().prop_map(|version| Request::FetchFilterDelta { version }),
            Just(Request::ListDevices),
            any::<u32>().prop_map(|device_id| Request::UnlinkDevice { device_id }),
            proptest::collection::vec(any::<u8>(), 0..70)
                .prop_map(|pake| Request::LinkOpen { pake }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..70))
                .prop_map(|(nameplate, pake)| Request::LinkJoin { nameplate, pake }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..100))
                .prop_map(|(nameplate, sealed)| Request::LinkRequest { nameplate, sealed }),
            any::<u32>().prop_map(|nameplate| Request::LinkPoll { nameplate }),
            (
                any::<u32>(),
                ".{0,70}",
                proptest::collection::vec(any::<u8>(), 0..100)
            )
                .prop_map(|(nameplate, name, sealed)| Request::LinkGrant {
                    nameplate,
                    name,
                    sealed
                }),
            any::<u32>().prop_map(|nameplate| Request::LinkAbort { nameplate }),
            (
                proptest::collection::vec(".{0,20}", 0..4),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(members, meta)| Request::CreateGroup { members, meta }),
            (any::<u64>(), ".{0,20}").prop_map(|(group_id, number)| Request::ChangeGroup {
                group_id,
                change: GroupChange::Remove { number }
            }),
            any::<u64>().prop_map(|group_id| Request::ChangeGroup {
                group_id,
                change: GroupChange::Leave
            }),
            any::<u64>().prop_map(|group_id| Request::FetchGroup { group_id }),
            Just(Request::ListGroups),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(req in sample_requests()) {
            let bytes = encode(&req).unwrap();
            let (back, used) = decode::<Request>(&bytes, HARD_MAX_FRAME_BYTES).unwrap().unwrap();
            prop_assert_eq!(back, req);
            prop_assert_eq!(used, bytes.len());
        }

        #[test]
        fn every_prefix_is_incomplete_not_an_error(req in sample_requests()) {
            let bytes = encode(&req).unwrap();
            for cut in 0..bytes.len() {
                prop_assert!(matches!(decode::<Request>(&bytes[..cut], HARD_MAX_FRAME_BYTES), Ok(None)));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes, HARD_MAX_FRAME_BYTES);
            let _ = decode_payload::<Request>(&bytes);
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_reading() {
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(b"abc");
        assert!(matches!(
            decode::<Request>(&frame, 1024),
            Err(FrameError::TooLarge { len, max: 1024 }) if len == u32::MAX as usize
        ));
    }

    #[test]
    fn huge_announced_vector_is_refused_without_allocating() {
        // A VerifyCode whose number claims 2^60 bytes: without the decode limit bincode
        // would try to reserve that much and abort the process.
        let mut payload = vec![1u8]; // variant 1: VerifyCode
        payload.push(253); // varint marker for a u64
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode_payload::<Request>(&payload),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_variant_and_trailing_bytes_are_malformed() {
        assert!(matches!(
            decode_payload::<Request>(&[200]),
            Err(FrameError::Malformed(_))
        ));
        let mut ok = encode(&Request::WhoAmI).unwrap()[PREFIX_BYTES..].to_vec();
        ok.push(0);
        assert!(matches!(
            decode_payload::<Request>(&ok),
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn async_reader_matches_slice_decoder() {
        let mut stream = Vec::new();
        stream.extend(encode(&Request::WhoAmI).unwrap());
        stream.extend(
            encode(&Request::VerifyCode {
                number: "+1".into(),
                code: "1".into(),
            })
            .unwrap(),
        );
        let mut reader = &stream[..];
        assert_eq!(
            read::<Request, _>(&mut reader, 1024).await.unwrap(),
            Some(Request::WhoAmI)
        );
        assert!(matches!(
            read::<Request, _>(&mut reader, 1024).await.unwrap(),
            Some(Request::VerifyCode { .. })
        ));
        assert_eq!(read::<Request, _>(&mut reader, 1024).await.unwrap(), None);
        let mut cut = &stream[..3];
        assert!(matches!(
            read::<Request, _>(&mut cut, 1024).await,
            Err(FrameError::Truncated)
        ));
    }
}
