//! A persistent [`Store`] over any atomic key-value backend:
//! [`KvStore`] keeps the device's state decoded in memory and writes every
//! change, sealed, through a [`KvBackend`] in one atomic batch per store
//! write. The browser's IndexedDB (crate `cubbyhole-browser`) is one such
//! backend; [`MemoryKv`] is one in memory, for tests.
//!
//! # Records at rest
//!
//! Every piece of state is one backend record (the identity, the prekeys,
//! each session record, peer, contact, access key, outbox entry, processed
//! mark, inbox message, sent message, quarantined record, account, the
//! pairing offer), plus a key check record. Two keys are derived from the
//! application's 32-byte key with HKDF-SHA256 (no salt; infos
//! `"cubbyhole/v1 kv store seal"` and `"cubbyhole/v1 kv store name"`):
//!
//! ```text
//! backend key = HMAC-SHA256(name key, kind (1) || record key)
//! value       = nonce (12, fresh from the OS) || AES-256-GCM(seal key, nonce,
//!               plaintext, aad = backend key) || tag (16)
//! plaintext   = 0x01 || kind (1) || seq (8) || key length (2) || record key || body
//! ```
//!
//! The backend learns neither what a record is nor whose it is from its
//! key; a value altered, cut, or moved to another key fails to open. `seq`
//! is a store-wide write counter: the outbox, the inbox, the sent messages
//! and the quarantine reload in the order of their records' `seq` (an
//! updated outbox entry or sent message keeps its first one), and session
//! records in the order they were last written (the order of
//! [`Store::awaiting_ratchet_key`]). What is not hidden: the number of
//! records, their sizes, and when they change.
//!
//! As for the SQLite store, nothing here detects a record deleted or put
//! back in an older version by whoever controls the backend (the mark of a
//! compromised peer is kept twice, in its peer record and in a record
//! listing every compromised address, so that putting back one older
//! record does not undo it).
//!
//! # Damage
//!
//! [`KvStore::open`] fails with [`StoreError::WrongKey`] if the backend
//! holds records but no key check record under this key, and with
//! [`StoreError::Corrupted`] if the key check record does not open. Any
//! other record that does not open or decode is set aside, for that record
//! only (listed by [`KvStore::corrupted_records`]):
//!
//! - a record that opens but does not decode, or one that does not open
//!   but whose key is recognised (a singleton, or a session, peer or peer
//!   access record of an address the store knows), is
//!   [`StoreError::Corrupted`] for the methods that read it, as with the
//!   SQLite store: [`Store::sessions`] returns it as its error beside the
//!   healthy records (and [`Store::quarantine_session`] moves its bytes, as
//!   found, to the quarantine); a method returning a list of its kind fails
//!   naming it (a missing message must not look like an absent one); a
//!   processed mark whose time does not decode counts as processed, at time
//!   0. Writing the record again (or removing it) replaces it, which is how
//!   an application recovers;
//! - a record whose key is not recognised cannot be told apart from one the
//!   backend deleted: it is ignored (and kept, until
//!   [`KvStore::discard_unreadable`] or a write to the same key).

use core::fmt;
use core::future::Future;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::format;
use std::string::{String, ToString};
use std::sync::{Arc, Mutex, PoisonError};
use std::vec::Vec;

use aes_gcm::{Aes256Gcm, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::at_rest::{self, OpenError};
use super::{
    address_bytes, address_from_bytes, address_name, hex, AccessKeyRecord, AccountRecord,
    BlockingStore, ContactRecord, Cursor, DeliveryState, DepositDone, InboxMessage, LocalIdentity,
    MemoryStore, MessageId, OutboxEntry, PairingRecord, PeerAccess, PeerRecord, PrekeyState,
    Quarantined, ReceiveCommit, SendCopy, SentMessage, SessionRecord, Store, StoreError, Trust,
};
use crate::bounds::{MaybeSend, MaybeSync};
use crate::protocol::devices::AccountId;
use crate::protocol::keys::IdentityKey;
use crate::transport::{DeviceAddress, Envelope, EnvelopeId};

/// The key of one backend record: opaque, 32 bytes (a keyed hash of what
/// the record is, so the backend learns nothing from the keys).
pub type KvKey = [u8; 32];

/// One change of a batch.
#[derive(Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Store `value` under `key`, replacing any value there.
    Put {
        /// The record's key.
        key: KvKey,
        /// The sealed value.
        value: Vec<u8>,
    },
    /// Remove the record under `key` (nothing happens if there is none).
    Delete {
        /// The record's key.
        key: KvKey,
    },
}

impl KvOp {
    /// The key the operation changes.
    pub fn key(&self) -> &KvKey {
        match self {
            KvOp::Put { key, .. } | KvOp::Delete { key } => key,
        }
    }
}

impl fmt::Debug for KvOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvOp::Put { value, .. } => write!(f, "Put({} bytes)", value.len()),
            KvOp::Delete { .. } => f.write_str("Delete"),
        }
    }
}

/// Where a [`KvStore`] keeps its records: a map from [`KvKey`] to bytes
/// with atomic batches.
///
/// The contract:
/// - [`KvBackend::write`] applies its operations in order (a later one on
///   the same key wins) and **all or none** of them; once it returned
///   `Ok`, they survive a crash (or the closing of the browser tab).
/// - [`KvBackend::load`] returns every record, in any order.
pub trait KvBackend: MaybeSend + MaybeSync {
    /// Every record.
    fn load(&self) -> impl Future<Output = Result<Vec<(KvKey, Vec<u8>)>, StoreError>> + MaybeSend;
    /// Applies `ops` atomically.
    fn write(&self, ops: &[KvOp]) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
}

/// HKDF info of the key values are sealed under.
const SEAL_INFO: &[u8] = b"cubbyhole/v1 kv store seal";
/// HKDF info of the key record names are computed under.
const NAME_INFO: &[u8] = b"cubbyhole/v1 kv store name";
/// The key check record's body starts with this (then the schema, 4 bytes).
const KEY_CHECK_VALUE: &[u8] = b"cubbyhole kv store key check v1";
/// The first byte of every record's plaintext.
const FORMAT: u8 = 1;

/// What a record is: the first byte of its name's input and of its
/// plaintext (the values are part of the format at rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KeyCheck = 0,
    Identity = 1,
    Prekeys = 2,
    Session = 3,
    Quarantine = 4,
    Peer = 5,
    Compromised = 6,
    Contact = 7,
    OwnAccess = 8,
    PeerAccess = 9,
    Outbox = 10,
    Processed = 11,
    Inbox = 12,
    Sent = 13,
    OwnAccount = 14,
    Account = 15,
    Pairing = 16,
}

