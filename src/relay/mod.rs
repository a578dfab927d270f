//! The relay: one implementation of the prekey directory's and the
//! mailbox's rules, over a pluggable storage backend.
//!
//! [`Relay`] is sans-IO like the rest of the crate: every method takes the
//! current time (`now`, unix seconds) and, where it needs randomness, a
//! `&mut impl CryptoRngCore`; it never reads a clock or the OS generator.
//! [`InProcessRelay`] wraps it for use in the same process (tests, demos)
//! and implements [`PrekeyDirectory`](crate::transport::PrekeyDirectory)
//! and [`Mailbox`](crate::transport::Mailbox); a network server calls the
//! same [`Relay`] methods.
//!
//! # The rules
//!
//! The relay is untrusted for confidentiality (it stores only public keys
//! and opaque envelopes), but it must not let one user harm another:
//!
//! - **Publishing** ([`Relay::publish`]) a device's bundle set requires the
//!   upload to be signed by the device's identity key
//!   ([`BundleSetUpload::decode_verified`]: upload signature and signed
//!   prekey signature, strict Ed25519). The device address contains the
//!   identity key, so only its holder can write that device's record. The
//!   upload's counter must be **strictly greater** than the last accepted
//!   one, so an old upload (or the same one again) is refused with
//!   [`TransportError::Replayed`]: nobody can roll back a signed prekey or
//!   re-add one-time prekeys that were already handed out. A client that
//!   lost the answer to an upload must therefore not resend the same bytes:
//!   it re-signs with a higher counter (typically replacing the pool).
//!   An upload either replaces the device's pool of one-time prekeys or adds
//!   to it (an id already in the pool gets the new key); if the resulting
//!   pool would exceed [`RelayConfig::max_one_time_prekeys`] the whole
//!   upload is refused with [`TransportError::LimitExceeded`]
//!   ([`reason::ONE_TIME_PREKEYS`]) and nothing changes (no silent
//!   trimming: the device keeps exactly the private keys the relay can hand
//!   out, and can replace the pool instead). Duplicate one-time prekey ids
//!   within one upload are a [`TransportError::BadRequest`].
//! - **Fetching a bundle** ([`Relay::fetch_bundle`]) needs no identity and
//!   claims at most one one-time prekey (the oldest in the pool), which is
//!   deleted when claimed, so it is handed out once. Claims from one device
//!   are limited by a budget kept with the device (a burst of
//!   [`RelayConfig::claims_per_device_burst`], refilled at
//!   [`RelayConfig::claims_per_device_per_hour`]), whoever asks: once it is
//!   spent, bundles are served without a one-time prekey, so nobody can
//!   empty a device's pool faster than that. A device without a record is
//!   [`TransportError::NotFound`] (also for
//!   [`Relay::one_time_prekeys_left`]).
//! - **Depositing** ([`Relay::deposit`]) needs no identity: senders stay
//!   anonymous to the relay as far as the wire format allows. It is
//!   idempotent by envelope id: a repeat of an id still pending, or
//!   acknowledged within the retention period, is accepted and not stored
//!   again (the first payload is kept). With
//!   [`RelayConfig::require_published_mailbox`] (the default), a deposit to
//!   a mailbox whose device never published is [`TransportError::NotFound`],
//!   so storage cannot be spread over made-up mailboxes.
//! - **Fetching and acknowledging** a mailbox ([`Relay::fetch`],
//!   [`Relay::acknowledge`]) require a [`MailboxAuth`] for that operation:
//!   its op must match the method, its signature must verify under the
//!   identity key of the mailbox's owner (the mailbox is derived from the
//!   owner's address), and its challenge must have been issued by
//!   [`Relay::challenge`] for that mailbox, be unexpired, and is consumed
//!   (single use). Challenges are stateless: each carries its issue time
//!   and a tag made with the relay's key ([`RelayKey`], kept in the
//!   storage), which the relay recomputes; only a challenge used by a
//!   valid proof is recorded, until it expires. Issuing a challenge writes
//!   nothing, so requesting challenges cannot evict anyone's. Any failure
//!   is [`TransportError::Unauthorized`]; a proof that fails before the
//!   challenge check does not consume the challenge.
//!   Acknowledging deletes the envelopes (unknown ids are ignored) and
//!   remembers their ids until they would have expired, for idempotent
//!   redeposits. The relay never parses an envelope's payload.
//! - **Device lists** ([`Relay::publish_device_list`],
//!   [`Relay::fetch_device_lists`], SPEC.md 25.12): the relay keeps per
//!   account the chain of signed device lists, the newest
//!   [`DEVICE_LIST_RETENTION`] versions. An upload for an account without
//!   a stored list must pass `verify_genesis`; one whose version is the
//!   newest stored + 1 must pass `verify_successor` against the newest
//!   stored list (so only a device listed in it can sign, and every added
//!   device must countersign: a stranger can neither add nor remove a
//!   device). The check of the head and the insert are one storage call
//!   ([`RelayStorage::append_device_list`]), so no race forks the chain.
//!   The version is the upload counter: an upload of a version the relay
//!   holds with the same body is accepted and changes nothing (a retry
//!   after a lost answer is not an error); with another body it is
//!   [`TransportError::Conflict`] if it is authentic (it passes the checks
//!   against the version before it), else that check's error; an older
//!   version no longer held is [`TransportError::Replayed`] (`stale`).
//!   Fetching needs no identity. The relay trusts the signatures of the
//!   lists it stored, so a request verifies at most one list's signatures.
//!
//! # Bounds
//!
//! Every bound is a field of [`RelayConfig`] (default after the colon):
//!
//! - envelope payload size: 256 KiB ([`reason::ENVELOPE_SIZE`]);
//! - pending envelopes per mailbox: 10 000
//!   ([`reason::PENDING_ENVELOPES`]); pending payload bytes per mailbox:
//!   64 MiB ([`reason::PENDING_BYTES`]);
//! - one-time prekeys per device: 1 000 ([`reason::ONE_TIME_PREKEYS`]);
//! - retention: 30 days. An envelope older than it (`now - received >
//!   retention`) is expired: never returned by a fetch, not counted against
//!   the mailbox's bounds at the next deposit, deleted by [`Relay::sweep`];
//! - challenge lifetime: 300 s;
//! - one-time-prekey claims per device: a burst of 20, then 60 per hour
//!   (further bundles come without a one-time prekey);
//! - envelopes per fetch: 1 000, payload bytes per fetch: 8 MiB; ids per
//!   acknowledgment: 1 000 ([`reason::ACKNOWLEDGE_IDS`]).
//!
//! These bound each device and mailbox; they do not bound the relay's total
//! storage or work. Anonymous requests (deposits, bundle fetches,
//! challenges) are for the network server in front of the relay to
//! rate-limit per client.

pub mod conformance;
mod in_process;
mod memory;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::HashSet;
use std::fmt;
use std::string::String;
use std::vec::Vec;

use hmac::{Hmac, Mac};
use rand_core::CryptoRngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub use in_process::{Clock, InProcessRelay};
pub use memory::MemoryRelayStorage;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteRelayStorage;

use crate::protocol::bundle::BUNDLE_LEN_WITH_OPK;
use crate::protocol::devices::{AccountId, DeviceList, DeviceListError};
use crate::protocol::wire::VERSION;
use crate::transport::stamp::Stamp;
use crate::transport::{
    AccessVerifier, BundleSetUpload, DepositPass, DeviceAddress, Envelope, EnvelopeId, MailboxAuth,
    MailboxId, MailboxOp, SignedPrekeyRecord, TransportError, DEVICE_LIST_RETENTION,
};

