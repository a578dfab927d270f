//! # cubbyhole
//!
//! Asynchronous end-to-end encryption for messaging through stores and
//! relays nobody trusts: Signal-style X3DH prekey agreement and the Double
//! Ratchet, exactly as fixed by the `cubbyhole/v1` protocol profile (see
//! `SPEC.md`).
//!
//! cubbyhole is **sans-IO**. It never touches the network or the disk, never
//! reads a clock and never draws randomness on its own: bytes come in, are
//! decoded into typed values, go through the protocol, and leave as bytes.
//! Randomness is passed in as `&mut impl CryptoRngCore`, time as an argument.
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
//! - `std` (default): `std::error::Error` for [`Error`] and the `OsRng`
//!   re-export [`OsRng`]. Without it the crate is `#![no_std]` + `alloc`.
//! - `sqlite`: the SQLite local store and relay backend.
//! - `serde`: `Serialize`/`Deserialize` for addresses, ids, delivery states
//!   and the stored records ([`forms`], with `std`); never for key
//!   material. `serde` is used without its `std` feature.

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
pub use protocol::fingerprint::{Fingerprint, SafetyNumber};
pub use protocol::hazmat;
pub use protocol::keys::{IdentityKey, IdentityKeyPair, OneTimePrekey, SignedPrekey};
pub use protocol::prekeys::PrekeyStore;
pub use protocol::ratchet::SessionConfig;
pub use protocol::session::{Accepted, PrekeyLookup, Role, Session};
pub use protocol::time::{check_timestamp, MAX_TIMESTAMP};
pub use protocol::wire::{Header, Incoming, PrekeyFields};

/// Runs the README's example as a doctest.
#[cfg(all(doctest, feature = "std"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The operating system's random number generator (feature `std`).
#[cfg(feature = "std")]
pub use rand_core::OsRng;