impl Kind {
    const ALL: [Kind; 17] = [
        Kind::KeyCheck,
        Kind::Identity,
        Kind::Prekeys,
        Kind::Session,
        Kind::Quarantine,
        Kind::Peer,
        Kind::Compromised,
        Kind::Contact,
        Kind::OwnAccess,
        Kind::PeerAccess,
        Kind::Outbox,
        Kind::Processed,
        Kind::Inbox,
        Kind::Sent,
        Kind::OwnAccount,
        Kind::Account,
        Kind::Pairing,
    ];
    /// The records of one of a kind, keyed by nothing.
    const SINGLETONS: [Kind; 6] = [
        Kind::Identity,
        Kind::Prekeys,
        Kind::Compromised,
        Kind::OwnAccess,
        Kind::OwnAccount,
        Kind::Pairing,
    ];

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// The name [`StoreError::Corrupted`] gives the kind (the SQLite
    /// store's table names where there is one).
    fn table(self) -> &'static str {
        match self {
            Kind::KeyCheck => "meta",
            Kind::Identity => "identity",
            Kind::Prekeys => "prekeys",
            Kind::Session => "sessions",
            Kind::Quarantine => "quarantine",
            Kind::Peer => "peers",
            Kind::Compromised => "compromised",
            Kind::Contact => "contacts",
            Kind::OwnAccess => "own_access",
            Kind::PeerAccess => "peer_access",
            Kind::Outbox => "outbox",
            Kind::Processed => "processed",
            Kind::Inbox => "inbox",
            Kind::Sent => "sent",
            Kind::OwnAccount => "own_account",
            Kind::Account => "accounts",
            Kind::Pairing => "pairing",
        }
    }

    /// Whether a list of this kind keeps its first order when a record is
    /// replaced (the outbox and the sent messages).
    fn keeps_order(self) -> bool {
        matches!(self, Kind::Outbox | Kind::Sent)
    }
}

/// A record's printable key, in an error.
fn row_name(kind: Kind, key: &[u8]) -> String {
    match kind {
        Kind::Session | Kind::Peer | Kind::PeerAccess => match address_from_bytes(key) {
            Some(a) => address_name(&a),
            None => hex(key),
        },
        Kind::Quarantine => match <[u8; 8]>::try_from(key) {
            Ok(seq) => u64::from_be_bytes(seq).to_string(),
            Err(_) => hex(key),
        },
        _ if key.is_empty() => "1".to_string(),
        _ => hex(key),
    }
}

/// The keys derived from the application's key.
struct Sealer {
    cipher: Aes256Gcm,
    name_key: Zeroizing<[u8; 32]>,
}

impl Sealer {
    fn new(key: &[u8; 32]) -> Self {
        let hkdf = Hkdf::<Sha256>::new(None, key);
        let mut seal = Zeroizing::new([0u8; 32]);
        hkdf.expand(SEAL_INFO, seal.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut name_key = Zeroizing::new([0u8; 32]);
        hkdf.expand(NAME_INFO, name_key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Sealer {
            cipher: Aes256Gcm::new(seal.as_ref().into()),
            name_key,
        }
    }

    /// The backend key of a record: `HMAC-SHA256(name key, kind || key)`.
    fn name(&self, kind: Kind, key: &[u8]) -> KvKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.name_key.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(&[kind.code()]);
        mac.update(key);
        mac.finalize().into_bytes().into()
    }

    /// `nonce || ciphertext || tag`, bound to the backend key `name`.
    fn seal(&self, name: &KvKey, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        at_rest::seal(&self.cipher, name, plaintext)
    }

    /// Opens [`Self::seal`]'s output; the error is the reason.
    fn open(&self, name: &KvKey, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        at_rest::open(&self.cipher, name, sealed).map_err(|e| match e {
            OpenError::TooShort(n) => format!("sealed value too short ({n} bytes)"),
            OpenError::Auth => {
                "authentication failed (altered, cut, or moved from another key)".to_string()
            }
        })
    }
}

/// `FORMAT || kind || seq (8) || key length (2) || key || body`.
fn plaintext(
    kind: Kind,
    key: &[u8],
    seq: u64,
    body: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let len = u16::try_from(key.len())
        .map_err(|_| StoreError::Backend(format!("record key of {} bytes", key.len())))?;
    let mut out = Zeroizing::new(Vec::with_capacity(12 + key.len() + body.len()));
    out.push(FORMAT);
    out.push(kind.code());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(body);
    Ok(out)
}

/// A record's plaintext, parsed.
struct Plain<'a> {
    kind: Kind,
    seq: u64,
    key: &'a [u8],
    body: &'a [u8],
}

/// The inverse of [`plaintext`].
fn parse_plaintext(bytes: &[u8]) -> Result<Plain<'_>, String> {
    let mut r = Cursor(bytes);
    let cut = || "record header cut short".to_string();
    match r.u8().ok_or_else(cut)? {
        FORMAT => {}
        other => return Err(format!("record format {other} unknown")),
    }
    let code = r.u8().ok_or_else(cut)?;
    let kind = Kind::from_code(code).ok_or_else(|| format!("record kind {code} unknown"))?;
    let seq = r.u64().ok_or_else(cut)?;
    let len = usize::from(r.u16().ok_or_else(cut)?);
    let key = r.take(len).ok_or_else(cut)?;
    Ok(Plain {
        kind,
        seq,
        key,
        body: r.0,
    })
}

fn no_trailing(r: &Cursor<'_>) -> Result<(), String> {
    if r.0.is_empty() {
        Ok(())
    } else {
        Err(format!("{} bytes too many", r.0.len()))
    }
}

fn address_key(key: &[u8]) -> Result<DeviceAddress, String> {
    address_from_bytes(key).ok_or_else(|| format!("key of {} bytes, not an address", key.len()))
}

fn id_key(key: &[u8]) -> Result<[u8; 16], String> {
    key.try_into()
        .map_err(|_| format!("key of {} bytes, not an id of 16", key.len()))
}

fn read_address(r: &mut Cursor<'_>) -> Option<DeviceAddress> {
    address_from_bytes(r.take(36)?)
}

/// A peer record's body: `trust (1) || first_seen (8)`.
fn encode_peer(p: &PeerRecord) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = p.trust.code();
    out[1..].copy_from_slice(&p.first_seen.to_be_bytes());
    out
}

fn decode_peer(address: DeviceAddress, body: &[u8]) -> Result<PeerRecord, String> {
    let mut r = Cursor(body);
    let code = r.u8().ok_or("peer record cut short")?;
    let trust = Trust::from_code(code).ok_or_else(|| format!("trust level {code} unknown"))?;
    let first_seen = r.u64().ok_or("peer record cut short")?;
    no_trailing(&r)?;
    Ok(PeerRecord {
        address,
        trust,
        first_seen,
    })
}

/// The compromised list's body: the addresses, 36 bytes each, ascending.
fn encode_addresses(set: &BTreeSet<DeviceAddress>) -> Vec<u8> {
    set.iter().flat_map(address_bytes).collect()
}

fn decode_addresses(body: &[u8]) -> Result<BTreeSet<DeviceAddress>, String> {
    if body.len() % 36 != 0 {
        return Err(format!("{} bytes, not addresses of 36", body.len()));
    }
    Ok(body
        .chunks_exact(36)
        .filter_map(address_from_bytes)
        .collect())
}

/// A peer's access: `excluded (1: 0 | 1) || has key (1: 0 | 1) [||
/// AccessKeyRecord::to_bytes]`.
fn encode_access(access: &PeerAccess) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(2 + AccessKeyRecord::LEN_WITH_INBOX));
    out.push(u8::from(access.excluded));
    match &access.key {
        Some(key) => {
            out.push(1);
            out.extend_from_slice(&key.to_bytes());
        }
        None => out.push(0),
    }
    out
}

fn flag(byte: Option<u8>) -> Result<bool, String> {
    match byte {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(b) => Err(format!("flag {b} is neither 0 nor 1")),
        None => Err("cut short".to_string()),
    }
}

fn decode_access(body: &[u8]) -> Result<PeerAccess, String> {
    let mut r = Cursor(body);
    let excluded = flag(r.u8())?;
    let key = match flag(r.u8())? {
        true => Some(AccessKeyRecord::from_bytes(r.0).map_err(|e| e.to_string())?),
        false => {
            no_trailing(&r)?;
            None
        }
    };
    Ok(PeerAccess { key, excluded })
}