/// The reasons carried by [`TransportError::LimitExceeded`] from a relay.
pub mod reason {
    /// An envelope's payload is empty (no wire message is: nothing to
    /// store).
    pub const EMPTY_PAYLOAD: &str = "empty payload";
    /// An envelope's payload is larger than
    /// [`RelayConfig::max_envelope_bytes`](super::RelayConfig::max_envelope_bytes).
    pub const ENVELOPE_SIZE: &str = "envelope size";
    /// The mailbox holds
    /// [`RelayConfig::max_pending_envelopes`](super::RelayConfig::max_pending_envelopes)
    /// envelopes.
    pub const PENDING_ENVELOPES: &str = "pending envelopes per mailbox";
    /// The envelope would take the mailbox over
    /// [`RelayConfig::max_pending_bytes`](super::RelayConfig::max_pending_bytes).
    pub const PENDING_BYTES: &str = "pending bytes per mailbox";
    /// The upload would leave the device with more than
    /// [`RelayConfig::max_one_time_prekeys`](super::RelayConfig::max_one_time_prekeys).
    pub const ONE_TIME_PREKEYS: &str = "one-time prekeys per device";
    /// An acknowledgment lists more than
    /// [`RelayConfig::max_acknowledge_ids`](super::RelayConfig::max_acknowledge_ids).
    pub const ACKNOWLEDGE_IDS: &str = "ids per acknowledgment";
    /// The mailbox's strangers' share holds
    /// [`RelayConfig::max_stranger_envelopes`](super::RelayConfig::max_stranger_envelopes).
    pub const STRANGER_ENVELOPES: &str = "strangers' envelopes per mailbox";
    /// The envelope would take the mailbox's strangers' share over
    /// [`RelayConfig::max_stranger_bytes`](super::RelayConfig::max_stranger_bytes).
    pub const STRANGER_BYTES: &str = "strangers' bytes per mailbox";
    /// The mailbox's owner has not been seen for
    /// [`RelayConfig::stranger_idle`](super::RelayConfig::stranger_idle):
    /// its strangers' share takes nothing.
    pub const STRANGERS_CLOSED: &str = "strangers' share closed";
}

/// The reasons carried by [`TransportError::BadRequest`] when the relay
/// refuses a device list ([`Relay::publish_device_list`]), one per SPEC.md
/// 25.6 kind that maps to a bad request.
pub mod device_list_reason {
    /// `malformed`: the bytes are not a signed device list (SPEC.md 25.4).
    pub const MALFORMED: &str = "device list: malformed";
    /// `not_genesis`: the account has no list and this is not a first
    /// version.
    pub const NOT_GENESIS: &str = "device list: not a first version";
    /// `wrong_account`: the account id is not the founder's.
    pub const WRONG_ACCOUNT: &str = "device list: wrong account";
    /// `gap`: the version is above the newest stored version + 1.
    pub const GAP: &str = "device list: gap";
    /// `device_id_changed`: a kept device changed its number.
    pub const DEVICE_ID_CHANGED: &str = "device list: device id changed";
    /// `device_id_reused`: an added device took a number of the previous
    /// version.
    pub const DEVICE_ID_REUSED: &str = "device list: device id reused";
}

/// The transport error for a device-list refusal (SPEC.md 25.12): `stale`
/// is [`TransportError::Replayed`], `conflict` [`TransportError::Conflict`],
/// `bad_signature` and `unauthorized` [`TransportError::Unauthorized`], the
/// other kinds [`TransportError::BadRequest`] with a
/// [`device_list_reason`].
pub fn device_list_error(error: &DeviceListError) -> TransportError {
    use device_list_reason as r;
    match error {
        DeviceListError::Stale => TransportError::Replayed,
        DeviceListError::Conflict { .. } => TransportError::Conflict,
        DeviceListError::BadSignature | DeviceListError::Unauthorized => {
            TransportError::Unauthorized
        }
        DeviceListError::NotGenesis => TransportError::BadRequest(r::NOT_GENESIS),
        DeviceListError::WrongAccount => TransportError::BadRequest(r::WRONG_ACCOUNT),
        DeviceListError::Gap => TransportError::BadRequest(r::GAP),
        DeviceListError::DeviceIdChanged => TransportError::BadRequest(r::DEVICE_ID_CHANGED),
        DeviceListError::DeviceIdReused => TransportError::BadRequest(r::DEVICE_ID_REUSED),
        _ => TransportError::BadRequest(r::MALFORMED),
    }
}

/// The relay's bounds. Every field is public; [`Default`] gives the values
/// documented on each field (and in the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Largest envelope payload accepted, in bytes (the envelope id is not
    /// counted). Default 256 KiB (262 144).
    pub max_envelope_bytes: u32,
    /// Most envelopes pending in one mailbox. Default 10 000.
    pub max_pending_envelopes: u32,
    /// Most payload bytes pending in one mailbox. Default 64 MiB.
    pub max_pending_bytes: u64,
    /// Most one-time prekeys in one device's pool. Default 1 000.
    pub max_one_time_prekeys: u32,
    /// How long an envelope is kept, in seconds: it expires once
    /// `now - received > retention`. Acknowledged ids are remembered as
    /// long (for idempotent redeposits). Default 30 days (2 592 000).
    pub retention: u64,
    /// How long a challenge stays valid, in seconds: it is refused once
    /// `now - issued > challenge_ttl`. Default 300.
    pub challenge_ttl: u64,
    /// Most one-time prekeys claimed from one device at once (the claim
    /// budget's burst, SPEC.md 16.2): once a device's budget is spent, its
    /// bundles are served without a one-time prekey until the budget
    /// refills at [`Self::claims_per_device_per_hour`]. Default 20 (0 acts
    /// as 1).
    pub claims_per_device_burst: u32,
    /// How fast a device's claim budget refills, in claims per hour (one
    /// every `3600 / rate` seconds). 0 turns the budget off (every fetch
    /// claims a one-time prekey while any is left). Default 60.
    pub claims_per_device_per_hour: u32,
    /// Most envelopes returned by one fetch (the caller's limit is capped
    /// to it). Default 1 000.
    pub max_fetch_envelopes: u32,
    /// Most payload bytes returned by one fetch: the batch stops before the
    /// envelope that would exceed it, but always holds at least one
    /// envelope if any is pending. Default 8 MiB.
    pub max_fetch_bytes: u64,
    /// Most ids in one acknowledgment. Default 1 000.
    pub max_acknowledge_ids: u32,
    /// Refuse deposits and challenges for mailboxes of devices that never
    /// published ([`TransportError::NotFound`]). Default `true`.
    pub require_published_mailbox: bool,
    /// The difficulty of the stamp a deposit without a valid access key
    /// needs (SPEC.md 16.11: `difficulty + ceil(log2(4 KiB blocks))`
    /// leading zero bits). 0 asks no stamp (such deposits still go to the
    /// strangers' share). Default 20 (about 10^6 SHA-256 per 4 KiB).
    pub deposit_stamp_difficulty: u8,
    /// The difficulty of the identity stamp a device's first upload needs
    /// (SPEC.md 16.11). 0 asks none. Default 24.
    pub identity_stamp_difficulty: u8,
    /// Most envelopes pending in a mailbox's strangers' share (deposits
    /// admitted by a stamp, not an access key). Default 100.
    pub max_stranger_envelopes: u32,
    /// Most payload bytes pending in a mailbox's strangers' share.
    /// Default 1 MiB.
    pub max_stranger_bytes: u64,
    /// The strangers' share of a mailbox whose owner has not been seen
    /// (published or fetched) for this long, in seconds, is closed:
    /// stamped deposits are refused ([`reason::STRANGERS_CLOSED`]).
    /// Default 7 days.
    pub stranger_idle: u64,
    /// A mailbox whose owner has not been seen for this long, in seconds,
    /// is inactive: its envelopes expire after
    /// [`Self::inactive_retention`] instead of [`Self::retention`].
    /// Default 30 days.
    pub inactive_after: u64,
    /// The retention of an inactive mailbox's envelopes, in seconds.
    /// Default 7 days.
    pub inactive_retention: u64,
    /// A device whose owner has not been seen for this long, in seconds,
    /// is deleted by [`Relay::sweep`] with its prekeys and mailbox.
    /// Default 90 days.
    pub directory_idle: u64,
    /// After a rotation of a mailbox's access key, the previous key is
    /// still accepted for this long, in seconds. Default 1 day.
    pub access_grace: u64,
}

