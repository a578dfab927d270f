//! # cubbyhole
//!
//! Asynchronous end-to-end encrypted messaging through stores and relays
//! nobody trusts: Signal-style X3DH prekey agreement and the Double Ratchet,
//! exactly as fixed by the `cubbyhole/v1` protocol profile (`SPEC.md`), with
//! a client that delivers every message exactly once across crashes, lost
//! messages and dead sessions.
//!
//! ## The client path: store + transport + client
//!
//! Most applications need three parts:
//!
//! - a **store** for the device's state ([`storage`]): [`storage::SqliteStore`]
//!   (feature `sqlite`: one file, secrets encrypted at rest under the
//!   application's key), [`storage::MemoryStore`], or your own (implement
//!   [`storage::BlockingStore`] for a synchronous backend or
//!   [`storage::Store`] for an asynchronous one, and run
//!   [`storage::conformance`] against it);
//! - a **transport** to the untrusted directory and mailbox ([`transport`]):
//!   `HttpRelay` from the `cubbyhole-http` crate talks to a
//!   `cubbyhole-relay` server over HTTP; [`relay::InProcessRelay`] runs the
//!   same relay rules in the process (tests, embedding);
//! - the **[`client::Client`]**, which joins them: it publishes and rotates
//!   prekeys, sends (starting sessions from verified bundles), receives
//!   with exactly-once delivery into the store's inbox, sends receipts and
//!   re-sends what got none.
//!
//! ```
//! use cubbyhole::client::{block_on, Client, ClientConfig};
//! use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
//! use cubbyhole::storage::MemoryStore;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = cubbyhole::OsRng;
//! let now = 1_700_000_000; // unix seconds, from the application's clock
//! let relay = InProcessRelay::new(Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()));
//!
//! block_on(async {
//!     let config = ClientConfig::default();
//!     let mut bob = Client::open(MemoryStore::new(), relay.clone(), relay.clone(), config, &mut rng).await?;
//!     bob.maintain_prekeys(&mut rng, now).await?; // publish, then go offline
//!
//!     let mut alice = Client::open(MemoryStore::new(), relay.clone(), relay.clone(), config, &mut rng).await?;
//!     alice.maintain_prekeys(&mut rng, now).await?;
//!     alice.send(&mut rng, &bob.address(), b"hello Bob", now).await?;
//!
//!     bob.receive(&mut rng, now).await?; // later: fetch, decrypt, commit, acknowledge
//!     let inbox = bob.inbox().await?;
//!     assert_eq!(inbox[0].body, b"hello Bob");
//!     assert_eq!(inbox[0].from, alice.address());
//!     Ok::<_, cubbyhole::client::ClientError>(())
//! })?;
//! # Ok(()) }
//! ```
//!
//! Every client future is `Send` on native targets with the crate's stores
//! and transports, so each device's loop can run in `tokio::spawn`;
//! [`client::block_on`] drives them from synchronous code. Times are unix
//! **seconds** (a millisecond clock is refused: [`check_timestamp`]).
//!
//! Debug builds: the crate's `Cargo.toml` optimizes the crypto
//! dependencies in its own debug builds, but Cargo ignores a dependency's
//! profile settings, so in *your* debug build the primitives run about six
//! times slower. Paste the profile overrides from the README ("Debug
//! builds") into your application's `Cargo.toml`.
//!
//! ## The sans-IO core
//!
//! Underneath, the protocol is **sans-IO**: it never touches the network or
//! the disk, never reads a clock and never draws randomness on its own:
//! bytes come in, are decoded into typed values, go through the protocol,
//! and leave as bytes. Randomness is passed in as `&mut impl CryptoRngCore`,
//! time as an argument. Applications with their own storage and transport
//! can use it directly ([`protocol`], re-exported at the crate root); it
//! builds without `std`.
//!
//! ```text
//!   untrusted store / relay                         your application
//!  ─────────────────────────┐                     ┌──────────────────────
//!   bundle bytes  ──decode──▶ PrekeyBundle ─verify(now)─▶ VerifiedBundle ─┐
//!                           │                     │                      ▼
//!   message bytes ──decode──▶ Incoming ──▶ Session::decrypt ──▶ plaintext
//!                           │                     │
//!   message bytes ◀─────────┤ Session::encrypt ◀──┴── plaintext, rng
//!  ─────────────────────────┘                     └──────────────────────
//! ```
//!
//! ## A full offline session
//!
//! ```
//! use cubbyhole::{IdentityKeyPair, Incoming, PrekeyBundle, PrekeyStore, Session, SessionConfig};
//! use cubbyhole::bundle::FreshnessPolicy;
//! # fn main() -> Result<(), cubbyhole::Error> {
//! let mut rng = rand_core::OsRng;
//! let now = 1_700_000_000;
//!
//! // Bob publishes a bundle to an untrusted directory and goes offline.
//! let bob = IdentityKeyPair::generate(&mut rng);
//! let mut bob_prekeys = PrekeyStore::new(&mut rng, &bob, now)?;
//! bob_prekeys.generate_one_time_prekeys(&mut rng, 10);
//! let published: Vec<u8> = bob_prekeys.bundle(&bob).encode();
//!
//! // Alice fetches it, verifies it, and leaves two messages in Bob's mailbox.
//! let alice = IdentityKeyPair::generate(&mut rng);
//! let bundle = PrekeyBundle::decode(&published)?.verify(now, FreshnessPolicy::default())?;
//! let mut alice_session = Session::initiate(&mut rng, &alice, &bundle, SessionConfig::default())?;
//! let first = alice_session.encrypt(&mut rng, b"hello Bob")?;
//! let second = alice_session.encrypt(&mut rng, b"are you there?")?;
//!
//! // Days later Bob picks them up, in whatever order the mailbox gives.
//! let incoming = Incoming::decode(&second)?;
//! let accepted = bob_prekeys.accept(&bob, &incoming, SessionConfig::default())?;
//! assert_eq!(accepted.plaintext, b"are you there?");
//! let mut bob_session = accepted.session;
//! assert_eq!(bob_session.decrypt(&first)?, b"hello Bob");
//!
//! // Bob replies; once Alice decrypts it she stops sending prekey messages.
//! let reply = bob_session.encrypt(&mut rng, b"hi Alice")?;
//! assert_eq!(alice_session.decrypt(&reply)?, b"hi Alice");
//! assert!(!alice_session.sends_prekey_messages());
//!
//! // Sessions survive restarts (store the bytes encrypted: they hold keys;
//! // the identity keys are not in them, the application keeps those).
//! let saved = alice_session.to_bytes();
//! let mut alice_session = Session::from_bytes(&saved, alice.public(), bob.public())?;
//! let more = alice_session.encrypt(&mut rng, b"great")?;
//! assert_eq!(bob_session.decrypt(&more)?, b"great");
//! # Ok(()) }
//! ```
//!
//! ## Features
//! - `std` (default): the client, storage, transport and relay layers,
//!   `std::error::Error` for [`Error`] and the `OsRng` re-export [`OsRng`].
//!   Without it the crate is the `#![no_std]` + `alloc` protocol core.
//! - `sqlite`: [`storage::SqliteStore`], the SQLite local store, and
//!   [`relay::SqliteRelayStorage`], the SQLite relay backend (rusqlite with
//!   SQLite bundled; implies `std`).
//! - `serde`: `Serialize`/`Deserialize` for addresses, ids, delivery states
//!   and the stored records ([`forms`], with `std`); never for key
//!   material. `serde` is used without its `std` feature.
//!
//! ## In a browser (`wasm32-unknown-unknown`)
//! With `default-features = false, features = ["std"]` (or `std` and
//! `serde`; not `sqlite`, whose bundled SQLite needs a C toolchain for the
//! target) the whole client layer builds for `wasm32-unknown-unknown`, and
//! [`OsRng`] is the browser's `crypto.getRandomValues` (getrandom's `js`
//! backend, a dependency only on that target). The client's futures are
//! bounded by [`MaybeSend`], which asks nothing there, so a store or
//! transport may await JavaScript promises. The persistent store for it is
//! [`storage::KvStore`] over an IndexedDB backend, and the relay is
//! `cubbyhole-http`'s `HttpRelay` over `fetch` (both in the repository's
//! `browser/` crate, `cubbyhole-browser`). Nothing reads a clock there
//! either: [`relay::InProcessRelay`] needs its `with_clock` form, as
//! `SystemTime` panics on that target.

