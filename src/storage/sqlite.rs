//! The file-backed [`Store`] over SQLite: see [`SqliteStore`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::format;
use std::path::Path;
use std::string::{String, ToString};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use std::vec::Vec;

use aes_gcm::{Aes256Gcm, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::at_rest::{self, OpenError, NONCE_LEN, TAG_LEN};
#[allow(unused_imports)] // the docs' links
use super::Store;
use super::{address_bytes, address_name, hex};
use super::{
    AccessKeyRecord, AccountRecord, BlockingStore, ContactRecord, DeliveryState, DepositDone,
    InboxMessage, LocalIdentity, MessageId, OutboxEntry, PairingRecord, PeerAccess, PeerRecord,
    PrekeyState, Quarantined, ReceiveCommit, SendCopy, SentMessage, SessionRecord, StoreError,
    Trust, LOCAL_IDENTITY_LEN,
};
use crate::protocol::devices::AccountId;
use crate::protocol::keys::IdentityKey;
use crate::transport::{DeviceAddress, Envelope, EnvelopeId};

const T_META: &str = "meta";
const T_IDENTITY: &str = "identity";
const T_PREKEYS: &str = "prekeys";
const T_SESSIONS: &str = "sessions";
const T_PEERS: &str = "peers";
const T_OUTBOX: &str = "outbox";
const T_INBOX: &str = "inbox";
const T_QUARANTINE: &str = "quarantine";
const T_SENT: &str = "sent";
const T_CONTACTS: &str = "contacts";
const T_ACCOUNTS: &str = "accounts";
const T_PAIRING: &str = "pairing";
const T_OWN_ACCESS: &str = "own_access";
const T_PEER_ACCESS: &str = "peer_access";

/// The key of the singleton rows (identity, prekeys), as stored and as
/// bound into their associated data.
const SINGLETON: u32 = 1;
/// The `meta` row holding the sealed key check value.
const KEY_CHECK_ROW: &str = "key_check";
/// The `meta` row holding the addresses of the peer records marked
/// Compromised (sealed; sorted `identity (32) || device_id (4)` end to end):
/// a second copy of every Compromised mark, so that putting back an older
/// copy of one row does not undo one (SPEC 22.3).
const COMPROMISED_ROW: &str = "compromised";

/// The compromised addresses of the `meta` row (none if absent).
fn read_compromised(
    conn: &Connection,
    sealer: &Sealer,
) -> Result<BTreeSet<DeviceAddress>, StoreError> {
    let fail = |r: String| corrupted(T_META, COMPROMISED_ROW.to_string(), r);
    let value: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM meta WHERE name = ?1")
        .and_then(|mut s| {
            let mut rows = s.query([COMPROMISED_ROW])?;
            rows.next()?.map(|r| r.get(0)).transpose()
        })
        .map_err(backend)?;
    let Some(sealed) = value else {
        return Ok(BTreeSet::new());
    };
    let plain = sealer
        .open(T_META, COMPROMISED_ROW.as_bytes(), &sealed)
        .map_err(fail)?;
    if plain.len() % 36 != 0 {
        return Err(fail(format!("{} bytes, not addresses of 36", plain.len())));
    }
    Ok(plain
        .chunks_exact(36)
        .map(|a| {
            let (identity, device) = a.split_at(32);
            DeviceAddress {
                identity: identity.try_into().unwrap_or([0; 32]),
                device_id: u32::from_be_bytes(device.try_into().unwrap_or([0; 4])),
            }
        })
        .collect())
}

/// Adds or removes the addresses of `peers` in the compromised row, in
/// the caller's transaction, as their records say; writes it only if it
/// changed.
fn note_compromised<'a>(
    conn: &Connection,
    sealer: &Sealer,
    peers: impl IntoIterator<Item = &'a PeerRecord>,
) -> Result<(), StoreError> {
    let mut set = read_compromised(conn, sealer)?;
    let mut changed = false;
    for p in peers {
        changed |= if p.trust == Trust::Compromised {
            set.insert(p.address)
        } else {
            set.remove(&p.address)
        };
    }
    if changed {
        let plain: Vec<u8> = set.iter().flat_map(address_bytes).collect();
        let sealed = sealer.seal(T_META, COMPROMISED_ROW.as_bytes(), &plain)?;
        conn.prepare_cached(
            "INSERT INTO meta (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .and_then(|mut s| s.execute(params![COMPROMISED_ROW, sealed]))
        .map_err(backend)?;
    }
    Ok(())
}
/// The plaintext of the key check row.
const KEY_CHECK_VALUE: &[u8] = b"cubbyhole sqlite store key check v1";
/// HKDF info for the at-rest key.
const KEY_INFO: &[u8] = b"cubbyhole/v1 sqlite store at-rest key";
/// HKDF info of the routing index's key ([`Sealer::route`]).
const ROUTE_KEY_INFO: &[u8] = b"cubbyhole/v1 sqlite store route key";
/// Prefix of every associated data.
const AAD_DOMAIN: &[u8] = b"cubbyhole/v1 sqlite\0";

/// How long a writer waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A schema step, from version `i` to `i + 1` for `MIGRATIONS[i]`. It runs
/// inside the opening transaction; a step may rewrite rows (it gets the
/// sealer for that).
type Migration = fn(&Transaction<'_>, &Sealer) -> Result<(), StoreError>;

/// The schema steps, in order. To change the schema, append a step: never
/// edit a published one.
const MIGRATIONS: &[Migration] = &[
    migrate_v1, migrate_v2, migrate_v3, migrate_v4, migrate_v5, migrate_v6, migrate_v7,
];

/// Version 1: the tables and the key check row.
fn migrate_v1(tx: &Transaction<'_>, sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE meta (
             name TEXT PRIMARY KEY,
             value BLOB NOT NULL
         ) WITHOUT ROWID, STRICT;
         CREATE TABLE identity (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             secret BLOB NOT NULL
         ) STRICT;
         CREATE TABLE prekeys (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             state BLOB NOT NULL
         ) STRICT;
         CREATE TABLE sessions (
             identity BLOB NOT NULL CHECK (length(identity) = 32),
             device_id INTEGER NOT NULL CHECK (device_id BETWEEN 0 AND 4294967295),
             state BLOB NOT NULL,
             PRIMARY KEY (identity, device_id)
         ) WITHOUT ROWID, STRICT;
         CREATE TABLE peers (
             identity BLOB NOT NULL CHECK (length(identity) = 32),
             device_id INTEGER NOT NULL CHECK (device_id BETWEEN 0 AND 4294967295),
             trust INTEGER NOT NULL,
             first_seen INTEGER NOT NULL,
             auth BLOB NOT NULL,
             PRIMARY KEY (identity, device_id)
         ) WITHOUT ROWID, STRICT;
         CREATE TABLE outbox (
             seq INTEGER PRIMARY KEY,
             envelope_id BLOB NOT NULL UNIQUE CHECK (length(envelope_id) = 16),
             to_identity BLOB NOT NULL,
             to_device INTEGER NOT NULL,
             payload BLOB NOT NULL,
             created INTEGER NOT NULL
         ) STRICT;
         CREATE TABLE processed (
             envelope_id BLOB PRIMARY KEY CHECK (length(envelope_id) = 16),
             processed_at INTEGER NOT NULL
         ) WITHOUT ROWID, STRICT;
         CREATE INDEX processed_by_time ON processed (processed_at);
         CREATE TABLE inbox (
             seq INTEGER PRIMARY KEY,
             envelope_id BLOB NOT NULL UNIQUE CHECK (length(envelope_id) = 16),
             from_identity BLOB NOT NULL,
             from_device INTEGER NOT NULL,
             received_at INTEGER NOT NULL,
             body BLOB NOT NULL
         ) STRICT;",
    )
    .map_err(backend)?;
    let check = sealer.seal(T_META, KEY_CHECK_ROW.as_bytes(), KEY_CHECK_VALUE)?;
    tx.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)",
        params![KEY_CHECK_ROW, check],
    )
    .map_err(backend)?;
    Ok(())
}

/// Version 2: session records (the `sessions.state` column now holds a
/// sealed [`SessionRecord::to_bytes`]; a version 1 row, a sealed bare
/// session state, still decodes as a record of one session, so no row is
/// rewritten), the quarantine of session records that failed, and the sent
/// messages.
fn migrate_v2(tx: &Transaction<'_>, _sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE quarantine (
             seq INTEGER PRIMARY KEY,
             identity BLOB NOT NULL CHECK (length(identity) = 32),
             device_id INTEGER NOT NULL CHECK (device_id BETWEEN 0 AND 4294967295),
             at INTEGER NOT NULL,
             bytes BLOB NOT NULL,
             reason TEXT NOT NULL
         ) STRICT;
         CREATE TABLE sent (
             seq INTEGER PRIMARY KEY,
             id BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
             to_identity BLOB NOT NULL CHECK (length(to_identity) = 32),
             to_device INTEGER NOT NULL CHECK (to_device BETWEEN 0 AND 4294967295),
             state INTEGER NOT NULL CHECK (state BETWEEN 0 AND 255),
             created INTEGER NOT NULL,
             last_sent INTEGER NOT NULL,
             sends INTEGER NOT NULL CHECK (sends BETWEEN 0 AND 4294967295),
             body BLOB NOT NULL
         ) STRICT;
         CREATE INDEX sent_pending ON sent (seq) WHERE state < 3;
         ALTER TABLE outbox ADD COLUMN message BLOB
             CHECK (message IS NULL OR length(message) = 16);
         CREATE TABLE contacts (
             name BLOB PRIMARY KEY CHECK (length(name) <= 255),
             record BLOB NOT NULL
         ) WITHOUT ROWID, STRICT;",
    )
    .map_err(backend)
}

/// Version 4: accounts (SPEC.md 25): the device's own account (`kind` 0,
/// at most one row) and its contacts' accounts (`kind` 1), each an
/// [`AccountRecord`] sealed under its kind and account id.
fn migrate_v4(tx: &Transaction<'_>, _sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE accounts (
             kind INTEGER NOT NULL CHECK (kind IN (0, 1)),
             account_id BLOB NOT NULL CHECK (length(account_id) = 32),
             record BLOB NOT NULL,
             PRIMARY KEY (kind, account_id)
         ) WITHOUT ROWID, STRICT;",
    )
    .map_err(backend)
}