impl RelayConfig {
    /// Default [`Self::max_envelope_bytes`]: 256 KiB.
    pub const DEFAULT_MAX_ENVELOPE_BYTES: u32 = 256 * 1024;
    /// Default [`Self::max_pending_envelopes`]: 10 000.
    pub const DEFAULT_MAX_PENDING_ENVELOPES: u32 = 10_000;
    /// Default [`Self::max_pending_bytes`]: 64 MiB.
    pub const DEFAULT_MAX_PENDING_BYTES: u64 = 64 * 1024 * 1024;
    /// Default [`Self::max_one_time_prekeys`]: 1 000.
    pub const DEFAULT_MAX_ONE_TIME_PREKEYS: u32 = 1_000;
    /// Default [`Self::retention`]: 30 days.
    pub const DEFAULT_RETENTION: u64 = 30 * 24 * 60 * 60;
    /// Default [`Self::challenge_ttl`]: 300 seconds.
    pub const DEFAULT_CHALLENGE_TTL: u64 = 300;
    /// Default [`Self::claims_per_device_burst`]: 20.
    pub const DEFAULT_CLAIMS_PER_DEVICE_BURST: u32 = 20;
    /// Default [`Self::claims_per_device_per_hour`]: 60.
    pub const DEFAULT_CLAIMS_PER_DEVICE_PER_HOUR: u32 = 60;
    /// Default [`Self::max_fetch_envelopes`]: 1 000.
    pub const DEFAULT_MAX_FETCH_ENVELOPES: u32 = 1_000;
    /// Default [`Self::max_fetch_bytes`]: 8 MiB.
    pub const DEFAULT_MAX_FETCH_BYTES: u64 = 8 * 1024 * 1024;
    /// Default [`Self::max_acknowledge_ids`]: 1 000.
    pub const DEFAULT_MAX_ACKNOWLEDGE_IDS: u32 = 1_000;
    /// Default [`Self::deposit_stamp_difficulty`]: 20.
    pub const DEFAULT_DEPOSIT_STAMP_DIFFICULTY: u8 = 20;
    /// Default [`Self::identity_stamp_difficulty`]: 24.
    pub const DEFAULT_IDENTITY_STAMP_DIFFICULTY: u8 = 24;
    /// Default [`Self::max_stranger_envelopes`]: 100.
    pub const DEFAULT_MAX_STRANGER_ENVELOPES: u32 = 100;
    /// Default [`Self::max_stranger_bytes`]: 1 MiB.
    pub const DEFAULT_MAX_STRANGER_BYTES: u64 = 1024 * 1024;
    /// Default [`Self::stranger_idle`]: 7 days.
    pub const DEFAULT_STRANGER_IDLE: u64 = 7 * 24 * 60 * 60;
    /// Default [`Self::inactive_after`]: 30 days.
    pub const DEFAULT_INACTIVE_AFTER: u64 = 30 * 24 * 60 * 60;
    /// Default [`Self::inactive_retention`]: 7 days.
    pub const DEFAULT_INACTIVE_RETENTION: u64 = 7 * 24 * 60 * 60;
    /// Default [`Self::directory_idle`]: 90 days.
    pub const DEFAULT_DIRECTORY_IDLE: u64 = 90 * 24 * 60 * 60;
    /// Default [`Self::access_grace`]: 1 day.
    pub const DEFAULT_ACCESS_GRACE: u64 = 24 * 60 * 60;

    /// The defaults, but asking no stamps (both difficulties 0): for tests
    /// and embedded relays whose callers are known; never for a relay that
    /// strangers reach (a stamp of difficulty 20 costs about 0.06 s of CPU,
    /// an identity stamp about 1 s: that price, with the small
    /// strangers' share, is what keeps them from filling mailboxes). The
    /// shares and every other bound stay.
    pub fn unpriced() -> Self {
        RelayConfig {
            deposit_stamp_difficulty: 0,
            identity_stamp_difficulty: 0,
            ..RelayConfig::default()
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            max_envelope_bytes: Self::DEFAULT_MAX_ENVELOPE_BYTES,
            max_pending_envelopes: Self::DEFAULT_MAX_PENDING_ENVELOPES,
            max_pending_bytes: Self::DEFAULT_MAX_PENDING_BYTES,
            max_one_time_prekeys: Self::DEFAULT_MAX_ONE_TIME_PREKEYS,
            retention: Self::DEFAULT_RETENTION,
            challenge_ttl: Self::DEFAULT_CHALLENGE_TTL,
            claims_per_device_burst: Self::DEFAULT_CLAIMS_PER_DEVICE_BURST,
            claims_per_device_per_hour: Self::DEFAULT_CLAIMS_PER_DEVICE_PER_HOUR,
            max_fetch_envelopes: Self::DEFAULT_MAX_FETCH_ENVELOPES,
            max_fetch_bytes: Self::DEFAULT_MAX_FETCH_BYTES,
            max_acknowledge_ids: Self::DEFAULT_MAX_ACKNOWLEDGE_IDS,
            require_published_mailbox: true,
            deposit_stamp_difficulty: Self::DEFAULT_DEPOSIT_STAMP_DIFFICULTY,
            identity_stamp_difficulty: Self::DEFAULT_IDENTITY_STAMP_DIFFICULTY,
            max_stranger_envelopes: Self::DEFAULT_MAX_STRANGER_ENVELOPES,
            max_stranger_bytes: Self::DEFAULT_MAX_STRANGER_BYTES,
            stranger_idle: Self::DEFAULT_STRANGER_IDLE,
            inactive_after: Self::DEFAULT_INACTIVE_AFTER,
            inactive_retention: Self::DEFAULT_INACTIVE_RETENTION,
            directory_idle: Self::DEFAULT_DIRECTORY_IDLE,
            access_grace: Self::DEFAULT_ACCESS_GRACE,
        }
    }
}

/// What the relay keeps of a device (besides its one-time prekey pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device (its address holds its identity key).
    pub device: DeviceAddress,
    /// Counter of the last accepted upload.
    pub counter: u64,
    /// The current signed prekey.
    pub signed_prekey: SignedPrekeyRecord,
    /// When the last upload was accepted (unix seconds).
    pub published_at: u64,
    /// The verifier of the mailbox's current deposit access key (SPEC.md
    /// 16.6), if an upload registered one.
    pub access: Option<AccessVerifier>,
    /// The verifier it replaced, if any.
    pub previous_access: Option<AccessVerifier>,
    /// When `access` was registered (unix seconds; 0 if never).
    pub access_changed_at: u64,
    /// When the owner was last seen: its last accepted upload or valid
    /// mailbox proof (unix seconds).
    pub owner_seen_at: u64,
}

/// What [`RelayStorage::apply_upload`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadOutcome {
    /// The record and pool were written.
    Applied,
    /// The counter was not above the stored one; nothing was written.
    Replayed,
    /// The pool would exceed the bound; nothing was written.
    TooManyOneTimePrekeys,
}

/// Which part of a mailbox an envelope is stored in (SPEC.md 16.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Share {
    /// Deposits that showed the mailbox's access key.
    Contacts,
    /// Deposits admitted by a stamp (or, at difficulty 0, by nothing).
    Strangers,
}

/// The bounds [`RelayStorage::insert_envelope`] enforces, atomically with
/// the insert. Each share is bounded on its own: an envelope counts only
/// against the bounds of its share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Most envelopes pending in the mailbox's contacts' share after the
    /// insert.
    pub max_envelopes: u32,
    /// Most payload bytes pending in the contacts' share after the insert.
    pub max_bytes: u64,
    /// Most envelopes pending in the strangers' share after the insert.
    pub max_stranger_envelopes: u32,
    /// Most payload bytes pending in the strangers' share after the insert.
    pub max_stranger_bytes: u64,
    /// Envelopes (and acknowledged ids) of this mailbox received before
    /// this time are expired: delete them first.
    pub expire_before: u64,
}

/// What [`RelayStorage::insert_envelope`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The envelope was stored.
    Stored,
    /// An envelope with that id is pending or was acknowledged; nothing
    /// was written.
    Duplicate,
    /// The envelope's share holds its maximum number of envelopes;
    /// nothing was written.
    TooManyEnvelopes,
    /// The envelope would take its share over its byte bound; nothing was
    /// written.
    TooManyBytes,
}

/// How much a mailbox holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailboxUsage {
    /// Pending envelopes (both shares).
    pub envelopes: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Of those, the envelopes in the strangers' share.
    pub stranger_envelopes: u64,
    /// Their payload bytes.
    pub stranger_bytes: u64,
}

/// What [`Relay::sweep`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Pending envelopes past the retention period.
    pub envelopes_expired: u64,
    /// Records of used challenges past their lifetime.
    pub challenges_expired: u64,
    /// Envelopes of inactive mailboxes past the shorter retention
    /// ([`RelayConfig::inactive_retention`]).
    pub inactive_expired: u64,
    /// Devices deleted because their owner was not seen for
    /// [`RelayConfig::directory_idle`].
    pub devices_expired: u64,
}

