//! The pure protocol: keys, bundles, X3DH, the Double Ratchet, sessions, the
//! wire codec and the session state encoding. No I/O, no clock, no implicit
//! randomness.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

pub mod bundle;
pub mod devices;
pub mod fingerprint;
pub mod hazmat;
pub mod keys;
pub mod prekeys;
pub mod ratchet;
pub mod sealed;
pub mod session;
pub mod state;
pub mod time;
pub mod wire;
mod x3dh;