/// Version 5: the pending pairing offer (SPEC.md 25.9), at most one row, a
/// [`PairingRecord`] sealed under row id 1.
fn migrate_v5(tx: &Transaction<'_>, _sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE pairing (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             record BLOB NOT NULL
         ) STRICT;",
    )
    .map_err(backend)
}

/// Version 6: an index of the pending sent messages by recipient, for
/// [`BlockingStore::last_pending_to`] (read for every copy of an account
/// message, SPEC.md 25.13).
fn migrate_v6(tx: &Transaction<'_>, _sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE INDEX sent_pending_to ON sent (to_identity, to_device, seq) WHERE state < 3;",
    )
    .map_err(backend)
}

/// Version 7: deposit access keys (SPEC.md, "Access keys in the client").
/// `own_access` holds the device's own key and epoch (at most one row,
/// sealed under row id 1); `peer_access` holds, per peer device, its key
/// and epoch (`access_key`, sealed under the address and `k`; NULL if none
/// received) and this device's exclusion of it (`exclusion`, one sealed
/// byte under the address and `x`). A store migrated from version 6 has
/// no own key: the client draws one at its next publish.
fn migrate_v7(tx: &Transaction<'_>, _sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE own_access (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             secret BLOB NOT NULL
         ) STRICT;
         CREATE TABLE peer_access (
             identity BLOB NOT NULL CHECK (length(identity) = 32),
             device_id INTEGER NOT NULL,
             access_key BLOB,
             exclusion BLOB NOT NULL,
             PRIMARY KEY (identity, device_id)
         ) WITHOUT ROWID, STRICT;",
    )
    .map_err(backend)
}

/// The associated-data row of a peer's access key (`kind` b'k') or
/// exclusion flag (`kind` b'x').
fn peer_access_binding(peer: &DeviceAddress, kind: u8) -> [u8; 37] {
    let mut out = [0u8; 37];
    out[..36].copy_from_slice(&address_bytes(peer));
    out[36] = kind;
    out
}

const PEER_ACCESS_KEY_UPSERT: &str =
    "INSERT INTO peer_access (identity, device_id, access_key, exclusion) VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (identity, device_id) DO UPDATE SET access_key = excluded.access_key";
const PEER_EXCLUSION_UPSERT: &str =
    "INSERT INTO peer_access (identity, device_id, access_key, exclusion) VALUES (?1, ?2, NULL, ?3)
     ON CONFLICT (identity, device_id) DO UPDATE SET exclusion = excluded.exclusion";
const PEER_ACCESS_SELECT: &str = "SELECT identity, device_id, access_key, exclusion
     FROM peer_access ORDER BY identity, device_id";

/// One copy of a send, sealed before its transaction opens.
struct SealedSend<'a> {
    record: Vec<u8>,
    routes: Routes,
    sent: Option<(&'a SentMessage, Vec<u8>)>,
}

/// Writes a sealed send (session record, routes, outbox entry, sent
/// message) in the caller's transaction.
fn write_send(
    tx: &Transaction<'_>,
    entry: &OutboxEntry,
    sealed: &SealedSend<'_>,
) -> Result<(), StoreError> {
    tx.prepare_cached(SESSION_UPSERT)
        .and_then(|mut s| {
            s.execute(params![
                &entry.to.identity[..],
                entry.to.device_id,
                &sealed.record[..]
            ])
        })
        .map_err(backend)?;
    write_routes(tx, &entry.to, &sealed.routes)?;
    tx.prepare_cached(
        "INSERT INTO outbox (envelope_id, to_identity, to_device, payload, created, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (envelope_id) DO UPDATE SET to_identity = excluded.to_identity,
             to_device = excluded.to_device, payload = excluded.payload,
             created = excluded.created, message = excluded.message",
    )
    .and_then(|mut s| {
        s.execute(params![
            &entry.envelope.id.0[..],
            &entry.to.identity[..],
            entry.to.device_id,
            &entry.envelope.payload[..],
            entry.created as i64,
            entry.message.as_ref().map(|m| &m.0[..]),
        ])
    })
    .map_err(backend)?;
    if let Some((m, body)) = &sealed.sent {
        tx.prepare_cached(SENT_UPSERT)
            .and_then(|mut s| s.execute(sent_params(m, body)))
            .map_err(backend)?;
    }
    Ok(())
}

/// Reads and opens the identity row (`None`: no identity yet).
fn read_identity(conn: &Connection, sealer: &Sealer) -> Result<Option<LocalIdentity>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT secret FROM identity WHERE id = ?1")
        .map_err(backend)?;
    let mut rows = stmt.query([SINGLETON]).map_err(backend)?;
    let Some(row) = rows.next().map_err(backend)? else {
        return Ok(None);
    };
    let fail = |r: String| corrupted(T_IDENTITY, SINGLETON.to_string(), r);
    let sealed = blob(row, 0, "secret").map_err(fail)?;
    let plain = sealer
        .open(T_IDENTITY, &SINGLETON.to_be_bytes(), sealed)
        .map_err(fail)?;
    LocalIdentity::from_bytes(&plain).map(Some).map_err(|_| {
        fail(format!(
            "secret: {} bytes, expected {LOCAL_IDENTITY_LEN}",
            plain.len()
        ))
    })
}

/// Opens and decodes the sealed session record at `column` of a row keyed
/// by `address`, with our identity key `local`. Fails only with
/// [`StoreError::Corrupted`] naming the row.
fn open_session_row(
    sealer: &Sealer,
    address: &DeviceAddress,
    row: &Row<'_>,
    column: usize,
    local: Option<&IdentityKey>,
) -> Result<SessionRecord, StoreError> {
    let fail = |r: String| corrupted(T_SESSIONS, address_name(address), r);
    let sealed = blob(row, column, "state").map_err(fail)?;
    let plain = sealer
        .open(T_SESSIONS, &address_bytes(address), sealed)
        .map_err(fail)?;
    let local = local.ok_or_else(|| fail("a session but no identity".to_string()))?;
    let remote = IdentityKey::from_bytes(&address.identity)
        .map_err(|e| fail(format!("peer identity: {e}")))?;
    SessionRecord::from_bytes(&plain, local, &remote)
        .map_err(|e| fail(format!("session record: {e}")))
}

/// Version 3: the routing index. `routes` maps a keyed digest of each
/// ratchet key a peer's record can decrypt under
/// ([`SessionRecord::ratchet_keys`], [`Sealer::route`]) to the peer, and
/// `sessions.awaits` marks the records that await a new ratchet key
/// ([`SessionRecord::awaits_ratchet_key`]) with the order they were
/// written in (0: not awaiting), so a receive opens only the
/// records its messages belong to. Both are written with the record, in
/// the same transaction; this step fills them for the existing records (a
/// record that does not open is marked awaiting, so a receive finds it
/// and quarantines it).
fn migrate_v3(tx: &Transaction<'_>, sealer: &Sealer) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE routes (
             key BLOB NOT NULL CHECK (length(key) = 16),
             identity BLOB NOT NULL CHECK (length(identity) = 32),
             device_id INTEGER NOT NULL CHECK (device_id BETWEEN 0 AND 4294967295),
             PRIMARY KEY (key, identity, device_id)
         ) WITHOUT ROWID, STRICT;
         CREATE INDEX routes_by_peer ON routes (identity, device_id);
         ALTER TABLE sessions ADD COLUMN awaits INTEGER NOT NULL DEFAULT 0
             CHECK (awaits >= 0);
         CREATE INDEX sessions_awaiting ON sessions (awaits) WHERE awaits > 0;",
    )
    .map_err(backend)?;
    // A store whose identity row does not open has no routes to build: its
    // records are marked awaiting (and quarantined when a receive needs them).
    let local = read_identity(tx, sealer)
        .ok()
        .flatten()
        .map(|i| *i.keys.public());
    let mut found = Vec::new();
    {
        let mut stmt = tx.prepare(SESSIONS_SELECT).map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let address = address_key(T_SESSIONS, row, 0, 1)?;
            let record = open_session_row(sealer, &address, row, 2, local.as_ref()).ok();
            found.push((address, record));
        }
    }
    for (address, record) in found {
        match record {
            Some(record) => write_routes(tx, &address, &sealer.routes(&record))?,
            None => write_routes(tx, &address, &Routes::unknown())?,
        }
    }
    Ok(())
}

/// What the routing index holds for one record.
struct Routes {
    keys: Vec<[u8; 16]>,
    awaits: bool,
}

impl Routes {
    /// For a record that does not open: no key, awaiting (found by the
    /// next receive that looks for a new chain, and quarantined).
    fn unknown() -> Self {
        Routes {
            keys: Vec::new(),
            awaits: true,
        }
    }
}

/// Replaces the routing index entries of `peer` (whose `sessions` row is
/// written in the same transaction).
fn write_routes(
    conn: &Connection,
    peer: &DeviceAddress,
    routes: &Routes,
) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM routes WHERE identity = ?1 AND device_id = ?2")
        .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id]))
        .map_err(backend)?;
    if !routes.keys.is_empty() {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO routes (key, identity, device_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )
            .map_err(backend)?;
        for key in &routes.keys {
            stmt.execute(params![&key[..], &peer.identity[..], peer.device_id])
                .map_err(backend)?;
        }
    }
    // 0: not awaiting; otherwise the order of the write (most recent
    // highest), which is the order `awaiting_ratchet_key` answers in.
    conn.prepare_cached(
        "UPDATE sessions SET awaits = CASE WHEN ?3 THEN
             (SELECT coalesce(max(awaits), 0) + 1 FROM sessions WHERE awaits > 0)
             ELSE 0 END
         WHERE identity = ?1 AND device_id = ?2",
    )
    .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id, routes.awaits]))
    .map_err(backend)?;
    Ok(())
}

/// Deletes the routing index entries of `peer`.
fn delete_routes(conn: &Connection, peer: &DeviceAddress) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM routes WHERE identity = ?1 AND device_id = ?2")
        .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id]))
        .map_err(backend)?;
    Ok(())
}

