//! The device's own state: identity, private prekeys, sessions per peer
//! device, peers' identity keys and trust, contacts, sent messages awaiting
//! a receipt, an outbox and an inbox.
//!
//! # Two traits
//!
//! - [`Store`] is what the client awaits: every method returns a future
//!   bounded by [`MaybeSend`] (`Send` on native targets, so a client future
//!   can be spawned on a multi-threaded runtime; unbounded on `wasm32`, so a
//!   browser store can await JavaScript promises). An asynchronous backend
//!   (IndexedDB, a network database) implements it directly.
//! - [`BlockingStore`] has the same methods, synchronous: a backend that
//!   blocks (SQLite, files) implements it and is a [`Store`] through a
//!   blanket implementation whose futures are ready at once: the work is
//!   done when the method is **called**, on the calling thread.
//!
//! Implementations in the crate: [`MemoryStore`] (never blocks),
//! [`KvStore`] (a [`Store`] over any atomic key-value backend, such as the
//! browser's IndexedDB: state decoded in memory, every write one sealed
//! batch) and `SqliteStore` (feature `sqlite`, `Send + Sync`: its
//! connection is behind a mutex). `SqliteStore` blocks the thread that calls it for the length
//! of one SQLite statement or transaction, and every commit waits for the
//! write-ahead log to reach the disk (`synchronous=FULL`). Measured with
//! `examples/receive_cost.rs` (BENCHMARKS.md, "Routing a receive"): a
//! session read takes 0.034 ms (median), a session commit 0.13 to 0.17 ms
//! on an idle disk and 3.9 ms while other processes wrote to it; a whole
//! receive of one message (several reads, one `commit_receive`, one
//! `commit_send` for the receipt) about 1.2 ms. An application that must
//! not block its async workers that long calls the client from a thread
//! that may block (for Tokio: `tokio::task::spawn_blocking` around
//! [`crate::client::block_on`], or a runtime of its own).
//!
//! # The contract
//!
//! The whole contract is in the methods' documentation; the
//! [`conformance`] suite checks it against any implementation. In short:
//!
//! - **Atomicity**: [`Store::commit_send`] and [`Store::commit_receive`] (and
//!   [`Store::quarantine_session`], [`Store::set_session`]) each apply all
//!   their changes or none, which is what makes delivery exactly-once
//!   across crashes (SPEC.md, "Guaranteed delivery"); a write that returned
//!   `Ok` survives a crash.
//! - **Isolation of damage**: a record that does not decode is an error for
//!   that record only ([`StoreError::Corrupted`]), never for the others.
//! - **Routing**: [`Store::route_ratchet_keys`],
//!   [`Store::awaiting_ratchet_key`] and [`Store::sessions_with_identity`]
//!   answer from the records as last written (an index kept in the same
//!   transaction as the records, so that a receive opens only the records
//!   its messages belong to).
//! - **Order**: lists come back in the documented order (outbox and inbox in
//!   the order written, sent messages in the order first stored).
//! - **Secrets**: a store that persists keeps the identity, prekeys,
//!   session records, message bodies and peer trust confidential and
//!   authenticated at rest (as `SqliteStore` does under the application's
//!   key).
//! - A store must be `MaybeSend + MaybeSync` (`Send + Sync` on native
//!   targets: the client holds it across awaits).

mod at_rest;
pub mod conformance;
pub mod kv;
mod memory;
pub mod record;
#[cfg(feature = "sqlite")]
mod sqlite;

use core::future::Future;
use std::fmt;
use std::string::String;
use std::vec::Vec;

pub use kv::{KvBackend, KvKey, KvOp, KvStore, MemoryKv};
pub use memory::MemoryStore;
pub use record::{tag_route_key, SessionEntry, SessionRecord, ROUTING_WINDOW};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

use crate::bounds::{MaybeSend, MaybeSync};
use crate::protocol::devices::AccountId;
use crate::protocol::keys::IdentityKeyPair;
use crate::protocol::prekeys::PrekeyStore;
use crate::transport::{AccessKey, DeviceAddress, Envelope, EnvelopeId, ACCESS_KEY_LEN};

/// The device's identity and number.
#[derive(Clone, Debug)]
pub struct LocalIdentity {
    /// The identity key pair.
    pub keys: IdentityKeyPair,
    /// This device's number.
    pub device_id: u32,
}

/// The device's private prekeys with the lifecycle's bookkeeping.
#[derive(Clone, Debug)]
pub struct PrekeyState {
    /// Current and retained signed prekeys, unused one-time prekeys.
    pub prekeys: PrekeyStore,
    /// Counter of the last upload to the directory (uploads must grow it).
    pub upload_counter: u64,
    /// When the signed prekey was last rotated (unix seconds).
    pub last_rotation: u64,
    /// When the retired signed prekeys started their grace period, by id.
    pub retired_at: Vec<(u32, u64)>,
    /// Withdrawn one-time prekeys: those with ids below `.0` were withdrawn
    /// from the directory at time `.1` (their grace period starts then).
    pub one_time_retired: Vec<(u32, u64)>,
    /// An upload was committed but not confirmed by the directory: the next
    /// maintenance replaces the pool again.
    pub upload_pending: bool,
    /// Digests of the prekey messages accepted, with the signed prekey
    /// each used: a prekey message whose digest is here is a replay
    /// (`duplicate`), even after its session was archived or dropped. Each
    /// digest goes with its signed prekey (SPEC.md, "Replay-proof first
    /// messages"): the memory is 20 bytes per session accepted while the
    /// signed prekeys held were current or in their grace period.
    pub accepted: Vec<(u32, [u8; 16])>,
}

/// The replay digest of a prekey message: the first 16 bytes of
/// `SHA-256("cubbyhole/v1 accepted" || IK_A || EK_A)`.
pub fn accepted_digest(identity: &[u8; 32], ephemeral: &[u8; 32]) -> [u8; 16] {
    labelled_digest16(b"cubbyhole/v1 accepted", &[identity, ephemeral])
}

/// The first 16 bytes of `SHA-256(label || parts...)`: the client layer's
/// short names (replay digests, seen marks).
pub(crate) fn labelled_digest16(label: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new().chain_update(label);
    for part in parts {
        hash.update(part);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.finalize()[..16]);
    out
}

/// How far a peer's identity key is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// First seen, not compared out of band (trust on first use).
    Unvalidated,
    /// The safety number was compared and matched.
    Validated,
    /// Marked compromised: nothing is sent to or accepted from it.
    Compromised,
}

impl Trust {
    /// The trust level's code, as the SQLite store and the binary serde
    /// form keep it: 0 unvalidated, 1 validated, 2 compromised.
    pub fn code(self) -> u8 {
        match self {
            Trust::Unvalidated => 0,
            Trust::Validated => 1,
            Trust::Compromised => 2,
        }
    }
    /// The inverse of [`Trust::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Trust::Unvalidated,
            1 => Trust::Validated,
            2 => Trust::Compromised,
            _ => return None,
        })
    }
}

/// What the device knows about a peer device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    /// The peer device.
    pub address: DeviceAddress,
    /// Trust in its identity key.
    pub trust: Trust,
    /// When it was first seen (unix seconds).
    pub first_seen: u64,
}

