//! The untrusted side: addresses, envelopes, the prekey directory and the
//! mailbox, as async, runtime-agnostic traits.
//!
//! Nothing here is trusted for confidentiality: the directory and the
//! mailbox see only what this module encodes, byte for byte, and SPEC.md
//! ("What the directory and the mailbox learn") lists it. They are trusted
//! not to let one user harm another, which is why publishing needs a
//! signature by the device's identity key and fetching or acknowledging a
//! mailbox needs proof of its owner's key over a fresh, single-use challenge
//! (see [`crate::relay`] for the rules any relay applies).
//!
//! The traits return `impl Future + MaybeSend` (`Send` on native targets,
//! unbounded on `wasm32`, where a browser transport awaits JavaScript
//! promises), so implementations may use any runtime (or none: the
//! in-process relay answers immediately).

mod access;
mod codec;
pub mod conformance;
pub mod stamp;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::future::Future;

use sha2::{Digest, Sha256};

pub use access::{AccessKey, AccessVerifier, DepositPass, ACCESS_KEY_LEN, ACCESS_VERIFIER_LABEL};
pub use codec::{
    decode_acknowledge, decode_envelope, decode_envelope_list, encode_acknowledge, encode_envelope,
    encode_envelope_list, BundleSetUpload, MailboxAuth, MailboxOp, SignedPrekeyRecord,
    MAILBOX_AUTH_LEN, MAX_ACKNOWLEDGE_IDS_ENCODED,
};

use crate::bounds::{MaybeSend, MaybeSync};
use crate::protocol::devices::AccountId;
use crate::protocol::keys::IdentityKey;

/// A device: its identity key (each device has its own) and a device number
/// that groups devices of one person. Sessions, peers and mailboxes are
/// addressed by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DeviceAddress {
    /// The device's identity key bytes (a valid [`IdentityKey`]).
    pub identity: [u8; 32],
    /// The device number.
    pub device_id: u32,
}

impl DeviceAddress {
    /// The address of the device with this identity key and number.
    pub fn new(identity: &IdentityKey, device_id: u32) -> Self {
        DeviceAddress {
            identity: *identity.as_bytes(),
            device_id,
        }
    }

    /// The device's mailbox:
    /// `SHA-256("cubbyhole/v1 mailbox" || identity || device_id)`.
    pub fn mailbox(&self) -> MailboxId {
        let digest = Sha256::new()
            .chain_update(b"cubbyhole/v1 mailbox")
            .chain_update(self.identity)
            .chain_update(self.device_id.to_be_bytes())
            .finalize();
        MailboxId(digest.into())
    }
}

/// The opaque name of a mailbox on a relay (derived from the owner's
/// device address, so senders can compute it and the relay can check the
/// owner's proofs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxId(pub [u8; 32]);

impl fmt::Debug for MailboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MailboxId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// The sender-chosen id of an envelope: random, and the same on every retry
/// of the same deposit, so that a retried deposit lands once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct EnvelopeId(pub [u8; 16]);

/// An envelope as the mailbox stores it: its id and the opaque payload (a
/// cubbyhole wire message). The relay learns the recipient mailbox, the id,
/// the length and the time; for prekey messages the payload also shows the
/// sender's identity key (the profile's wire format).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    /// The envelope id.
    pub id: EnvelopeId,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Why the untrusted side refused or failed a request. Implementations over