/// A file-backed [`Store`] over SQLite (feature `sqlite`), with secrets
/// encrypted at rest.
///
/// # Durability and atomicity
///
/// The database runs in WAL mode with `synchronous=FULL`: once a write
/// method returns `Ok`, the change survives a crash or power loss.
/// [`Store::commit_send`], [`Store::commit_receive`] and
/// [`Store::quarantine_session`] each run in one `BEGIN IMMEDIATE`
/// transaction, so a crash or error leaves all of their changes or none.
/// Several processes may open the same file; writers wait for each other up
/// to a busy timeout (10 s) before failing with [`StoreError::Backend`].
///
/// # Encryption at rest
///
/// Secrets are sealed with AES-256-GCM under a key derived (HKDF-SHA256)
/// from the 32-byte key the application supplies: the identity seed, the
/// prekey state, every session record, every inbox message body and every
/// sent message body. A sealed value is `nonce (12, fresh from the OS) ||
/// ciphertext || tag (16)`; its associated data binds it to its table and
/// row key (and, for inbox messages, to the sender and reception time; for
/// sent messages, to the recipient and every column of the row: delivery
/// state, times, send count), so a value altered, cut or moved to another
/// row or table fails to open. Peer records are stored in the clear (they
/// are queried by key) but carry an authentication tag over the same
/// binding, so a changed trust level is detected too. Outbox payloads
/// (already end-to-end ciphertext) and processed-envelope marks are stored
/// in the clear. Quarantined session records keep the sealed bytes found in
/// the `sessions` row (still sealed under that row's binding), with the
/// peer, time and reason in the clear. Metadata is not hidden: which peers
/// and sessions exist, envelope and message ids, delivery states, times,
/// sizes.
///
/// The key is checked when the store opens: a `meta` row holds a sealed
/// check value, written when the database is created, and a key that does
/// not open it is [`StoreError::WrongKey`]. The encryption does not protect
/// against a whole-file rollback (restoring an older copy) or against
/// deleting rows; it guarantees that what is read is what this key wrote
/// for that row.
///
/// Nonces are random, so the usual AES-GCM bound applies: keep the number
/// of sealed values written under one key below 2^32 (each session record,
/// peer, prekey, identity or sent-message write and each received message
/// is one; a receive batch seals each session record and sent message it
/// changes once). That is 50 days at 1,000 writes a second, sustained.
///
/// # Corrupted rows
///
/// A row that fails to open or decode is [`StoreError::Corrupted`], naming
/// the table and the row's key (`hex(identity)/device_id` for sessions and
/// peers, `hex(envelope_id)` for the inbox and the outbox, `hex(id)` for
/// sent messages, the sequence number for the quarantine, `1` for the
/// singleton identity and prekeys rows); it never affects the other rows:
///
/// - methods reading one row ([`Store::session`], [`Store::peer`],
///   [`Store::sent_message`], ...) fail only when *that* row is corrupted;
/// - [`Store::sessions`] decodes each record on its own: a corrupted one is
///   returned as its error, beside the healthy ones, to be quarantined
///   ([`Store::quarantine_session`] moves the row's bytes, as found, to the
///   `quarantine` table);
/// - the other methods returning a list ([`Store::peers`],
///   [`Store::outbox`], [`Store::sent_messages`], [`Store::inbox`], ...)
///   return the error naming the first corrupted row rather than silently
///   dropping it (a missing message must not look like an absent one);
/// - writes replace a corrupted row as usual ([`Store::set_session`],
///   [`Store::remove_session`], [`Store::update_sent`],
///   [`Store::remove_inbox`], [`SqliteStore::remove_sent`], ...), which is
///   how an application recovers; [`SqliteStore::corrupted_rows`] lists
///   every corrupted row and [`SqliteStore::session_addresses`] lists
///   sessions without opening them.
///
/// # Schema
///
/// The schema version is SQLite's `user_version`. Opening a database of an
/// older version migrates it, one step per version, all in the opening
/// transaction (a crash mid-migration leaves the old version); a newer
/// version than this code knows is [`StoreError::UnsupportedSchema`].
/// Version 1 held a bare session state per peer; version 2 holds session
/// records (a version 1 row still decodes, as a record of that one session)
/// and adds the `quarantine` and `sent` tables.
///
/// # Example
///
/// ```no_run
/// # fn main() -> Result<(), cubbyhole::storage::StoreError> {
/// use cubbyhole::storage::{BlockingStore, SqliteStore};
/// let key = [7u8; 32]; // the application's secret, e.g. from the OS keychain
/// let store = SqliteStore::open("device.db", &key)?;
/// assert!(store.identity()?.is_none());
/// # Ok(()) }
/// ```
pub struct SqliteStore {
    db: Mutex<Db>,
}

/// The store proper; [`SqliteStore`] puts it behind a mutex so that it is
/// `Sync` (a rusqlite connection is not).
struct Db {
    conn: Connection,
    sealer: Sealer,
    /// Our identity key, once read: session states are restored with it.
    local: std::cell::Cell<Option<IdentityKey>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never waits for (or deadlocks on) a store in use.
        match self.db.try_lock() {
            Ok(db) => db.fmt(f),
            Err(_) => f.write_str("SqliteStore { .. (in use) }"),
        }
    }
}

impl SqliteStore {
    /// The schema version this code creates and understands (SQLite's
    /// `user_version`).
    pub const SCHEMA_VERSION: u32 = Db::SCHEMA_VERSION;

    /// Opens the store at `path`, creating it if absent, migrating an older
    /// schema, and checking `key`.
    ///
    /// # Errors
    /// - [`StoreError::WrongKey`] if the database was created under another
    ///   key;
    /// - [`StoreError::UnsupportedSchema`] if it was written by newer code;
    /// - [`StoreError::Corrupted`] if the key check row is missing, cut or
    ///   extended;
    /// - [`StoreError::Backend`] if SQLite fails (unreadable file, not a
    ///   database, a non-empty database of another application, locked
    ///   longer than the busy timeout, ...).
    pub fn open(path: impl AsRef<Path>, key: &[u8; 32]) -> Result<Self, StoreError> {
        Db::open(path, key).map(Self::wrap)
    }

    /// Opens a fresh store in memory (gone when dropped): the same code
    /// paths as a file, for tests.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails.
    pub fn open_in_memory(key: &[u8; 32]) -> Result<Self, StoreError> {
        Db::open_in_memory(key).map(Self::wrap)
    }

    fn wrap(db: Db) -> Self {
        SqliteStore { db: Mutex::new(db) }
    }

    /// The store, for a call through `&self`. A panic while it was held
    /// (which no method allows) cannot leave a half-applied change: every
    /// write is one SQLite transaction, rolled back if not committed.
    fn lock(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get_mut(&mut self) -> &mut Db {
        self.db.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// The addresses of all sessions, without opening them (so a corrupted
    /// session does not hide the others): with [`Store::session`] per
    /// address, an application can load every healthy session.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails, [`StoreError::Corrupted`]
    /// for an unreadable row key.
    pub fn session_addresses(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        self.lock().session_addresses()
    }

    /// Deletes a sent message, if any: the way to discard a corrupted one
    /// (which fails [`Store::sent_messages`] until it is removed or
    /// overwritten with [`Store::update_sent`]).
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails.
    pub fn remove_sent(&mut self, id: &MessageId) -> Result<(), StoreError> {
        self.get_mut().remove_sent(id)
    }

    /// Opens and decodes every row that [`Store`] reads and returns one
    /// [`StoreError::Corrupted`] per row that fails, in table order
    /// (identity, prekeys, own access key, peer access keys, sessions,
    /// quarantine, peers, outbox, sent,
    /// inbox). Empty means the store is healthy. (A quarantined record is
    /// not opened: only its columns are decoded.)
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails.
    pub fn corrupted_rows(&self) -> Result<Vec<StoreError>, StoreError> {
        self.lock().corrupted_rows()
    }
}

impl BlockingStore for SqliteStore {
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        self.lock().identity()
    }

    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        self.get_mut().set_identity(identity)
    }

    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        self.lock().prekeys()
    }

    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        self.get_mut().set_prekeys(state)
    }

    fn own_access_key(&self) -> Result<Option<AccessKeyRecord>, StoreError> {
        self.lock().own_access_key()
    }

    fn set_own_access_key(&mut self, key: &AccessKeyRecord) -> Result<(), StoreError> {
        self.get_mut().set_own_access_key(key)
    }

    fn peer_access(&self, peer: &DeviceAddress) -> Result<PeerAccess, StoreError> {
        self.lock().peer_access(peer)
    }

    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.get_mut().set_peer_access_key(peer, key)
    }

    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        self.get_mut().set_peer_excluded(peer, excluded)
    }

    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError> {
        self.lock().session(peer)
    }

    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.lock().sessions()
    }

    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.get_mut().set_session(peer, record)
    }

    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        self.get_mut().remove_session(peer)
    }

    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.get_mut().quarantine_session(peer, now, reason)
    }

    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.lock().quarantined()
    }

    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        self.lock().peer(device)
    }

    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.get_mut().set_peer(peer)
    }

    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.lock().peers()
    }

    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        self.lock().contact(name)
    }

    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        self.get_mut().set_contact(contact)
    }

    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        self.lock().contacts()
    }

    fn peers_with_identity(&self, identity: &[u8; 32]) -> Result<Vec<PeerRecord>, StoreError> {
        self.lock().peers_with_identity(identity)
    }

    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        self.get_mut().commit_send(record, entry, sent)
    }

    fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        self.get_mut().commit_send_many(copies)
    }

    fn commit_deposits(&mut self, done: &[DepositDone]) -> Result<(), StoreError> {
        self.get_mut().commit_deposits(done)
    }

    fn own_account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.lock().own_account()
    }

    fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.get_mut().set_own_account(record)
    }

    fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        self.lock().account(account)
    }

    fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.get_mut().set_account(record)
    }

    fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.lock().accounts()
    }

    fn pairing(&self) -> Result<Option<PairingRecord>, StoreError> {
        self.lock().pairing()
    }

    fn set_pairing(&mut self, record: Option<&PairingRecord>) -> Result<(), StoreError> {
        self.get_mut().set_pairing(record)
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.lock().outbox()
    }

    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.get_mut().remove_outbox(id)
    }

    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.lock().is_processed(id)
    }

    fn processed_among(&self, ids: &[EnvelopeId]) -> Result<Vec<bool>, StoreError> {
        self.lock().processed_among(ids)
    }

    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        self.get_mut().commit_receive(batch)
    }

    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        self.get_mut().prune_processed(before)
    }

    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.lock().sent_messages()
    }

    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.lock().pending_sent()
    }

    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        self.lock().last_pending_to(to)
    }

    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        self.lock().sent_message(id)
    }

    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        self.get_mut().update_sent(message)
    }

    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        self.get_mut().prune_sent(before)
    }

    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        self.lock().inbox()
    }

    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.get_mut().remove_inbox(id)
    }

    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.lock().sessions_with_identity(identity)
    }

    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        self.lock().route_ratchet_keys(keys)
    }

    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        self.lock().awaiting_ratchet_key()
    }
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .finish_non_exhaustive()
    }
}