/// A deposit access key with its epoch (SPEC.md, "Access keys in the
/// client"): the device's own, which it hands to its contacts in every
/// frame, or a peer device's, which this device shows when depositing to
/// that peer's mailbox. A secret: the key is wiped when dropped and its
/// `Debug` shows only the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessKeyRecord {
    /// The key's epoch: 1 for a device's first key, one more at each
    /// rotation. A receiver keeps a peer's key only if its epoch is above
    /// the one it holds.
    pub epoch: u32,
    /// The key.
    pub key: AccessKey,
    /// A peer device's private inbox for this epoch (profile v2, SPEC.md
    /// 26.11): the mailbox id its chain messages are deposited into and the
    /// access key they show there. `None` for the device's own key (its
    /// inbox is derived) and for a peer that gave none.
    pub inbox: Option<([u8; 32], AccessKey)>,
}

impl AccessKeyRecord {
    /// The length of [`AccessKeyRecord::to_bytes`] without an inbox.
    pub const LEN: usize = 4 + ACCESS_KEY_LEN;
    /// The length of [`AccessKeyRecord::to_bytes`] with an inbox.
    pub const LEN_WITH_INBOX: usize = Self::LEN + 32 + ACCESS_KEY_LEN;

    /// `epoch (4, big-endian) || key (16) [|| inbox (32) || inbox key
    /// (16)]`, wiped when dropped.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(Self::LEN_WITH_INBOX));
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(self.key.as_bytes());
        if let Some((inbox, key)) = &self.inbox {
            out.extend_from_slice(inbox);
            out.extend_from_slice(key.as_bytes());
        }
        out
    }

    /// The inverse of [`AccessKeyRecord::to_bytes`].
    ///
    /// # Errors
    /// [`crate::Error::Decode`] unless exactly [`AccessKeyRecord::LEN`] or
    /// [`AccessKeyRecord::LEN_WITH_INBOX`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let (record, inbox) = match bytes.len() {
            Self::LEN => (bytes, None),
            Self::LEN_WITH_INBOX => {
                let (record, inbox) = bytes.split_at(Self::LEN);
                let (id, key) = inbox.split_at(32);
                let mut mailbox = [0u8; 32];
                mailbox.copy_from_slice(id);
                let mut raw = zeroize::Zeroizing::new([0u8; ACCESS_KEY_LEN]);
                raw.copy_from_slice(key);
                (record, Some((mailbox, AccessKey::from_bytes(*raw))))
            }
            _ => return Err(crate::Error::Decode("access key record length")),
        };
        let (epoch, key) = record.split_at(4);
        let mut raw = zeroize::Zeroizing::new([0u8; ACCESS_KEY_LEN]);
        raw.copy_from_slice(key);
        Ok(AccessKeyRecord {
            epoch: u32::from_be_bytes([epoch[0], epoch[1], epoch[2], epoch[3]]),
            key: AccessKey::from_bytes(*raw),
            inbox,
        })
    }
}

/// What the device keeps about deposit access for one peer device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAccess {
    /// The peer's access key (the newest epoch received), if it sent one.
    pub key: Option<AccessKeyRecord>,
    /// Excluded: the frames this device sends to the peer do not carry
    /// this device's access key ([`crate::client::Client::exclude_contact`]).
    pub excluded: bool,
}

/// An envelope waiting to be deposited (committed before the deposit, so a
/// crash does not lose it; retried with the same id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The recipient device.
    pub to: DeviceAddress,
    /// The envelope (its id makes retries idempotent).
    pub envelope: Envelope,
    /// When it was created (unix seconds).
    pub created: u64,
    /// The message it carries, if any (a receipt or a notice carries
    /// none): depositing it moves that message's delivery state.
    pub message: Option<MessageId>,
}

/// A received, decrypted message, waiting for the application.
#[derive(Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// The envelope it came in (unique: the inbox key).
    pub envelope_id: EnvelopeId,
    /// The sender device.
    pub from: DeviceAddress,
    /// The application's bytes.
    pub body: Vec<u8>,
    /// When it was received (unix seconds).
    pub received_at: u64,
}

impl fmt::Debug for InboxMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxMessage")
            .field("envelope_id", &self.envelope_id)
            .field("from", &self.from)
            .field("body_len", &self.body.len())
            .field("received_at", &self.received_at)
            .finish()
    }
}

/// Everything one processed envelope changes, committed atomically by
/// [`Store::commit_receive`].
#[derive(Clone, Copy, Debug)]
pub struct ReceiveCommit<'a> {
    /// The envelope, marked processed (so a redelivery is recognised).
    pub envelope_id: EnvelopeId,
    /// When it was processed (unix seconds).
    pub processed_at: u64,
    /// The peer's new session record, if the envelope changed it.
    pub session: Option<(&'a DeviceAddress, &'a SessionRecord)>,
    /// The prekeys, if a one-time prekey was consumed.
    pub prekeys: Option<&'a PrekeyState>,
    /// A new or updated peer record.
    pub peer: Option<&'a PeerRecord>,
    /// The message for the application.
    pub message: Option<&'a InboxMessage>,
    /// A sent message whose state changed (a receipt arrived).
    pub sent: Option<&'a SentMessage>,
    /// A peer device's new access key (its frame carried a higher epoch):
    /// replaces the key of [`Store::peer_access`], keeps `excluded`.
    pub access: Option<(&'a DeviceAddress, &'a AccessKeyRecord)>,
}

/// The id a sender gives a message, inside the encrypted frame: the
/// recipient shows each id once and acknowledges it end to end.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Why a message could not be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// No receipt came within the configured time, despite re-sending.
    TimedOut,
    /// The recipient was marked compromised before it was delivered.
    Compromised,
    /// The relay refused it as never deliverable (too large, malformed).
    Refused,
}

impl Failure {
    /// A stable code for storage (1, 2, 3).
    pub fn code(self) -> u8 {
        match self {
            Failure::TimedOut => 1,
            Failure::Compromised => 2,
            Failure::Refused => 3,
        }
    }
    /// The inverse of [`Failure::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Failure::TimedOut,
            2 => Failure::Compromised,
            3 => Failure::Refused,
            _ => return None,
        })
    }
}

/// Where a sent message is, as far as its sender can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Committed to the outbox, not yet deposited.
    Stored,
    /// Deposited at the recipient's relay; no receipt yet.
    Deposited,
    /// Re-sent (at least once) for want of a receipt; no receipt yet.
    Resent,
    /// The recipient's device acknowledged it end to end.
    Delivered,
    /// Given up, with the reason.
    Failed(Failure),
}

impl DeliveryState {
    /// Whether the message is still awaiting a receipt.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            DeliveryState::Stored | DeliveryState::Deposited | DeliveryState::Resent
        )
    }
    /// A stable code for storage: 0 stored, 1 deposited, 2 re-sent,
    /// 3 delivered, 16 + [`Failure::code`] failed.
    pub fn code(self) -> u8 {
        match self {
            DeliveryState::Stored => 0,
            DeliveryState::Deposited => 1,
            DeliveryState::Resent => 2,
            DeliveryState::Delivered => 3,
            DeliveryState::Failed(f) => 16 + f.code(),
        }
    }
    /// The inverse of [`DeliveryState::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => DeliveryState::Stored,
            1 => DeliveryState::Deposited,
            2 => DeliveryState::Resent,
            3 => DeliveryState::Delivered,
            c if c > 16 => DeliveryState::Failed(Failure::from_code(c - 16)?),
            _ => return None,
        })
    }
}