/// a network map their failures onto these.
///
/// The variants with a `&'static str` reason name what failed in words the
/// crate fixes. A transport that fails below the protocol (a socket, a
/// file, a TLS stack) and wants to hand the underlying error to the
/// application uses [`TransportError::Io`] (built with
/// [`TransportError::io`]): the error is kept and returned by
/// [`std::error::Error::source`], so an error reporter that walks the
/// chain shows it. Like [`TransportError::Unavailable`], an `Io` failure
/// says nothing about the request itself: an idempotent request may be
/// retried.
///
/// Equality compares the variant and its reason; for `Io`, the context and
/// the source's `Display` text (two sources are equal if they are the same
/// allocation or print the same).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TransportError {
    /// The request was malformed (the reason names the field).
    BadRequest(&'static str),
    /// A signature or mailbox proof did not verify, or the challenge was
    /// unknown, expired or already used.
    Unauthorized,
    /// An upload's counter is not above the last accepted one (a replayed
    /// or reordered upload).
    Replayed,
    /// A bound was hit (the reason names it: envelope size, mailbox full,
    /// too many one-time prekeys, ...).
    LimitExceeded(&'static str),
    /// No bundle is published for that device (or, from a
    /// [`DeviceDirectory`], no device list for that account).
    NotFound,
    /// The directory holds another device list of the same version (a
    /// fork of the account's chain, SPEC.md 25.12): the upload is refused
    /// and nothing changes. Unlike [`TransportError::Replayed`] it is
    /// evidence that two authentic, incompatible lists exist (one of the
    /// account's devices, or a thief holding one, signed the other).
    Conflict,
    /// The service could not be reached or failed; the request may be
    /// retried if it is idempotent.
    Unavailable(&'static str),
    /// The request needs a proof of work ([`stamp`]) at this difficulty:
    /// a deposit that shows no valid access key for the mailbox, or the
    /// first upload of a device (SPEC.md 16.10, 16.11). The stamp it carried,
    /// if any, was missing, too weak or of another epoch; nothing changed.
    /// Mint one at this difficulty and retry.
    StampRequired(u8),
    /// The transport itself failed (I/O, TLS, a driver...), with the
    /// underlying error; the request may be retried if it is idempotent.
    /// `Display` shows the context only; the underlying error is the
    /// [`source`](std::error::Error::source).
    Io {
        /// What the transport was doing ("connect to the relay", "read
        /// the answer", ...).
        context: &'static str,
        /// The underlying error. It must not carry secrets: it is
        /// displayed and logged like any error.
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl TransportError {
    /// A [`TransportError::Io`] carrying `source`.
    ///
    /// ```
    /// use cubbyhole::transport::TransportError;
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
    /// let e = TransportError::io("read the relay's answer", io);
    /// assert_eq!(e.to_string(), "transport failed: read the relay's answer");
    /// let source = std::error::Error::source(&e).expect("the I/O error");
    /// assert_eq!(source.to_string(), "reset by peer");
    /// ```
    pub fn io(
        context: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        TransportError::Io {
            context,
            source: Arc::new(source),
        }
    }
}

impl PartialEq for TransportError {
    fn eq(&self, other: &Self) -> bool {
        use TransportError as E;
        match (self, other) {
            (E::BadRequest(a), E::BadRequest(b))
            | (E::LimitExceeded(a), E::LimitExceeded(b))
            | (E::Unavailable(a), E::Unavailable(b)) => a == b,
            (E::StampRequired(a), E::StampRequired(b)) => a == b,
            (E::Unauthorized, E::Unauthorized)
            | (E::Replayed, E::Replayed)
            | (E::NotFound, E::NotFound)
            | (E::Conflict, E::Conflict) => true,
            (
                E::Io {
                    context: a,
                    source: x,
                },
                E::Io {
                    context: b,
                    source: y,
                },
            ) => a == b && (Arc::ptr_eq(x, y) || x.to_string() == y.to_string()),
            _ => false,
        }
    }
}
impl Eq for TransportError {}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::BadRequest(why) => write!(f, "bad request: {why}"),
            TransportError::Unauthorized => f.write_str("unauthorized"),
            TransportError::Replayed => f.write_str("replayed or outdated upload"),
            TransportError::LimitExceeded(what) => write!(f, "limit exceeded: {what}"),
            TransportError::NotFound => f.write_str("not found"),
            TransportError::Conflict => f.write_str("conflicting device list"),
            TransportError::Unavailable(why) => write!(f, "unavailable: {why}"),
            TransportError::StampRequired(difficulty) => {
                write!(f, "a stamp of difficulty {difficulty} is required")
            }
            TransportError::Io { context, .. } => write!(f, "transport failed: {context}"),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Io { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// The prekey directory: where devices publish their bundle sets and
/// senders fetch bundles.
///
/// # Contract
///
/// An implementation (a relay, or a client of one) must keep all of this;
/// [`conformance`] checks it against any implementation:
///
/// - [`publish`](Self::publish) accepts only an upload
///   ([`BundleSetUpload`]) signed by the identity key of the device it
///   names, whose signed prekey's signature also verifies under that key;
///   otherwise [`TransportError::Unauthorized`] (malformed bytes:
///   [`TransportError::BadRequest`]), and nothing changes. Its counter must
///   be strictly above the device's last accepted one, else
///   [`TransportError::Replayed`] and nothing changes (the same upload sent
///   twice is refused the second time). An accepted upload replaces the
///   device's signed prekey and replaces or extends its pool of one-time
///   prekeys.
/// - [`fetch_bundle`](Self::fetch_bundle) returns the profile's bundle
///   encoding ([`PrekeyBundle`](crate::PrekeyBundle)) of the device's
///   identity key and current signed prekey, with at most one one-time
///   prekey from the pool, which it claims: no one-time prekey is ever
///   handed out twice. When the pool is empty the bundle has none.
/// - [`one_time_prekeys_left`](Self::one_time_prekeys_left) is the pool's
///   size: each bundle that carried one leaves one fewer.
/// - A device that never published (a device number is a device of its
///   own) is [`TransportError::NotFound`] for both.
/// - Failures to reach or run the service are
///   [`TransportError::Unavailable`]; bounds are
///   [`TransportError::LimitExceeded`].
pub trait PrekeyDirectory: MaybeSend + MaybeSync {
    /// Publishes or replaces a device's bundle set. The upload is signed by
    /// the device's identity key and carries a counter above the last one.
    fn publish(
        &self,
        upload: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend;

    /// Fetches a bundle (the profile's bundle encoding) for a device,
    /// claiming at most one of its one-time prekeys.
    fn fetch_bundle(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + MaybeSend;

    /// How many one-time prekeys the device has left in the directory.
    fn one_time_prekeys_left(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<u32, TransportError>> + MaybeSend;
}

/// Most versions of an account's device list a directory keeps (the
/// newest ones), and so most lists one
/// [`DeviceDirectory::fetch_device_lists`] returns (SPEC.md 25.12).
pub const DEVICE_LIST_RETENTION: usize = 64;

/// Where accounts publish their device lists and contacts fetch them
/// (SPEC.md 25.12).
///
/// Nothing a directory serves is trusted: a contact verifies every list
/// itself ([`DeviceListChain`](crate::protocol::devices::DeviceListChain)).
/// The directory's rules keep a stranger from rewriting an account's list
/// in the directory (and so from denying service quietly), and keep the
/// chain it stores from forking.
///
/// # Contract
///
/// An implementation (a relay, or a client of one) must keep all of this;
/// [`conformance`] checks it against any implementation:
///
/// - [`publish_device_list`](Self::publish_device_list) takes a signed list
///   (SPEC.md 25.3). For an account with no stored list it must pass
///   `verify_genesis`; otherwise, if its version is the newest stored
///   version + 1, it must pass `verify_successor` against the newest stored
///   list. Only then is it stored, and the check of the newest version and
///   the store are one atomic step: two uploads of the same next version
///   never both succeed. The directory keeps the newest
///   [`DEVICE_LIST_RETENTION`] versions of each account.
/// - Errors, and nothing changes:
///   - bytes that do not decode, a first upload that is not a valid first
///     version (`not_genesis`, `wrong_account`), a version above the
///     newest + 1 (`gap`), or a device number changed or reused:
///     [`TransportError::BadRequest`];
///   - a signature that does not verify (`bad_signature`), or signers that
///     do not authorize the list (`unauthorized`: no device of the newest
///     list signed it, an added device did not countersign):
///     [`TransportError::Unauthorized`];
///   - a version the directory holds, with the same body (SPEC.md 25.3:
///     the signature set aside) as the stored one: **accepted** (`Ok`),
///     nothing is written and the stored encoding stays; an upload retried
///     after a lost answer is thus not an error;
///   - a version the directory holds, with another body, which is authentic
///     (it passes the checks against the stored version before it, or as a
///     first version): [`TransportError::Conflict`]; not authentic: the
///     error of those checks;
///   - a version not above the newest that the directory no longer holds
///     (or whose predecessor it no longer holds): [`TransportError::Replayed`]
///     (`stale`).
/// - [`fetch_device_lists`](Self::fetch_device_lists) returns the stored
///   signed lists of the account with a version above `after`, oldest
///   first (at most [`DEVICE_LIST_RETENTION`]), byte for byte as
///   uploaded; an empty vector when the account has none above `after`;
///   [`TransportError::NotFound`] for an account with no stored list.
/// - Failures to reach or run the service are
///   [`TransportError::Unavailable`]; both calls may be retried (a publish
///   is idempotent, see above).
pub trait DeviceDirectory: MaybeSend + MaybeSync {
    /// Publishes a signed device list (its SPEC.md 25.3 encoding): a
    /// genesis for an account the directory does not know, or the
    /// successor of its newest stored version.
    ///
    /// Errors (see the trait's contract): [`TransportError::BadRequest`]
    /// for a malformed list, a gap, a bad first version or a device number
    /// changed or reused; [`TransportError::Unauthorized`] for signatures
    /// that do not verify or do not authorize it;
    /// [`TransportError::Replayed`] for a stale version;
    /// [`TransportError::Conflict`] for another list of a held version.
    /// The same list again is `Ok`.
    fn publish_device_list(
        &self,
        signed: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend;

    /// The signed lists of `account` with a version above `after`, oldest
    /// first, at most [`DEVICE_LIST_RETENTION`] (the newest the directory
    /// retains); empty if none is above `after`. [`TransportError::NotFound`]
    /// if it has none for the account.
    fn fetch_device_lists(
        &self,
        account: &AccountId,
        after: u64,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, TransportError>> + MaybeSend;
}

/// The mailbox: where senders leave envelopes and recipients pick them up.
///
/// # Contract
///
/// An implementation (a relay, or a client of one) must keep all of this;
/// [`conformance`] checks it against any implementation:
///
/// - [`deposit`](Self::deposit) needs no identity. A relay that prices
///   strangers' deposits admits one only with the mailbox's access key or
///   a valid stamp ([`DepositPass`], SPEC.md 16.10), else
///   [`TransportError::StampRequired`] and nothing is stored. It is
///   idempotent by envelope id within a mailbox: an id already pending, or acknowledged
///   within the retention period, is accepted (`Ok`) and not stored again;
///   the first payload stays. A payload over the size bound is
///   [`TransportError::LimitExceeded`] and is not stored (so are deposits
///   into a full mailbox). A relay may refuse mailboxes of devices that
///   never published ([`TransportError::NotFound`]).
/// - [`challenge`](Self::challenge) issues a fresh challenge for one
///   mailbox. A proof ([`MailboxAuth`]) is accepted only if its challenge
///   was issued for the mailbox of the device it names, has not expired and
///   was not used before (single use), its operation is the method's
///   ([`MailboxOp::Fetch`] for [`fetch`](Self::fetch) and
///   [`fetch_waiting`](Self::fetch_waiting), [`MailboxOp::Acknowledge`]
///   for [`acknowledge`](Self::acknowledge)), and its signature verifies
///   under that device's identity key; anything else is
///   [`TransportError::Unauthorized`] and reads or deletes nothing.
/// - [`fetch`](Self::fetch) returns the proof's mailbox's pending
///   envelopes, whole, oldest first (in the order deposited), at most
///   `limit` (an implementation may return fewer, for its own bounds), and
///   deletes nothing: the same envelopes come back until acknowledged.
/// - [`fetch_waiting`](Self::fetch_waiting) is [`fetch`](Self::fetch),
///   except that an implementation that supports waiting, when nothing is
///   pending, waits up to `wait_ms` for a deposit and returns it.
/// - [`acknowledge`](Self::acknowledge) deletes exactly the named
///   envelopes of the proof's mailbox; unknown ids (and ids already
///   acknowledged) are ignored.
/// - Failures to reach or run the service are
///   [`TransportError::Unavailable`]; a deposit, an acknowledgment and a
///   fetch may be retried (the first two are idempotent, fetching deletes
///   nothing), with a fresh proof.
pub trait Mailbox: MaybeSend + MaybeSync {
    /// Deposits an encoded envelope for a mailbox. Needs no identity, but
    /// a pass: the mailbox's access key, or a stamp on the envelope
    /// (SPEC.md 16.10; [`TransportError::StampRequired`] if neither admits
    /// it). Idempotent: depositing the same envelope id again is accepted
    /// and stored once.
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend;

    /// A fresh, single-use challenge for proving ownership of a mailbox.
    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + MaybeSend;

    /// Pending envelopes, oldest first, at most `limit`; `auth` must be a
    /// [`MailboxOp::Fetch`] proof over a fresh challenge.
    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + MaybeSend;

    /// Like [`Mailbox::fetch`], but when nothing is pending waits up to
    /// `wait_ms` milliseconds for an envelope to arrive (push for online
    /// recipients: a long poll). The default does not wait.
    fn fetch_waiting(
        &self,
        auth: &MailboxAuth,
        limit: u32,
        wait_ms: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + MaybeSend {
        let _ = wait_ms;
        self.fetch(auth, limit)
    }

    /// Deletes envelopes by id; `auth` must be a [`MailboxOp::Acknowledge`]
    /// proof over a fresh challenge. Unknown ids are ignored.
    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend;
}
