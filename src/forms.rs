//! Text forms and (feature `serde`) serialization of the addresses, ids
//! and records an application stores or shows.
//!
//! # Text forms
//!
//! `Display` writes, and `FromStr` reads back, one canonical text per
//! value; `FromStr` refuses every other spelling with a [`ParseError`]
//! (so `s.parse::<T>()?.to_string() == s` whenever the parse succeeds):
//!
//! ```text
//! DeviceAddress  <identity: 64 lowercase hex digits>.<device number: decimal>
//!                d8aee4f2...2a7d.1   (no leading zero, no sign, at most u32::MAX)
//! MailboxId      64 lowercase hex digits
//! EnvelopeId     32 lowercase hex digits
//! MessageId      32 lowercase hex digits
//! Trust          unvalidated | validated | compromised
//! Failure        timed_out | compromised | refused
//! DeliveryState  stored | deposited | resent | delivered | failed:<Failure>
//! ```
//!
//! Input longer than the longest canonical form of the type is refused
//! before it is read ([`ParseError::TooLong`]); nothing is allocated.
//!
//! **A parsed `DeviceAddress` holds a valid identity key**: `FromStr`
//! (and deserialization) checks the 32 bytes with
//! [`IdentityKey::from_bytes`](crate::IdentityKey::from_bytes) (canonical,
//! not of small order; [`ParseError::IdentityKey`] otherwise), since an
//! address is typically read from outside (a QR code, a contact file) and
//! an invalid key could only fail later. The field is public, so an
//! address built by hand may hold bytes that are not a key: its `Display`
//! output then does not parse back.
//!
//! # Serialization (feature `serde`)
//!
//! `Serialize` and `Deserialize` for [`DeviceAddress`], [`MailboxId`],
//! [`EnvelopeId`], [`MessageId`], [`Envelope`], [`Trust`], [`Failure`],
//! [`DeliveryState`], [`PeerRecord`], [`OutboxEntry`], [`InboxMessage`],
//! [`SentMessage`] and [`ContactRecord`].
//!
//! - In human-readable formats (JSON, TOML, ...:
//!   `Serializer::is_human_readable`) the addresses, ids and enums are
//!   their text forms above, as strings; byte fields (bodies, payloads,
//!   contact names and earlier keys) are lowercase hex strings.
//! - In binary formats the ids are byte strings of their length, an
//!   address is 36 bytes (identity, then the device number big-endian),
//!   `Trust` is a `u8` (0 unvalidated, 1 validated, 2 compromised) and
//!   `Failure` and `DeliveryState` their `code()`; byte fields are byte
//!   strings.
//! - Records are structs with the Rust field names (an `OutboxEntry`'s
//!   envelope is a nested struct `{ id, payload }`); unknown fields are
//!   refused. A `ContactRecord` with more than
//!   [`ContactRecord::MAX_NAME`] name bytes, [`ContactRecord::MAX_DEVICES`]
//!   devices or [`ContactRecord::MAX_PREVIOUS`] earlier keys is refused
//!   (its byte encoding would truncate it).
//!
//! Deserializing untrusted input gives errors, never panics, and allocates
//! no more than the decoded values hold (a byte string or hex string is
//! bounded by the input; a sequence of bytes stops at the type's length).
//!
//! Bodies and payloads are message plaintext or ciphertext: serializing a
//! record is the application's choice, and what it writes must be kept as
//! confidential as the store it came from. Nothing holding key material
//! (identity key pairs, prekeys, sessions) implements `Serialize`.

use core::fmt;
use core::str::FromStr;

use crate::protocol::keys::IdentityKey;
use crate::storage::{DeliveryState, Failure, MessageId, Trust};
use crate::transport::{DeviceAddress, EnvelopeId, MailboxId};
#[cfg(feature = "serde")]
use crate::{
    storage::{ContactRecord, InboxMessage, OutboxEntry, PeerRecord, SentMessage},
    transport::Envelope,
};