/// A message handed to [`crate::client::Client::send`], kept (its body
/// encrypted at rest) until the recipient acknowledges it, so that it can
/// be re-sent; after that only its state is kept, until pruned.
#[derive(Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// The message id (in the frame).
    pub id: MessageId,
    /// The recipient device.
    pub to: DeviceAddress,
    /// The application's bytes (emptied once delivered or failed).
    pub body: Vec<u8>,
    /// Its delivery state.
    pub state: DeliveryState,
    /// When the application handed it over (unix seconds).
    pub created: u64,
    /// When it was last encrypted and queued (unix seconds).
    pub last_sent: u64,
    /// How many times it was encrypted and queued (1 + re-sends).
    pub sends: u32,
}

impl fmt::Debug for SentMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentMessage")
            .field("id", &self.id)
            .field("to", &self.to)
            .field("body_len", &self.body.len())
            .field("state", &self.state)
            .field("created", &self.created)
            .field("last_sent", &self.last_sent)
            .field("sends", &self.sends)
            .finish()
    }
}

/// What the application knows of a person: its own name for them, and the
/// device addresses it was last given for them. The client compares each
/// new address with these, by device number, to tell the application
/// that a contact's key changed (Signal's "safety number changed"),
/// instead of meeting the new key as a stranger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactRecord {
    /// The application's name for the contact (at most
    /// [`ContactRecord::MAX_NAME`] bytes).
    pub name: Vec<u8>,
    /// Its devices, one address per device number, by device number.
    pub devices: Vec<DeviceAddress>,
    /// Identity keys the contact's devices had before, oldest first (at
    /// most [`ContactRecord::MAX_PREVIOUS`]).
    pub previous: Vec<[u8; 32]>,
    /// When a key last changed (unix seconds; 0: never).
    pub changed_at: u64,
}

impl ContactRecord {
    /// The longest name.
    pub const MAX_NAME: usize = 255;
    /// Earlier keys kept.
    pub const MAX_PREVIOUS: usize = 16;
    /// The most devices kept.
    pub const MAX_DEVICES: usize = 255;

    /// Serializes the record:
    /// `0x01 || name length (1) || name || device count (1) || count x
    /// (identity (32) || device_id (4)) || previous count (1) || count x
    /// identity (32) || changed_at (8)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            13 + self.name.len() + 36 * self.devices.len() + 32 * self.previous.len(),
        );
        out.push(1);
        out.push(self.name.len().min(Self::MAX_NAME) as u8);
        out.extend_from_slice(&self.name[..self.name.len().min(Self::MAX_NAME)]);
        let devices = &self.devices[..self.devices.len().min(Self::MAX_DEVICES)];
        out.push(devices.len() as u8);
        for d in devices {
            out.extend_from_slice(&d.identity);
            out.extend_from_slice(&d.device_id.to_be_bytes());
        }
        let previous = &self.previous[self.previous.len().saturating_sub(Self::MAX_PREVIOUS)..];
        out.push(previous.len() as u8);
        for k in previous {
            out.extend_from_slice(k);
        }
        out.extend_from_slice(&self.changed_at.to_be_bytes());
        out
    }

    /// Restores [`Self::to_bytes`].
    ///
    /// # Errors
    /// [`crate::Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let bad = crate::Error::State("contact record");
        let mut r = Cursor(bytes);
        if r.u8().ok_or(bad)? != 1 {
            return Err(bad);
        }
        let len = usize::from(r.u8().ok_or(bad)?);
        let name = r.take(len).ok_or(bad)?.to_vec();
        let count = usize::from(r.u8().ok_or(bad)?);
        let mut devices = Vec::with_capacity(count.min(r.0.len() / 36));
        for _ in 0..count {
            devices.push(DeviceAddress {
                identity: r.array().ok_or(bad)?,
                device_id: r.u32().ok_or(bad)?,
            });
        }
        let count = usize::from(r.u8().ok_or(bad)?);
        if count > Self::MAX_PREVIOUS {
            return Err(bad);
        }
        let mut previous = Vec::with_capacity(count.min(r.0.len() / 32));
        for _ in 0..count {
            previous.push(r.array().ok_or(bad)?);
        }
        let changed_at = r.u64().ok_or(bad)?;
        if !r.0.is_empty() {
            return Err(bad);
        }
        Ok(ContactRecord {
            name,
            devices,
            previous,
            changed_at,
        })
    }
}

/// A session record set aside because it did not decrypt or decode: its
/// bytes are kept as stored, for inspection; the peer gets a new session.
/// They may hold session secrets (a store that does not seal keeps them in
/// the clear): zeroized on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The peer device.
    pub peer: DeviceAddress,
    /// When it was set aside (unix seconds).
    pub at: u64,
    /// The stored bytes, as found (still sealed, for a sealing store).
    pub bytes: zeroize::Zeroizing<Vec<u8>>,
    /// Why it failed.
    pub reason: String,
}

impl fmt::Debug for Quarantined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quarantined")
            .field("peer", &self.peer)
            .field("at", &self.at)
            .field("bytes_len", &self.bytes.len())
            .field("reason", &self.reason)
            .finish()
    }
}

/// What the device keeps of an account (SPEC.md 25.7, 25.8): its own
/// account or a contact's. The lists are the signed encodings (SPEC.md
/// 25.3), verified before they were stored; a client restores the head by
/// taking the parent on first use and verifying the head as its successor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRecord {
    /// The account id.
    pub account: AccountId,
    /// The newest verified list (signed encoding).
    pub head: Vec<u8>,
    /// The list the head was verified as the successor of, if any (kept to
    /// authenticate a conflicting sibling of the head).
    pub parent: Option<Vec<u8>>,
    /// Trust in the person (the three states of SPEC.md 22.3, per account).
    pub trust: Trust,
    /// The evidence of a conflict (`ours`, `theirs`: two signed lists of one
    /// version), kept once the account was marked compromised by one.
    pub evidence: Option<(Vec<u8>, Vec<u8>)>,
    /// When the record last changed (unix seconds).
    pub updated_at: u64,
}

impl AccountRecord {
    /// The longest list encoding a record holds (SPEC.md 25.10: 1691 bytes).
    pub const MAX_LIST: usize = 74 + 36 * 16 + 1 + 65 * 16;

