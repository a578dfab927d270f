//! cubbyhole-relay: the untrusted prekey directory and mailbox of
//! [cubbyhole] as an HTTP service.
//!
//! - [`server`]: the server ([`serve`]), the HTTP API of `relay/API.md` in
//!   front of one [`cubbyhole::relay::Relay`] on SQLite (default) or
//!   PostgreSQL (feature `postgres`), with abuse limits, metrics, health
//!   and graceful shutdown. The binary `cubbyhole-relay` runs it (see the
//!   crate README for its options).
//! - [`restore`]: the step to run once after restoring the database from a
//!   backup ([`restore::after_restore`]).
//!
//! The client side of that API, `HttpRelay`, is the `cubbyhole-http`
//! crate (a client depends on it, not on this server).
//!
//! Every rule of the directory and the mailbox (owner proofs, upload
//! signatures and counters, bounds, retention) is enforced by
//! [`cubbyhole::relay::Relay`], the same code as the in-process relay; the
//! server maps its answers to HTTP and adds what only a network service
//! needs (rate limits per client address, a relay-wide storage bound, body
//! size and time limits).
//!
//! ```no_run
//! # async fn run() -> Result<(), cubbyhole_relay::ServerError> {
//! use cubbyhole_relay::{serve, ServerConfig, StorageConfig};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let config = ServerConfig {
//!     storage: StorageConfig::Sqlite("relay.db".into()),
//!     ..ServerConfig::default()
//! };
//! serve(listener, config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod restore;
pub mod server;

mod connections;
mod durability;
mod metrics;
mod ratelimit;
mod waiters;
mod web;

pub use server::{serve, Limits, ServerConfig, ServerError, StorageConfig};