/// Why a text (or a serialized value) is not the canonical form of the
/// type it was read as. No variant echoes the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// Longer than the longest canonical form of the type (refused before
    /// anything is read).
    TooLong,
    /// A hex field (or a binary field) of the wrong length.
    Length,
    /// A character that is not a lowercase hex digit (`0-9a-f`; uppercase
    /// is not canonical).
    Hex,
    /// A `DeviceAddress` without the `.` between identity and number.
    Separator,
    /// A device number that is empty, not decimal digits, has a leading
    /// zero or a sign, or is above `u32::MAX`.
    DeviceNumber,
    /// The identity of a `DeviceAddress` is not a valid identity key.
    IdentityKey,
    /// Not one of the type's names (or codes, in binary form).
    Name,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::TooLong => "text longer than the canonical form",
            ParseError::Length => "wrong length",
            ParseError::Hex => "not lowercase hex",
            ParseError::Separator => "device address without '.'",
            ParseError::DeviceNumber => "device number not canonical decimal u32",
            ParseError::IdentityKey => "not a valid identity key",
            ParseError::Name => "unknown name",
        })
    }
}

impl std::error::Error for ParseError {}

/// Writes `bytes` as lowercase hex.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

fn hex_digit(c: u8) -> Result<u8, ParseError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(ParseError::Hex),
    }
}

/// Decodes exactly `2 * out.len()` lowercase hex digits into `out`.
fn decode_hex_into(s: &[u8], out: &mut [u8]) -> Result<(), ParseError> {
    if s.len() != 2 * out.len() {
        return Err(ParseError::Length);
    }
    for (pair, byte) in s.chunks_exact(2).zip(out.iter_mut()) {
        if let [hi, lo] = pair {
            *byte = hex_digit(*hi)? << 4 | hex_digit(*lo)?;
        }
    }
    Ok(())
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseError> {
    if s.len() > 2 * N {
        return Err(ParseError::TooLong);
    }
    let mut out = [0u8; N];
    decode_hex_into(s.as_bytes(), &mut out)?;
    Ok(out)
}

/// A canonical decimal `u32`: digits only, no leading zero (but "0").
fn parse_device_number(s: &str) -> Result<u32, ParseError> {
    let b = s.as_bytes();
    let canonical = !b.is_empty()
        && b.len() <= 10
        && b.iter().all(u8::is_ascii_digit)
        && (b.len() == 1 || b.first() != Some(&b'0'));
    if !canonical {
        return Err(ParseError::DeviceNumber);
    }
    s.parse().map_err(|_| ParseError::DeviceNumber)
}

fn check_identity(identity: &[u8; 32]) -> Result<(), ParseError> {
    IdentityKey::from_bytes(identity)
        .map(|_| ())
        .map_err(|_| ParseError::IdentityKey)
}

/// The longest canonical `DeviceAddress`: 64 hex digits, '.', 10 digits.
const ADDRESS_TEXT_MAX: usize = 64 + 1 + 10;
/// The binary form of a `DeviceAddress`: identity || device number (BE).
#[cfg(feature = "serde")]
const ADDRESS_BINARY_LEN: usize = 36;

impl fmt::Display for DeviceAddress {
    /// `<identity: 64 lowercase hex digits>.<device number>` (module docs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", Hex(&self.identity), self.device_id)
    }
}

impl FromStr for DeviceAddress {
    type Err = ParseError;
    /// Parses the canonical form and checks that the identity is a valid
    /// identity key (module docs).
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.len() > ADDRESS_TEXT_MAX {
            return Err(ParseError::TooLong);
        }
        let (identity, number) = s.split_once('.').ok_or(ParseError::Separator)?;
        let identity = parse_hex::<32>(identity).map_err(|e| match e {
            ParseError::TooLong => ParseError::Length,
            e => e,
        })?;
        let device_id = parse_device_number(number)?;
        check_identity(&identity)?;
        Ok(DeviceAddress {
            identity,
            device_id,
        })
    }
}

#[cfg(feature = "serde")]
impl DeviceAddress {
    fn from_binary(bytes: &[u8]) -> Result<Self, ParseError> {
        let bytes: &[u8; ADDRESS_BINARY_LEN] = bytes.try_into().map_err(|_| ParseError::Length)?;
        let mut identity = [0u8; 32];
        let mut number = [0u8; 4];
        identity.copy_from_slice(&bytes[..32]);
        number.copy_from_slice(&bytes[32..]);
        check_identity(&identity)?;
        Ok(DeviceAddress {
            identity,
            device_id: u32::from_be_bytes(number),
        })
    }
}