    /// Serializes the record: `0x01 || account (32) || trust (1) ||
    /// updated_at (8) || head (2-byte length || bytes) || parent flag (1) [||
    /// parent (2 || bytes)] || evidence flag (1) [|| ours (2 || bytes) ||
    /// theirs (2 || bytes)]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, bytes: &[u8]) {
            let bytes = &bytes[..bytes.len().min(AccountRecord::MAX_LIST)];
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(bytes);
        }
        let mut out = Vec::with_capacity(64 + self.head.len() * 3);
        out.push(1);
        out.extend_from_slice(self.account.as_bytes());
        out.push(self.trust.code());
        out.extend_from_slice(&self.updated_at.to_be_bytes());
        put(&mut out, &self.head);
        match &self.parent {
            Some(parent) => {
                out.push(1);
                put(&mut out, parent);
            }
            None => out.push(0),
        }
        match &self.evidence {
            Some((ours, theirs)) => {
                out.push(1);
                put(&mut out, ours);
                put(&mut out, theirs);
            }
            None => out.push(0),
        }
        out
    }

    /// Restores [`Self::to_bytes`].
    ///
    /// # Errors
    /// [`crate::Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let bad = crate::Error::State("account record");
        fn list(r: &mut Cursor<'_>) -> Option<Vec<u8>> {
            let len = usize::from(r.u16()?);
            if len > AccountRecord::MAX_LIST {
                return None;
            }
            Some(r.take(len)?.to_vec())
        }
        fn flag(r: &mut Cursor<'_>) -> Option<bool> {
            match r.u8()? {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            }
        }
        let mut r = Cursor(bytes);
        if r.u8().ok_or(bad)? != 1 {
            return Err(bad);
        }
        let account = AccountId(r.array().ok_or(bad)?);
        let trust = Trust::from_code(r.u8().ok_or(bad)?).ok_or(bad)?;
        let updated_at = r.u64().ok_or(bad)?;
        let head = list(&mut r).ok_or(bad)?;
        let parent = match flag(&mut r).ok_or(bad)? {
            true => Some(list(&mut r).ok_or(bad)?),
            false => None,
        };
        let evidence = match flag(&mut r).ok_or(bad)? {
            true => Some((list(&mut r).ok_or(bad)?, list(&mut r).ok_or(bad)?)),
            false => None,
        };
        if !r.0.is_empty() {
            return Err(bad);
        }
        Ok(AccountRecord {
            account,
            head,
            parent,
            trust,
            evidence,
            updated_at,
        })
    }
}

/// A pairing offer this device showed and waits to be paired through
/// (SPEC.md 25.9): the pairing code and when it expires. Zeroized on drop,
/// never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingRecord {
    /// The pairing code (16 random bytes), secret.
    pub code: zeroize::Zeroizing<[u8; 16]>,
    /// When the offer was made (unix seconds).
    pub created_at: u64,
    /// When it expires (unix seconds): a pairing message received later is
    /// refused.
    pub expires_at: u64,
}

impl fmt::Debug for PairingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingRecord")
            .field("code", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl PairingRecord {
    /// Length of [`Self::to_bytes`].
    pub const LEN: usize = 1 + 16 + 8 + 8;

    /// Serializes the record: `0x01 || code (16) || created_at (8) ||
    /// expires_at (8)`.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(Self::LEN));
        out.push(1);
        out.extend_from_slice(&self.code[..]);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out
    }

    /// Restores [`Self::to_bytes`].
    ///
    /// # Errors
    /// [`crate::Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let bad = crate::Error::State("pairing record");
        let mut r = Cursor(bytes);
        if r.u8().ok_or(bad)? != 1 {
            return Err(bad);
        }
        let code = zeroize::Zeroizing::new(r.array::<16>().ok_or(bad)?);
        let created_at = r.u64().ok_or(bad)?;
        let expires_at = r.u64().ok_or(bad)?;
        if !r.0.is_empty() {
            return Err(bad);
        }
        Ok(PairingRecord {
            code,
            created_at,
            expires_at,
        })
    }
}

/// One copy of a fan-out ([`Store::commit_send_many`]): the recipient
/// device's session record, the envelope for the outbox and, if given, the
/// sent message kept for re-sending.
pub type SendCopy = (SessionRecord, OutboxEntry, Option<SentMessage>);

/// One deposit to record ([`Store::commit_deposits`]): the envelope the
/// relay accepted (or refused for good), to remove from the outbox, and, if
/// its sent message changed state (deposited, re-sent, failed), the message
/// as updated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepositDone {
    /// The envelope to remove from the outbox.
    pub envelope: EnvelopeId,
    /// The sent message to store (keyed by its id), if it changed.
    pub sent: Option<SentMessage>,
}

fn accounts_unsupported() -> StoreError {
    StoreError::Backend("this store does not keep accounts".into())
}

