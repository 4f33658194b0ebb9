//! Integration tests: real nodes on 127.0.0.1 port 0 with their data in temp dirs,
//! driven through the client library and the `switchboard` binary as a process.

mod support;

mod admin;
mod attachments;
mod chat;
mod cli;
mod cli_messaging;
mod client_home;
mod cluster;
mod cluster_accounts;
mod cluster_export;
mod cluster_nodes;
mod cluster_power;
mod cluster_queues;
mod conversation;
mod crash;
mod devices;
mod discovery;
mod disk;
mod failover;
mod group_messages;
mod groups;
mod handoff;
mod hostile;
mod library;
mod messaging;
mod nats;
mod powerfs;
mod providers;