/// An outbox entry's body: `to (36) || created (8) || has message (1) [||
/// message id (16)] || payload`.
fn encode_outbox(e: &OutboxEntry) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(61 + e.envelope.payload.len()));
    out.extend_from_slice(&address_bytes(&e.to));
    out.extend_from_slice(&e.created.to_be_bytes());
    match &e.message {
        Some(m) => {
            out.push(1);
            out.extend_from_slice(&m.0);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&e.envelope.payload);
    out
}

fn decode_outbox(id: EnvelopeId, body: &[u8]) -> Result<OutboxEntry, String> {
    let cut = || "outbox entry cut short".to_string();
    let mut r = Cursor(body);
    let to = read_address(&mut r).ok_or_else(cut)?;
    let created = r.u64().ok_or_else(cut)?;
    let message = match flag(r.u8())? {
        true => Some(MessageId(r.array().ok_or_else(cut)?)),
        false => None,
    };
    Ok(OutboxEntry {
        to,
        envelope: Envelope {
            id,
            payload: r.0.to_vec(),
        },
        created,
        message,
    })
}

/// An inbox message's body: `from (36) || received_at (8) || body`.
fn encode_inbox(m: &InboxMessage) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(44 + m.body.len()));
    out.extend_from_slice(&address_bytes(&m.from));
    out.extend_from_slice(&m.received_at.to_be_bytes());
    out.extend_from_slice(&m.body);
    out
}

fn decode_inbox(envelope_id: EnvelopeId, body: &[u8]) -> Result<InboxMessage, String> {
    let cut = || "inbox message cut short".to_string();
    let mut r = Cursor(body);
    let from = read_address(&mut r).ok_or_else(cut)?;
    let received_at = r.u64().ok_or_else(cut)?;
    Ok(InboxMessage {
        envelope_id,
        from,
        body: r.0.to_vec(),
        received_at,
    })
}

/// A sent message's body: `to (36) || state (1) || created (8) ||
/// last_sent (8) || sends (4) || body`.
fn encode_sent(m: &SentMessage) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(57 + m.body.len()));
    out.extend_from_slice(&address_bytes(&m.to));
    out.push(m.state.code());
    out.extend_from_slice(&m.created.to_be_bytes());
    out.extend_from_slice(&m.last_sent.to_be_bytes());
    out.extend_from_slice(&m.sends.to_be_bytes());
    out.extend_from_slice(&m.body);
    out
}

fn decode_sent(id: MessageId, body: &[u8]) -> Result<SentMessage, String> {
    let cut = || "sent message cut short".to_string();
    let mut r = Cursor(body);
    let to = read_address(&mut r).ok_or_else(cut)?;
    let code = r.u8().ok_or_else(cut)?;
    let state =
        DeliveryState::from_code(code).ok_or_else(|| format!("delivery state {code} unknown"))?;
    let created = r.u64().ok_or_else(cut)?;
    let last_sent = r.u64().ok_or_else(cut)?;
    let sends = r.u32().ok_or_else(cut)?;
    Ok(SentMessage {
        id,
        to,
        body: r.0.to_vec(),
        state,
        created,
        last_sent,
        sends,
    })
}

/// A quarantined record's body: `peer (36) || at (8) || reason length (4)
/// || reason (UTF-8) || bytes`.
fn encode_quarantine(q: &Quarantined) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(48 + q.reason.len() + q.bytes.len()));
    out.extend_from_slice(&address_bytes(&q.peer));
    out.extend_from_slice(&q.at.to_be_bytes());
    out.extend_from_slice(&(q.reason.len() as u32).to_be_bytes());
    out.extend_from_slice(q.reason.as_bytes());
    out.extend_from_slice(&q.bytes);
    out
}

fn decode_quarantine(body: &[u8]) -> Result<Quarantined, String> {
    let cut = || "quarantined record cut short".to_string();
    let mut r = Cursor(body);
    let peer = read_address(&mut r).ok_or_else(cut)?;
    let at = r.u64().ok_or_else(cut)?;
    let len = r.u32().ok_or_else(cut)? as usize;
    let reason = r.take(len).ok_or_else(cut)?;
    let reason = String::from_utf8(reason.to_vec()).map_err(|_| "reason: not UTF-8")?;
    Ok(Quarantined {
        peer,
        at,
        bytes: Zeroizing::new(r.0.to_vec()),
        reason,
    })
}

/// A [`KvBackend`] in memory, for tests: a map behind a mutex (a clone
/// shares it, so a test can reopen a store from the same records), with a
/// fault injector ([`MemoryKv::fail_after`]).
#[derive(Clone, Default)]
pub struct MemoryKv {
    inner: Arc<Mutex<MemoryKvInner>>,
}

#[derive(Default)]
struct MemoryKvInner {
    records: BTreeMap<KvKey, Vec<u8>>,
    fail_at: Option<u32>,
}

impl MemoryKv {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryKvInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on, until `fail_after(None)`: the `n`-th operation (0: the
    /// first) of every batch fails, so a batch of more than `n` operations
    /// is discarded whole (nothing of it is applied) and
    /// [`KvBackend::write`] returns [`StoreError::Backend`].
    pub fn fail_after(&self, n: Option<u32>) {
        self.lock().fail_at = n;
    }

    /// How many records the map holds.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether the map holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for MemoryKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryKv")
            .field("records", &self.len())
            .finish()
    }
}

impl KvBackend for MemoryKv {
    fn load(&self) -> impl Future<Output = Result<Vec<(KvKey, Vec<u8>)>, StoreError>> + MaybeSend {
        let records = self
            .lock()
            .records
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        core::future::ready(Ok(records))
    }

    fn write(&self, ops: &[KvOp]) -> impl Future<Output = Result<(), StoreError>> + MaybeSend {
        let mut inner = self.lock();
        let result = match inner.fail_at {
            Some(n) if (n as usize) < ops.len() => Err(StoreError::Backend(format!(
                "injected failure at operation {n} of {}",
                ops.len()
            ))),
            _ => {
                for op in ops {
                    match op {
                        KvOp::Put { key, value } => {
                            inner.records.insert(*key, value.clone());
                        }
                        KvOp::Delete { key } => {
                            inner.records.remove(key);
                        }
                    }
                }
                Ok(())
            }
        };
        core::future::ready(result)
    }
}

/// A record that is there but cannot be used (see the module docs,
/// "Damage").
struct Broken {
    kind: Kind,
    key: Vec<u8>,
    /// The value as found (still sealed).
    sealed: Vec<u8>,
    reason: String,
}

impl Broken {
    fn error(&self) -> StoreError {
        StoreError::Corrupted {
            table: self.kind.table(),
            row: row_name(self.kind, &self.key),
            reason: self.reason.clone(),
        }
    }
}

/// The operations of one store write, before it is applied.
struct Batch {
    ops: Vec<KvOp>,
    /// The position of each key's operation (a later one on the same key
    /// replaces it: the backend would apply only the last).
    at: HashMap<KvKey, usize>,
    /// The next write counter.
    seq: u64,
    /// The first-stored counters of the ordered records the batch writes
    /// (`None`: removed).
    order: HashMap<KvKey, Option<u64>>,
}

