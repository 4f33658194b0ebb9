//! The bare limit: a minimal quinn relay. A client opens one stream and writes its id
//! (the inbox); each message is a stream carrying `[to: u32][payload]`, answered with
//! one byte after it was handed to the recipient's inbox; `to` = `u32::MAX` is a
//! fan-out: `[n: u8][n ids: u32 each][payload]`, handed to each of those inboxes. No
//! storage, no client authentication, no acknowledgements.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use switchboard::proto::frame;

use super::*;

const ALPN: &[u8] = b"bare";

type Inboxes = Arc<Mutex<HashMap<u32, tokio::sync::mpsc::Sender<Vec<u8>>>>>;

/// Stream heads of the attachment limit: a byte sink and a byte source.
const SINK: u32 = u32::MAX - 1;
const SOURCE: u32 = u32::MAX - 2;

/// Writes `len` raw bytes to the bare server's sink; returns once it has them all.
pub async fn sink(conn: &quinn::Connection, len: u64) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(err)?;
    let mut head = SINK.to_be_bytes().to_vec();
    head.extend_from_slice(&len.to_be_bytes());
    frame::write(&mut send, &head).await.map_err(err)?;
    let buf = vec![0xa5_u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        send.write_all(&buf[..n]).await.map_err(err)?;
        left -= n as u64;
    }
    send.finish().map_err(err)?;
    match frame::read::<Vec<u8>, _>(&mut recv, 1024)
        .await
        .map_err(err)?
    {
        Some(v) if v == [1] => Ok(()),
        other => Err(format!("the bare sink answered {other:?}")),
    }
}

/// Reads `len` raw bytes from the bare server's source.
pub async fn source(conn: &quinn::Connection, len: u64) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(err)?;
    let mut head = SOURCE.to_be_bytes().to_vec();
    head.extend_from_slice(&len.to_be_bytes());
    frame::write(&mut send, &head).await.map_err(err)?;
    send.finish().map_err(err)?;
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(256 * 1024, true).await.map_err(err)? {
        got += chunk.bytes.len() as u64;
    }
    if got == len {
        Ok(())
    } else {
        Err(format!("the bare source sent {got} of {len} bytes"))
    }
}

pub async fn serve() -> Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(err)?;
    let cert_der = cert.cert.der().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone().into()], key)
        .map_err(err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Session tickets as the node issues them, for the reconnect scenario.
    tls.ticketer = rustls::crypto::ring::Ticketer::new().map_err(err)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(120).try_into().map_err(err)?));
    // The node's transport tuning (ACK frequency, socket buffers), so the limit
    // is quinn configured as the node is.
    transport.ack_frequency_config(Some(switchboard::quic::ack_frequency()));
    config.transport_config(Arc::new(transport));
    let endpoint = udp_endpoint("127.0.0.1:0", Some(config))?;
    println!("listening on {}", endpoint.local_addr().map_err(err)?);
    println!("cert {}", hex::encode(&cert_der));
    let inboxes: Inboxes = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let inboxes = inboxes.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(stream(send, recv, inboxes.clone()));
            }
        });
    }
    Ok(())
}

async fn stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, inboxes: Inboxes) {
    let Ok(Some(first)) = frame::read::<Vec<u8>, _>(&mut recv, 1 << 20).await else {
        return;
    };
    let Some((head, body)) = first.split_first_chunk::<4>() else {
        return;
    };
    let id = u32::from_be_bytes(*head);
    // A sink: read `len` raw bytes to the end, answer one byte. A source: write `len`
    // raw bytes and finish. (Attachments' bare limit.)
    if id == SINK || id == SOURCE {
        let Some(len) = body.first_chunk::<8>().map(|b| u64::from_be_bytes(*b)) else {
            return;
        };
        if id == SINK {
            let mut got = 0u64;
            while let Ok(Some(chunk)) = recv.read_chunk(256 * 1024, true).await {
                got += chunk.bytes.len() as u64;
            }
            let _ = frame::write(&mut send, &vec![u8::from(got == len)]).await;
        } else {
            let buf = vec![0x5a_u8; 256 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            switchboard::quic::read_end(&mut recv);
        }
        let _ = send.finish();
        let _ = send.stopped().await;
        return;
    }
    if body.is_empty() {
        // An inbox: forward everything sent to `id`.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        if let Ok(mut map) = inboxes.lock() {
            map.insert(id, tx);
        }
        while let Some(msg) = rx.recv().await {
            if frame::write(&mut send, &msg).await.is_err() {
                return;
            }
        }
    } else {
        let (ids, body) = match (id, body.split_first()) {
            (u32::MAX, Some((&n, rest))) if rest.len() >= 4 * usize::from(n) => {
                let (ids, body) = rest.split_at(4 * usize::from(n));
                let ids: Vec<u32> = ids
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (ids, body)
            }
            _ => (vec![id], body),
        };
        let txs: Vec<_> = match inboxes.lock() {
            Ok(m) => ids.iter().filter_map(|i| m.get(i).cloned()).collect(),
            Err(_) => Vec::new(),
        };
        for tx in txs {
            let _ = tx.send(body.to_vec()).await;
        }
        let _ = frame::write(&mut send, &vec![1u8]).await;
        let _ = send.finish();
        // As the node does: take the FIN, so dropping `recv` sends no STOP_SENDING.
        switchboard::quic::read_end(&mut recv);
    }
}

pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: &str,
    cert: &[u8],
) -> Result<quinn::Connection> {
    let config = client_config(cert)?;
    connect_with(endpoint, addr, config).await
}

/// Connects with `config` (reused, it resumes the TLS sessions it holds tickets for).
pub async fn connect_with(
    endpoint: &quinn::Endpoint,
    addr: &str,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection> {
    let addr: std::net::SocketAddr = addr.parse().map_err(err)?;
    endpoint
        .connect_with(config, addr, "localhost")
        .map_err(err)?
        .await
        .map_err(err)
}

/// The bare client's configuration: the bare server's certificate as its root.
pub fn client_config(cert: &[u8]) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.to_vec().into()).map_err(err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(15)));
    // The node's transport tuning (ACK frequency, socket buffers), so the limit
    // is quinn configured as the node is.
    transport.ack_frequency_config(Some(switchboard::quic::ack_frequency()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Opens the inbox of `id`; read frames of `Vec<u8>` from it.
pub async fn subscribe(conn: &quinn::Connection, id: u32) -> Result<quinn::RecvStream> {
    let (mut send, recv) = conn.open_bi().await.map_err(err)?;
    frame::write(&mut send, &id.to_be_bytes().to_vec())
        .await
        .map_err(err)?;
    Ok(recv)
}

pub async fn send(conn: &quinn::Connection, to: u32, body: Vec<u8>) -> Result<()> {
    let mut msg = to.to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    exchange(conn, msg).await
}

/// One message to each of the inboxes `to` (at most 255), in one stream.
pub async fn send_many(conn: &quinn::Connection, to: &[u32], body: Vec<u8>) -> Result<()> {
    let mut msg = u32::MAX.to_be_bytes().to_vec();
    msg.push(u8::try_from(to.len()).map_err(err)?);
    for id in to {
        msg.extend_from_slice(&id.to_be_bytes());
    }
    msg.extend_from_slice(&body);
    exchange(conn, msg).await
}

async fn exchange(conn: &quinn::Connection, msg: Vec<u8>) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(err)?;
    frame::write(&mut send, &msg).await.map_err(err)?;
    send.finish().map_err(err)?;
    frame::read::<Vec<u8>, _>(&mut recv, 1024)
        .await
        .map_err(err)?
        .ok_or("no reply")?;
    Ok(())
}