impl Db {
    /// The schema version this code creates and understands (SQLite's
    /// `user_version`).
    pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

    /// Opens the store at `path`, creating it if absent, migrating an older
    /// schema, and checking `key`.
    ///
    /// # Errors
    /// - [`StoreError::WrongKey`] if the database was created under another
    ///   key;
    /// - [`StoreError::UnsupportedSchema`] if it was written by newer code;
    /// - [`StoreError::Corrupted`] if the key check row is missing, cut or
    ///   extended;
    /// - [`StoreError::Backend`] if SQLite fails (unreadable file, not a
    ///   database, a non-empty database of another application, locked
    ///   longer than the busy timeout, ...).
    pub fn open(path: impl AsRef<Path>, key: &[u8; 32]) -> Result<Self, StoreError> {
        let conn = Connection::open(path.as_ref()).map_err(backend)?;
        Self::init(conn, key, true)
    }

    /// Opens a fresh store in memory (gone when dropped): the same code
    /// paths as a file, for tests.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails.
    pub fn open_in_memory(key: &[u8; 32]) -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(backend)?;
        Self::init(conn, key, false)
    }

    fn init(mut conn: Connection, key: &[u8; 32], file: bool) -> Result<Self, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
            .map_err(backend)?;
        if file && !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "cannot enable WAL mode (journal mode is {mode})"
            )));
        }
        // FULL: in WAL mode, every commit syncs the log before it returns.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend)?;
        let synchronous: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .map_err(backend)?;
        if synchronous != 2 {
            return Err(StoreError::Backend(format!(
                "cannot set synchronous=FULL (it is {synchronous})"
            )));
        }
        conn.set_prepared_statement_cache_capacity(64);
        let sealer = Sealer::new(key);

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(backend)?;
        // user_version is a signed 32-bit value; read negatives as huge.
        let version = version as i32 as u32;
        if version > Self::SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema(version));
        }
        if version == 0 {
            let objects: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(backend)?;
            if objects != 0 {
                return Err(StoreError::Backend(
                    "the file holds another application's database".to_string(),
                ));
            }
        } else {
            check_key(&tx, &sealer)?;
        }
        for step in &MIGRATIONS[version as usize..] {
            step(&tx, &sealer)?;
        }
        if version < Self::SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", Self::SCHEMA_VERSION)
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(Db {
            conn,
            sealer,
            local: std::cell::Cell::new(None),
        })
    }

    /// The addresses of all sessions, without opening them (so a corrupted
    /// session does not hide the others): with [`Store::session`] per
    /// address, an application can load every healthy session.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails, [`StoreError::Corrupted`]
    /// for an unreadable row key.
    pub fn session_addresses(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT identity, device_id FROM sessions ORDER BY identity, device_id")
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(address_key(T_SESSIONS, row, 0, 1)?);
        }
        Ok(out)
    }

    /// Deletes a sent message, if any: the way to discard a corrupted one
    /// (which fails [`Store::sent_messages`] until it is removed or
    /// overwritten with [`Store::update_sent`]).
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails.
    pub fn remove_sent(&mut self, id: &MessageId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM sent WHERE id = ?1")
            .and_then(|mut s| s.execute([&id.0[..]]))
            .map_err(backend)?;
        Ok(())
    }

    /// Opens and decodes every row that [`Store`] reads and returns one
    /// [`StoreError::Corrupted`] per row that fails, in table order
    /// (identity, prekeys, own access key, peer access keys, sessions,
    /// quarantine, peers, outbox, sent,
    /// inbox). Empty means the store is healthy. (A quarantined record is
    /// not opened: only its columns are decoded.)
    ///
    /// # Errors
    /// [`StoreError::Backend`] if SQLite fails.
    pub fn corrupted_rows(&self) -> Result<Vec<StoreError>, StoreError> {
        let mut found = Vec::new();
        let mut keep = |r: Result<(), StoreError>| match r {
            Ok(()) => Ok(()),
            Err(e @ StoreError::Corrupted { .. }) => {
                found.push(e);
                Ok(())
            }
            Err(e) => Err(e),
        };
        keep(self.identity().map(drop))?;
        keep(self.prekeys().map(drop))?;
        keep(self.own_access_key().map(drop))?;
        self.scan(
            PEER_ACCESS_SELECT,
            |row| {
                let address = address_key(T_PEER_ACCESS, row, 0, 1)?;
                self.peer_access_row(&address, row, 2).map(drop)
            },
            &mut keep,
        )?;
        self.scan(
            SESSIONS_SELECT,
            |row| self.session_row(row).map(drop),
            &mut keep,
        )?;
        self.scan(
            QUARANTINE_SELECT,
            |row| quarantine_row(row).map(drop),
            &mut keep,
        )?;
        let compromised = match read_compromised(&self.conn, &self.sealer) {
            Ok(set) => set,
            Err(e) => {
                keep(Err(e))?;
                BTreeSet::new()
            }
        };
        self.scan(
            PEERS_SELECT,
            |row| {
                let address = address_key(T_PEERS, row, 0, 1)?;
                self.peer_row(&address, row, 2, &compromised).map(drop)
            },
            &mut keep,
        )?;
        self.scan(OUTBOX_SELECT, |row| outbox_row(row).map(drop), &mut keep)?;
        self.scan(SENT_SELECT, |row| self.sent_row(row).map(drop), &mut keep)?;
        self.scan(
            CONTACTS_SELECT,
            |row| self.contact_row(row).map(drop),
            &mut keep,
        )?;
        self.scan(INBOX_SELECT, |row| self.inbox_row(row).map(drop), &mut keep)?;
        Ok(found)
    }

    fn scan(
        &self,
        sql: &str,
        mut each: impl FnMut(&Row<'_>) -> Result<(), StoreError>,
        keep: &mut impl FnMut(Result<(), StoreError>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            keep(each(row))?;
        }
        Ok(())
    }

    /// Decodes a row of [`SESSIONS_SELECT`].
    fn session_row(&self, row: &Row<'_>) -> Result<(DeviceAddress, SessionRecord), StoreError> {
        let address = address_key(T_SESSIONS, row, 0, 1)?;
        let local = self.local_key()?;
        let record = self.open_record(&address, row, 2, local.as_ref())?;
        Ok((address, record))
    }

    /// Our identity key (read once, then remembered): session records are
    /// restored with it. `None` if the store has no identity yet.
    fn local_key(&self) -> Result<Option<IdentityKey>, StoreError> {
        match self.local.get() {
            Some(local) => Ok(Some(local)),
            // identity() remembers the key it reads.
            None => Ok(self.identity()?.map(|i| *i.keys.public())),
        }
    }

    /// Opens and decodes the sealed session record at `column` of a row
    /// keyed by `address`, with our identity key `local`. Fails only with
    /// [`StoreError::Corrupted`] naming the row.
    fn open_record(
        &self,
        address: &DeviceAddress,
        row: &Row<'_>,
        column: usize,
        local: Option<&IdentityKey>,
    ) -> Result<SessionRecord, StoreError> {
        open_session_row(&self.sealer, address, row, column, local)
    }

    /// Decodes `(trust, first_seen, auth)` at `column..` of a `peers` row;
    /// an address in `compromised` is Compromised whatever the row says (an
    /// older copy of the row put back does not undo the mark).
    fn peer_row(
        &self,
        address: &DeviceAddress,
        row: &Row<'_>,
        column: usize,
        compromised: &BTreeSet<DeviceAddress>,
    ) -> Result<PeerRecord, StoreError> {
        let fail = |r: String| corrupted(T_PEERS, address_name(address), r);
        let trust = int(row, column, "trust").map_err(fail)?;
        let first_seen = int(row, column + 1, "first_seen").map_err(fail)? as u64;
        let auth = blob(row, column + 2, "auth").map_err(fail)?;
        let trust = u8::try_from(trust)
            .ok()
            .and_then(Trust::from_code)
            .ok_or_else(|| fail(format!("unknown trust level {trust}")))?;
        let record = PeerRecord {
            address: *address,
            trust,
            first_seen,
        };
        let plain = self
            .sealer
            .open(T_PEERS, &peer_binding(&record), auth)
            .map_err(fail)?;
        if !plain.is_empty() {
            return Err(fail("auth: unexpected content".to_string()));
        }
        let mut record = record;
        if compromised.contains(address) {
            record.trust = Trust::Compromised;
        }
        Ok(record)
    }

    /// Decodes a row of [`INBOX_SELECT`].
    fn inbox_row(&self, row: &Row<'_>) -> Result<InboxMessage, StoreError> {
        let id = envelope_key(T_INBOX, row, 0)?;
        let fail = |r: String| corrupted(T_INBOX, hex(&id.0), r);
        let from = address_columns(row, 1, 2).map_err(fail)?;
        let received_at = int(row, 3, "received_at").map_err(fail)? as u64;
        let sealed = blob(row, 4, "body").map_err(fail)?;
        let mut body = self
            .sealer
            .open(T_INBOX, &inbox_binding(&id, &from, received_at), sealed)
            .map_err(fail)?;
        Ok(InboxMessage {
            envelope_id: id,
            from,
            body: core::mem::take(&mut *body),
            received_at,
        })
    }

    /// Decodes a row of [`SENT_SELECT`].
    fn sent_row(&self, row: &Row<'_>) -> Result<SentMessage, StoreError> {
        let id = MessageId(key16(T_SENT, row, 0, "id")?);
        let fail = |r: String| corrupted(T_SENT, hex(&id.0), r);
        let to = address_columns(row, 1, 2).map_err(fail)?;
        let code = int(row, 3, "state").map_err(fail)?;
        let state = u8::try_from(code)
            .ok()
            .and_then(DeliveryState::from_code)
            .ok_or_else(|| fail(format!("unknown delivery state {code}")))?;
        let created = int(row, 4, "created").map_err(fail)? as u64;
        let last_sent = int(row, 5, "last_sent").map_err(fail)? as u64;
        let sends = int(row, 6, "sends").map_err(fail)?;
        let sends =
            u32::try_from(sends).map_err(|_| fail(format!("sends: {sends} out of range")))?;
        let sealed = blob(row, 7, "body").map_err(fail)?;
        let mut message = SentMessage {
            id,
            to,
            body: Vec::new(),
            state,
            created,
            last_sent,
            sends,
        };
        let mut body = self
            .sealer
            .open(T_SENT, &sent_binding(&message), sealed)
            .map_err(fail)?;
        message.body = core::mem::take(&mut *body);
        Ok(message)
    }

    /// Runs a query of [`SENT_SELECT`]'s columns, decoding every row.
    /// Opens a `(name, record)` row of `contacts`: the record is sealed
    /// and bound to its name.
    fn seal_send<'a>(
        &self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&'a SentMessage>,
    ) -> Result<SealedSend<'a>, StoreError> {
        Ok(SealedSend {
            record: self.seal_record(&entry.to, record)?,
            routes: self.sealer.routes(record),
            sent: sent.map(|m| Ok((m, self.seal_sent(m)?))).transpose()?,
        })
    }

    fn seal_account(&self, kind: u8, record: &AccountRecord) -> Result<Vec<u8>, StoreError> {
        let mut row = vec![kind];
        row.extend_from_slice(&record.account.0);
        self.sealer.seal(T_ACCOUNTS, &row, &record.to_bytes())
    }

    /// The account rows of `kind` (0: own, 1: contacts), of one account or
    /// all, by account id.
    fn account_query(
        &self,
        kind: u8,
        account: Option<&AccountId>,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT account_id, record FROM accounts
                 WHERE kind = ?1 AND (?2 IS NULL OR account_id = ?2) ORDER BY account_id",
            )
            .map_err(backend)?;
        let mut rows = stmt
            .query(params![kind, account.map(|a| &a.0[..])])
            .map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            let id = blob(row, 0, "account_id")
                .map_err(|r| corrupted(T_ACCOUNTS, "?".to_string(), r))?
                .to_vec();
            let fail = |r: String| corrupted(T_ACCOUNTS, hex(&id), r);
            let sealed = blob(row, 1, "record").map_err(fail)?;
            let mut binding = vec![kind];
            binding.extend_from_slice(&id);
            let plain = self
                .sealer
                .open(T_ACCOUNTS, &binding, sealed)
                .map_err(fail)?;
            let record = AccountRecord::from_bytes(&plain).map_err(|e| fail(e.to_string()))?;
            if record.account.0[..] != id[..] {
                return Err(fail("record of another account".to_string()));
            }
            out.push(record);
        }
        Ok(out)
    }

    fn contact_row(&self, row: &Row<'_>) -> Result<ContactRecord, StoreError> {
        let name = blob(row, 0, "name")
            .map_err(|r| corrupted(T_CONTACTS, "?".to_string(), r))?
            .to_vec();
        let fail = |r: String| corrupted(T_CONTACTS, hex(&name), r);
        let sealed = blob(row, 1, "record").map_err(fail)?;
        let plain = self.sealer.open(T_CONTACTS, &name, sealed).map_err(fail)?;
        let record = ContactRecord::from_bytes(&plain).map_err(|e| fail(e.to_string()))?;
        if record.name != name {
            return Err(fail("record of another name".to_string()));
        }
        Ok(record)
    }

    fn sent_query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<SentMessage>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let mut rows = stmt.query(params).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(self.sent_row(row)?);
        }
        Ok(out)
    }

    /// Runs a query of [`PEERS_SELECT`]'s columns, decoding every row.
    fn peer_query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<PeerRecord>, StoreError> {
        let compromised = read_compromised(&self.conn, &self.sealer)?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let mut rows = stmt.query(params).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            let address = address_key(T_PEERS, row, 0, 1)?;
            out.push(self.peer_row(&address, row, 2, &compromised)?);
        }
        Ok(out)
    }
}

