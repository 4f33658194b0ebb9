//! The client's home directory: the device key and what the device knows of its node.
//!
//! Layout (every file owner-only, the directory 0700):
//! - `device.key`, `device.crt`: the device's private key and self-signed certificate
//!   (PEM). With a passphrase, `device.key` is sealed (`client::sealed`);
//! - `state.toml`: server address, pinned node fingerprint, number and ids;
//! - `e2e.key` and `home.db`: the home key and the database it seals
//!   (`client::db`: Olm state, contacts, history);
//! - `settings.toml` (optional): the home's settings (`client::settings`).
//!
//! Files are written atomically, so an interrupted write never leaves half a home.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sealed::{self, Passphrase};
use crate::fsutil;
use crate::phone::Number;
use crate::tls::{Credentials, Fingerprint, PemPair, TlsError};

/// What can go wrong with the home directory.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("no home directory: pass --home or set SWITCHBOARD_HOME")]
    NoHome,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("this home ({path}) has no registered device: run `switchboard register` first")]
    NotRegistered { path: PathBuf },
    #[error(
        "{path} is encrypted: set SWITCHBOARD_PASSPHRASE or pass --passphrase-file to unlock it"
    )]
    Locked { path: PathBuf },
    #[error("{path}: {source}")]
    Seal {
        path: PathBuf,
        source: sealed::SealError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A client home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
    /// Seals the device key at rest when set.
    passphrase: Option<Passphrase>,
}

/// A registered device as its home knows it.
#[derive(Debug, Clone)]
pub struct Registration {
    pub server: String,
    pub fingerprint: Fingerprint,
    pub number: Number,
    pub account_id: u64,
    pub device_id: u32,
    pub credentials: Credentials,
}

#[derive(Serialize, Deserialize)]
struct State {
    server: String,
    fingerprint: String,
    number: String,
    account_id: u64,
    device_id: u32,
}

impl Home {
    /// The home at `dir`, or the platform's data dir (`~/.local/share/switchboard`).
    pub fn new(dir: Option<PathBuf>) -> Result<Home, HomeError> {
        let dir = match dir {
            Some(d) => d,
            None => dirs::data_dir()
                .ok_or(HomeError::NoHome)?
                .join("switchboard"),
        };
        Ok(Home {
            dir,
            passphrase: None,
        })
    }

    /// The same home, with keys sealed under `passphrase`. Keys found unsealed are
    /// sealed the next time they are read.
    pub fn with_passphrase(mut self, passphrase: Option<Passphrase>) -> Home {
        self.passphrase = passphrase;
        self
    }