/// The relay's secret key (SPEC.md 16.4): it authenticates the challenges
/// the relay issues, so that it can check them without storing them. One
/// per relay storage, created at the first challenge
/// ([`RelayStorage::relay_key`]) and shared by every relay over that
/// storage. Wiped when dropped; its `Debug` shows nothing of it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct RelayKey([u8; 32]);

/// Compared in constant time: a secret is never compared with `==` on its
/// bytes.
impl PartialEq for RelayKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0[..].ct_eq(&other.0[..]))
    }
}

impl Eq for RelayKey {}

impl RelayKey {
    /// The key from its bytes (as a storage keeps them).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        RelayKey(bytes)
    }

    /// A fresh random key.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut key = RelayKey([0; 32]);
        rng.fill_bytes(&mut key.0);
        key
    }

    /// The key's bytes (for a storage to keep them).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelayKey(..)")
    }
}

/// A device's one-time-prekey claim budget (SPEC.md 16.2), as a generic
/// cell rate: each device has a stored *claim time* (milliseconds, 0 for a
/// device never claimed from), the time at which its budget would be full
/// again. [`RelayStorage::claim_one_time_prekey`] passes the stored value to
/// [`ClaimBudget::admit`] and, if a prekey is claimed, stores what it
/// returns, in the same transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimBudget {
    /// The current time, in milliseconds.
    pub now_ms: u64,
    /// Milliseconds per claim at the sustained rate.
    pub interval_ms: u64,
    /// How far the claim time may run ahead of `now_ms`: `interval_ms *
    /// (burst - 1)`.
    pub tolerance_ms: u64,
}

impl ClaimBudget {
    /// The budget of [`RelayConfig`] at `now` (unix seconds), `None` if the
    /// config turns it off (`claims_per_device_per_hour` 0).
    pub fn new(config: &RelayConfig, now: u64) -> Option<Self> {
        let per_hour = u64::from(config.claims_per_device_per_hour);
        if per_hour == 0 {
            return None;
        }
        let interval_ms = (3_600_000 / per_hour).max(1);
        let burst = u64::from(config.claims_per_device_burst.max(1));
        Some(ClaimBudget {
            now_ms: now.saturating_mul(1000),
            interval_ms,
            tolerance_ms: interval_ms.saturating_mul(burst - 1),
        })
    }

    /// Whether a device whose stored claim time is `claimed_until` may
    /// claim now: `Some(new claim time)` if so, `None` if its budget is
    /// spent.
    pub fn admit(&self, claimed_until: u64) -> Option<u64> {
        let from = claimed_until.max(self.now_ms);
        if from - self.now_ms > self.tolerance_ms {
            return None;
        }
        Some(from.saturating_add(self.interval_ms))
    }
}

/// What [`RelayStorage::claim_one_time_prekey`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This one-time prekey (id, public key) was removed from the pool and
    /// the device's claim time advanced.
    Claimed(u32, [u8; 32]),
    /// The pool is empty (or the device has no record); nothing written.
    Empty,
    /// The device's claim budget is spent; nothing written.
    Limited,
}

/// A stored version of an account's device list (SPEC.md 25.12): what
/// [`RelayStorage::append_device_list`] keeps and the device-list reads
/// return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDeviceList {
    /// The list's version (>= 1).
    pub version: u64,
    /// `list_hash(body)` (SPEC.md 25.3).
    pub body_hash: [u8; 32],
    /// The signed list, as uploaded.
    pub signed: Vec<u8>,
}

/// What [`RelayStorage::append_device_list`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The version was stored (and versions beyond the retention dropped).
    Appended,
    /// The account's newest stored version was not the one the caller
    /// checked the list against (another upload came first); nothing was
    /// written.
    HeadMoved,
}

/// A relay storage failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum RelayStorageError {
    /// The schema is newer than this code understands.
    UnsupportedSchema(u32),
    /// The database is not a relay database (or is damaged).
    Corrupted(String),
    /// The backend failed (I/O, locking, ...).
    Backend(String),
}

impl fmt::Display for RelayStorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayStorageError::UnsupportedSchema(v) => {
                write!(f, "unsupported relay schema version {v}")
            }
            RelayStorageError::Corrupted(why) => write!(f, "corrupted relay storage: {why}"),
            RelayStorageError::Backend(e) => write!(f, "relay storage backend: {e}"),
        }
    }
}

impl std::error::Error for RelayStorageError {}

/// Where a relay keeps its state. Synchronous and backend-agnostic; the
/// [`Relay`] applies the rules, the storage applies each write atomically
/// (methods that check a condition and write do both in one transaction,
/// so that several relay processes can share one database).
///
/// Times are unix seconds. "Oldest" means first inserted.
///
/// # Contract
///
/// Each method's docs state what it must do; in addition:
///
/// - **Atomicity.** Every call applies all of its writes or none: a call
///   that returns an error wrote nothing, and so did a call whose outcome
///   says so ([`UploadOutcome::Replayed`],
///   [`UploadOutcome::TooManyOneTimePrekeys`],
///   [`InsertOutcome::Duplicate`], [`InsertOutcome::TooManyEnvelopes`],
///   [`InsertOutcome::TooManyBytes`]). A batch
///   ([`RelayStorage::insert_envelopes`]) that returns an error stored none
///   of its envelopes, and a group whose [`RelayStorage::commit_group`]
///   failed stored none of its writes. A write that returned `Ok` is
///   durable for a storage that claims durability.
/// - **Isolation.** Several relays sharing one backend see each call as
///   if alone: a one-time prekey is claimed once and a challenge consumed
///   once whoever asks, and the mailbox bounds hold under concurrent
///   inserts.
/// - **Order.** Pools and mailboxes keep insertion order: the "oldest"
///   one-time prekey or envelope is the first inserted, whatever its id.
/// - **Values.** Counters and signed-prekey creation times round trip bit
///   for bit over the whole `u64` range and counters compare as `u64`.
///   Times the storage compares (receipt, expiry, `published_at`) are exact
///   up to `i64::MAX`; a backend with signed integers may clamp later times
///   to `i64::MAX`.
/// - **Scope.** Envelope ids, acknowledged ids and challenges belong to
///   one mailbox: the same id or challenge in another mailbox is another
///   one.
///
/// [`conformance`] checks all of this that a single caller can observe
/// through the trait (every outcome, order, bound, expiry, the single use
/// of prekeys and challenges, groups); failures halfway, durability and
/// concurrency need fault injection of the implementor's own (see that
/// module's docs).
pub trait RelayStorage {
    /// A device's record (`None` if it never had an upload applied).
    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError>;

    /// Whether a device whose [`DeviceAddress::mailbox`] is `mailbox` has a
    /// record.
    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError>;

    /// The record of the device whose [`DeviceAddress::mailbox`] is
    /// `mailbox` (`None` if none has one).
    fn mailbox_owner(&self, mailbox: &MailboxId)
        -> Result<Option<DeviceRecord>, RelayStorageError>;

    /// Atomically: unless the device has a record with a counter at or
    /// above `upload.counter` ([`UploadOutcome::Replayed`]), writes the
    /// record (counter, signed prekey, `published_at`, and
    /// `owner_seen_at` = `published_at`) and replaces
    /// (`upload.replace_one_time_prekeys`) or extends the pool with
    /// `upload.one_time_prekeys` (an id already pooled keeps its place and
    /// takes the new key; new ids go to the back); if the pool would then
    /// hold more than `max_one_time_prekeys`, writes nothing
    /// ([`UploadOutcome::TooManyOneTimePrekeys`]). If the upload carries
    /// an access verifier other than the record's `access` (or the device
    /// has no record), the record's `access` becomes `previous_access` and
    /// the upload's verifier becomes `access`, with `access_changed_at` =
    /// `published_at`; an upload without a verifier (or with the same one)
    /// keeps the three fields. The upload's signatures were checked by the
    /// caller and its ids are distinct.
    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError>;

    /// Atomically: reads the device's claim time (0 if it was never
    /// claimed from); if `budget` is `Some` and [`ClaimBudget::admit`]
    /// refuses it, writes nothing and returns [`ClaimOutcome::Limited`];
    /// else removes and returns the device's oldest one-time prekey and,
    /// with a budget, stores the claim time `admit` returned
    /// ([`ClaimOutcome::Claimed`]), or, if its pool is empty or it has no
    /// record, writes nothing ([`ClaimOutcome::Empty`]). No key is ever
    /// returned twice, and concurrent claims see each other's claim times.
    /// The claim time is kept with the device (durably, for a durable
    /// storage): an upload does not change it.
    fn claim_one_time_prekey(
        &mut self,
        device: &DeviceAddress,
        budget: Option<ClaimBudget>,
    ) -> Result<ClaimOutcome, RelayStorageError>;