const OUTBOX_SELECT: &str =
    "SELECT envelope_id, to_identity, to_device, payload, created, message FROM outbox ORDER BY seq";
const SESSIONS_SELECT: &str =
    "SELECT identity, device_id, state FROM sessions ORDER BY identity, device_id";
const QUARANTINE_SELECT: &str =
    "SELECT seq, identity, device_id, at, bytes, reason FROM quarantine ORDER BY seq";
const PEERS_SELECT: &str = "SELECT identity, device_id, trust, first_seen, auth FROM peers
     ORDER BY identity, device_id";
const PEERS_OF_IDENTITY: &str = "SELECT identity, device_id, trust, first_seen, auth FROM peers
     WHERE identity = ?1 ORDER BY device_id";
const CONTACTS_SELECT: &str = "SELECT name, record FROM contacts ORDER BY name";
const SENT_SELECT: &str =
    "SELECT id, to_identity, to_device, state, created, last_sent, sends, body
     FROM sent ORDER BY seq";
/// Pending states are 0, 1 and 2 (`DeliveryState::code`); the partial
/// index `sent_pending` holds just those rows.
const SENT_PENDING: &str =
    "SELECT id, to_identity, to_device, state, created, last_sent, sends, body
     FROM sent WHERE state < 3 ORDER BY seq";
/// Uses the partial index `sent_pending_to` (schema version 6).
const SENT_LAST_PENDING_TO: &str = "SELECT id FROM sent
     WHERE state < 3 AND to_identity = ?1 AND to_device = ?2 ORDER BY seq DESC LIMIT 1";
const SENT_BY_ID: &str = "SELECT id, to_identity, to_device, state, created, last_sent, sends, body
     FROM sent WHERE id = ?1";
const INBOX_SELECT: &str =
    "SELECT envelope_id, from_identity, from_device, received_at, body FROM inbox ORDER BY seq";

const SESSION_UPSERT: &str = "INSERT INTO sessions (identity, device_id, state) VALUES (?1, ?2, ?3)
     ON CONFLICT (identity, device_id) DO UPDATE SET state = excluded.state";
const PREKEYS_UPSERT: &str = "INSERT INTO prekeys (id, state) VALUES (?1, ?2)
     ON CONFLICT (id) DO UPDATE SET state = excluded.state";
const PEER_UPSERT: &str =
    "INSERT INTO peers (identity, device_id, trust, first_seen, auth) VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (identity, device_id) DO UPDATE SET
         trust = excluded.trust, first_seen = excluded.first_seen, auth = excluded.auth";
/// Inserts a sent message, or updates it in place (keeping its position).
const SENT_UPSERT: &str = "INSERT INTO sent
         (id, to_identity, to_device, state, created, last_sent, sends, body)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
     ON CONFLICT (id) DO UPDATE SET
         to_identity = excluded.to_identity, to_device = excluded.to_device,
         state = excluded.state, created = excluded.created,
         last_sent = excluded.last_sent, sends = excluded.sends, body = excluded.body";

/// Decodes a row of [`QUARANTINE_SELECT`] (the record is not opened).
fn quarantine_row(row: &Row<'_>) -> Result<Quarantined, StoreError> {
    let seq = int(row, 0, "seq").map_err(|r| corrupted(T_QUARANTINE, raw_name(row, 0), r))?;
    let fail = |r: String| corrupted(T_QUARANTINE, seq.to_string(), r);
    let peer = address_columns(row, 1, 2).map_err(fail)?;
    let at = int(row, 3, "at").map_err(fail)? as u64;
    let bytes = Zeroizing::new(blob(row, 4, "bytes").map_err(fail)?.to_vec());
    let reason = text(row, 5, "reason").map_err(fail)?;
    Ok(Quarantined {
        peer,
        at,
        bytes,
        reason,
    })
}

/// Decodes a row of [`OUTBOX_SELECT`].
fn outbox_row(row: &Row<'_>) -> Result<OutboxEntry, StoreError> {
    let id = envelope_key(T_OUTBOX, row, 0)?;
    let fail = |r: String| corrupted(T_OUTBOX, hex(&id.0), r);
    let to = address_columns(row, 1, 2).map_err(fail)?;
    let payload = blob(row, 3, "payload").map_err(fail)?.to_vec();
    let created = int(row, 4, "created").map_err(fail)? as u64;
    let message = match row.get_ref(5).map_err(|e| fail(e.to_string()))? {
        rusqlite::types::ValueRef::Null => None,
        rusqlite::types::ValueRef::Blob(b) => Some(MessageId(
            b.try_into()
                .map_err(|_| fail(format!("message: {} bytes", b.len())))?,
        )),
        _ => return Err(fail("message: not a blob".to_string())),
    };
    Ok(OutboxEntry {
        to,
        envelope: Envelope { id, payload },
        created,
        message,
    })
}