    /// The passphrase this home was opened with.
    pub fn passphrase(&self) -> Option<&Passphrase> {
        self.passphrase.as_ref()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The home database (keys, sessions, contacts, history), made if there is none.
    pub fn db(&self) -> Result<super::db::HomeDb, super::db::DbError> {
        super::db::HomeDb::open(&self.dir, self.passphrase.as_ref())
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> HomeError {
        let path = path.to_path_buf();
        move |source| HomeError::Io {
            path: path.clone(),
            source,
        }
    }

    /// `state.toml`, or [`HomeError::NotRegistered`].
    fn state(&self) -> Result<State, HomeError> {
        let state_path = self.dir.join("state.toml");
        if !state_path.exists() {
            return Err(HomeError::NotRegistered {
                path: self.dir.clone(),
            });
        }
        let text = std::fs::read_to_string(&state_path).map_err(self.io(&state_path))?;
        toml::from_str(&text).map_err(|e| self.damaged_state(e.to_string()))
    }

    fn damaged_state(&self, reason: String) -> HomeError {
        HomeError::Damaged {
            path: self.dir.join("state.toml"),
            reason,
        }
    }

    /// The registered number alone: no key is read (or unsealed).
    pub fn number(&self) -> Result<Number, HomeError> {
        Number::parse_e164(&self.state()?.number).map_err(|e| self.damaged_state(e.to_string()))
    }

    /// The registered device, or [`HomeError::NotRegistered`].
    pub fn load(&self) -> Result<Registration, HomeError> {
        let state = self.state()?;
        let read = |p: &Path| std::fs::read_to_string(p).map_err(self.io(p));
        let damaged = |reason: String| self.damaged_state(reason);
        let key_path = self.dir.join("device.key");
        let key = unseal(
            &key_path,
            std::fs::read(&key_path).map_err(self.io(&key_path))?,
            self.passphrase.as_ref(),
        )?;
        let key = std::str::from_utf8(&key).map_err(|_| HomeError::Damaged {
            path: key_path.clone(),
            reason: "not PEM text".into(),
        })?;
        let credentials = Credentials::from_pem(&read(&self.dir.join("device.crt"))?, key)?;
        Ok(Registration {
            fingerprint: state.fingerprint.parse().map_err(damaged)?,
            number: Number::parse_e164(&state.number).map_err(|e| damaged(e.to_string()))?,
            server: state.server,
            account_id: state.account_id,
            device_id: state.device_id,
            credentials,
        })
    }

    /// Replaces the node addresses the device connects to (comma-separated, tried in
    /// order): the same node under a new address, or the nodes of the cluster it
    /// moved into. The pinned certificate stays: a node that does not present it is
    /// refused.
    pub fn set_servers(&self, servers: &str) -> Result<(), HomeError> {
        let mut state = self.state()?;
        state.server = servers.to_string();
        let path = self.dir.join("state.toml");
        let text = toml::to_string(&state).map_err(|e| HomeError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fsutil::write_private(&path, text.as_bytes()).map_err(self.io(&path))
    }

    /// Saves a new registration with its device key, replacing any earlier one.
    pub fn save(&self, reg: &Registration, pem: &PemPair) -> Result<(), HomeError> {
        fsutil::create_private_dir(&self.dir).map_err(self.io(&self.dir))?;
        let state = State {
            server: reg.server.clone(),
            fingerprint: reg.fingerprint.to_string(),
            number: reg.number.to_string(),
            account_id: reg.account_id,
            device_id: reg.device_id,
        };
        let text = toml::to_string(&state).map_err(|e| HomeError::Damaged {
            path: self.dir.join("state.toml"),
            reason: e.to_string(),
        })?;
        let key = match &self.passphrase {
            Some(p) => {
                sealed::seal(p.as_str(), pem.key.as_bytes()).map_err(|source| HomeError::Seal {
                    path: self.dir.join("device.key"),
                    source,
                })?
            }
            None => pem.key.as_bytes().to_vec(),
        };
        // Key and certificate before the state that points at them.
        for (name, bytes) in [
            ("device.key", key.as_slice()),
            ("device.crt", pem.cert.as_bytes()),
            ("state.toml", text.as_bytes()),
        ] {
            let path = self.dir.join(name);
            fsutil::write_private(&path, bytes).map_err(self.io(&path))?;
        }
        Ok(())
    }
}

/// The plain secret in `bytes`, read from `path`: opened with the passphrase when
/// sealed, and sealed in place when it was plain and a passphrase is given.
pub fn unseal(
    path: &Path,
    bytes: Vec<u8>,
    passphrase: Option<&Passphrase>,
) -> Result<zeroize::Zeroizing<Vec<u8>>, HomeError> {
    let seal_err = |source| HomeError::Seal {
        path: path.to_path_buf(),
        source,
    };
    match (sealed::is_sealed(&bytes), passphrase) {
        (true, Some(p)) => sealed::open(p.as_str(), &bytes).map_err(seal_err),
        (true, None) => Err(HomeError::Locked {
            path: path.to_path_buf(),
        }),
        (false, Some(p)) => {
            let sealed = sealed::seal(p.as_str(), &bytes).map_err(seal_err)?;
            fsutil::write_private(path, &sealed).map_err(|source| HomeError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(zeroize::Zeroizing::new(bytes))
        }
        (false, None) => Ok(zeroize::Zeroizing::new(bytes)),
    }
}
