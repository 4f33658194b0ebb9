//! Switchboard: a self-hosted messaging node, its wire protocol and its client library.
//!
//! The crate is laid out by layer; ARCHITECTURE.md has the map and the invariants.
//!
//! - [`proto`]: the wire, frames and messages; knows nothing of quinn or sled.
//! - [`node`]: the server: QUIC endpoint, connections, request handlers.
//! - [`store`]: the only code that touches sled.
//! - [`verify`]: verification codes and their delivery providers.
//! - [`client`]: the client library used by the CLI, the tests and apps.
//! - [`config`], [`phone`], [`tls`]: configuration, phone numbers, certificates.
//!
//! The `switchboard` binary (src/main.rs and src/cli/) is a thin shell over these.

pub mod admin;
pub mod client;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod fsutil;
pub mod node;
pub mod phone;
pub mod proto;
pub mod quic;
pub mod store;
pub mod tls;
pub mod verify;