    /// How many one-time prekeys the device's pool holds (0 for a device
    /// without a record).
    fn one_time_prekey_count(&self, device: &DeviceAddress) -> Result<u32, RelayStorageError>;

    /// Atomically: deletes the mailbox's envelopes and acknowledged ids
    /// received before `limits.expire_before`; then, if the envelope's id
    /// is pending or acknowledged in the mailbox (in either share), returns
    /// [`InsertOutcome::Duplicate`]; else, if the bounds of `share` allow
    /// it (counting only the mailbox's envelopes of that share), stores
    /// the envelope with its share and receipt time.
    fn insert_envelope(
        &mut self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError>;

    /// Deposits a batch, each envelope checked as by
    /// [`RelayStorage::insert_envelope`] in order (so an id repeated in the
    /// batch is a [`InsertOutcome::Duplicate`] and earlier envelopes of the
    /// batch count against the bounds), and all committed together (group
    /// commit: one durable write for the batch). Returns one outcome per
    /// envelope, in order. On error none is stored. The default runs them
    /// one by one.
    fn insert_envelopes(
        &mut self,
        batch: &[(MailboxId, Envelope, Share)],
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<Vec<InsertOutcome>, RelayStorageError> {
        batch
            .iter()
            .map(|(mailbox, envelope, share)| {
                self.insert_envelope(mailbox, envelope, *share, received_at, limits)
            })
            .collect()
    }

    /// The mailbox's pending envelopes received at or after
    /// `received_since`, oldest first: at most `limit`, stopping before the
    /// envelope that would take the payload total over `max_bytes` (the
    /// first is always included). Whole envelopes, as inserted; deletes
    /// nothing.
    fn list_envelopes(
        &self,
        mailbox: &MailboxId,
        received_since: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>, RelayStorageError>;

    /// How many envelopes and payload bytes the mailbox holds (expired but
    /// not yet swept ones included).
    fn mailbox_usage(&self, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError>;

    /// Deletes the mailbox's pending envelopes with these ids and remembers
    /// the ids (with their receipt time) as acknowledged. Unknown ids (and
    /// ids pending in another mailbox, or already acknowledged) are
    /// ignored. Returns how many were deleted (an id listed twice counts
    /// once).
    fn acknowledge_envelopes(
        &mut self,
        mailbox: &MailboxId,
        ids: &[EnvelopeId],
    ) -> Result<u64, RelayStorageError>;

    /// Deletes every envelope and acknowledged id received before
    /// `received_before`. Returns how many pending envelopes were deleted.
    fn expire_envelopes(&mut self, received_before: u64) -> Result<u64, RelayStorageError>;

    /// Deletes the envelopes and acknowledged ids received before
    /// `received_before` of every mailbox whose owner's record has
    /// `owner_seen_at < seen_before` (inactive mailboxes). Returns how many
    /// pending envelopes were deleted.
    fn expire_inactive(
        &mut self,
        seen_before: u64,
        received_before: u64,
    ) -> Result<u64, RelayStorageError>;

    /// Deletes every device whose record has `owner_seen_at <
    /// seen_before`: its record, one-time prekeys and claim time, and its
    /// mailbox's envelopes, acknowledged ids and used challenges. Returns
    /// how many devices were deleted.
    fn expire_devices(&mut self, seen_before: u64) -> Result<u64, RelayStorageError>;

    /// Opens a group: until [`RelayStorage::commit_group`], every call's
    /// writes are kept together and made durable by that one commit (the
    /// relay server runs each turn of calls as a group: one durable write
    /// per turn instead of one per call). Each call stays atomic on its
    /// own inside the group (a call that fails writes nothing), and reads
    /// see the group's writes. The caller answers none of the group's
    /// calls before the commit succeeds.
    ///
    /// The default does nothing: every call keeps committing on its own,
    /// which satisfies the same contract.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] if the group cannot be opened (then
    /// no group is open and calls commit on their own).
    fn begin_group(&mut self) -> Result<(), RelayStorageError> {
        Ok(())
    }

    /// Commits the group opened by [`RelayStorage::begin_group`].
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] if the commit failed: then none of
    /// the group's writes is stored, and the group is closed.
    fn commit_group(&mut self) -> Result<(), RelayStorageError> {
        Ok(())
    }

    /// The newest stored version of the account's device list (`None` if
    /// it has none).
    fn device_list_head(
        &self,
        account: &AccountId,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError>;

    /// The stored version `version` of the account's device list (`None`
    /// if it was never stored or no longer is).
    fn device_list_version(
        &self,
        account: &AccountId,
        version: u64,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError>;

    /// The account's stored versions above `after`, oldest first, at most
    /// `limit` (the oldest of them).
    fn device_lists_after(
        &self,
        account: &AccountId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredDeviceList>, RelayStorageError>;

    /// Atomically (one transaction, so that no concurrent call can fork the
    /// chain): if `list.version` is 1, the account must have no stored
    /// version; otherwise its newest stored version must be
    /// `list.version - 1` with body hash `previous`. If so, stores `list`
    /// and deletes the account's versions at or below `list.version -
    /// retain` (keeping the newest `retain`, at least 1) and returns
    /// [`AppendOutcome::Appended`]; else writes nothing and returns
    /// [`AppendOutcome::HeadMoved`]. Two calls appending the same version
    /// never both succeed. The caller verified the list; the storage does
    /// not parse it.
    fn append_device_list(
        &mut self,
        account: &AccountId,
        list: &StoredDeviceList,
        previous: &[u8; 32],
        retain: u32,
    ) -> Result<AppendOutcome, RelayStorageError>;

    /// The relay's key (SPEC.md 16.4). Atomically: if the storage holds
    /// none and `fresh` is `Some`, stores `fresh`; returns the key it then
    /// holds (`None` only if it holds none and `fresh` is `None`). Of
    /// concurrent first calls, one stores its key and all return that one.
    /// The key never changes afterwards except by an operator deleting it
    /// (a rotation, after a restore from a backup).
    fn relay_key(
        &mut self,
        fresh: Option<&RelayKey>,
    ) -> Result<Option<RelayKey>, RelayStorageError>;

    /// Records the use of a challenge (SPEC.md 16.4), which the caller
    /// checked (a valid one, of this mailbox, that expires at
    /// `expires_at`). Atomically: deletes the mailbox's records that
    /// expired before `now` (`expires_at < now`); then, if this challenge
    /// is recorded for this mailbox, returns `false` (it was used before)
    /// and writes nothing more; else records it until `expires_at`, sets
    /// the `owner_seen_at` of the mailbox's device record (if any) to
    /// `now` (if that is later), and returns `true`. Of concurrent calls
    /// with one challenge, one returns `true`.
    fn consume_challenge(
        &mut self,
        mailbox: &MailboxId,
        challenge: &[u8; 32],
        now: u64,
        expires_at: u64,
    ) -> Result<bool, RelayStorageError>;

    /// Deletes every record of a used challenge that expired before `now`
    /// (`expires_at < now`). Returns how many.
    fn purge_challenges(&mut self, now: u64) -> Result<u64, RelayStorageError>;
}

/// A deposit's answer from the storage's outcome: `Ok(true)` stored,
/// `Ok(false)` already there, else the share's bound.
fn insert_result(outcome: InsertOutcome, share: Share) -> Result<bool, TransportError> {
    match (outcome, share) {
        (InsertOutcome::Stored, _) => Ok(true),
        (InsertOutcome::Duplicate, _) => Ok(false),
        (InsertOutcome::TooManyEnvelopes, Share::Contacts) => {
            Err(TransportError::LimitExceeded(reason::PENDING_ENVELOPES))
        }
        (InsertOutcome::TooManyBytes, Share::Contacts) => {
            Err(TransportError::LimitExceeded(reason::PENDING_BYTES))
        }
        (InsertOutcome::TooManyEnvelopes, Share::Strangers) => {
            Err(TransportError::LimitExceeded(reason::STRANGER_ENVELOPES))
        }
        (InsertOutcome::TooManyBytes, Share::Strangers) => {
            Err(TransportError::LimitExceeded(reason::STRANGER_BYTES))
        }
    }
}

/// The relay's rules over a storage backend. See the module docs.
#[derive(Debug)]
pub struct Relay<S> {
    storage: S,
    config: RelayConfig,
    storage_error: Option<RelayStorageError>,
    /// The storage's relay key, once read.
    key: Option<RelayKey>,
}

impl<S: RelayStorage> Relay<S> {
    /// A relay over `storage` with these bounds.
    pub fn new(storage: S, config: RelayConfig) -> Self {
        Relay {
            storage,
            config,
            storage_error: None,
            key: None,
        }
    }

    /// The bounds.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The storage (for inspection).
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage, mutably (for maintenance; bypasses the rules).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Gives the storage back.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// The last storage failure, which the caller saw as
    /// [`TransportError::Unavailable`] (for logging); clears it.
    pub fn take_storage_error(&mut self) -> Option<RelayStorageError> {
        self.storage_error.take()
    }

    fn storage_failed(&mut self, error: RelayStorageError) -> TransportError {
        self.storage_error = Some(error);
        TransportError::Unavailable("relay storage")
    }

    fn check<T>(&mut self, result: Result<T, RelayStorageError>) -> Result<T, TransportError> {
        result.map_err(|e| self.storage_failed(e))
    }

    /// Publishes or replaces a device's bundle set from a signed upload
    /// ([`BundleSetUpload::sign`]).
    ///
    /// # Errors
    /// [`TransportError::BadRequest`] for a malformed upload or duplicate
    /// one-time prekey ids, [`TransportError::Unauthorized`] for a
    /// signature that fails, [`TransportError::StampRequired`] for a
    /// device's first upload without a valid identity stamp (SPEC.md 16.11;
    /// with [`RelayConfig::identity_stamp_difficulty`] above 0),
    /// [`TransportError::Replayed`] for a counter not
    /// above the last accepted one, [`TransportError::LimitExceeded`]
    /// ([`reason::ONE_TIME_PREKEYS`]) for a pool over the bound,
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn publish(&mut self, now: u64, upload: &[u8]) -> Result<(), TransportError> {
        let upload = BundleSetUpload::decode_verified(upload)?;
        let difficulty = self.config.identity_stamp_difficulty;
        if difficulty > 0 {
            let record = self.storage.device(&upload.device);
            if self.check(record)?.is_none() {
                let valid = upload.identity_stamp.is_some_and(|stamp| {
                    stamp
                        .verify_identity(&upload.device, difficulty, now)
                        .is_ok()
                });
                if !valid {
                    return Err(TransportError::StampRequired(difficulty));
                }
            }
        }
        let max = self.config.max_one_time_prekeys;
        if upload.one_time_prekeys.len() > max as usize {
            return Err(TransportError::LimitExceeded(reason::ONE_TIME_PREKEYS));
        }
        let mut ids = HashSet::with_capacity(upload.one_time_prekeys.len());
        if !upload
            .one_time_prekeys
            .iter()
            .all(|(id, _)| ids.insert(*id))
        {
            return Err(TransportError::BadRequest("duplicate one-time prekey id"));
        }
        let outcome = self.storage.apply_upload(&upload, now, max);
        match self.check(outcome)? {
            UploadOutcome::Applied => Ok(()),
            UploadOutcome::Replayed => Err(TransportError::Replayed),
            UploadOutcome::TooManyOneTimePrekeys => {
                Err(TransportError::LimitExceeded(reason::ONE_TIME_PREKEYS))
            }
        }
    }

    /// A bundle for the device, in the profile's bundle encoding, with one
    /// of its one-time prekeys if any is left and the device's claim budget
    /// allows it (claimed: never handed out again), else without one
    /// (SPEC.md 16.2).
    ///
    /// # Errors
    /// [`TransportError::NotFound`] if the device never published,
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn fetch_bundle(
        &mut self,
        now: u64,
        device: &DeviceAddress,
    ) -> Result<Vec<u8>, TransportError> {
        let record = self.storage.device(device);
        let record = self.check(record)?.ok_or(TransportError::NotFound)?;
        let budget = ClaimBudget::new(&self.config, now);
        let claim = self.storage.claim_one_time_prekey(device, budget);
        let one_time_prekey = match self.check(claim)? {
            ClaimOutcome::Claimed(id, key) => Some((id, key)),
            ClaimOutcome::Empty | ClaimOutcome::Limited => None,
        };
        Ok(encode_bundle(
            &record.device.identity,
            &record.signed_prekey,
            one_time_prekey.as_ref(),
        ))
    }

    /// How many one-time prekeys the device has left.
    ///
    /// # Errors
    /// [`TransportError::NotFound`] if the device never published,
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn one_time_prekeys_left(&mut self, device: &DeviceAddress) -> Result<u32, TransportError> {
        let record = self.storage.device(device);
        if self.check(record)?.is_none() {
            return Err(TransportError::NotFound);
        }
        let count = self.storage.one_time_prekey_count(device);
        self.check(count)
    }

    /// Which share of `mailbox` a deposit goes to, or why it is refused
    /// (SPEC.md 16.10), in this order: an empty payload
    /// ([`TransportError::BadRequest`], [`reason::EMPTY_PAYLOAD`]); a
    /// payload over [`RelayConfig::max_envelope_bytes`]
    /// ([`TransportError::LimitExceeded`], [`reason::ENVELOPE_SIZE`]); an
    /// unpublished mailbox ([`TransportError::NotFound`], with
    /// [`RelayConfig::require_published_mailbox`]); then, for a mailbox
    /// whose owner registered an access key, the pass: an access key whose
    /// verifier is the mailbox's, or the previous one within
    /// [`RelayConfig::access_grace`] of the rotation, admits it to
    /// [`Share::Contacts`]; otherwise it is a stranger's deposit, refused
    /// if the owner has not been seen for [`RelayConfig::stranger_idle`]
    /// ([`TransportError::LimitExceeded`], [`reason::STRANGERS_CLOSED`]).
    /// Then, with [`RelayConfig::deposit_stamp_difficulty`] above 0, a
    /// deposit not admitted by its key is refused without a stamp valid for
    /// this mailbox, envelope id, payload length and time
    /// ([`TransportError::StampRequired`]); it goes to [`Share::Strangers`]
    /// of a mailbox with an access key, to the only share
    /// ([`Share::Contacts`]) of one without. Reads one device record;
    /// writes nothing.
    ///
    /// # Errors
    /// As above, and [`TransportError::Unavailable`] for a storage failure.
    pub fn admit(
        &mut self,
        now: u64,
        mailbox: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> Result<Share, TransportError> {
        if envelope.payload.is_empty() {
            return Err(TransportError::BadRequest(reason::EMPTY_PAYLOAD));
        }
        if envelope.payload.len() > self.config.max_envelope_bytes as usize {
            return Err(TransportError::LimitExceeded(reason::ENVELOPE_SIZE));
        }
        let owner = self.storage.mailbox_owner(mailbox);
        let owner = self.check(owner)?;
        if owner.is_none() && self.config.require_published_mailbox {
            return Err(TransportError::NotFound);
        }
        // A mailbox whose owner registered an access key has two shares;
        // one whose owner registered none (or an unknown mailbox, when the
        // relay does not require publication) has one, the contacts'
        // bounds, as before access keys: every deposit then needs a stamp.
        let keyed = owner.as_ref().filter(|record| record.access.is_some());
        if let Some(record) = keyed {
            if let Some(key) = &pass.access {
                let shown = key.verifier(mailbox);
                let current = record.access.is_some_and(|v| v == shown);
                let previous = record.previous_access.is_some_and(|v| v == shown)
                    && now.saturating_sub(record.access_changed_at) <= self.config.access_grace;
                if current || previous {
                    return Ok(Share::Contacts);
                }
            }
            if now.saturating_sub(record.owner_seen_at) > self.config.stranger_idle {
                return Err(TransportError::LimitExceeded(reason::STRANGERS_CLOSED));
            }
        }
        let difficulty = self.config.deposit_stamp_difficulty;
        if difficulty > 0 {
            let len = u32::try_from(envelope.payload.len()).unwrap_or(u32::MAX);
            let valid = pass.stamp.is_some_and(|stamp: Stamp| {
                stamp
                    .verify(mailbox, &envelope.id, len, difficulty, now)
                    .is_ok()
            });
            if !valid {
                return Err(TransportError::StampRequired(difficulty));
            }
        }
        Ok(if keyed.is_some() {
            Share::Strangers
        } else {
            Share::Contacts
        })
    }

    /// Deposits an envelope for a mailbox, anonymously: [`Relay::admit`],
    /// then the insert into its share. Idempotent by envelope id (see the
    /// module docs).
    ///
    /// # Errors
    /// [`Relay::admit`]'s, then [`TransportError::LimitExceeded`]
    /// ([`reason::PENDING_ENVELOPES`], [`reason::PENDING_BYTES`] for the
    /// contacts' share, [`reason::STRANGER_ENVELOPES`],
    /// [`reason::STRANGER_BYTES`] for the strangers'),
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn deposit(
        &mut self,
        now: u64,
        mailbox: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> Result<(), TransportError> {
        let share = self.admit(now, mailbox, envelope, pass)?;
        let limits = self.limits(now);
        let outcome = self
            .storage
            .insert_envelope(mailbox, envelope, share, now, limits);
        let outcome = self.check(outcome)?;
        insert_result(outcome, share).map(|_| ())
    }

    /// Deposits several envelopes with one storage commit (group commit),
    /// for servers that gather concurrent deposits. Each result is what
    /// [`Relay::deposit`] would answer for that envelope, with `Ok(true)`
    /// when it was stored now and `Ok(false)` when that id was already
    /// there (an idempotent retry). A storage failure fails every envelope
    /// of the batch (none is stored).
    pub fn deposit_batch(
        &mut self,
        now: u64,
        batch: &[(MailboxId, Envelope, DepositPass)],
    ) -> Vec<Result<bool, TransportError>> {
        let admitted: Vec<Result<Share, TransportError>> = batch
            .iter()
            .map(|(mailbox, envelope, pass)| self.admit(now, mailbox, envelope, pass))
            .collect();
        let mut results: Vec<Result<bool, TransportError>> = Vec::with_capacity(batch.len());
        let mut accepted: Vec<(MailboxId, Envelope, Share)> = Vec::with_capacity(batch.len());
        let mut slots = Vec::with_capacity(batch.len());
        for ((mailbox, envelope, _), share) in batch.iter().zip(admitted) {
            match share {
                Ok(share) => {
                    slots.push(results.len());
                    accepted.push((*mailbox, envelope.clone(), share));
                    results.push(Ok(false));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let stored = self.deposit_admitted(now, &accepted);
        for (slot, result) in slots.into_iter().zip(stored) {
            results[slot] = result;
        }
        results
    }

    /// Stores deposits that [`Relay::admit`] admitted to the given shares,
    /// with one storage commit; one result per deposit as
    /// [`Relay::deposit_batch`] gives.
    pub fn deposit_admitted(
        &mut self,
        now: u64,
        batch: &[(MailboxId, Envelope, Share)],
    ) -> Vec<Result<bool, TransportError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let limits = self.limits(now);
        let outcome = self.storage.insert_envelopes(batch, now, limits);
        match self.check(outcome) {
            Ok(outcomes) => outcomes
                .into_iter()
                .zip(batch)
                .map(|(outcome, (_, _, share))| insert_result(outcome, *share))
                .collect(),
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn limits(&self, now: u64) -> MailboxLimits {
        MailboxLimits {
            max_envelopes: self.config.max_pending_envelopes,
            max_bytes: self.config.max_pending_bytes,
            max_stranger_envelopes: self.config.max_stranger_envelopes,
            max_stranger_bytes: self.config.max_stranger_bytes,
            expire_before: self.expiry_cutoff(now),
        }
    }

    /// Issues a fresh, single-use challenge for proving ownership of a
    /// mailbox, valid for [`RelayConfig::challenge_ttl`] seconds. The
    /// challenge is authenticated with the relay's key and stored nowhere
    /// (SPEC.md 16.4): issuing one writes nothing (but the relay key, at the
    /// first challenge a storage ever sees), so nobody can crowd out
    /// another's challenges.
    ///
    /// # Errors
    /// [`TransportError::NotFound`] for an unpublished mailbox (with
    /// [`RelayConfig::require_published_mailbox`]),
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn challenge(
        &mut self,
        now: u64,
        rng: &mut impl CryptoRngCore,
        mailbox: &MailboxId,
    ) -> Result<[u8; 32], TransportError> {
        self.require_mailbox(mailbox)?;
        let key = match self.key.take() {
            Some(key) => key,
            None => {
                let fresh = RelayKey::generate(rng);
                let stored = self.storage.relay_key(Some(&fresh));
                match self.check(stored)? {
                    Some(key) => key,
                    None => {
                        return Err(self.storage_failed(RelayStorageError::Backend(
                            "the storage kept no relay key".into(),
                        )))
                    }
                }
            }
        };
        let mut challenge = [0u8; 32];
        challenge[..8].copy_from_slice(&now.to_be_bytes());
        rng.fill_bytes(&mut challenge[8..16]);
        let tag = challenge_tag(&key, mailbox, &challenge);
        challenge[16..].copy_from_slice(&tag);
        self.key = Some(key);
        Ok(challenge)
    }

    /// The mailbox's pending envelopes, oldest first: at most `limit`
    /// (capped by [`RelayConfig::max_fetch_envelopes`] and
    /// [`RelayConfig::max_fetch_bytes`]). Expired envelopes are left out.
    ///
    /// # Errors
    /// [`TransportError::Unauthorized`] unless `auth` is a valid
    /// [`MailboxOp::Fetch`] proof over a fresh challenge (which it
    /// consumes), [`TransportError::Unavailable`] for a storage failure.
    pub fn fetch(
        &mut self,
        now: u64,
        auth: &MailboxAuth,
        limit: u32,
    ) -> Result<Vec<Envelope>, TransportError> {
        let mailbox = self.authorize(now, auth, MailboxOp::Fetch)?;
        let limit = limit.min(self.config.max_fetch_envelopes);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let envelopes = self.storage.list_envelopes(
            &mailbox,
            self.expiry_cutoff(now),
            limit,
            self.config.max_fetch_bytes,
        );
        self.check(envelopes)
    }

    /// Deletes envelopes from the mailbox by id (unknown ids are ignored).
    ///
    /// # Errors
    /// [`TransportError::Unauthorized`] unless `auth` is a valid
    /// [`MailboxOp::Acknowledge`] proof over a fresh challenge (which it
    /// consumes), [`TransportError::LimitExceeded`]
    /// ([`reason::ACKNOWLEDGE_IDS`]) for too many ids (checked first, the
    /// challenge is not consumed), [`TransportError::Unavailable`] for a
    /// storage failure.
    pub fn acknowledge(
        &mut self,
        now: u64,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> Result<(), TransportError> {
        if ids.len() > self.config.max_acknowledge_ids as usize {
            return Err(TransportError::LimitExceeded(reason::ACKNOWLEDGE_IDS));
        }
        let mailbox = self.authorize(now, auth, MailboxOp::Acknowledge)?;
        if ids.is_empty() {
            return Ok(());
        }
        let result = self.storage.acknowledge_envelopes(&mailbox, ids);
        self.check(result).map(|_| ())
    }

    /// Publishes a signed device list (SPEC.md 25.12): a first version for
    /// an account without a stored list, else the successor of the newest
    /// stored version. The same list as a stored version (same body) is
    /// accepted and changes nothing. See the module docs for the rules.
    ///
    /// Work per call is bounded: one upload decoded, at most two stored
    /// lists read and one decoded, at most [`MAX_DEVICES`] signature
    /// verifications (the relay trusts the signatures of the lists it
    /// stored: it verified them before storing them).
    ///
    /// # Errors
    /// As [`device_list_error`] maps the first failing check of SPEC.md
    /// 25.5; [`TransportError::Conflict`] for an authentic list of a version
    /// the relay holds with another body; [`TransportError::Replayed`] for a
    /// version not above the newest that is no longer held;
    /// [`TransportError::Unavailable`] for a storage failure (or a stored
    /// list that no longer decodes).
    ///
    /// [`MAX_DEVICES`]: crate::protocol::devices::MAX_DEVICES
    pub fn publish_device_list(&mut self, signed: &[u8]) -> Result<(), TransportError> {
        let list = DeviceList::decode(signed).map_err(|e| device_list_error(&e))?;
        let account = *list.account_id();
        let head = self.storage.device_list_head(&account);
        let previous = match self.check(head)? {
            None => {
                list.verify_genesis().map_err(|e| device_list_error(&e))?;
                [0u8; 32]
            }
            Some(head) if list.version() <= head.version => {
                return self.held_device_list(&account, &list, false);
            }
            Some(head) => {
                let prev = self.stored_device_list(&head)?;
                list.successor_checks(&prev)
                    .map_err(|e| device_list_error(&e))?;
                head.body_hash
            }
        };
        let stored = StoredDeviceList {
            version: list.version(),
            body_hash: *list.body_hash(),
            signed: signed.to_vec(),
        };
        let outcome = self.storage.append_device_list(
            &account,
            &stored,
            &previous,
            DEVICE_LIST_RETENTION as u32,
        );
        match self.check(outcome)? {
            AppendOutcome::Appended => Ok(()),
            // Another upload of this version came first. This list passed
            // the checks against the version before it (which never
            // changes once stored), so it is authentic: no need to verify
            // it again.
            AppendOutcome::HeadMoved => self.held_device_list(&account, &list, true),
        }
    }

    /// A list whose version the relay holds (or held): the same body is
    /// `Ok`, another authentic body a conflict, one no longer held stale.
    fn held_device_list(
        &mut self,
        account: &AccountId,
        list: &DeviceList,
        authentic: bool,
    ) -> Result<(), TransportError> {
        let version = list.version();
        let stored = self.storage.device_list_version(account, version);
        let Some(stored) = self.check(stored)? else {
            return Err(TransportError::Replayed);
        };
        if stored.body_hash == *list.body_hash() {
            return Ok(());
        }
        if authentic {
            return Err(TransportError::Conflict);
        }
        let checked = if version == 1 {
            list.verify_genesis().map(drop)
        } else {
            let parent = self.storage.device_list_version(account, version - 1);
            let Some(parent) = self.check(parent)? else {
                // Its predecessor is gone: the relay cannot judge it.
                return Err(TransportError::Replayed);
            };
            let parent = self.stored_device_list(&parent)?;
            list.successor_checks(&parent)
        };
        match checked {
            Ok(()) | Err(DeviceListError::Conflict { .. }) => Err(TransportError::Conflict),
            Err(e) => Err(device_list_error(&e)),
        }
    }

    /// A stored list, decoded (its signatures were verified when it was
    /// stored).
    fn stored_device_list(
        &mut self,
        stored: &StoredDeviceList,
    ) -> Result<DeviceList, TransportError> {
        match DeviceList::decode(&stored.signed) {
            Ok(list)
                if list.version() == stored.version && *list.body_hash() == stored.body_hash =>
            {
                Ok(list)
            }
            _ => Err(self.storage_failed(RelayStorageError::Corrupted(
                "a stored device list does not decode".into(),
            ))),
        }
    }

    /// The account's stored device lists above version `after`, oldest
    /// first, at most [`DEVICE_LIST_RETENTION`]; empty if none is above
    /// `after`.
    ///
    /// # Errors
    /// [`TransportError::NotFound`] for an account without a stored list,
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn fetch_device_lists(
        &mut self,
        account: &AccountId,
        after: u64,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let lists = self
            .storage
            .device_lists_after(account, after, DEVICE_LIST_RETENTION as u32);
        let lists = self.check(lists)?;
        if lists.is_empty() {
            let head = self.storage.device_list_head(account);
            if self.check(head)?.is_none() {
                return Err(TransportError::NotFound);
            }
        }
        Ok(lists.into_iter().map(|l| l.signed).collect())
    }

    /// Deletes, in this order: devices whose owner was not seen for
    /// [`RelayConfig::directory_idle`] (record, prekeys, mailbox), expired
    /// envelopes (and acknowledged ids), the envelopes of inactive
    /// mailboxes (owner not seen for [`RelayConfig::inactive_after`])
    /// older than [`RelayConfig::inactive_retention`], and expired
    /// challenge records. Call it periodically; the rules hold without it,
    /// it frees space (SPEC.md 16.12).
    ///
    /// # Errors
    /// [`TransportError::Unavailable`] for a storage failure.
    pub fn sweep(&mut self, now: u64) -> Result<SweepReport, TransportError> {
        let idle = now.saturating_sub(self.config.directory_idle);
        let devices = self.storage.expire_devices(idle);
        let devices_expired = self.check(devices)?;
        let expired = self.storage.expire_envelopes(self.expiry_cutoff(now));
        let envelopes_expired = self.check(expired)?;
        let inactive = self.storage.expire_inactive(
            now.saturating_sub(self.config.inactive_after),
            now.saturating_sub(self.config.inactive_retention),
        );
        let inactive_expired = self.check(inactive)?;
        let purged = self.storage.purge_challenges(now);
        let challenges_expired = self.check(purged)?;
        Ok(SweepReport {
            envelopes_expired,
            challenges_expired,
            inactive_expired,
            devices_expired,
        })
    }

    /// Envelopes received before this are expired.
    fn expiry_cutoff(&self, now: u64) -> u64 {
        now.saturating_sub(self.config.retention)
    }

    fn require_mailbox(&mut self, mailbox: &MailboxId) -> Result<(), TransportError> {
        if !self.config.require_published_mailbox {
            return Ok(());
        }
        let exists = self.storage.mailbox_exists(mailbox);
        if self.check(exists)? {
            Ok(())
        } else {
            Err(TransportError::NotFound)
        }
    }

    /// The mailbox check: op, signature, then the challenge (its tag, its
    /// age, then its single use).
    fn authorize(
        &mut self,
        now: u64,
        auth: &MailboxAuth,
        op: MailboxOp,
    ) -> Result<MailboxId, TransportError> {
        if auth.op != op {
            return Err(TransportError::Unauthorized);
        }
        auth.verify()?;
        let mailbox = auth.mailbox();
        let key = match self.key.take() {
            Some(key) => key,
            None => {
                let stored = self.storage.relay_key(None);
                // No key: no relay over this storage ever issued a
                // challenge.
                self.check(stored)?.ok_or(TransportError::Unauthorized)?
            }
        };
        let tag = challenge_tag(&key, &mailbox, &auth.challenge);
        self.key = Some(key);
        if !bool::from(tag.ct_eq(&auth.challenge[16..])) {
            return Err(TransportError::Unauthorized);
        }
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&auth.challenge[..8]);
        let expires_at = u64::from_be_bytes(issued).saturating_add(self.config.challenge_ttl);
        if now > expires_at {
            return Err(TransportError::Unauthorized);
        }
        let fresh = self
            .storage
            .consume_challenge(&mailbox, &auth.challenge, now, expires_at);
        if self.check(fresh)? {
            Ok(mailbox)
        } else {
            Err(TransportError::Unauthorized)
        }
    }
}

/// The domain of a challenge's tag (SPEC.md 16.4).
const CHALLENGE_DOMAIN: &[u8] = b"cubbyhole/v1 relay challenge";

/// A challenge's tag: the first 16 bytes of `HMAC-SHA-256(key, domain ||
/// mailbox || issued_at || random)`, over the challenge's first 16 bytes
/// (`issued_at || random`).
fn challenge_tag(key: &RelayKey, mailbox: &MailboxId, challenge: &[u8; 32]) -> [u8; 16] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(CHALLENGE_DOMAIN);
    mac.update(&mailbox.0);
    mac.update(&challenge[..16]);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&full[..16]);
    tag
}

/// The profile's bundle encoding from published parts:
/// `0x01 || IK || spk_id || spk_created || spk_public || spk_signature ||
/// has_opk || [opk_id || opk_public]`.
fn encode_bundle(
    identity: &[u8; 32],
    spk: &SignedPrekeyRecord,
    one_time_prekey: Option<&(u32, [u8; 32])>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(BUNDLE_LEN_WITH_OPK);
    out.push(VERSION);
    out.extend_from_slice(identity);
    out.extend_from_slice(&spk.id.to_be_bytes());
    out.extend_from_slice(&spk.created.to_be_bytes());
    out.extend_from_slice(&spk.public);
    out.extend_from_slice(&spk.signature);
    match one_time_prekey {
        Some((id, key)) => {
            out.push(1);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(key);
        }
        None => out.push(0),
    }
    out
}