/// A storage failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The database key is wrong (or the database belongs to another key).
    WrongKey,
    /// A row failed to decrypt or decode; names the table and row.
    Corrupted {
        /// The table (or record kind).
        table: &'static str,
        /// The row's key, printable.
        row: String,
        /// What failed.
        reason: String,
    },
    /// The schema is newer than this code understands.
    UnsupportedSchema(u32),
    /// The backend failed (I/O, locking, ...).
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::WrongKey => f.write_str("wrong database key"),
            StoreError::Corrupted { table, row, reason } => {
                write!(f, "corrupted row {row} in {table}: {reason}")
            }
            StoreError::UnsupportedSchema(v) => write!(f, "unsupported schema version {v}"),
            StoreError::Backend(e) => write!(f, "storage backend: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The device's local state, with blocking methods: the trait to implement
/// for a synchronous backend (every [`BlockingStore`] is a [`Store`]). See
/// the module docs for the contract.
pub trait BlockingStore {
    /// The device's identity, if created.
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError>;
    /// Sets the device's identity (once, at creation).
    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError>;

    /// The private prekeys and their bookkeeping.
    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError>;
    /// Replaces the private prekeys and their bookkeeping.
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError>;

    /// The sessions with a peer device. A store that serializes sessions
    /// restores them with its identity (the state does not hold the
    /// identity keys: [`SessionRecord::from_bytes`]), so it needs one:
    /// without it a stored record is [`StoreError::Corrupted`].
    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError>;
    /// Every peer's session record, each decoded on its own: a record that
    /// fails is returned as its error (to be quarantined), the others load.
    ///
    /// # Errors
    /// Only a failure that concerns the whole store (the backend failed).
    #[allow(clippy::type_complexity)]
    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>;
    /// Replaces (or creates) a peer's session record.
    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError>;
    /// Deletes a peer's session record, if any.
    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError>;
    /// Moves a peer's session record, as stored, to the quarantine (with
    /// `reason`), so that the peer starts afresh and the bytes stay for
    /// inspection. No record: nothing happens.
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError>;
    /// The quarantined records, oldest first.
    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError>;

    /// What is known of a peer device.
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError>;
    /// Adds or updates a peer record.
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError>;
    /// Every peer record.
    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError>;
    /// A contact by the application's name for it.
    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError>;
    /// Adds or replaces a contact (keyed by its name).
    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError>;
    /// Every contact, by name.
    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError>;
    /// Every peer record with this identity key (trust belongs to the key:
    /// SPEC.md, "Trust"). The default filters [`BlockingStore::peers`].
    fn peers_with_identity(&self, identity: &[u8; 32]) -> Result<Vec<PeerRecord>, StoreError> {
        Ok(self
            .peers()?
            .into_iter()
            .filter(|p| &p.address.identity == identity)
            .collect())
    }

    /// The device's own deposit access key (`None`: not drawn yet).
    fn own_access_key(&self) -> Result<Option<AccessKeyRecord>, StoreError>;
    /// Replaces the device's own deposit access key (a secret: a store
    /// that persists keeps it confidential at rest).
    fn set_own_access_key(&mut self, key: &AccessKeyRecord) -> Result<(), StoreError>;
    /// What is kept about a peer device's access ([`PeerAccess::default`]
    /// if nothing).
    fn peer_access(&self, peer: &DeviceAddress) -> Result<PeerAccess, StoreError>;
    /// Replaces a peer device's access key (a secret, as the own one),
    /// keeping its `excluded` flag.
    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> Result<(), StoreError>;
    /// Sets a peer device's `excluded` flag, keeping its key.
    fn set_peer_excluded(&mut self, peer: &DeviceAddress, excluded: bool)
        -> Result<(), StoreError>;

    /// Atomically stores the session record of `entry.to`, adds the
    /// envelope to the outbox and, if given, stores the sent message (new
    /// or updated: keyed by its id).
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError>;
    /// Envelopes not yet deposited, oldest first.
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Removes a deposited envelope from the outbox.
    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError>;

    /// Whether an envelope was already processed.
    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError>;
    /// For each id, whether it is processed ([`BlockingStore::is_processed`] of
    /// each, in order; a store answers a whole batch at once if it can).
    fn processed_among(&self, ids: &[EnvelopeId]) -> Result<Vec<bool>, StoreError> {
        ids.iter().map(|id| self.is_processed(id)).collect()
    }
    /// Applies every commit of the batch, in order, atomically: all or none.
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError>;
    /// Forgets processed-envelope marks older than `before` (after the
    /// relay's retention, a redelivery cannot happen from an honest relay,
    /// and the ratchet still rejects replays).
    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError>;

    /// Every sent message kept: awaiting a receipt, or delivered or failed
    /// and not yet pruned; oldest first.
    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError>;
    /// The sent messages still awaiting a receipt, oldest first (read on
    /// every receive: a store should not read the delivered ones for it).
    /// The default filters [`BlockingStore::sent_messages`].
    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        let mut all = self.sent_messages()?;
        all.retain(|m| m.state.is_pending());
        Ok(all)
    }
    /// The id of the most recently stored sent message to `to` that still
    /// awaits a receipt (the last one addressed to `to` among
    /// [`BlockingStore::pending_sent`]), or `None`. Read for every copy of
    /// an account message (its `previous`, SPEC.md 25.13): a store should
    /// answer it without reading every pending message. The default
    /// filters [`BlockingStore::pending_sent`].
    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        Ok(self
            .pending_sent()?
            .iter()
            .rev()
            .find(|m| m.to == *to)
            .map(|m| m.id))
    }
    /// A sent message by id.
    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError>;
    /// Stores a sent message (new or updated: keyed by its id).
    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError>;
    /// Forgets delivered and failed messages created before `before`.
    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError>;

    /// Messages waiting for the application, in the order received.
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError>;
    /// Removes a message the application has consumed.
    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError>;

    /// The session records of every peer device with this identity key,
    /// each decoded on its own (as [`BlockingStore::sessions`]): a prekey
    /// message names its sender's identity key, so this is how it finds
    /// its sessions. The default filters [`BlockingStore::sessions`].
    #[allow(clippy::type_complexity)]
    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        let mut all = self.sessions()?;
        all.retain(|(a, _)| &a.identity == identity);
        Ok(all)
    }
    /// The peer devices whose session record holds a session that can
    /// decrypt under one of these ratchet keys without a DH ratchet step
    /// ([`SessionRecord::ratchet_keys`]), each once, in any order. A
    /// record that does not decode is included (so that it is found and
    /// quarantined). A store should keep an index, written with the
    /// records, so that routing a message does not open every record; the
    /// default filters [`BlockingStore::sessions`].
    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        Ok(self
            .sessions()?
            .into_iter()
            .filter(|(_, r)| match r {
                Ok(r) => r.ratchet_keys().any(|k| keys.contains(&k)),
                Err(_) => true,
            })
            .map(|(a, _)| a)
            .collect())
    }
    /// The peer devices whose session record holds a session that awaits a
    /// new ratchet key from its peer ([`SessionRecord::awaits_ratchet_key`]):
    /// only they can own a message whose ratchet key no record knows. A
    /// record that does not decode is included. A store should list the
    /// most recently written records first: the client tries them in this
    /// order and stops at the one that decrypts, so the order decides the
    /// cost, not the outcome. The default filters [`BlockingStore::sessions`], in
    /// its order.
    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        Ok(self
            .sessions()?
            .into_iter()
            .filter(|(_, r)| r.as_ref().map_or(true, SessionRecord::awaits_ratchet_key))
            .map(|(a, _)| a)
            .collect())
    }

    /// Atomically stores every copy of one fan-out (SPEC.md 25.13): each
    /// recipient device's session record, its envelope in the outbox and
    /// its sent message, all or none. The default refuses (a loop over
    /// [`Self::commit_send`] would not be atomic).
    fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        let _ = copies;
        Err(accounts_unsupported())
    }
    /// Records the outcome of several deposits (SPEC.md 25.13): for each
    /// item, in order, removes its envelope from the outbox
    /// ([`Self::remove_outbox`]) and, if given, stores its sent message
    /// ([`Self::update_sent`]). An empty batch changes nothing.
    ///
    /// A store SHOULD apply the whole batch in one atomic transaction (the
    /// client records a fan-out's deposits with one call: one transaction
    /// instead of two per copy). The default does the per-item calls in
    /// order, not atomically, which is safe: a crash or a failure in the
    /// middle only leaves some of the work undone, and what is left is
    /// repaired. An envelope left in the outbox is deposited again by the
    /// next [`crate::client::Client::flush_outbox`] with the same id (the
    /// relay takes it idempotently, the receiver's processed mark drops a
    /// redelivery); a sent message left `Stored` is moved on by that
    /// deposit, its receipt or its re-send.
    fn commit_deposits(&mut self, done: &[DepositDone]) -> Result<(), StoreError> {
        for d in done {
            self.remove_outbox(&d.envelope)?;
            if let Some(sent) = &d.sent {
                self.update_sent(sent)?;
            }
        }
        Ok(())
    }
    /// The device's own account (`None`: it has none yet). The default
    /// keeps none.
    fn own_account(&self) -> Result<Option<AccountRecord>, StoreError> {
        Ok(None)
    }
    /// Stores (replaces) the device's own account. The default refuses.
    fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        let _ = record;
        Err(accounts_unsupported())
    }
    /// A contact's account, by id. The default keeps none.
    fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        let _ = account;
        Ok(None)
    }
    /// Stores (replaces) a contact's account. The default refuses.
    fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        let _ = record;
        Err(accounts_unsupported())
    }
    /// Every contact account, ordered by account id. The default keeps none.
    fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        Ok(Vec::new())
    }
    /// The pending pairing offer (SPEC.md 25.9), if any. The default keeps
    /// none.
    fn pairing(&self) -> Result<Option<PairingRecord>, StoreError> {
        Ok(None)
    }
    /// Stores (replaces) or, with `None`, drops the pending pairing offer.
    /// The default refuses.
    fn set_pairing(&mut self, record: Option<&PairingRecord>) -> Result<(), StoreError> {
        let _ = record;
        Err(accounts_unsupported())
    }
}