macro_rules! hex_id {
    ($ty:ident, $len:literal) => {
        impl fmt::Display for $ty {
            /// Lowercase hex, two digits per byte.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                Hex(&self.0).fmt(f)
            }
        }

        impl FromStr for $ty {
            type Err = ParseError;
            /// Exactly the `Display` form: lowercase hex of the full length.
            fn from_str(s: &str) -> Result<Self, ParseError> {
                parse_hex::<$len>(s).map($ty)
            }
        }

        impl $ty {
            #[cfg(feature = "serde")]
            fn from_binary(bytes: &[u8]) -> Result<Self, ParseError> {
                bytes.try_into().map($ty).map_err(|_| ParseError::Length)
            }
        }
    };
}

hex_id!(MailboxId, 32);
hex_id!(EnvelopeId, 16);
hex_id!(MessageId, 16);

/// The names of an enum's text form; its binary codes are the enum's own
/// (`code` / `from_code`, as the SQLite store keeps them).
trait Named: Sized + Copy + 'static {
    const NAMES: &'static [(&'static str, Self)];
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    fn code_of(self) -> u8;
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    fn from_code_of(code: u8) -> Option<Self>;
}

fn name_of<T: Named + PartialEq>(value: T) -> &'static str {
    T::NAMES
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("", |(name, _)| name)
}

fn by_name<T: Named>(s: &str) -> Result<T, ParseError> {
    T::NAMES
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or(ParseError::Name)
}

#[cfg(feature = "serde")]
fn by_code<T: Named>(code: u64) -> Result<T, ParseError> {
    u8::try_from(code)
        .ok()
        .and_then(T::from_code_of)
        .ok_or(ParseError::Name)
}

macro_rules! named {
    ($ty:ident, [$($name:literal => $value:expr),+ $(,)?]) => {
        impl Named for $ty {
            const NAMES: &'static [(&'static str, Self)] = &[$(($name, $value)),+];
            fn code_of(self) -> u8 {
                self.code()
            }
            fn from_code_of(code: u8) -> Option<Self> {
                $ty::from_code(code)
            }
        }
    };
}

named!(Trust, [
    "unvalidated" => Trust::Unvalidated,
    "validated" => Trust::Validated,
    "compromised" => Trust::Compromised,
]);
named!(Failure, [
    "timed_out" => Failure::TimedOut,
    "compromised" => Failure::Compromised,
    "refused" => Failure::Refused,
]);
named!(DeliveryState, [
    "stored" => DeliveryState::Stored,
    "deposited" => DeliveryState::Deposited,
    "resent" => DeliveryState::Resent,
    "delivered" => DeliveryState::Delivered,
    "failed:timed_out" => DeliveryState::Failed(Failure::TimedOut),
    "failed:compromised" => DeliveryState::Failed(Failure::Compromised),
    "failed:refused" => DeliveryState::Failed(Failure::Refused),
]);

/// The longest name of the enums above ("failed:compromised").
const NAME_MAX: usize = 18;

macro_rules! named_text {
    ($ty:ident, $doc:literal) => {
        impl fmt::Display for $ty {
            #[doc = $doc]
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(name_of(*self))
            }
        }

        impl FromStr for $ty {
            type Err = ParseError;
            /// Exactly one of the names `Display` writes.
            fn from_str(s: &str) -> Result<Self, ParseError> {
                if s.len() > NAME_MAX {
                    return Err(ParseError::TooLong);
                }
                by_name(s)
            }
        }
    };
}

named_text!(Trust, "`unvalidated`, `validated` or `compromised`.");
named_text!(Failure, "`timed_out`, `compromised` or `refused`.");
named_text!(
    DeliveryState,
    "`stored`, `deposited`, `resent`, `delivered` or `failed:` and the failure."
);

#[cfg(feature = "serde")]
mod serde_impls {
    use super::*;

    use alloc::vec::Vec;
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;
    use serde::{Deserialize, Serialize};

