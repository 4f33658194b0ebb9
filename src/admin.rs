//! The admin protocol: what `switchboard admin` asks a running node over the Unix
//! socket `DATA_DIR/admin.sock`, and the client side of it.
//!
//! A connection carries one request: a line of JSON ([`AdminRequest`]), answered
//! by a line of JSON ([`AdminReply`]). A backup is answered by a
//! [`AdminReply::BackupStarting`] line, then the backup file's bytes until the node
//! closes the socket (the file checks itself: see `store::backup`). The socket is
//! owner-only and the node also checks that the peer runs as its own user.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::store::{AccountSummary, StoreCounts};

/// The socket's file name in the data dir.
pub const SOCKET: &str = "admin.sock";

/// The longest request line the node reads.
pub const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    Stats,
    Accounts,
    Account { number: String },
    Delete { number: String },
    Backup,
    RotateDiscoveryKey,
}

/// The node's counts, as `admin stats` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    #[serde(flatten)]
    pub store: StoreCounts,
    /// Devices with a live connection; `None` when the node is not running.
    pub online_devices: Option<u64>,
    pub connections: Option<u64>,
    /// Bytes of every file in the data dir.
    pub data_dir_bytes: u64,
    pub uptime_secs: Option<u64>,
    pub schema_version: u32,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminReply {
    Stats(NodeStats),
    Accounts(Vec<AccountSummary>),
    Account(AccountSummary),
    Deleted {
        number: String,
        devices: u64,
        queued_items: u64,
        connections_closed: u64,
    },
    /// The backup's bytes follow this line.
    BackupStarting {
        entries_estimate: u64,
    },
    Rotated {
        version: u32,
        accounts: u64,
    },
    Error {
        message: String,
    },
}

/// The admin socket of a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// The file a node in cluster mode keeps in its data dir (and a node on its own
/// removes), so that admin commands on the stopped data dir know its database
/// holds none of the cluster's accounts.
pub fn cluster_mark(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster-node")
}

/// Writes (`cluster`) or removes the [`cluster_mark`] of `data_dir`.
pub fn set_cluster_mark(data_dir: &Path, cluster: bool) -> std::io::Result<()> {
    let path = cluster_mark(data_dir);
    if cluster {
        std::fs::write(
            &path,
            "This node runs on the NATS cluster its config names ([cluster] nats); the \
             database in this data dir holds none of the cluster's accounts.\n",
        )
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// A connection to a running node's admin socket.
pub struct AdminClient {
    stream: BufReader<UnixStream>,
}

/// Why the admin client failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No node answers on this data dir (no socket, or a stale one).
    #[error("no node is running on {0}")]
    NotRunning(PathBuf),
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node's answer is not understood: {0}")]
    Protocol(String),
    #[error("{0}")]
    Node(String),
}

impl AdminClient {
    /// Connects to the node running on `data_dir`.
    pub async fn connect(data_dir: &Path) -> Result<AdminClient, AdminError> {
        let path = socket_path(data_dir);
        match UnixStream::connect(&path).await {
            Ok(stream) => Ok(AdminClient {
                stream: BufReader::new(stream),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(AdminError::NotRunning(data_dir.to_path_buf()))
            }
            Err(e) => Err(AdminError::Io(e)),
        }
    }

    /// Sends `request` and reads the reply line (for a backup, only the first line:
    /// read the rest with [`AdminClient::into_stream`]).
    pub async fn ask(&mut self, request: &AdminRequest) -> Result<AdminReply, AdminError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| AdminError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line).await?;
        let mut reply = String::new();
        let n = (&mut self.stream)
            .take(64 * 1024 * 1024)
            .read_line(&mut reply)
            .await?;
        if n == 0 {
            return Err(AdminError::Protocol(
                "the node closed the socket without answering".into(),
            ));
        }
        match serde_json::from_str(&reply).map_err(|e| AdminError::Protocol(e.to_string()))? {
            AdminReply::Error { message } => Err(AdminError::Node(message)),
            reply => Ok(reply),
        }
    }

    /// The rest of the connection: a backup's bytes.
    pub fn into_stream(self) -> BufReader<UnixStream> {
        self.stream
    }
}

/// The files of the data dir a backup carries: the self-signed certificate and its
/// key, which clients have pinned.
pub fn backup_files(data_dir: &Path) -> Vec<(String, Vec<u8>)> {
    crate::store::backup::FILES
        .into_iter()
        .filter_map(|p| Some((p.to_string(), std::fs::read(data_dir.join(p)).ok()?)))
        .collect()
}

/// Bytes of every regular file under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_read_as_documented() {
        let r: AdminRequest =
            serde_json::from_str(r#"{"command":"account","number":"+14155550100"}"#)
                .expect("parse");
        assert_eq!(
            r,
            AdminRequest::Account {
                number: "+14155550100".into()
            }
        );
        let r: AdminRequest =
            serde_json::from_str(r#"{"command":"rotate-discovery-key"}"#).expect("parse");
        assert_eq!(r, AdminRequest::RotateDiscoveryKey);
        assert!(serde_json::from_str::<AdminRequest>(r#"{"command":"format-disk"}"#).is_err());
        assert!(
            serde_json::from_str::<AdminRequest>(r#"{"command":"delete","number":"+1","yes":1}"#)
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn any_line_decodes_or_errs(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = serde_json::from_slice::<AdminRequest>(&bytes);
        }
    }
}