/// The device's local state, asynchronous: what the client awaits. A
/// synchronous backend implements [`BlockingStore`] instead and gets this
/// trait for free; an asynchronous one (IndexedDB, a network database)
/// implements it directly. See the module docs for the contract.
#[allow(clippy::type_complexity)]
pub trait Store: MaybeSend + MaybeSync {
    /// The device's identity, if created.
    fn identity(
        &self,
    ) -> impl Future<Output = Result<Option<LocalIdentity>, StoreError>> + MaybeSend;
    /// Sets the device's identity (once, at creation).
    fn set_identity(
        &mut self,
        identity: &LocalIdentity,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// The private prekeys and their bookkeeping.
    fn prekeys(&self) -> impl Future<Output = Result<Option<PrekeyState>, StoreError>> + MaybeSend;
    /// Replaces the private prekeys and their bookkeeping.
    fn set_prekeys(
        &mut self,
        state: &PrekeyState,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// The sessions with a peer device. A store that serializes sessions
    /// restores them with its identity (the state does not hold the
    /// identity keys: [`SessionRecord::from_bytes`]), so it needs one:
    /// without it a stored record is [`StoreError::Corrupted`].
    fn session(
        &self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + MaybeSend;
    /// Every peer's session record, each decoded on its own: a record that
    /// fails is returned as its error (to be quarantined), the others load.
    ///
    /// # Errors
    /// Only a failure that concerns the whole store (the backend failed).
    #[allow(clippy::type_complexity)]
    fn sessions(
        &self,
    ) -> impl Future<
        Output = Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>,
    > + MaybeSend;
    /// Replaces (or creates) a peer's session record.
    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Deletes a peer's session record, if any.
    fn remove_session(
        &mut self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Moves a peer's session record, as stored, to the quarantine (with
    /// `reason`), so that the peer starts afresh and the bytes stay for
    /// inspection. No record: nothing happens.
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// The quarantined records, oldest first.
    fn quarantined(&self)
        -> impl Future<Output = Result<Vec<Quarantined>, StoreError>> + MaybeSend;
    /// What is known of a peer device.
    fn peer(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<PeerRecord>, StoreError>> + MaybeSend;
    /// Adds or updates a peer record.
    fn set_peer(
        &mut self,
        peer: &PeerRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Every peer record.
    fn peers(&self) -> impl Future<Output = Result<Vec<PeerRecord>, StoreError>> + MaybeSend;
    /// A contact by the application's name for it.
    fn contact(
        &self,
        name: &[u8],
    ) -> impl Future<Output = Result<Option<ContactRecord>, StoreError>> + MaybeSend;
    /// Adds or replaces a contact (keyed by its name).
    fn set_contact(
        &mut self,
        contact: &ContactRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Every contact, by name.
    fn contacts(&self) -> impl Future<Output = Result<Vec<ContactRecord>, StoreError>> + MaybeSend;
    /// Every peer record with this identity key (trust belongs to the key:
    /// SPEC.md, "Trust"). The default filters [`Store::peers`].
    fn peers_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> impl Future<Output = Result<Vec<PeerRecord>, StoreError>> + MaybeSend {
        async move {
            let mut all = self.peers().await?;
            all.retain(|p| &p.address.identity == identity);
            Ok(all)
        }
    }
    /// The device's own deposit access key (`None`: not drawn yet).
    fn own_access_key(
        &self,
    ) -> impl Future<Output = Result<Option<AccessKeyRecord>, StoreError>> + MaybeSend;
    /// Replaces the device's own deposit access key (a secret: a store
    /// that persists keeps it confidential at rest).
    fn set_own_access_key(
        &mut self,
        key: &AccessKeyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// What is kept about a peer device's access ([`PeerAccess::default`]
    /// if nothing).
    fn peer_access(
        &self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<PeerAccess, StoreError>> + MaybeSend;
    /// Replaces a peer device's access key (a secret, as the own one),
    /// keeping its `excluded` flag.
    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Sets a peer device's `excluded` flag, keeping its key.
    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;

    /// Atomically stores the session record of `entry.to`, adds the
    /// envelope to the outbox and, if given, stores the sent message (new
    /// or updated: keyed by its id).
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Envelopes not yet deposited, oldest first.
    fn outbox(&self) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + MaybeSend;
    /// Removes a deposited envelope from the outbox.
    fn remove_outbox(
        &mut self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Whether an envelope was already processed.
    fn is_processed(
        &self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<bool, StoreError>> + MaybeSend;
    /// For each id, whether it is processed ([`Store::is_processed`] of
    /// each, in order; a store answers a whole batch at once if it can).
    fn processed_among(
        &self,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + MaybeSend {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(self.is_processed(id).await?);
            }
            Ok(out)
        }
    }
    /// Applies every commit of the batch, in order, atomically: all or none.
    fn commit_receive(
        &mut self,
        batch: &[ReceiveCommit<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Forgets processed-envelope marks older than `before` (after the
    /// relay's retention, a redelivery cannot happen from an honest relay,
    /// and the ratchet still rejects replays).
    fn prune_processed(
        &mut self,
        before: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Every sent message kept: awaiting a receipt, or delivered or failed
    /// and not yet pruned; oldest first.
    fn sent_messages(
        &self,
    ) -> impl Future<Output = Result<Vec<SentMessage>, StoreError>> + MaybeSend;
    /// The sent messages still awaiting a receipt, oldest first (read on
    /// every receive: a store should not read the delivered ones for it).
    /// The default filters [`Store::sent_messages`].
    fn pending_sent(
        &self,
    ) -> impl Future<Output = Result<Vec<SentMessage>, StoreError>> + MaybeSend {
        async move {
            let mut all = self.sent_messages().await?;
            all.retain(|m| m.state.is_pending());
            Ok(all)
        }
    }
    /// [`BlockingStore::last_pending_to`]; the default filters
    /// [`Store::pending_sent`].
    fn last_pending_to(
        &self,
        to: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<MessageId>, StoreError>> + MaybeSend {
        async move {
            Ok(self
                .pending_sent()
                .await?
                .iter()
                .rev()
                .find(|m| m.to == *to)
                .map(|m| m.id))
        }
    }
    /// A sent message by id.
    fn sent_message(
        &self,
        id: &MessageId,
    ) -> impl Future<Output = Result<Option<SentMessage>, StoreError>> + MaybeSend;
    /// Stores a sent message (new or updated: keyed by its id).
    fn update_sent(
        &mut self,
        message: &SentMessage,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Forgets delivered and failed messages created before `before`.
    fn prune_sent(
        &mut self,
        before: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// Messages waiting for the application, in the order received.
    fn inbox(&self) -> impl Future<Output = Result<Vec<InboxMessage>, StoreError>> + MaybeSend;
    /// Removes a message the application has consumed.
    fn remove_inbox(
        &mut self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
    /// The session records of every peer device with this identity key,
    /// each decoded on its own (as [`Store::sessions`]): a prekey
    /// message names its sender's identity key, so this is how it finds
    /// its sessions. The default filters [`Store::sessions`].
    #[allow(clippy::type_complexity)]
    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> impl Future<
        Output = Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>,
    > + MaybeSend {
        async move {
            let mut all = self.sessions().await?;
            all.retain(|(a, _)| &a.identity == identity);
            Ok(all)
        }
    }
    /// The peer devices whose session record holds a session that can
    /// decrypt under one of these ratchet keys without a DH ratchet step
    /// ([`SessionRecord::ratchet_keys`]), each once, in any order. A
    /// record that does not decode is included (so that it is found and
    /// quarantined). A store should keep an index, written with the
    /// records, so that routing a message does not open every record; the
    /// default filters [`Store::sessions`].
    fn route_ratchet_keys(
        &self,
        keys: &[[u8; 32]],
    ) -> impl Future<Output = Result<Vec<DeviceAddress>, StoreError>> + MaybeSend {
        async move {
            Ok(self
                .sessions()
                .await?
                .into_iter()
                .filter(|(_, r)| match r {
                    Ok(r) => r.ratchet_keys().any(|k| keys.contains(&k)),
                    Err(_) => true,
                })
                .map(|(a, _)| a)
                .collect())
        }
    }
    /// The peer devices whose session record holds a session that awaits a
    /// new ratchet key from its peer ([`SessionRecord::awaits_ratchet_key`]):
    /// only they can own a message whose ratchet key no record knows. A
    /// record that does not decode is included. A store should list the
    /// most recently written records first: the client tries them in this
    /// order and stops at the one that decrypts, so the order decides the
    /// cost, not the outcome. The default filters [`Store::sessions`], in
    /// its order.
    fn awaiting_ratchet_key(
        &self,
    ) -> impl Future<Output = Result<Vec<DeviceAddress>, StoreError>> + MaybeSend {
        async move {
            Ok(self
                .sessions()
                .await?
                .into_iter()
                .filter(|(_, r)| r.as_ref().map_or(true, SessionRecord::awaits_ratchet_key))
                .map(|(a, _)| a)
                .collect())
        }
    }

    /// [`BlockingStore::commit_send_many`].
    fn commit_send_many(
        &mut self,
        copies: &[SendCopy],
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        let _ = copies;
        core::future::ready(Err(accounts_unsupported()))
    }
    /// [`BlockingStore::commit_deposits`]; the default awaits
    /// [`Store::remove_outbox`] and [`Store::update_sent`] per item, in
    /// order (not atomic: see there why that is safe).
    fn commit_deposits(
        &mut self,
        done: &[DepositDone],
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        async move {
            for d in done {
                self.remove_outbox(&d.envelope).await?;
                if let Some(sent) = &d.sent {
                    self.update_sent(sent).await?;
                }
            }
            Ok(())
        }
    }
    /// [`BlockingStore::own_account`].
    fn own_account(
        &self,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(Ok(None))
    }
    /// [`BlockingStore::set_own_account`].
    fn set_own_account(
        &mut self,
        record: &AccountRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        let _ = record;
        core::future::ready(Err(accounts_unsupported()))
    }
    /// [`BlockingStore::account`].
    fn account(
        &self,
        account: &AccountId,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + MaybeSend {
        let _ = account;
        core::future::ready(Ok(None))
    }
    /// [`BlockingStore::set_account`].
    fn set_account(
        &mut self,
        record: &AccountRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        let _ = record;
        core::future::ready(Err(accounts_unsupported()))
    }
    /// [`BlockingStore::accounts`].
    fn accounts(&self) -> impl Future<Output = Result<Vec<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(Ok(Vec::new()))
    }
    /// [`BlockingStore::pairing`].
    fn pairing(
        &self,
    ) -> impl Future<Output = Result<Option<PairingRecord>, StoreError>> + MaybeSend {
        core::future::ready(Ok(None))
    }
    /// [`BlockingStore::set_pairing`].
    fn set_pairing(
        &mut self,
        record: Option<&PairingRecord>,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        let _ = record;
        core::future::ready(Err(accounts_unsupported()))
    }
}

/// Every blocking store is a store: each method does its work when called
/// and returns a ready future (see the module docs: where it blocks).
#[allow(clippy::type_complexity)]
impl<T: BlockingStore + MaybeSend + MaybeSync> Store for T {
    fn identity(
        &self,
    ) -> impl Future<Output = Result<Option<LocalIdentity>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::identity(self))
    }

    fn set_identity(
        &mut self,
        identity: &LocalIdentity,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_identity(self, identity))
    }

    fn own_access_key(
        &self,
    ) -> impl Future<Output = Result<Option<AccessKeyRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::own_access_key(self))
    }

    fn set_own_access_key(
        &mut self,
        key: &AccessKeyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_own_access_key(self, key))
    }

    fn peer_access(
        &self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<PeerAccess, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::peer_access(self, peer))
    }

    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_peer_access_key(self, peer, key))
    }

    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_peer_excluded(self, peer, excluded))
    }

    fn prekeys(&self) -> impl Future<Output = Result<Option<PrekeyState>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::prekeys(self))
    }

    fn set_prekeys(
        &mut self,
        state: &PrekeyState,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_prekeys(self, state))
    }

    fn session(
        &self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::session(self, peer))
    }

    fn sessions(
        &self,
    ) -> impl Future<
        Output = Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>,
    > + MaybeSend {
        core::future::ready(BlockingStore::sessions(self))
    }

    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_session(self, peer, record))
    }

    fn remove_session(
        &mut self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::remove_session(self, peer))
    }

    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::quarantine_session(self, peer, now, reason))
    }

    fn quarantined(
        &self,
    ) -> impl Future<Output = Result<Vec<Quarantined>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::quarantined(self))
    }

    fn peer(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<PeerRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::peer(self, device))
    }

    fn set_peer(
        &mut self,
        peer: &PeerRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_peer(self, peer))
    }

    fn peers(&self) -> impl Future<Output = Result<Vec<PeerRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::peers(self))
    }

    fn contact(
        &self,
        name: &[u8],
    ) -> impl Future<Output = Result<Option<ContactRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::contact(self, name))
    }

    fn set_contact(
        &mut self,
        contact: &ContactRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_contact(self, contact))
    }

    fn contacts(&self) -> impl Future<Output = Result<Vec<ContactRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::contacts(self))
    }

    fn peers_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> impl Future<Output = Result<Vec<PeerRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::peers_with_identity(self, identity))
    }

    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::commit_send(self, record, entry, sent))
    }

    fn outbox(&self) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::outbox(self))
    }

    fn remove_outbox(
        &mut self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::remove_outbox(self, id))
    }

    fn is_processed(
        &self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<bool, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::is_processed(self, id))
    }

    fn processed_among(
        &self,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::processed_among(self, ids))
    }

    fn commit_receive(
        &mut self,
        batch: &[ReceiveCommit<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::commit_receive(self, batch))
    }

    fn prune_processed(
        &mut self,
        before: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::prune_processed(self, before))
    }

    fn sent_messages(
        &self,
    ) -> impl Future<Output = Result<Vec<SentMessage>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::sent_messages(self))
    }

    fn pending_sent(
        &self,
    ) -> impl Future<Output = Result<Vec<SentMessage>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::pending_sent(self))
    }

    fn last_pending_to(
        &self,
        to: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<MessageId>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::last_pending_to(self, to))
    }

    fn sent_message(
        &self,
        id: &MessageId,
    ) -> impl Future<Output = Result<Option<SentMessage>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::sent_message(self, id))
    }

    fn update_sent(
        &mut self,
        message: &SentMessage,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::update_sent(self, message))
    }

    fn prune_sent(
        &mut self,
        before: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::prune_sent(self, before))
    }

    fn inbox(&self) -> impl Future<Output = Result<Vec<InboxMessage>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::inbox(self))
    }

    fn remove_inbox(
        &mut self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::remove_inbox(self, id))
    }

    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> impl Future<
        Output = Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>,
    > + MaybeSend {
        core::future::ready(BlockingStore::sessions_with_identity(self, identity))
    }

    fn route_ratchet_keys(
        &self,
        keys: &[[u8; 32]],
    ) -> impl Future<Output = Result<Vec<DeviceAddress>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::route_ratchet_keys(self, keys))
    }

    fn awaiting_ratchet_key(
        &self,
    ) -> impl Future<Output = Result<Vec<DeviceAddress>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::awaiting_ratchet_key(self))
    }

    fn commit_send_many(
        &mut self,
        copies: &[SendCopy],
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::commit_send_many(self, copies))
    }
    fn commit_deposits(
        &mut self,
        done: &[DepositDone],
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::commit_deposits(self, done))
    }
    fn own_account(
        &self,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::own_account(self))
    }
    fn set_own_account(
        &mut self,
        record: &AccountRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_own_account(self, record))
    }
    fn account(
        &self,
        account: &AccountId,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::account(self, account))
    }
    fn set_account(
        &mut self,
        record: &AccountRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_account(self, record))
    }
    fn accounts(&self) -> impl Future<Output = Result<Vec<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::accounts(self))
    }
    fn pairing(
        &self,
    ) -> impl Future<Output = Result<Option<PairingRecord>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::pairing(self))
    }
    fn set_pairing(
        &mut self,
        record: Option<&PairingRecord>,
    ) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::set_pairing(self, record))
    }
}