/// Checks the key against the sealed check value.
fn check_key(tx: &Transaction<'_>, sealer: &Sealer) -> Result<(), StoreError> {
    let fail = |r: &str| corrupted(T_META, KEY_CHECK_ROW.to_string(), r.to_string());
    let value: Option<Vec<u8>> = tx
        .query_row(
            "SELECT value FROM meta WHERE name = ?1",
            [KEY_CHECK_ROW],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(backend)?;
    let value = value.ok_or_else(|| fail("missing"))?;
    // The sealed check value has one length: a row cut or extended is
    // corrupted, not sealed under another key (only a row of the right
    // length that does not open is taken for a wrong key).
    let expected = NONCE_LEN + KEY_CHECK_VALUE.len() + TAG_LEN;
    if value.len() != expected {
        return Err(fail(&format!("{} bytes, expected {expected}", value.len())));
    }
    let plain = sealer
        .open(T_META, KEY_CHECK_ROW.as_bytes(), &value)
        .map_err(|_| StoreError::WrongKey)?;
    if plain.as_slice() != KEY_CHECK_VALUE {
        return Err(fail("unexpected check value"));
    }
    Ok(())
}

impl BlockingStore for Db {
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        let identity = read_identity(&self.conn, &self.sealer)?;
        if let Some(identity) = &identity {
            self.local.set(Some(*identity.keys.public()));
        }
        Ok(identity)
    }

    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        let plain = identity.to_bytes();
        let sealed = self
            .sealer
            .seal(T_IDENTITY, &SINGLETON.to_be_bytes(), &plain)?;
        self.conn
            .prepare_cached(
                "INSERT INTO identity (id, secret) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET secret = excluded.secret",
            )
            .and_then(|mut s| s.execute(params![SINGLETON, sealed]))
            .map_err(backend)?;
        self.local.set(Some(*identity.keys.public()));
        Ok(())
    }

    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state FROM prekeys WHERE id = ?1")
            .map_err(backend)?;
        let mut rows = stmt.query([SINGLETON]).map_err(backend)?;
        let Some(row) = rows.next().map_err(backend)? else {
            return Ok(None);
        };
        let fail = |r: String| corrupted(T_PREKEYS, SINGLETON.to_string(), r);
        let sealed = blob(row, 0, "state").map_err(fail)?;
        let plain = self
            .sealer
            .open(T_PREKEYS, &SINGLETON.to_be_bytes(), sealed)
            .map_err(fail)?;
        PrekeyState::from_bytes(&plain)
            .map(Some)
            .map_err(|e| fail(format!("prekey state: {e}")))
    }

    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        let sealed = self.seal_prekeys(state)?;
        self.conn
            .prepare_cached(PREKEYS_UPSERT)
            .and_then(|mut s| s.execute(params![SINGLETON, sealed]))
            .map_err(backend)?;
        Ok(())
    }

    fn own_access_key(&self) -> Result<Option<AccessKeyRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT secret FROM own_access WHERE id = ?1")
            .map_err(backend)?;
        let mut rows = stmt.query([SINGLETON]).map_err(backend)?;
        let Some(row) = rows.next().map_err(backend)? else {
            return Ok(None);
        };
        let fail = |r: String| corrupted(T_OWN_ACCESS, SINGLETON.to_string(), r);
        let sealed = blob(row, 0, "secret").map_err(fail)?;
        let plain = self
            .sealer
            .open(T_OWN_ACCESS, &SINGLETON.to_be_bytes(), sealed)
            .map_err(fail)?;
        AccessKeyRecord::from_bytes(&plain)
            .map(Some)
            .map_err(|e| fail(e.to_string()))
    }

    fn set_own_access_key(&mut self, key: &AccessKeyRecord) -> Result<(), StoreError> {
        let sealed = self.sealer.seal(
            T_OWN_ACCESS,
            &SINGLETON.to_be_bytes(),
            key.to_bytes().as_ref(),
        )?;
        self.conn
            .prepare_cached(
                "INSERT INTO own_access (id, secret) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET secret = excluded.secret",
            )
            .and_then(|mut s| s.execute(params![SINGLETON, sealed]))
            .map_err(backend)?;
        Ok(())
    }

    fn peer_access(&self, peer: &DeviceAddress) -> Result<PeerAccess, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT access_key, exclusion FROM peer_access
                 WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(backend)?;
        let mut rows = stmt
            .query(params![&peer.identity[..], peer.device_id])
            .map_err(backend)?;
        match rows.next().map_err(backend)? {
            None => Ok(PeerAccess::default()),
            Some(row) => self.peer_access_row(peer, row, 0),
        }
    }

    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> Result<(), StoreError> {
        let (sealed, exclusion) = self.seal_peer_access_key(peer, key)?;
        self.conn
            .prepare_cached(PEER_ACCESS_KEY_UPSERT)
            .and_then(|mut s| {
                s.execute(params![
                    &peer.identity[..],
                    peer.device_id,
                    sealed,
                    exclusion
                ])
            })
            .map_err(backend)?;
        Ok(())
    }

    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        let sealed = self.seal_exclusion(peer, excluded)?;
        self.conn
            .prepare_cached(PEER_EXCLUSION_UPSERT)
            .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id, sealed]))
            .map_err(backend)?;
        Ok(())
    }

    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state FROM sessions WHERE identity = ?1 AND device_id = ?2")
            .map_err(backend)?;
        let mut rows = stmt
            .query(params![&peer.identity[..], peer.device_id])
            .map_err(backend)?;
        match rows.next().map_err(backend)? {
            None => Ok(None),
            Some(row) => {
                let local = self.local_key()?;
                self.open_record(peer, row, 0, local.as_ref()).map(Some)
            }
        }
    }

    /// Every session record, ordered by address, each opened on its own: a
    /// corrupted row is its [`StoreError::Corrupted`], beside the healthy
    /// records. The whole call fails only if SQLite fails, if the identity
    /// row (which every record is restored with) is corrupted, or if a row's
    /// key does not decode (which the schema's constraints rule out).
    #[allow(clippy::type_complexity)]
    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(SESSIONS_SELECT).map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            let address = address_key(T_SESSIONS, row, 0, 1)?;
            let local = self.local_key()?;
            out.push((address, self.open_record(&address, row, 2, local.as_ref())));
        }
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT identity, device_id, state FROM sessions WHERE identity = ?1
                 ORDER BY device_id",
            )
            .map_err(backend)?;
        let mut rows = stmt.query([&identity[..]]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            let address = address_key(T_SESSIONS, row, 0, 1)?;
            let local = self.local_key()?;
            out.push((address, self.open_record(&address, row, 2, local.as_ref())));
        }
        Ok(out)
    }

    /// One indexed lookup per key, of its keyed digest
    /// ([`Sealer::route`]): no record is opened.
    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT identity, device_id FROM routes WHERE key = ?1")
            .map_err(backend)?;
        let mut out = BTreeSet::new();
        for key in keys {
            let digest = self.sealer.route(key);
            let mut rows = stmt.query([&digest[..]]).map_err(backend)?;
            while let Some(row) = rows.next().map_err(backend)? {
                out.insert(address_key(T_SESSIONS, row, 0, 1)?);
            }
        }
        Ok(out.into_iter().collect())
    }

    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT identity, device_id FROM sessions WHERE awaits > 0 ORDER BY awaits DESC",
            )
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(address_key(T_SESSIONS, row, 0, 1)?);
        }
        Ok(out)
    }

    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        let sealed = self.seal_record(peer, record)?;
        let routes = self.sealer.routes(record);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.prepare_cached(SESSION_UPSERT)
            .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id, sealed]))
            .map_err(backend)?;
        write_routes(&tx, peer, &routes)?;
        tx.commit().map_err(backend)
    }

    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.prepare_cached("DELETE FROM sessions WHERE identity = ?1 AND device_id = ?2")
            .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id]))
            .map_err(backend)?;
        delete_routes(&tx, peer)?;
        tx.commit().map_err(backend)
    }

    /// Moves the row, in one transaction: the `state` column's bytes as
    /// stored (sealed, whether or not they open) go to the `quarantine`
    /// table with the peer, `now` and `reason`.
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let moved = tx
            .prepare_cached(
                "INSERT INTO quarantine (identity, device_id, at, bytes, reason)
                 SELECT identity, device_id, ?3, state, ?4 FROM sessions
                 WHERE identity = ?1 AND device_id = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &peer.identity[..],
                    peer.device_id,
                    now as i64,
                    reason
                ])
            })
            .map_err(backend)?;
        if moved == 0 {
            return Ok(());
        }
        tx.prepare_cached("DELETE FROM sessions WHERE identity = ?1 AND device_id = ?2")
            .and_then(|mut s| s.execute(params![&peer.identity[..], peer.device_id]))
            .map_err(backend)?;
        delete_routes(&tx, peer)?;
        tx.commit().map_err(backend)
    }

    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, record FROM contacts WHERE name = ?1")
            .map_err(backend)?;
        let mut rows = stmt.query([name]).map_err(backend)?;
        match rows.next().map_err(backend)? {
            None => Ok(None),
            Some(row) => self.contact_row(row).map(Some),
        }
    }

    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        if contact.name.len() > ContactRecord::MAX_NAME {
            return Err(StoreError::Backend(
                "contact name longer than 255 bytes".into(),
            ));
        }
        let sealed = self
            .sealer
            .seal(T_CONTACTS, &contact.name, &contact.to_bytes())?;
        self.conn
            .prepare_cached(
                "INSERT INTO contacts (name, record) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET record = excluded.record",
            )
            .and_then(|mut s| s.execute(params![&contact.name[..], sealed]))
            .map_err(backend)?;
        Ok(())
    }

    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(CONTACTS_SELECT).map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(self.contact_row(row)?);
        }
        Ok(out)
    }

    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(QUARANTINE_SELECT)
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(quarantine_row(row)?);
        }
        Ok(out)
    }

    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT trust, first_seen, auth FROM peers WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(backend)?;
        let mut rows = stmt
            .query(params![&device.identity[..], device.device_id])
            .map_err(backend)?;
        match rows.next().map_err(backend)? {
            None => Ok(None),
            Some(row) => {
                let compromised = read_compromised(&self.conn, &self.sealer)?;
                self.peer_row(device, row, 0, &compromised).map(Some)
            }
        }
    }

    /// Writes the row and, in the same transaction, the key's entry in the
    /// compromised row (added for Compromised, removed otherwise).
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        let auth = self.sealer.seal(T_PEERS, &peer_binding(peer), &[])?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.prepare_cached(PEER_UPSERT)
            .and_then(|mut s| s.execute(peer_params(peer, &auth)))
            .map_err(backend)?;
        note_compromised(&tx, &self.sealer, [peer])?;
        tx.commit().map_err(backend)
    }

    /// Every peer record, ordered by address. A corrupted row fails the
    /// call with [`StoreError::Corrupted`] naming it.
    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.peer_query(PEERS_SELECT, [])
    }

    /// The peer records of one identity key, by device number: one indexed
    /// query (the key's prefix). A corrupted row fails the call.
    fn peers_with_identity(&self, identity: &[u8; 32]) -> Result<Vec<PeerRecord>, StoreError> {
        self.peer_query(PEERS_OF_IDENTITY, [&identity[..]])
    }

    /// Stores the session record, appends the envelope to the outbox and
    /// stores the sent message, in one transaction. An envelope id already
    /// in the outbox, or a message id already sent, is replaced in place
    /// (same position).
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        let sealed = self.seal_send(record, entry, sent)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        write_send(&tx, entry, &sealed)?;
        tx.commit().map_err(backend)
    }

    fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        let sealed = copies
            .iter()
            .map(|(record, entry, sent)| self.seal_send(record, entry, sent.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        for ((_, entry, _), sealed) in copies.iter().zip(&sealed) {
            write_send(&tx, entry, sealed)?;
        }
        tx.commit().map_err(backend)
    }

    /// One IMMEDIATE transaction for the whole batch: every outbox removal
    /// and every sent-message update, all or none (the bodies are sealed
    /// before it opens). An empty batch opens none.
    fn commit_deposits(&mut self, done: &[DepositDone]) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let sealed = done
            .iter()
            .map(|d| d.sent.as_ref().map(|m| self.seal_sent(m)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        {
            let mut remove = tx
                .prepare_cached("DELETE FROM outbox WHERE envelope_id = ?1")
                .map_err(backend)?;
            let mut upsert = tx.prepare_cached(SENT_UPSERT).map_err(backend)?;
            for (d, body) in done.iter().zip(&sealed) {
                remove.execute([&d.envelope.0[..]]).map_err(backend)?;
                if let (Some(m), Some(body)) = (&d.sent, body) {
                    upsert.execute(sent_params(m, body)).map_err(backend)?;
                }
            }
        }
        tx.commit().map_err(backend)
    }

    fn own_account(&self) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self.account_query(0, None)?.pop())
    }

    fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        let sealed = self.seal_account(0, record)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        tx.execute("DELETE FROM accounts WHERE kind = 0", [])
            .map_err(backend)?;
        tx.execute(
            "INSERT INTO accounts (kind, account_id, record) VALUES (0, ?1, ?2)",
            params![&record.account.0[..], sealed],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self.account_query(1, Some(account))?.pop())
    }

    fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        let sealed = self.seal_account(1, record)?;
        self.conn
            .prepare_cached(
                "INSERT INTO accounts (kind, account_id, record) VALUES (1, ?1, ?2)
                 ON CONFLICT (kind, account_id) DO UPDATE SET record = excluded.record",
            )
            .and_then(|mut s| s.execute(params![&record.account.0[..], sealed]))
            .map_err(backend)?;
        Ok(())
    }

    fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.account_query(1, None)
    }

    fn pairing(&self) -> Result<Option<PairingRecord>, StoreError> {
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT record FROM pairing WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(backend)?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let fail = |r: String| corrupted(T_PAIRING, "1".to_string(), r);
        let plain = self.sealer.open(T_PAIRING, b"1", &sealed).map_err(fail)?;
        PairingRecord::from_bytes(&plain)
            .map(Some)
            .map_err(|e| fail(e.to_string()))
    }

    fn set_pairing(&mut self, record: Option<&PairingRecord>) -> Result<(), StoreError> {
        match record {
            Some(record) => {
                let sealed = self.sealer.seal(T_PAIRING, b"1", &record.to_bytes())?;
                self.conn
                    .execute(
                        "INSERT INTO pairing (id, record) VALUES (1, ?1)
                         ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                        params![sealed],
                    )
                    .map_err(backend)?;
            }
            None => {
                self.conn
                    .execute("DELETE FROM pairing", [])
                    .map_err(backend)?;
            }
        }
        Ok(())
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut stmt = self.conn.prepare_cached(OUTBOX_SELECT).map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(outbox_row(row)?);
        }
        Ok(out)
    }

    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE envelope_id = ?1")
            .and_then(|mut s| s.execute([&id.0[..]]))
            .map_err(backend)?;
        Ok(())
    }

    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM processed WHERE envelope_id = ?1")
            .map_err(backend)?;
        stmt.exists([&id.0[..]]).map_err(backend)
    }

    /// One query per 128 ids (the last chunk padded with its last id, so
    /// that a single cached statement serves every call).
    fn processed_among(&self, ids: &[EnvelopeId]) -> Result<Vec<bool>, StoreError> {
        const CHUNK: usize = 128;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT envelope_id FROM processed WHERE envelope_id IN ({})",
            vec!["?"; CHUNK].join(",")
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend)?;
        let mut found = std::collections::HashSet::new();
        for chunk in ids.chunks(CHUNK) {
            let last = chunk.len() - 1;
            let params = (0..CHUNK).map(|i| &chunk[i.min(last)].0[..]);
            let mut rows = stmt
                .query(rusqlite::params_from_iter(params))
                .map_err(backend)?;
            while let Some(row) = rows.next().map_err(backend)? {
                let id = envelope_key("processed", row, 0)?;
                found.insert(id);
            }
        }
        Ok(ids.iter().map(|id| found.contains(id)).collect())
    }

    /// Applies the batch in one transaction. Everything is sealed before the
    /// transaction starts (so the write lock is held only for the writes),
    /// and a session record, peer, sent message or prekey state changed
    /// several times in the batch is written once, in its last state (a sent
    /// message new to the store takes the position of its first change).
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut sessions: BTreeMap<DeviceAddress, &SessionRecord> = BTreeMap::new();
        let mut peers: BTreeMap<DeviceAddress, &PeerRecord> = BTreeMap::new();
        let mut sent_at: BTreeMap<MessageId, usize> = BTreeMap::new();
        let mut sent: Vec<&SentMessage> = Vec::new();
        let mut prekeys = None;
        let mut access: BTreeMap<DeviceAddress, &AccessKeyRecord> = BTreeMap::new();
        for c in batch {
            if let Some((address, record)) = c.session {
                sessions.insert(*address, record);
            }
            if let Some((address, key)) = c.access {
                access.insert(*address, key);
            }
            if let Some(peer) = c.peer {
                peers.insert(peer.address, peer);
            }
            if let Some(m) = c.sent {
                match sent_at.get(&m.id) {
                    Some(&i) => sent[i] = m,
                    None => {
                        sent_at.insert(m.id, sent.len());
                        sent.push(m);
                    }
                }
            }
            if c.prekeys.is_some() {
                prekeys = c.prekeys;
            }
        }
        let sessions = sessions
            .into_iter()
            .map(|(a, r)| Ok((a, self.seal_record(&a, r)?, self.sealer.routes(r))))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let sent = sent
            .into_iter()
            .map(|m| Ok((m, self.seal_sent(m)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let peers = peers
            .into_values()
            .map(|p| Ok((p, self.sealer.seal(T_PEERS, &peer_binding(p), &[])?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let prekeys = prekeys.map(|p| self.seal_prekeys(p)).transpose()?;
        let access = access
            .into_iter()
            .map(|(a, k)| Ok((a, self.seal_peer_access_key(&a, k)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let messages = batch
            .iter()
            .filter_map(|c| c.message)
            .map(|m| {
                let binding = inbox_binding(&m.envelope_id, &m.from, m.received_at);
                Ok((m, self.sealer.seal(T_INBOX, &binding, &m.body)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;

        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        {
            let mut stmt = tx.prepare_cached(SESSION_UPSERT).map_err(backend)?;
            for (a, sealed, _) in &sessions {
                stmt.execute(params![&a.identity[..], a.device_id, sealed])
                    .map_err(backend)?;
            }
            for (a, _, routes) in &sessions {
                write_routes(&tx, a, routes)?;
            }
            if !peers.is_empty() {
                let mut stmt = tx.prepare_cached(PEER_UPSERT).map_err(backend)?;
                for (p, auth) in &peers {
                    stmt.execute(peer_params(p, auth)).map_err(backend)?;
                }
                note_compromised(&tx, &self.sealer, peers.iter().map(|(p, _)| *p))?;
            }
            if let Some(sealed) = &prekeys {
                tx.prepare_cached(PREKEYS_UPSERT)
                    .and_then(|mut s| s.execute(params![SINGLETON, sealed]))
                    .map_err(backend)?;
            }
            if !access.is_empty() {
                let mut stmt = tx.prepare_cached(PEER_ACCESS_KEY_UPSERT).map_err(backend)?;
                for (a, (sealed, exclusion)) in &access {
                    stmt.execute(params![&a.identity[..], a.device_id, sealed, exclusion])
                        .map_err(backend)?;
                }
            }
            if !sent.is_empty() {
                let mut stmt = tx.prepare_cached(SENT_UPSERT).map_err(backend)?;
                for (m, body) in &sent {
                    stmt.execute(sent_params(m, body)).map_err(backend)?;
                }
            }
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO inbox (envelope_id, from_identity, from_device, received_at, body)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (envelope_id) DO NOTHING",
                )
                .map_err(backend)?;
            for (m, sealed) in &messages {
                stmt.execute(params![
                    &m.envelope_id.0[..],
                    &m.from.identity[..],
                    m.from.device_id,
                    m.received_at as i64,
                    sealed,
                ])
                .map_err(backend)?;
            }
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO processed (envelope_id, processed_at) VALUES (?1, ?2)
                     ON CONFLICT (envelope_id) DO UPDATE SET processed_at = excluded.processed_at",
                )
                .map_err(backend)?;
            for c in batch {
                stmt.execute(params![&c.envelope_id.0[..], c.processed_at as i64])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        let sql = format!(
            "DELETE FROM processed WHERE {}",
            older_than("processed_at", before)
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute([before as i64]))
            .map_err(backend)?;
        Ok(())
    }

    /// Sent messages in the order first stored. A corrupted row fails the
    /// call with [`StoreError::Corrupted`] naming its message id (hex),
    /// which [`SqliteStore::remove_sent`] can then discard.
    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.sent_query(SENT_SELECT, [])
    }

    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        Ok(self.sent_query(SENT_BY_ID, [&id.0[..]])?.pop())
    }

    /// Reads only the pending rows (through the partial index
    /// `sent_pending`), however many delivered ones are kept.
    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.sent_query(SENT_PENDING, [])
    }

    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        let id: Option<Vec<u8>> = self
            .conn
            .prepare_cached(SENT_LAST_PENDING_TO)
            .and_then(|mut s| {
                s.query_row(params![&to.identity[..], to.device_id], |r| r.get(0))
                    .optional()
            })
            .map_err(backend)?;
        id.map(|id| {
            id.try_into()
                .map(MessageId)
                .map_err(|_| corrupted("sent", hex(&to.identity), "message id length"))
        })
        .transpose()
    }

    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        let body = self.seal_sent(message)?;
        self.conn
            .prepare_cached(SENT_UPSERT)
            .and_then(|mut s| s.execute(sent_params(message, &body)))
            .map_err(backend)?;
        Ok(())
    }

    /// Deletes the rows whose state is delivered or failed and whose
    /// creation time is before `before`; a pending message, or a row whose
    /// state code is unknown (corrupted), is kept.
    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        let finished: Vec<String> = (0..=u8::MAX)
            .filter(|&c| DeliveryState::from_code(c).is_some_and(|s| !s.is_pending()))
            .map(|c| c.to_string())
            .collect();
        let sql = format!(
            "DELETE FROM sent WHERE state IN ({}) AND ({})",
            finished.join(", "),
            older_than("created", before)
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute([before as i64]))
            .map_err(backend)?;
        Ok(())
    }

    /// Messages in the order received. A corrupted message fails the call
    /// with [`StoreError::Corrupted`] naming its envelope id (hex), which
    /// [`Store::remove_inbox`] can then discard.
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        let mut stmt = self.conn.prepare_cached(INBOX_SELECT).map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(backend)? {
            out.push(self.inbox_row(row)?);
        }
        Ok(out)
    }

    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM inbox WHERE envelope_id = ?1")
            .and_then(|mut s| s.execute([&id.0[..]]))
            .map_err(backend)?;
        Ok(())
    }
}

impl Db {
    fn seal_record(
        &self,
        address: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<Vec<u8>, StoreError> {
        self.sealer
            .seal(T_SESSIONS, &address_bytes(address), &record.to_bytes())
    }

    /// The sealed key column and a sealed "not excluded" flag of a peer's
    /// access row (the flag is written only if the row is new).
    fn seal_peer_access_key(
        &self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        Ok((
            self.sealer.seal(
                T_PEER_ACCESS,
                &peer_access_binding(peer, b'k'),
                key.to_bytes().as_ref(),
            )?,
            self.seal_exclusion(peer, false)?,
        ))
    }

    fn seal_exclusion(&self, peer: &DeviceAddress, excluded: bool) -> Result<Vec<u8>, StoreError> {
        self.sealer.seal(
            T_PEER_ACCESS,
            &peer_access_binding(peer, b'x'),
            &[u8::from(excluded)],
        )
    }

    /// Decodes `(access_key, exclusion)` at `column..` of a `peer_access`
    /// row of `peer`.
    fn peer_access_row(
        &self,
        peer: &DeviceAddress,
        row: &Row<'_>,
        column: usize,
    ) -> Result<PeerAccess, StoreError> {
        let fail = |r: String| corrupted(T_PEER_ACCESS, address_name(peer), r);
        let key = match row.get_ref(column).map_err(|e| fail(e.to_string()))? {
            ValueRef::Null => None,
            ValueRef::Blob(sealed) => {
                let plain = self
                    .sealer
                    .open(T_PEER_ACCESS, &peer_access_binding(peer, b'k'), sealed)
                    .map_err(fail)?;
                Some(AccessKeyRecord::from_bytes(&plain).map_err(|e| fail(e.to_string()))?)
            }
            v => return Err(fail(format!("access_key: a {}", v.data_type()))),
        };
        let sealed = blob(row, column + 1, "exclusion").map_err(fail)?;
        let plain = self
            .sealer
            .open(T_PEER_ACCESS, &peer_access_binding(peer, b'x'), sealed)
            .map_err(fail)?;
        let excluded = match plain.as_slice() {
            [0] => false,
            [1] => true,
            _ => return Err(fail("exclusion: not a flag".to_string())),
        };
        Ok(PeerAccess { key, excluded })
    }

    fn seal_sent(&self, message: &SentMessage) -> Result<Vec<u8>, StoreError> {
        self.sealer
            .seal(T_SENT, &sent_binding(message), &message.body)
    }

    fn seal_prekeys(&self, state: &PrekeyState) -> Result<Vec<u8>, StoreError> {
        self.sealer
            .seal(T_PREKEYS, &SINGLETON.to_be_bytes(), &state.to_bytes())
    }
}

/// AES-256-GCM under the store's derived key.
struct Sealer {
    cipher: Aes256Gcm,
    /// The key of the routing index's digests ([`Sealer::route`]).
    route_key: Zeroizing<[u8; 32]>,
}

impl Sealer {
    fn new(key: &[u8; 32]) -> Self {
        let mut derived = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, key)
            .expand(KEY_INFO, derived.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut route_key = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, key)
            .expand(ROUTE_KEY_INFO, route_key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Sealer {
            cipher: Aes256Gcm::new(derived.as_ref().into()),
            route_key,
        }
    }

    /// The routing index's name for a ratchet public key: the first 16
    /// bytes of HMAC-SHA256 under a key derived from the store key, so the
    /// file alone does not tell which envelope seen on a relay belongs to
    /// which peer.
    fn route(&self, ratchet_key: &[u8; 32]) -> [u8; 16] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.route_key.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(ratchet_key);
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag[..16]);
        out
    }

    /// The routing index entries of a record.
    fn routes(&self, record: &SessionRecord) -> Routes {
        let mut keys: Vec<[u8; 16]> = record.ratchet_keys().map(|k| self.route(&k)).collect();
        keys.sort_unstable();
        keys.dedup();
        Routes {
            keys,
            awaits: record.awaits_ratchet_key(),
        }
    }

    /// `nonce || ciphertext || tag`, bound to `table` and `row`.
    fn seal(&self, table: &str, row: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        at_rest::seal(&self.cipher, &aad(table, row), plaintext)
    }

    /// Opens [`Self::seal`]'s output; the error is the reason.
    fn open(&self, table: &str, row: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        at_rest::open(&self.cipher, &aad(table, row), sealed).map_err(|e| match e {
            OpenError::TooShort(n) => format!("sealed value too short ({n} bytes)"),
            OpenError::Auth => {
                "authentication failed (altered, cut, or moved from another row)".to_string()
            }
        })
    }
}

/// `AAD_DOMAIN || table || 0 || row`.
fn aad(table: &str, row: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_DOMAIN.len() + table.len() + 1 + row.len());
    out.extend_from_slice(AAD_DOMAIN);
    out.extend_from_slice(table.as_bytes());
    out.push(0);
    out.extend_from_slice(row);
    out
}

/// What a peer row's tag covers: `address || trust (1) || first_seen (8)`.
fn peer_binding(p: &PeerRecord) -> [u8; 45] {
    let mut out = [0u8; 45];
    out[..36].copy_from_slice(&address_bytes(&p.address));
    out[36] = p.trust.code();
    out[37..].copy_from_slice(&p.first_seen.to_be_bytes());
    out
}

/// What an inbox body is bound to: `envelope_id || from || received_at`.
fn inbox_binding(id: &EnvelopeId, from: &DeviceAddress, received_at: u64) -> [u8; 60] {
    let mut out = [0u8; 60];
    out[..16].copy_from_slice(&id.0);
    out[16..52].copy_from_slice(&address_bytes(from));
    out[52..].copy_from_slice(&received_at.to_be_bytes());
    out
}

/// What a sent message's body is bound to: `id || to || state (1) ||
/// created (8) || last_sent (8) || sends (4)`, every column of its row.
fn sent_binding(m: &SentMessage) -> [u8; 73] {
    let mut out = [0u8; 73];
    out[..16].copy_from_slice(&m.id.0);
    out[16..52].copy_from_slice(&address_bytes(&m.to));
    out[52] = m.state.code();
    out[53..61].copy_from_slice(&m.created.to_be_bytes());
    out[61..69].copy_from_slice(&m.last_sent.to_be_bytes());
    out[69..].copy_from_slice(&m.sends.to_be_bytes());
    out
}

/// The condition "`column` < ?1" in u64 order, for a time stored as the
/// i64 with the same bits (so values from 2^63 on are negative): "0 <= at
/// < before" when `before` < 2^63, "at >= 0 or at < before" beyond. ?1 is
/// `before as i64`.
fn older_than(column: &str, before: u64) -> String {
    if before <= i64::MAX as u64 {
        format!("{column} >= 0 AND {column} < ?1")
    } else {
        format!("{column} >= 0 OR {column} < ?1")
    }
}

fn peer_params<'a>(p: &'a PeerRecord, auth: &'a [u8]) -> impl rusqlite::Params + 'a {
    (
        &p.address.identity[..],
        p.address.device_id,
        p.trust.code(),
        p.first_seen as i64,
        auth,
    )
}

/// The parameters of [`SENT_UPSERT`], with the sealed body.
fn sent_params<'a>(m: &'a SentMessage, body: &'a [u8]) -> impl rusqlite::Params + 'a {
    (
        &m.id.0[..],
        &m.to.identity[..],
        m.to.device_id,
        m.state.code(),
        m.created as i64,
        m.last_sent as i64,
        m.sends,
        body,
    )
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupted(table: &'static str, row: String, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupted {
        table,
        row,
        reason: reason.into(),
    }
}

fn blob<'r>(row: &'r Row<'_>, i: usize, what: &str) -> Result<&'r [u8], String> {
    match row.get_ref(i) {
        Ok(ValueRef::Blob(b)) => Ok(b),
        Ok(v) => Err(format!("{what}: a {} instead of a blob", v.data_type())),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

fn text(row: &Row<'_>, i: usize, what: &str) -> Result<String, String> {
    match row.get_ref(i) {
        Ok(ValueRef::Text(t)) => {
            String::from_utf8(t.to_vec()).map_err(|_| format!("{what}: not valid UTF-8"))
        }
        Ok(v) => Err(format!("{what}: a {} instead of text", v.data_type())),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

fn int(row: &Row<'_>, i: usize, what: &str) -> Result<i64, String> {
    match row.get_ref(i) {
        Ok(ValueRef::Integer(v)) => Ok(v),
        Ok(v) => Err(format!("{what}: a {} instead of an integer", v.data_type())),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// A device address from an identity and a device column.
fn address_columns(row: &Row<'_>, identity: usize, device: usize) -> Result<DeviceAddress, String> {
    let id = blob(row, identity, "identity")?;
    let identity: [u8; 32] = id
        .try_into()
        .map_err(|_| format!("identity: {} bytes, expected 32", id.len()))?;
    let device = int(row, device, "device_id")?;
    let device_id =
        u32::try_from(device).map_err(|_| format!("device_id: {device} out of range"))?;
    Ok(DeviceAddress {
        identity,
        device_id,
    })
}

/// A row's key address; a failure names the raw key as far as readable.
fn address_key(
    table: &'static str,
    row: &Row<'_>,
    identity: usize,
    device: usize,
) -> Result<DeviceAddress, StoreError> {
    address_columns(row, identity, device).map_err(|r| corrupted(table, raw_name(row, identity), r))
}

/// A row's key envelope id.
fn envelope_key(table: &'static str, row: &Row<'_>, i: usize) -> Result<EnvelopeId, StoreError> {
    key16(table, row, i, "envelope_id").map(EnvelopeId)
}

/// A row's 16-byte key (an envelope or message id) in column `i`.
fn key16(table: &'static str, row: &Row<'_>, i: usize, what: &str) -> Result<[u8; 16], StoreError> {
    let fail = |r: String| corrupted(table, raw_name(row, i), r);
    let b = blob(row, i, what).map_err(fail)?;
    b.try_into()
        .map_err(|_| fail(format!("{what}: {} bytes, expected 16", b.len())))
}

/// A best-effort name for a row whose key does not decode.
fn raw_name(row: &Row<'_>, i: usize) -> String {
    match row.get_ref(i) {
        Ok(ValueRef::Blob(b)) => hex(b),
        Ok(ValueRef::Integer(v)) => v.to_string(),
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => "(unreadable key)".to_string(),
    }
}
