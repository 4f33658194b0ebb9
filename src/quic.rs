//! QUIC transport tuning shared by the node, the client and the benchmarks.
//!
//! **Socket buffers.** A busy endpoint receives datagrams in bursts faster than one task drains them; what
//! does not fit in the socket's receive buffer is dropped by the kernel, and QUIC
//! reads a drop as congestion: it retransmits after a timeout and halves its window.
//! On loopback under the relay benchmark the kernel's default buffer (208 KiB) dropped
//! about one datagram in ten at the node (BENCHMARKS.md). So the node asks for bigger
//! buffers; the kernel caps what it grants at `net.core.rmem_max` / `wmem_max`.
//!
//! **Acknowledgement frequency.** By default a QUIC receiver acknowledges every
//! second packet at once. Most of our packets carry one small frame (a request, a
//! push, an ack), so half of them drew an ACK-only packet back: in the relay
//! benchmark the node sent 3.5 datagrams per message where the bare relay sent 1.9.
//! Both ends therefore ask the peer (the ACK frequency extension, which quinn speaks
//! on both sides) to acknowledge only every [`ACK_ELICITING_THRESHOLD`] + 1
//! packets, or after its `max_ack_delay` (25 ms), so ACKs mostly ride on the next
//! reply or push. Loss detection is unaffected: a reordered packet still draws an
//! ACK at once.
//!
//! **Reading to the end.** quinn sends STOP_SENDING for a receive stream dropped
//! before its end was read, even when the peer's FIN is already there. A request
//! stream's FIN mostly comes with the request, so [`read_end`] takes it: without it,
//! every request drew a STOP_SENDING, sent on its own once the reply had been
//! acknowledged (about one datagram more per message in the relay benchmark).

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Ack-eliciting packets a peer may receive before it must acknowledge at once.
pub const ACK_ELICITING_THRESHOLD: u32 = 8;

/// The ACK frequency both ends request of their peer.
pub fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    acks
}

/// Reads the end of `recv` if the peer's FIN is already there and nothing else is
/// (so dropping the stream sends no STOP_SENDING); never waits. `false` if the end
/// has not arrived yet, or if more data came (which is left unread).
pub fn read_end(recv: &mut quinn::RecvStream) -> bool {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let read = std::pin::pin!(recv.read_chunk(usize::MAX, true));
    matches!(
        read.poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Ok(None))
    )
}

/// What the kernel granted of the buffers asked for, in usable bytes.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    pub recv_buffer: usize,
    pub send_buffer: usize,
}

/// A quinn endpoint (a server when `server` is given) on a socket bound by [`bind`].
pub fn endpoint(
    addr: SocketAddr,
    buffer_bytes: usize,
    server: Option<quinn::ServerConfig>,
) -> io::Result<(quinn::Endpoint, Granted)> {
    let (socket, granted) = bind(addr, buffer_bytes)?;
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)?;
    Ok((endpoint, granted))
}

/// Binds a UDP socket on `addr` with receive and send buffers of `buffer_bytes` each
/// (0 keeps the system default). An IPv6 wildcard also accepts IPv4 (dual stack),
/// whatever the system default for `IPV6_V6ONLY` is.
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<(UdpSocket, Granted)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    if buffer_bytes > 0 {
        // Best effort: the kernel silently caps the size; we report what it granted.
        socket.set_recv_buffer_size(buffer_bytes)?;
        socket.set_send_buffer_size(buffer_bytes)?;
    }
    socket.bind(&addr.into())?;
    // Linux doubles the size asked for (for its bookkeeping) and reports the double.
    let usable = |reported: usize| {
        if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        }
    };
    let granted = Granted {
        recv_buffer: usable(socket.recv_buffer_size()?),
        send_buffer: usable(socket.send_buffer_size()?),
    };
    Ok((socket.into(), granted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_the_buffers_asked_for() {
        // 64 KiB is below any kernel's default cap.
        let (socket, granted) = bind("127.0.0.1:0".parse().unwrap(), 64 * 1024).unwrap();
        assert!(granted.recv_buffer >= 64 * 1024, "{granted:?}");
        assert!(granted.send_buffer >= 64 * 1024, "{granted:?}");
        let addr = socket.local_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
    }

    #[test]
    fn zero_keeps_the_system_default_and_ipv6_takes_ipv4_too() {
        let Ok((_, granted)) = bind("[::1]:0".parse().unwrap(), 0) else {
            return; // no IPv6 on this machine
        };
        assert!(granted.recv_buffer > 0);
        let (wildcard, _) = bind("[::]:0".parse().unwrap(), 0).unwrap();
        let port = wildcard.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"v4", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 8];
        wildcard
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, _) = wildcard.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"v4");
    }
}
