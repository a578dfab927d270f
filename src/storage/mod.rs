//! The device's own state: identity, private prekeys, sessions per peer
//! device, peers' identity keys and trust, an outbox and an inbox.
//!
//! One trait, [`Store`], with an in-memory implementation
//! ([`MemoryStore`]) and a file-backed one over SQLite (`SqliteStore`,
//! feature `sqlite`). The methods are synchronous: local storage is fast
//! and blocking (SQLite), and the client calls it between network awaits.
//!
//! Atomicity is part of the contract: [`Store::commit_send`] and
//! [`Store::commit_receive`] each apply all their changes or none, which is
//! what makes delivery exactly-once across crashes (see SPEC.md,
//! "Guaranteed delivery").

mod memory;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fmt;
use std::string::String;
use std::vec::Vec;

pub use memory::MemoryStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

use crate::protocol::keys::IdentityKeyPair;
use crate::protocol::prekeys::PrekeyStore;
use crate::protocol::session::Session;
use crate::transport::{DeviceAddress, Envelope, EnvelopeId};

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
    /// The session's new state, if the envelope decrypted.
    pub session: Option<(&'a DeviceAddress, &'a Session)>,
    /// The prekeys, if a one-time prekey was consumed.
    pub prekeys: Option<&'a PrekeyState>,
    /// A new or updated peer record.
    pub peer: Option<&'a PeerRecord>,
    /// The message for the application.
    pub message: Option<&'a InboxMessage>,
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

/// The device's local state. See the module docs.
pub trait Store {
    /// The device's identity, if created.
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError>;
    /// Sets the device's identity (once, at creation).
    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError>;

    /// The private prekeys and their bookkeeping.
    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError>;
    /// Replaces the private prekeys and their bookkeeping.
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError>;

    /// The session with a peer device. A store that serializes sessions
    /// restores them with its identity (the state does not hold the
    /// identity keys: [`Session::from_bytes`]), so it needs one: without it
    /// a stored session is [`StoreError::Corrupted`].
    fn session(&self, peer: &DeviceAddress) -> Result<Option<Session>, StoreError>;
    /// All sessions.
    fn sessions(&self) -> Result<Vec<(DeviceAddress, Session)>, StoreError>;

    /// What is known of a peer device.
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError>;
    /// Adds or updates a peer record.
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError>;

    /// Atomically stores the session with `entry.to` and adds the envelope
    /// to the outbox.
    fn commit_send(&mut self, session: &Session, entry: &OutboxEntry) -> Result<(), StoreError>;
    /// Envelopes not yet deposited, oldest first.
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Removes a deposited envelope from the outbox.
    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError>;

    /// Whether an envelope was already processed.
    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError>;
    /// Applies every commit of the batch, in order, atomically: all or none.
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError>;
    /// Forgets processed-envelope marks older than `before` (after the
    /// relay's retention, a redelivery cannot happen from an honest relay,
    /// and the ratchet still rejects replays).
    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError>;

    /// Messages waiting for the application, in the order received.
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError>;
    /// Removes a message the application has consumed.
    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError>;
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
    /// 0x02 || upload_counter (8) || last_rotation (8) || upload_pending (1)
    ///   || retired count (4) || count x (spk id (4) || retired_at (8))
    ///   || withdrawn count (4) || count x (below id (4) || withdrawn_at (8))
    ///   || PrekeyStore::to_bytes()
    /// ```
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let prekeys = self.prekeys.to_bytes();
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(
            26 + 12 * (self.retired_at.len() + self.one_time_retired.len()) + prekeys.len(),
        ));
        out.push(2);
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
        out.extend_from_slice(&prekeys);
        out
    }

    /// Restores [`Self::to_bytes`].
    ///
    /// # Errors
    /// [`crate::Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Self> {
        let bad = crate::Error::State("prekey state");
        let mut r = Cursor(bytes);
        if r.take(1).ok_or(bad)? != [2] {
            return Err(bad);
        }
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
        let [retired_at, one_time_retired] = lists;
        Ok(PrekeyState {
            prekeys: PrekeyStore::from_bytes(r.0)?,
            upload_counter,
            last_rotation,
            retired_at,
            one_time_retired,
            upload_pending,
        })
    }
}

/// A minimal reader for [`PrekeyState::from_bytes`].
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
}