impl Batch {
    fn push(&mut self, op: KvOp) {
        match self.at.get(op.key()) {
            Some(&i) => self.ops[i] = op,
            None => {
                self.at.insert(*op.key(), self.ops.len());
                self.ops.push(op);
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.saturating_add(1);
        seq
    }
}

/// A persistent [`Store`] over a [`KvBackend`], its records sealed under
/// the application's key (see the module docs for the format and what
/// happens to damaged records).
///
/// [`KvStore::open`] loads every record and keeps the state decoded in
/// memory (a [`MemoryStore`]): reads are answered from memory, at once.
/// Every write method computes its changes, writes them to the backend in
/// **one** atomic batch ([`KvBackend::write`]) and only once that succeeded
/// applies them in memory: a write that fails changes nothing visible, and
/// the store stays usable. So [`Store::commit_send`],
/// [`Store::commit_receive`], [`Store::commit_send_many`],
/// [`Store::commit_deposits`] and [`Store::quarantine_session`] are each
/// all or none, and durable once they returned `Ok` if the backend's
/// batches are.
///
/// One `KvStore` per backend at a time: two stores writing the same records
/// (two browser tabs) would each answer from their own memory.
///
/// The nonces are random: keep the number of records written under one key
/// below 2^32 (each write method writes one record per thing it changes).
pub struct KvStore<B> {
    backend: B,
    sealer: Sealer,
    cache: MemoryStore,
    /// The next write counter (above every counter stored).
    next_seq: u64,
    /// The first-stored counter of each outbox entry and sent message.
    order: HashMap<KvKey, u64>,
    /// The addresses whose peer record says Compromised.
    compromised: BTreeSet<DeviceAddress>,
    /// Records found damaged but recognised, by backend key.
    broken: BTreeMap<KvKey, Broken>,
    /// Records that did not open and were not recognised: why.
    unreadable: BTreeMap<KvKey, String>,
}

impl<B> fmt::Debug for KvStore<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore")
            .field("next_seq", &self.next_seq)
            .field("corrupted", &self.broken.len())
            .field("unreadable", &self.unreadable.len())
            .finish_non_exhaustive()
    }
}

/// The key check record's body: the check value and the schema.
fn key_check_body() -> Vec<u8> {
    let mut out = KEY_CHECK_VALUE.to_vec();
    out.extend_from_slice(&KvStore::<MemoryKv>::SCHEMA_VERSION.to_be_bytes());
    out
}

/// A decoded and opened record, during [`KvStore::open`].
struct Opened {
    name: KvKey,
    kind: Kind,
    seq: u64,
    key: Vec<u8>,
    body: Zeroizing<Vec<u8>>,
    sealed: Vec<u8>,
}

