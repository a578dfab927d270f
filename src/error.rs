//! The crate's one error type.

use core::fmt;

/// Everything that can go wrong in cubbyhole.
///
/// Variants are chosen so that a caller can act on them: drop a forged or
/// corrupted message ([`Error::Auth`], [`Error::Decode`]), ignore a replay
/// ([`Error::Duplicate`]), fetch a fresh bundle ([`Error::StaleBundle`]),
/// refuse a bundle ([`Error::Signature`], [`Error::InvalidKey`]) and so on.
/// No variant carries secret material or echoes input bytes.
///
/// Detailed failure reasons can help an attacker probe a receiver; an
/// application that reports errors back to a peer should collapse them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The AEAD tag did not verify: a forged, corrupted or undecryptable
    /// message (for example a replay whose key is gone).
    Auth,
    /// The receiving counter is exhausted (`u32::MAX` messages in one chain).
    CounterExhausted,
    /// Malformed bytes: wrong length, unknown version or kind, truncated
    /// field, trailing byte. The reason names the failing field.
    Decode(&'static str),
    /// The message was already decrypted (replay or duplicate delivery).
    Duplicate,
    /// A key that is not canonically encoded, is of small order, or a
    /// Diffie-Hellman result that is not contributory.
    InvalidKey,
    /// The plaintext is longer than AES-GCM can encrypt (2^36 - 32 bytes).
    PlaintextTooLong,
    /// A prekey message that belongs to a different session (other initiator
    /// identity or ephemeral key) was given to this session.
    SessionMismatch,
    /// The signed prekey's signature does not verify under the identity key.
    Signature,
    /// The signed prekey is older than the freshness policy allows.
    StaleBundle,
    /// A serialized session state (or other stored record) is corrupted,
    /// truncated or of an unsupported version. The reason names the field.
    State(&'static str),
    /// A time given to the crate (or the signed creation time in a bundle)
    /// is above [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP): not unix seconds,
    /// most likely a millisecond or microsecond clock. See
    /// [`check_timestamp`](crate::check_timestamp).
    TimeOutOfRange,
    /// The message would require deriving more message keys than the
    /// configured `max_skip` allows.
    TooManySkipped,
    /// The prekey message names a signed or one-time prekey this device does
    /// not hold (never had it, retired it, or already used it).
    UnknownPrekey,
}

impl Error {
    /// The implementation-neutral error kind of `protocol-profile.md` (the
    /// `error` field of `negative.json`), or `None` for errors the profile
    /// does not name.
    pub fn profile_kind(&self) -> Option<&'static str> {
        Some(match self {
            Error::Auth => "auth",
            Error::Decode(_) => "decode",
            Error::Duplicate => "duplicate",
            Error::InvalidKey => "invalid_key",
            Error::Signature => "signature",
            Error::StaleBundle => "stale_bundle",
            Error::TooManySkipped => "too_many_skipped",
            Error::UnknownPrekey => "unknown_prekey",
            Error::CounterExhausted
            | Error::PlaintextTooLong
            | Error::SessionMismatch
            | Error::State(_)
            | Error::TimeOutOfRange => return None,
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Auth => f.write_str("message authentication failed"),
            Error::CounterExhausted => f.write_str("message counter exhausted"),
            Error::Decode(what) => write!(f, "malformed input: {what}"),
            Error::Duplicate => f.write_str("message already received"),
            Error::InvalidKey => f.write_str("invalid or weak public key"),
            Error::PlaintextTooLong => f.write_str("plaintext too long"),
            Error::SessionMismatch => f.write_str("prekey message belongs to another session"),
            Error::Signature => f.write_str("signed prekey signature does not verify"),
            Error::StaleBundle => f.write_str("signed prekey is older than allowed"),
            Error::State(what) => write!(f, "corrupted stored state: {what}"),
            Error::TimeOutOfRange => {
                f.write_str("time out of range: not unix seconds (a millisecond clock?)")
            }
            Error::TooManySkipped => f.write_str("too many skipped messages"),
            Error::UnknownPrekey => f.write_str("unknown or already used prekey"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Result alias used throughout the crate.
pub type Result<T> = core::result::Result<T, Error>;