/// Length of [`LocalIdentity::to_bytes`].
pub const LOCAL_IDENTITY_LEN: usize = 36;

impl LocalIdentity {
    /// Serializes the identity (the secret seed included: store it
    /// encrypted): `seed (32) || device_id (4, big-endian)`.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(LOCAL_IDENTITY_LEN));
        out.extend_from_slice(&self.keys.seed()[..]);
        out.extend_from_slice(&self.device_id.to_be_bytes());
        out
    }

    /// Restores [`Self::to_bytes`] (the key pair is derived from the seed).
    ///
    /// # Errors
    /// [`crate::Error::State`] unless `bytes` is exactly
    /// [`LOCAL_IDENTITY_LEN`] bytes long.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let bad = crate::Error::State("local identity length");
        let (seed, device) = bytes.split_first_chunk::<32>().ok_or(bad)?;
        let device = <[u8; 4]>::try_from(device).map_err(|_| bad)?;
        let seed = zeroize::Zeroizing::new(*seed);
        Ok(LocalIdentity {
            keys: IdentityKeyPair::from_seed(&seed),
            device_id: u32::from_be_bytes(device),
        })
    }
}

impl PrekeyState {
    /// Serializes the state (secret keys included: store it encrypted):
    ///
    /// ```text
    /// 0x03 || upload_counter (8) || last_rotation (8) || upload_pending (1)
    ///   || retired count (4) || count x (spk id (4) || retired_at (8))
    ///   || withdrawn count (4) || count x (below id (4) || withdrawn_at (8))
    ///   || accepted count (4) || count x (spk id (4) || digest (16))
    ///   || PrekeyStore::to_bytes()
    /// ```
    ///
    /// Version 0x02 (the same without the accepted list) still decodes.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let prekeys = self.prekeys.to_bytes();
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(
            30 + 12 * (self.retired_at.len() + self.one_time_retired.len())
                + 20 * self.accepted.len()
                + prekeys.len(),
        ));
        out.push(3);
        out.extend_from_slice(&self.upload_counter.to_be_bytes());
        out.extend_from_slice(&self.last_rotation.to_be_bytes());
        out.push(u8::from(self.upload_pending));
        for list in [&self.retired_at, &self.one_time_retired] {
            out.extend_from_slice(&(list.len() as u32).to_be_bytes());
            for (id, at) in list {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&at.to_be_bytes());
            }
        }
        out.extend_from_slice(&(self.accepted.len() as u32).to_be_bytes());
        for (id, digest) in &self.accepted {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(digest);
        }
        out.extend_from_slice(&prekeys);
        out
    }

    /// Restores [`Self::to_bytes`] (version 0x03, or 0x02 without the
    /// accepted list).
    ///
    /// # Errors
    /// [`crate::Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let bad = crate::Error::State("prekey state");
        let mut r = Cursor(bytes);
        let version = match r.take(1).ok_or(bad)? {
            [v @ (2 | 3)] => *v,
            _ => return Err(bad),
        };
        let upload_counter = r.u64().ok_or(bad)?;
        let last_rotation = r.u64().ok_or(bad)?;
        let upload_pending = match r.take(1).ok_or(bad)? {
            [0] => false,
            [1] => true,
            _ => return Err(bad),
        };
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let count = r.u32().ok_or(bad)? as usize;
            if count > r.0.len() / 12 {
                return Err(bad);
            }
            for _ in 0..count {
                list.push((r.u32().ok_or(bad)?, r.u64().ok_or(bad)?));
            }
        }
        let mut accepted = Vec::new();
        if version == 3 {
            let count = r.u32().ok_or(bad)? as usize;
            if count > r.0.len() / 20 {
                return Err(bad);
            }
            accepted.reserve_exact(count);
            for _ in 0..count {
                let id = r.u32().ok_or(bad)?;
                let digest = r.array::<16>().ok_or(bad)?;
                accepted.push((id, digest));
            }
        }
        let [retired_at, one_time_retired] = lists;
        Ok(PrekeyState {
            prekeys: PrekeyStore::from_bytes(r.0)?,
            upload_counter,
            last_rotation,
            retired_at,
            one_time_retired,
            upload_pending,
            accepted,
        })
    }
}

/// The key of a session or peer as the persistent stores write it:
/// `identity || device_id (4, big-endian)`.
pub(crate) fn address_bytes(a: &DeviceAddress) -> [u8; 36] {
    let mut out = [0u8; 36];
    out[..32].copy_from_slice(&a.identity);
    out[32..].copy_from_slice(&a.device_id.to_be_bytes());
    out
}

/// The inverse of [`address_bytes`] (`None` unless exactly 36 bytes).
pub(crate) fn address_from_bytes(bytes: &[u8]) -> Option<DeviceAddress> {
    let (identity, device) = bytes.split_first_chunk::<32>()?;
    let device: [u8; 4] = device.try_into().ok()?;
    Some(DeviceAddress {
        identity: *identity,
        device_id: u32::from_be_bytes(device),
    })
}

/// Lower-case hex, for naming a stored record in an error.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write;
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `hex(identity)/device_id`: a session or peer, in an error.
pub(crate) fn address_name(a: &DeviceAddress) -> String {
    std::format!("{}/{}", hex(&a.identity), a.device_id)
}

/// A minimal reader for the stored records' encodings.
pub(crate) struct Cursor<'a>(pub(crate) &'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
}