fn mem<T>(r: Result<T, StoreError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

impl<B: KvBackend> KvStore<B> {
    /// The schema version written in the key check record; a backend
    /// written under a higher one is [`StoreError::UnsupportedSchema`].
    pub const SCHEMA_VERSION: u32 = 1;

    /// Opens the store kept in `backend` under `key` (creating it, with its
    /// key check record, if the backend is empty): loads, opens and decodes
    /// every record.
    ///
    /// # Errors
    /// - [`StoreError::WrongKey`] if the backend holds records but none is
    ///   this key's key check record (another key, or not a store);
    /// - [`StoreError::Corrupted`] if the key check record does not open or
    ///   decode;
    /// - [`StoreError::UnsupportedSchema`] if newer code wrote it;
    /// - the backend's error if it fails.
    pub async fn open(backend: B, key: &[u8; 32]) -> Result<Self, StoreError> {
        let records = backend.load().await?;
        let mut store = KvStore {
            backend,
            sealer: Sealer::new(key),
            cache: MemoryStore::new(),
            next_seq: 1,
            order: HashMap::new(),
            compromised: BTreeSet::new(),
            broken: BTreeMap::new(),
            unreadable: BTreeMap::new(),
        };
        let check = store.sealer.name(Kind::KeyCheck, &[]);
        if records.is_empty() {
            let plain = plaintext(Kind::KeyCheck, &[], 0, &key_check_body())?;
            let value = store.sealer.seal(&check, &plain)?;
            store
                .backend
                .write(&[KvOp::Put { key: check, value }])
                .await?;
            return Ok(store);
        }
        let Some((_, sealed)) = records.iter().find(|(k, _)| *k == check) else {
            return Err(StoreError::WrongKey);
        };
        store.check_key(&check, sealed)?;
        store.load(records, &check);
        Ok(store)
    }

    /// The backend (for a test's fault injection, say).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// One [`StoreError::Corrupted`] per damaged record found when the store
    /// was opened and not rewritten since: the recognised ones (named by
    /// kind and key, as the methods reading them report them) and then the
    /// unrecognised ones (table `"unknown"`, named by their backend key in
    /// hex). Empty means every record opened and decoded.
    pub fn corrupted_records(&self) -> Vec<StoreError> {
        let recognised = self.broken.values().map(Broken::error);
        let unknown = self
            .unreadable
            .iter()
            .map(|(name, reason)| StoreError::Corrupted {
                table: "unknown",
                row: hex(name),
                reason: reason.clone(),
            });
        recognised.chain(unknown).collect()
    }

    /// Deletes the records that did not open and were not recognised (see
    /// [`KvStore::corrupted_records`]), in one batch; returns how many.
    ///
    /// # Errors
    /// The backend's, and then nothing changed.
    pub async fn discard_unreadable(&mut self) -> Result<usize, StoreError> {
        let mut b = self.batch();
        for name in self.unreadable.keys() {
            b.push(KvOp::Delete { key: *name });
        }
        let n = b.ops.len();
        self.write(b).await?;
        Ok(n)
    }

    /// Deletes a sent message, if any: the way to discard a damaged one
    /// (which fails [`Store::sent_messages`] until it is removed or
    /// overwritten with [`Store::update_sent`]).
    ///
    /// # Errors
    /// The backend's, and then nothing changed.
    pub async fn remove_sent(&mut self, id: &MessageId) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.delete(&mut b, Kind::Sent, &id.0);
        self.write(b).await?;
        self.cache.remove_sent(id);
        Ok(())
    }

    fn check_key(&self, name: &KvKey, sealed: &[u8]) -> Result<(), StoreError> {
        let fail = |reason: String| StoreError::Corrupted {
            table: Kind::KeyCheck.table(),
            row: "key_check".to_string(),
            reason,
        };
        let plain = self.sealer.open(name, sealed).map_err(fail)?;
        let p = parse_plaintext(&plain).map_err(fail)?;
        if p.kind != Kind::KeyCheck || !p.key.is_empty() {
            return Err(fail("not a key check record".to_string()));
        }
        let schema = p
            .body
            .strip_prefix(KEY_CHECK_VALUE)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| fail("unexpected check value".to_string()))?;
        if schema > Self::SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema(schema));
        }
        Ok(())
    }

    /// Opens, decodes and caches every record but the key check.
    fn load(&mut self, records: Vec<(KvKey, Vec<u8>)>, check: &KvKey) {
        let mut opened = Vec::new();
        let mut unopened = Vec::new();
        for (name, sealed) in records {
            if name == *check {
                continue;
            }
            let plain = match self.sealer.open(&name, &sealed) {
                Ok(plain) => plain,
                Err(reason) => {
                    unopened.push((name, sealed, reason));
                    continue;
                }
            };
            match parse_plaintext(&plain) {
                Ok(p) if bool::from(self.sealer.name(p.kind, p.key).ct_eq(&name)) => {
                    self.next_seq = self.next_seq.max(p.seq.saturating_add(1));
                    opened.push(Opened {
                        name,
                        kind: p.kind,
                        seq: p.seq,
                        key: p.key.to_vec(),
                        body: Zeroizing::new(p.body.to_vec()),
                        sealed,
                    });
                }
                Ok(_) => {
                    self.unreadable
                        .insert(name, "its key does not match its content".to_string());
                }
                Err(reason) => {
                    self.unreadable.insert(name, reason);
                }
            }
        }
        // The lists and the session write order are replayed in the order
        // of the write counters.
        opened.sort_by_key(|o| o.seq);
        // First what the others need: the identity (sessions are restored
        // with it) and the compromised list (it overrides peer records).
        let mut local = None;
        for o in &opened {
            let result = match o.kind {
                Kind::Identity => LocalIdentity::from_bytes(&o.body)
                    .map_err(|e| format!("identity: {e}"))
                    .and_then(|i| {
                        local = Some(*i.keys.public());
                        mem(BlockingStore::set_identity(&mut self.cache, &i))
                    }),
                Kind::Compromised => decode_addresses(&o.body).map(|set| self.compromised = set),
                _ => continue,
            };
            if let Err(reason) = result {
                self.set_broken(o, reason);
            }
        }
        for o in &opened {
            if matches!(o.kind, Kind::Identity | Kind::Compromised | Kind::KeyCheck) {
                continue;
            }
            if let Err(reason) = self.restore(o, local.as_ref()) {
                self.set_broken(o, reason);
            }
        }
        if !unopened.is_empty() {
            let known = self.recognisable();
            for (name, sealed, reason) in unopened {
                match known.get(&name) {
                    Some((kind, key)) => {
                        self.broken.insert(
                            name,
                            Broken {
                                kind: *kind,
                                key: key.clone(),
                                sealed,
                                reason,
                            },
                        );
                    }
                    None => {
                        self.unreadable.insert(name, reason);
                    }
                }
            }
        }
    }

    fn set_broken(&mut self, o: &Opened, reason: String) {
        // A record whose own key does not decode is not attributable.
        let attributable = match o.kind {
            Kind::Session | Kind::Peer | Kind::PeerAccess => address_from_bytes(&o.key).is_some(),
            _ => true,
        };
        if attributable {
            self.broken.insert(
                o.name,
                Broken {
                    kind: o.kind,
                    key: o.key.clone(),
                    sealed: o.sealed.clone(),
                    reason,
                },
            );
        } else {
            self.unreadable.insert(o.name, reason);
        }
    }

    /// Decodes one record into the cache.
    fn restore(&mut self, o: &Opened, local: Option<&IdentityKey>) -> Result<(), String> {
        let c = &mut self.cache;
        let body = &o.body[..];
        match o.kind {
            Kind::Prekeys => {
                let state = PrekeyState::from_bytes(body).map_err(|e| format!("prekeys: {e}"))?;
                mem(BlockingStore::set_prekeys(c, &state))
            }
            Kind::Session => {
                let peer = address_key(&o.key)?;
                let local = local.ok_or("a session but no identity")?;
                let remote =
                    IdentityKey::from_bytes(&peer.identity).map_err(|e| format!("peer: {e}"))?;
                let record = SessionRecord::from_bytes(body, local, &remote)
                    .map_err(|e| format!("session record: {e}"))?;
                mem(BlockingStore::set_session(c, &peer, &record))
            }
            Kind::Quarantine => {
                if o.key.len() != 8 {
                    return Err(format!("key of {} bytes", o.key.len()));
                }
                c.restore_quarantined(decode_quarantine(body)?);
                Ok(())
            }
            Kind::Peer => {
                let mut peer = decode_peer(address_key(&o.key)?, body)?;
                if self.compromised.contains(&peer.address) {
                    peer.trust = Trust::Compromised;
                }
                mem(BlockingStore::set_peer(c, &peer))
            }
            Kind::Contact => {
                let contact = ContactRecord::from_bytes(body).map_err(|e| e.to_string())?;
                if contact.name != o.key {
                    return Err("the record names another contact".to_string());
                }
                mem(BlockingStore::set_contact(c, &contact))
            }
            Kind::OwnAccess => {
                let key = AccessKeyRecord::from_bytes(body).map_err(|e| e.to_string())?;
                mem(BlockingStore::set_own_access_key(c, &key))
            }
            Kind::PeerAccess => {
                let peer = address_key(&o.key)?;
                let access = decode_access(body)?;
                if let Some(key) = &access.key {
                    mem(BlockingStore::set_peer_access_key(c, &peer, key))?;
                }
                mem(BlockingStore::set_peer_excluded(c, &peer, access.excluded))
            }
            Kind::Outbox => {
                let entry = decode_outbox(EnvelopeId(id_key(&o.key)?), body)?;
                c.restore_outbox(entry);
                self.order.insert(o.name, o.seq);
                Ok(())
            }
            Kind::Processed => {
                let id = EnvelopeId(id_key(&o.key)?);
                // A mark whose time does not decode still says "processed".
                let at = <[u8; 8]>::try_from(body).map(u64::from_be_bytes);
                c.restore_processed(id, at.unwrap_or(0));
                at.map(|_| ())
                    .map_err(|_| format!("processed mark: {} bytes, not 8", body.len()))
            }
            Kind::Inbox => {
                c.restore_inbox(decode_inbox(EnvelopeId(id_key(&o.key)?), body)?);
                Ok(())
            }
            Kind::Sent => {
                let message = decode_sent(MessageId(id_key(&o.key)?), body)?;
                mem(BlockingStore::update_sent(c, &message))?;
                self.order.insert(o.name, o.seq);
                Ok(())
            }
            Kind::OwnAccount => {
                let record = AccountRecord::from_bytes(body).map_err(|e| e.to_string())?;
                mem(BlockingStore::set_own_account(c, &record))
            }
            Kind::Account => {
                let record = AccountRecord::from_bytes(body).map_err(|e| e.to_string())?;
                if record.account.0[..] != o.key[..] {
                    return Err("the record names another account".to_string());
                }
                mem(BlockingStore::set_account(c, &record))
            }
            Kind::Pairing => {
                let record = PairingRecord::from_bytes(body).map_err(|e| e.to_string())?;
                mem(BlockingStore::set_pairing(c, Some(&record)))
            }
            Kind::Identity | Kind::Compromised | Kind::KeyCheck => Ok(()),
        }
    }

    /// The backend keys a record that does not open may be recognised by:
    /// the singletons, and the session, peer and peer access records of
    /// every address the loaded records name.
    fn recognisable(&self) -> HashMap<KvKey, (Kind, Vec<u8>)> {
        let c = &self.cache;
        let mut addresses: BTreeSet<DeviceAddress> = self.compromised.clone();
        if let Ok(sessions) = BlockingStore::sessions(c) {
            addresses.extend(sessions.into_iter().map(|(a, _)| a));
        }
        if let Ok(peers) = BlockingStore::peers(c) {
            addresses.extend(peers.iter().map(|p| p.address));
        }
        if let Ok(contacts) = BlockingStore::contacts(c) {
            addresses.extend(contacts.iter().flat_map(|c| c.devices.iter().copied()));
        }
        if let Ok(outbox) = BlockingStore::outbox(c) {
            addresses.extend(outbox.iter().map(|e| e.to));
        }
        if let Ok(sent) = BlockingStore::sent_messages(c) {
            addresses.extend(sent.iter().map(|m| m.to));
        }
        if let Ok(inbox) = BlockingStore::inbox(c) {
            addresses.extend(inbox.iter().map(|m| m.from));
        }
        if let Ok(quarantined) = BlockingStore::quarantined(c) {
            addresses.extend(quarantined.iter().map(|q| q.peer));
        }
        addresses.extend(self.broken.values().filter_map(|b| match b.kind {
            Kind::Session | Kind::Peer | Kind::PeerAccess => address_from_bytes(&b.key),
            _ => None,
        }));
        let mut known = HashMap::new();
        for kind in Kind::SINGLETONS {
            known.insert(self.sealer.name(kind, &[]), (kind, Vec::new()));
        }
        for a in &addresses {
            let key = address_bytes(a);
            for kind in [Kind::Session, Kind::Peer, Kind::PeerAccess] {
                known.insert(self.sealer.name(kind, &key), (kind, key.to_vec()));
            }
        }
        known
    }

    fn batch(&self) -> Batch {
        Batch {
            ops: Vec::new(),
            at: HashMap::new(),
            seq: self.next_seq,
            order: HashMap::new(),
        }
    }

    /// Adds the record `(kind, key)` to `b`, sealed: with a new write
    /// counter, or for an outbox entry or a sent message, its first one.
    fn put(&self, b: &mut Batch, kind: Kind, key: &[u8], body: &[u8]) -> Result<(), StoreError> {
        let name = self.sealer.name(kind, key);
        let seq = if kind.keeps_order() {
            let first = match b.order.get(&name) {
                Some(seq) => *seq,
                None => self.order.get(&name).copied(),
            };
            let seq = match first {
                Some(seq) => seq,
                None => b.next_seq(),
            };
            b.order.insert(name, Some(seq));
            seq
        } else {
            b.next_seq()
        };
        let value = self.sealer.seal(&name, &plaintext(kind, key, seq, body)?)?;
        b.push(KvOp::Put { key: name, value });
        Ok(())
    }

    /// Adds the removal of the record `(kind, key)` to `b`.
    fn delete(&self, b: &mut Batch, kind: Kind, key: &[u8]) {
        let name = self.sealer.name(kind, key);
        if kind.keeps_order() {
            b.order.insert(name, None);
        }
        b.push(KvOp::Delete { key: name });
    }

    /// Writes `b` to the backend in one batch; on success, notes what it
    /// changed (the cache is the caller's to update, after this).
    async fn write(&mut self, b: Batch) -> Result<(), StoreError> {
        if b.ops.is_empty() {
            return Ok(());
        }
        self.backend.write(&b.ops).await?;
        self.next_seq = b.seq;
        for op in &b.ops {
            self.broken.remove(op.key());
            self.unreadable.remove(op.key());
        }
        for (name, seq) in b.order {
            match seq {
                Some(seq) => self.order.insert(name, seq),
                None => self.order.remove(&name),
            };
        }
        Ok(())
    }

    /// The error of the damaged record `(kind, key)`, if it is.
    fn check(&self, kind: Kind, key: &[u8]) -> Result<(), StoreError> {
        if self.broken.is_empty() {
            return Ok(());
        }
        match self.broken.get(&self.sealer.name(kind, key)) {
            Some(b) => Err(b.error()),
            None => Ok(()),
        }
    }

    /// The error of the first damaged record of `kind` that `filter`
    /// accepts (by key), if any.
    fn check_any(&self, kind: Kind, filter: impl Fn(&[u8]) -> bool) -> Result<(), StoreError> {
        match self
            .broken
            .values()
            .find(|b| b.kind == kind && filter(&b.key))
        {
            Some(b) => Err(b.error()),
            None => Ok(()),
        }
    }

    /// Peer records are damaged if theirs is, or the compromised list.
    fn check_peers(&self, filter: impl Fn(&[u8]) -> bool) -> Result<(), StoreError> {
        self.check(Kind::Compromised, &[])?;
        self.check_any(Kind::Peer, filter)
    }

    /// The damaged session records, by address.
    fn broken_sessions(&self) -> impl Iterator<Item = (DeviceAddress, &Broken)> + '_ {
        self.broken.values().filter_map(|b| match b.kind {
            Kind::Session => address_from_bytes(&b.key).map(|a| (a, b)),
            _ => None,
        })
    }

    #[allow(clippy::type_complexity)]
    fn with_broken_sessions(
        &self,
        mut healthy: Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>,
        filter: impl Fn(&DeviceAddress) -> bool,
    ) -> Vec<(DeviceAddress, Result<SessionRecord, StoreError>)> {
        let before = healthy.len();
        healthy.extend(
            self.broken_sessions()
                .filter(|(a, _)| filter(a))
                .map(|(a, b)| (a, Err(b.error()))),
        );
        if healthy.len() != before {
            healthy.sort_by_key(|x| x.0);
        }
        healthy
    }

    /// Adds a peer record, and notes its mark in `compromised`.
    fn put_peer(
        &self,
        b: &mut Batch,
        peer: &PeerRecord,
        compromised: &mut BTreeSet<DeviceAddress>,
    ) -> Result<(), StoreError> {
        self.put(
            b,
            Kind::Peer,
            &address_bytes(&peer.address),
            &encode_peer(peer),
        )?;
        if peer.trust == Trust::Compromised {
            compromised.insert(peer.address);
        } else {
            compromised.remove(&peer.address);
        }
        Ok(())
    }

    /// Adds the compromised list if it changed (or was damaged).
    fn put_compromised(
        &self,
        b: &mut Batch,
        compromised: &BTreeSet<DeviceAddress>,
    ) -> Result<(), StoreError> {
        if *compromised != self.compromised || self.check(Kind::Compromised, &[]).is_err() {
            self.put(b, Kind::Compromised, &[], &encode_addresses(compromised))?;
        }
        Ok(())
    }

    /// Adds a send's records (session, outbox entry, sent message).
    fn put_send(
        &self,
        b: &mut Batch,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        self.put(
            b,
            Kind::Session,
            &address_bytes(&entry.to),
            &record.to_bytes(),
        )?;
        self.put(b, Kind::Outbox, &entry.envelope.id.0, &encode_outbox(entry))?;
        if let Some(m) = sent {
            self.put(b, Kind::Sent, &m.id.0, &encode_sent(m))?;
        }
        Ok(())
    }
}