#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

extern crate alloc;

mod bounds;
pub mod error;
pub mod protocol;

#[cfg(feature = "std")]
pub mod client;
#[cfg(feature = "std")]
pub mod forms;
#[cfg(feature = "std")]
pub mod relay;
#[cfg(feature = "std")]
pub mod storage;
#[cfg(feature = "std")]
pub mod transport;

pub use bounds::{MaybeSend, MaybeSync};
pub use error::{Error, Result};
pub use protocol::bundle::{self, FreshnessPolicy, PrekeyBundle, VerifiedBundle};
pub use protocol::devices::{
    self, AccountId, DeviceEntry, DeviceList, DeviceListChain, DeviceListError, UnsignedDeviceList,
    VerifiedDeviceList,
};
pub use protocol::fingerprint::{Fingerprint, SafetyNumber};
pub use protocol::hazmat;
pub use protocol::keys::{IdentityKey, IdentityKeyPair, OneTimePrekey, SignedPrekey};
pub use protocol::prekeys::PrekeyStore;
pub use protocol::ratchet::SessionConfig;
pub use protocol::sealed;
pub use protocol::session::{Accepted, PrekeyLookup, Role, Sealed, Session};
pub use protocol::time::{check_timestamp, MAX_TIMESTAMP};
pub use protocol::wire::{Header, Incoming, PrekeyFields};

/// Runs the README's examples as doctests (with `sqlite`: one uses the SQLite store).
#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The operating system's random number generator (feature `std`).
#[cfg(feature = "std")]
pub use rand_core::OsRng;