    /// A value with a text form and a binary form of at most 36 bytes.
    trait Form: FromStr<Err = ParseError> + fmt::Display + Sized {
        const EXPECTING: &'static str;
        fn from_binary(bytes: &[u8]) -> Result<Self, ParseError>;
    }

    impl Form for DeviceAddress {
        const EXPECTING: &'static str = "a device address";
        fn from_binary(bytes: &[u8]) -> Result<Self, ParseError> {
            DeviceAddress::from_binary(bytes)
        }
    }
    macro_rules! id_form {
        ($ty:ident, $what:literal) => {
            impl Form for $ty {
                const EXPECTING: &'static str = $what;
                fn from_binary(bytes: &[u8]) -> Result<Self, ParseError> {
                    $ty::from_binary(bytes)
                }
            }
            impl Serialize for $ty {
                fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    if s.is_human_readable() {
                        s.collect_str(self)
                    } else {
                        s.serialize_bytes(&self.0)
                    }
                }
            }
            impl<'de> Deserialize<'de> for $ty {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    deserialize_form(d)
                }
            }
        };
    }
    id_form!(MailboxId, "a mailbox id");
    id_form!(EnvelopeId, "an envelope id");
    id_form!(MessageId, "a message id");

    impl Serialize for DeviceAddress {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if s.is_human_readable() {
                s.collect_str(self)
            } else {
                let mut bytes = [0u8; ADDRESS_BINARY_LEN];
                bytes[..32].copy_from_slice(&self.identity);
                bytes[32..].copy_from_slice(&self.device_id.to_be_bytes());
                s.serialize_bytes(&bytes)
            }
        }
    }
    impl<'de> Deserialize<'de> for DeviceAddress {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize_form(d)
        }
    }

    fn deserialize_form<'de, T: Form, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        struct V<T>(core::marker::PhantomData<T>);
        impl<'de, T: Form> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<T, E> {
                T::from_binary(b).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
                // Formats that write bytes as a sequence: read at most the
                // longest binary form (one more byte is an error).
                let mut buf = [0u8; ADDRESS_BINARY_LEN];
                let mut len = 0;
                while let Some(b) = seq.next_element::<u8>()? {
                    let slot = buf
                        .get_mut(len)
                        .ok_or_else(|| de::Error::custom(ParseError::Length))?;
                    *slot = b;
                    len += 1;
                }
                T::from_binary(&buf[..len]).map_err(de::Error::custom)
            }
        }
        let v = V(core::marker::PhantomData);
        if d.is_human_readable() {
            d.deserialize_str(v)
        } else {
            d.deserialize_bytes(v)
        }
    }

    macro_rules! named_serde {
        ($ty:ident, $what:literal) => {
            impl Serialize for $ty {
                fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    if s.is_human_readable() {
                        s.serialize_str(name_of(*self))
                    } else {
                        s.serialize_u8(self.code_of())
                    }
                }
            }
            impl<'de> Deserialize<'de> for $ty {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    struct V;
                    impl<'de> Visitor<'de> for V {
                        type Value = $ty;
                        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                            f.write_str($what)
                        }
                        fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                            s.parse().map_err(E::custom)
                        }
                        fn visit_u64<E: de::Error>(self, c: u64) -> Result<$ty, E> {
                            by_code(c).map_err(E::custom)
                        }
                    }
                    if d.is_human_readable() {
                        d.deserialize_str(V)
                    } else {
                        d.deserialize_u8(V)
                    }
                }
            }
        };
    }
    named_serde!(Trust, "a trust level");
    named_serde!(Failure, "a delivery failure");
    named_serde!(DeliveryState, "a delivery state");

    /// Byte fields: lowercase hex strings (human-readable) or byte strings.
    mod bytes_form {
        use super::*;

        pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
            if s.is_human_readable() {
                s.collect_str(&Hex(bytes))
            } else {
                s.serialize_bytes(bytes)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
                    if s.len() % 2 != 0 {
                        return Err(E::custom(ParseError::Length));
                    }
                    let mut out = alloc::vec![0u8; s.len() / 2];
                    decode_hex_into(s.as_bytes(), &mut out).map_err(E::custom)?;
                    Ok(out)
                }
                fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(b.to_vec())
                }
                fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(b)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                    // Grows with what the input holds, not with its claim.
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                    while let Some(b) = seq.next_element()? {
                        out.push(b);
                    }
                    Ok(out)
                }
            }
            if d.is_human_readable() {
                d.deserialize_str(V)
            } else {
                d.deserialize_byte_buf(V)
            }
        }
    }

    /// A 32-byte key in a list (a contact's earlier identity keys).
    struct Key32([u8; 32]);

    impl Serialize for Key32 {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            bytes_form::serialize(&self.0, s)
        }
    }
    impl<'de> Deserialize<'de> for Key32 {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let bytes = bytes_form::deserialize(d)?;
            bytes
                .try_into()
                .map(Key32)
                .map_err(|_| de::Error::custom(ParseError::Length))
        }
    }

    fn serialize_keys<S: Serializer>(keys: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(keys.iter().map(|k| Key32(*k)))
    }

    // Records: a borrowed twin to serialize, an owned one to deserialize,
    // both derived (so maps and sequences, missing, duplicate and unknown
    // fields are handled by serde).

    #[derive(Serialize)]
    #[serde(rename = "Envelope")]
    struct EnvelopeRef<'a> {
        id: &'a EnvelopeId,
        #[serde(serialize_with = "bytes_form::serialize")]
        payload: &'a [u8],
    }
    #[derive(Deserialize)]
    #[serde(rename = "Envelope", deny_unknown_fields)]
    struct EnvelopeOwned {
        id: EnvelopeId,
        #[serde(deserialize_with = "bytes_form::deserialize")]
        payload: Vec<u8>,
    }
    impl Serialize for Envelope {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            EnvelopeRef {
                id: &self.id,
                payload: &self.payload,
            }
            .serialize(s)
        }
    }
    impl<'de> Deserialize<'de> for Envelope {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let EnvelopeOwned { id, payload } = EnvelopeOwned::deserialize(d)?;
            Ok(Envelope { id, payload })
        }
    }

    #[derive(Serialize)]
    #[serde(rename = "PeerRecord")]
    struct PeerRecordRef<'a> {
        address: &'a DeviceAddress,
        trust: Trust,
        first_seen: u64,
    }
    #[derive(Deserialize)]
    #[serde(rename = "PeerRecord", deny_unknown_fields)]
    struct PeerRecordOwned {
        address: DeviceAddress,
        trust: Trust,
        first_seen: u64,
    }
    impl Serialize for PeerRecord {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            PeerRecordRef {
                address: &self.address,
                trust: self.trust,
                first_seen: self.first_seen,
            }
            .serialize(s)
        }
    }
    impl<'de> Deserialize<'de> for PeerRecord {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let PeerRecordOwned {
                address,
                trust,
                first_seen,
            } = PeerRecordOwned::deserialize(d)?;
            Ok(PeerRecord {
                address,
                trust,
                first_seen,
            })
        }
    }

    #[derive(Serialize)]
    #[serde(rename = "OutboxEntry")]
    struct OutboxEntryRef<'a> {
        to: &'a DeviceAddress,
        envelope: &'a Envelope,
        created: u64,
        message: Option<MessageId>,
    }
    #[derive(Deserialize)]
    #[serde(rename = "OutboxEntry", deny_unknown_fields)]
    struct OutboxEntryOwned {
        to: DeviceAddress,
        envelope: Envelope,
        created: u64,
        message: Option<MessageId>,
    }
    impl Serialize for OutboxEntry {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            OutboxEntryRef {
                to: &self.to,
                envelope: &self.envelope,
                created: self.created,
                message: self.message,
            }
            .serialize(s)
        }
    }
    impl<'de> Deserialize<'de> for OutboxEntry {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let OutboxEntryOwned {
                to,
                envelope,
                created,
                message,
            } = OutboxEntryOwned::deserialize(d)?;
            Ok(OutboxEntry {
                to,
                envelope,
                created,
                message,
            })
        }
    }

    #[derive(Serialize)]
    #[serde(rename = "InboxMessage")]
    struct InboxMessageRef<'a> {
        envelope_id: &'a EnvelopeId,
        from: &'a DeviceAddress,
        #[serde(serialize_with = "bytes_form::serialize")]
        body: &'a [u8],
        received_at: u64,
    }
    #[derive(Deserialize)]
    #[serde(rename = "InboxMessage", deny_unknown_fields)]
    struct InboxMessageOwned {
        envelope_id: EnvelopeId,
        from: DeviceAddress,
        #[serde(deserialize_with = "bytes_form::deserialize")]
        body: Vec<u8>,
        received_at: u64,
    }
    impl Serialize for InboxMessage {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            InboxMessageRef {
                envelope_id: &self.envelope_id,
                from: &self.from,
                body: &self.body,
                received_at: self.received_at,
            }
            .serialize(s)
        }
    }
    impl<'de> Deserialize<'de> for InboxMessage {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let InboxMessageOwned {
                envelope_id,
                from,
                body,
                received_at,
            } = InboxMessageOwned::deserialize(d)?;
            Ok(InboxMessage {
                envelope_id,
                from,
                body,
                received_at,
            })
        }
    }

    #[derive(Serialize)]
    #[serde(rename = "SentMessage")]
    struct SentMessageRef<'a> {
        id: &'a MessageId,
        to: &'a DeviceAddress,
        #[serde(serialize_with = "bytes_form::serialize")]
        body: &'a [u8],
        state: DeliveryState,
        created: u64,
        last_sent: u64,
        sends: u32,
    }
    #[derive(Deserialize)]
    #[serde(rename = "SentMessage", deny_unknown_fields)]
    struct SentMessageOwned {
        id: MessageId,
        to: DeviceAddress,
        #[serde(deserialize_with = "bytes_form::deserialize")]
        body: Vec<u8>,
        state: DeliveryState,
        created: u64,
        last_sent: u64,
        sends: u32,
    }
    impl Serialize for SentMessage {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            SentMessageRef {
                id: &self.id,
                to: &self.to,
                body: &self.body,
                state: self.state,
                created: self.created,
                last_sent: self.last_sent,
                sends: self.sends,
            }
            .serialize(s)
        }
    }
    impl<'de> Deserialize<'de> for SentMessage {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let SentMessageOwned {
                id,
                to,
                body,
                state,
                created,
                last_sent,
                sends,
            } = SentMessageOwned::deserialize(d)?;
            Ok(SentMessage {
                id,
                to,
                body,
                state,
                created,
                last_sent,
                sends,
            })
        }
    }

    #[derive(Serialize)]
    #[serde(rename = "ContactRecord")]
    struct ContactRecordRef<'a> {
        #[serde(serialize_with = "bytes_form::serialize")]
        name: &'a [u8],
        devices: &'a [DeviceAddress],
        #[serde(serialize_with = "serialize_keys")]
        previous: &'a [[u8; 32]],
        changed_at: u64,
    }
    #[derive(Deserialize)]
    #[serde(rename = "ContactRecord", deny_unknown_fields)]
    struct ContactRecordOwned {
        #[serde(deserialize_with = "bytes_form::deserialize")]
        name: Vec<u8>,
        devices: Vec<DeviceAddress>,
        previous: Vec<Key32>,
        changed_at: u64,
    }
    impl Serialize for ContactRecord {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            ContactRecordRef {
                name: &self.name,
                devices: &self.devices,
                previous: &self.previous,
                changed_at: self.changed_at,
            }
            .serialize(s)
        }
    }
    impl<'de> Deserialize<'de> for ContactRecord {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let ContactRecordOwned {
                name,
                devices,
                previous,
                changed_at,
            } = ContactRecordOwned::deserialize(d)?;
            if name.len() > ContactRecord::MAX_NAME
                || devices.len() > ContactRecord::MAX_DEVICES
                || previous.len() > ContactRecord::MAX_PREVIOUS
            {
                return Err(de::Error::custom(ParseError::TooLong));
            }
            Ok(ContactRecord {
                name,
                devices,
                previous: previous.into_iter().map(|k| k.0).collect(),
                changed_at,
            })
        }
    }
}