/// Reads answer from memory (ready futures); each write is one backend
/// batch, applied in memory once the backend took it.
#[allow(clippy::type_complexity)]
impl<B: KvBackend> Store for KvStore<B> {
    fn identity(
        &self,
    ) -> impl Future<Output = Result<Option<LocalIdentity>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Identity, &[])
                .and_then(|()| BlockingStore::identity(&self.cache)),
        )
    }

    async fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.put(&mut b, Kind::Identity, &[], &identity.to_bytes())?;
        self.write(b).await?;
        BlockingStore::set_identity(&mut self.cache, identity)
    }

    fn prekeys(&self) -> impl Future<Output = Result<Option<PrekeyState>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Prekeys, &[])
                .and_then(|()| BlockingStore::prekeys(&self.cache)),
        )
    }

    async fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.put(&mut b, Kind::Prekeys, &[], &state.to_bytes())?;
        self.write(b).await?;
        BlockingStore::set_prekeys(&mut self.cache, state)
    }

    fn session(
        &self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Session, &address_bytes(peer))
                .and_then(|()| BlockingStore::session(&self.cache, peer)),
        )
    }

    fn sessions(
        &self,
    ) -> impl Future<
        Output = Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>,
    > + MaybeSend {
        core::future::ready(
            BlockingStore::sessions(&self.cache)
                .map(|all| self.with_broken_sessions(all, |_| true)),
        )
    }

    async fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.put(
            &mut b,
            Kind::Session,
            &address_bytes(peer),
            &record.to_bytes(),
        )?;
        self.write(b).await?;
        BlockingStore::set_session(&mut self.cache, peer, record)
    }

    async fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.delete(&mut b, Kind::Session, &address_bytes(peer));
        self.write(b).await?;
        BlockingStore::remove_session(&mut self.cache, peer)
    }

    /// One batch: the session record's removal and the quarantined
    /// record's creation. A healthy record is quarantined as its encoding
    /// ([`SessionRecord::to_bytes`], as [`MemoryStore`] does; the
    /// quarantine record is sealed like any other), a damaged one as its
    /// value found in the backend (still sealed).
    async fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        let key = address_bytes(peer);
        let name = self.sealer.name(Kind::Session, &key);
        let (bytes, damaged) = match self.broken.get(&name) {
            Some(broken) => (Zeroizing::new(broken.sealed.clone()), true),
            None => match BlockingStore::session(&self.cache, peer)? {
                Some(record) => (record.to_bytes(), false),
                None => return Ok(()),
            },
        };
        let quarantined = Quarantined {
            peer: *peer,
            at: now,
            bytes,
            reason: reason.to_string(),
        };
        let mut b = self.batch();
        self.delete(&mut b, Kind::Session, &key);
        // Its write counter is its key: unique, and its place in the list.
        let seq = b.seq;
        self.put(
            &mut b,
            Kind::Quarantine,
            &seq.to_be_bytes(),
            &encode_quarantine(&quarantined),
        )?;
        self.write(b).await?;
        if damaged {
            self.cache.restore_quarantined(quarantined);
            Ok(())
        } else {
            BlockingStore::quarantine_session(&mut self.cache, peer, now, reason)
        }
    }

    fn quarantined(
        &self,
    ) -> impl Future<Output = Result<Vec<Quarantined>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Quarantine, |_| true)
                .and_then(|()| BlockingStore::quarantined(&self.cache)),
        )
    }

    fn peer(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<PeerRecord>, StoreError>> + MaybeSend {
        let key = address_bytes(device);
        core::future::ready(
            self.check_peers(|k| k == key)
                .and_then(|()| BlockingStore::peer(&self.cache, device)),
        )
    }

    async fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        let mut b = self.batch();
        let mut compromised = self.compromised.clone();
        self.put_peer(&mut b, peer, &mut compromised)?;
        self.put_compromised(&mut b, &compromised)?;
        self.write(b).await?;
        self.compromised = compromised;
        BlockingStore::set_peer(&mut self.cache, peer)
    }

    fn peers(&self) -> impl Future<Output = Result<Vec<PeerRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_peers(|_| true)
                .and_then(|()| BlockingStore::peers(&self.cache)),
        )
    }

    fn peers_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> impl Future<Output = Result<Vec<PeerRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_peers(|k| k.starts_with(identity))
                .and_then(|()| BlockingStore::peers_with_identity(&self.cache, identity)),
        )
    }

    fn contact(
        &self,
        name: &[u8],
    ) -> impl Future<Output = Result<Option<ContactRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Contact, name)
                .and_then(|()| BlockingStore::contact(&self.cache, name)),
        )
    }

    /// A name longer than [`ContactRecord::MAX_NAME`] is refused
    /// ([`StoreError::Backend`]); the devices and earlier keys beyond what
    /// [`ContactRecord::to_bytes`] keeps are dropped.
    async fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        if contact.name.len() > ContactRecord::MAX_NAME {
            return Err(StoreError::Backend(format!(
                "contact name of {} bytes (at most {})",
                contact.name.len(),
                ContactRecord::MAX_NAME
            )));
        }
        let bytes = contact.to_bytes();
        // What a reload will read.
        let kept = ContactRecord::from_bytes(&bytes)
            .map_err(|e| StoreError::Backend(format!("contact record: {e}")))?;
        let mut b = self.batch();
        self.put(&mut b, Kind::Contact, &contact.name, &bytes)?;
        self.write(b).await?;
        BlockingStore::set_contact(&mut self.cache, &kept)
    }

    fn contacts(&self) -> impl Future<Output = Result<Vec<ContactRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Contact, |_| true)
                .and_then(|()| BlockingStore::contacts(&self.cache)),
        )
    }

    fn own_access_key(
        &self,
    ) -> impl Future<Output = Result<Option<AccessKeyRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::OwnAccess, &[])
                .and_then(|()| BlockingStore::own_access_key(&self.cache)),
        )
    }

    async fn set_own_access_key(&mut self, key: &AccessKeyRecord) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.put(&mut b, Kind::OwnAccess, &[], &key.to_bytes())?;
        self.write(b).await?;
        BlockingStore::set_own_access_key(&mut self.cache, key)
    }

    fn peer_access(
        &self,
        peer: &DeviceAddress,
    ) -> impl Future<Output = Result<PeerAccess, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::PeerAccess, &address_bytes(peer))
                .and_then(|()| BlockingStore::peer_access(&self.cache, peer)),
        )
    }

    async fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> Result<(), StoreError> {
        let mut access = BlockingStore::peer_access(&self.cache, peer)?;
        access.key = Some(key.clone());
        let mut b = self.batch();
        self.put(
            &mut b,
            Kind::PeerAccess,
            &address_bytes(peer),
            &encode_access(&access),
        )?;
        self.write(b).await?;
        BlockingStore::set_peer_access_key(&mut self.cache, peer, key)
    }

    async fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        let mut access = BlockingStore::peer_access(&self.cache, peer)?;
        access.excluded = excluded;
        let mut b = self.batch();
        self.put(
            &mut b,
            Kind::PeerAccess,
            &address_bytes(peer),
            &encode_access(&access),
        )?;
        self.write(b).await?;
        BlockingStore::set_peer_excluded(&mut self.cache, peer, excluded)
    }

    async fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.put_send(&mut b, record, entry, sent)?;
        self.write(b).await?;
        BlockingStore::commit_send(&mut self.cache, record, entry, sent)
    }

    async fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        let mut b = self.batch();
        for (record, entry, sent) in copies {
            self.put_send(&mut b, record, entry, sent.as_ref())?;
        }
        self.write(b).await?;
        BlockingStore::commit_send_many(&mut self.cache, copies)
    }

    async fn commit_deposits(&mut self, done: &[DepositDone]) -> Result<(), StoreError> {
        let mut b = self.batch();
        for d in done {
            self.delete(&mut b, Kind::Outbox, &d.envelope.0);
            if let Some(m) = &d.sent {
                self.put(&mut b, Kind::Sent, &m.id.0, &encode_sent(m))?;
            }
        }
        self.write(b).await?;
        BlockingStore::commit_deposits(&mut self.cache, done)
    }

    fn outbox(&self) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Outbox, |_| true)
                .and_then(|()| BlockingStore::outbox(&self.cache)),
        )
    }

    async fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.delete(&mut b, Kind::Outbox, &id.0);
        self.write(b).await?;
        BlockingStore::remove_outbox(&mut self.cache, id)
    }

    fn is_processed(
        &self,
        id: &EnvelopeId,
    ) -> impl Future<Output = Result<bool, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::is_processed(&self.cache, id))
    }

    fn processed_among(
        &self,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::processed_among(&self.cache, ids))
    }

    /// One batch for the whole of `batch`; a record changed several times
    /// in it is written once, in its last state.
    async fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        let mut b = self.batch();
        let mut compromised = self.compromised.clone();
        let mut access: BTreeMap<DeviceAddress, PeerAccess> = BTreeMap::new();
        let mut inbox: BTreeSet<EnvelopeId> = BTreeSet::new();
        for c in batch {
            if let Some((peer, record)) = c.session {
                self.put(
                    &mut b,
                    Kind::Session,
                    &address_bytes(peer),
                    &record.to_bytes(),
                )?;
            }
            if let Some(m) = c.sent {
                self.put(&mut b, Kind::Sent, &m.id.0, &encode_sent(m))?;
            }
            if let Some(prekeys) = c.prekeys {
                self.put(&mut b, Kind::Prekeys, &[], &prekeys.to_bytes())?;
            }
            if let Some(peer) = c.peer {
                self.put_peer(&mut b, peer, &mut compromised)?;
            }
            if let Some((peer, key)) = c.access {
                let current = match access.remove(peer) {
                    Some(current) => current,
                    None => BlockingStore::peer_access(&self.cache, peer)?,
                };
                let updated = PeerAccess {
                    key: Some(key.clone()),
                    ..current
                };
                self.put(
                    &mut b,
                    Kind::PeerAccess,
                    &address_bytes(peer),
                    &encode_access(&updated),
                )?;
                access.insert(*peer, updated);
            }
            if let Some(m) = c.message {
                // A message already in the inbox adds nothing.
                if !self.cache.has_inbox(&m.envelope_id) && inbox.insert(m.envelope_id) {
                    self.put(&mut b, Kind::Inbox, &m.envelope_id.0, &encode_inbox(m))?;
                }
            }
            self.put(
                &mut b,
                Kind::Processed,
                &c.envelope_id.0,
                &c.processed_at.to_be_bytes(),
            )?;
        }
        self.put_compromised(&mut b, &compromised)?;
        self.write(b).await?;
        self.compromised = compromised;
        BlockingStore::commit_receive(&mut self.cache, batch)
    }

    async fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        let mut b = self.batch();
        for (id, at) in self.cache.processed_marks() {
            if at < before {
                self.delete(&mut b, Kind::Processed, &id.0);
            }
        }
        self.write(b).await?;
        BlockingStore::prune_processed(&mut self.cache, before)
    }

    fn sent_messages(
        &self,
    ) -> impl Future<Output = Result<Vec<SentMessage>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Sent, |_| true)
                .and_then(|()| BlockingStore::sent_messages(&self.cache)),
        )
    }

    fn pending_sent(
        &self,
    ) -> impl Future<Output = Result<Vec<SentMessage>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Sent, |_| true)
                .and_then(|()| BlockingStore::pending_sent(&self.cache)),
        )
    }

    fn last_pending_to(
        &self,
        to: &DeviceAddress,
    ) -> impl Future<Output = Result<Option<MessageId>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Sent, |_| true)
                .and_then(|()| BlockingStore::last_pending_to(&self.cache, to)),
        )
    }

    fn sent_message(
        &self,
        id: &MessageId,
    ) -> impl Future<Output = Result<Option<SentMessage>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Sent, &id.0)
                .and_then(|()| BlockingStore::sent_message(&self.cache, id)),
        )
    }

    async fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.put(&mut b, Kind::Sent, &message.id.0, &encode_sent(message))?;
        self.write(b).await?;
        BlockingStore::update_sent(&mut self.cache, message)
    }

    async fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        let mut b = self.batch();
        for m in BlockingStore::sent_messages(&self.cache)? {
            if !m.state.is_pending() && m.created < before {
                self.delete(&mut b, Kind::Sent, &m.id.0);
            }
        }
        self.write(b).await?;
        BlockingStore::prune_sent(&mut self.cache, before)
    }

    fn inbox(&self) -> impl Future<Output = Result<Vec<InboxMessage>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Inbox, |_| true)
                .and_then(|()| BlockingStore::inbox(&self.cache)),
        )
    }

    async fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        let mut b = self.batch();
        self.delete(&mut b, Kind::Inbox, &id.0);
        self.write(b).await?;
        BlockingStore::remove_inbox(&mut self.cache, id)
    }

    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> impl Future<
        Output = Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError>,
    > + MaybeSend {
        core::future::ready(
            BlockingStore::sessions_with_identity(&self.cache, identity)
                .map(|all| self.with_broken_sessions(all, |a| a.identity == *identity)),
        )
    }

    /// From the decoded records in memory, and every damaged record.
    fn route_ratchet_keys(
        &self,
        keys: &[[u8; 32]],
    ) -> impl Future<Output = Result<Vec<DeviceAddress>, StoreError>> + MaybeSend {
        core::future::ready(BlockingStore::route_ratchet_keys(&self.cache, keys).map(
            |mut found| {
                found.extend(self.broken_sessions().map(|(a, _)| a));
                found
            },
        ))
    }

    /// The damaged records first (found and quarantined by the next
    /// receive that needs them), then the healthy ones, most recently
    /// written first.
    fn awaiting_ratchet_key(
        &self,
    ) -> impl Future<Output = Result<Vec<DeviceAddress>, StoreError>> + MaybeSend {
        core::future::ready(
            BlockingStore::awaiting_ratchet_key(&self.cache).map(|healthy| {
                let mut out: Vec<DeviceAddress> = self.broken_sessions().map(|(a, _)| a).collect();
                out.extend(healthy);
                out
            }),
        )
    }

    fn own_account(
        &self,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::OwnAccount, &[])
                .and_then(|()| BlockingStore::own_account(&self.cache)),
        )
    }

    async fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        let bytes = record.to_bytes();
        let kept = AccountRecord::from_bytes(&bytes)
            .map_err(|e| StoreError::Backend(format!("account record: {e}")))?;
        let mut b = self.batch();
        self.put(&mut b, Kind::OwnAccount, &[], &bytes)?;
        self.write(b).await?;
        BlockingStore::set_own_account(&mut self.cache, &kept)
    }

    fn account(
        &self,
        account: &AccountId,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Account, account.as_bytes())
                .and_then(|()| BlockingStore::account(&self.cache, account)),
        )
    }

    async fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        let bytes = record.to_bytes();
        let kept = AccountRecord::from_bytes(&bytes)
            .map_err(|e| StoreError::Backend(format!("account record: {e}")))?;
        let mut b = self.batch();
        self.put(&mut b, Kind::Account, record.account.as_bytes(), &bytes)?;
        self.write(b).await?;
        BlockingStore::set_account(&mut self.cache, &kept)
    }

    fn accounts(&self) -> impl Future<Output = Result<Vec<AccountRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check_any(Kind::Account, |_| true)
                .and_then(|()| BlockingStore::accounts(&self.cache)),
        )
    }

    fn pairing(
        &self,
    ) -> impl Future<Output = Result<Option<PairingRecord>, StoreError>> + MaybeSend {
        core::future::ready(
            self.check(Kind::Pairing, &[])
                .and_then(|()| BlockingStore::pairing(&self.cache)),
        )
    }

    async fn set_pairing(&mut self, record: Option<&PairingRecord>) -> Result<(), StoreError> {
        let mut b = self.batch();
        match record {
            Some(r) => self.put(&mut b, Kind::Pairing, &[], &r.to_bytes())?,
            None => self.delete(&mut b, Kind::Pairing, &[]),
        }
        self.write(b).await?;
        BlockingStore::set_pairing(&mut self.cache, record)
    }
}
