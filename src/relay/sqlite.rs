//! The persistent relay storage over SQLite (feature `sqlite`).
//!
//! One database file holds devices (with their mailbox's access verifiers
//! and when their owner was last seen), one-time prekeys, mailboxes (each
//! with a small integer key and its usage, the envelope count and bytes of
//! both shares and of the strangers' share, so that a deposit checks its
//! share's bounds without counting envelopes), envelopes (each with its
//! share; an acknowledged one keeps its row, without its payload, until it
//! expires, so that its id stays a duplicate) and used challenges with the
//! relay key. The file runs in WAL mode with
//! `synchronous = FULL` (an accepted deposit or upload survives a power
//! loss), a busy timeout (several relay processes may share it), and
//! `user_version` schema versioning under a relay `application_id`. Every
//! check-then-write happens in one `IMMEDIATE` transaction or one
//! statement, so the [`RelayStorage`] atomicity contract holds across
//! processes.
//!
//! Unsigned 64-bit counters and signed-prekey creation times are stored
//! bit-for-bit as SQLite integers; times the database compares (receipt,
//! expiry) are clamped to `i64::MAX`.

use std::collections::hash_map::{Entry, HashMap};
use std::path::Path;
use std::time::Duration;
use std::vec::Vec;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InsertOutcome, MailboxLimits,
    MailboxUsage, RelayKey, RelayStorage, RelayStorageError, Share, StoredDeviceList,
    UploadOutcome,
};
use crate::protocol::devices::AccountId;
use crate::transport::{
    AccessVerifier, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxId,
    SignedPrekeyRecord,
};

/// `PRAGMA application_id` of a relay database ("cbrl").
const APPLICATION_ID: i32 = 0x6362_726c;
/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: u32 = 5;

/// The tables every schema version shares.
const COMMON_SCHEMA: &str = "
CREATE TABLE devices (
    identity BLOB NOT NULL,
    device_id INTEGER NOT NULL,
    mailbox BLOB NOT NULL,
    counter INTEGER NOT NULL,
    spk_id INTEGER NOT NULL,
    spk_created INTEGER NOT NULL,
    spk_public BLOB NOT NULL,
    spk_signature BLOB NOT NULL,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (identity, device_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX devices_by_mailbox ON devices (mailbox);

CREATE TABLE one_time_prekeys (
    seq INTEGER PRIMARY KEY,
    identity BLOB NOT NULL,
    device_id INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    UNIQUE (identity, device_id, key_id)
);
CREATE INDEX one_time_prekeys_by_device ON one_time_prekeys (identity, device_id, seq);

CREATE TABLE challenges (
    seq INTEGER PRIMARY KEY,
    mailbox BLOB NOT NULL,
    challenge BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    UNIQUE (mailbox, challenge)
);
CREATE INDEX challenges_by_mailbox ON challenges (mailbox, seq);
CREATE INDEX challenges_by_expiry ON challenges (expires_at);
";

/// The mailboxes and envelopes of schema version 2.
///
/// Each mailbox gets a small integer key (`mid`) the first time an
/// envelope is deposited to it; its row keeps the mailbox's usage (pending
/// envelopes and their payload bytes) and the sequence number of its next
/// envelope, which the code updates once per transaction.
///
/// Envelopes are stored clustered by mailbox, in deposit order (the
/// primary key is `(mid, seq)`), so that what a fetch lists and an
/// acknowledgement then touches are neighbouring rows on a few pages, not
/// one page per envelope. An envelope stays one row from its deposit
/// until it expires: acknowledging it sets `acknowledged` and drops its
/// payload, so that its id is still recognised as a duplicate until it
/// expires (moving it to a table of acknowledged ids cost eight B-tree
/// writes per envelope).
///
/// Indexes: `(mid, id)` finds duplicates and acknowledged ids;
/// `(mid, seq)` over pending envelopes only is where a listing starts;
/// `(mid, received_at)` expires one mailbox; `(received_at)` expires the
/// whole relay.
const MAILBOX_TABLES: &str = "
CREATE TABLE mailboxes (
    mid INTEGER PRIMARY KEY,
    mailbox BLOB NOT NULL UNIQUE,
    envelopes INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE envelopes_v2 (
    mid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    id BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    size INTEGER NOT NULL,
    acknowledged INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    PRIMARY KEY (mid, seq),
    UNIQUE (mid, id)
) WITHOUT ROWID;
";

/// The indexes of [`MAILBOX_TABLES`] besides its keys (created after a
/// migration has copied the rows), and the table's final name.
const MAILBOX_INDEXES: &str = "
ALTER TABLE envelopes_v2 RENAME TO envelopes;
CREATE INDEX envelopes_pending ON envelopes (mid, seq) WHERE acknowledged = 0;
CREATE INDEX envelopes_by_mailbox_time ON envelopes (mid, received_at);
CREATE INDEX envelopes_by_time ON envelopes (received_at);
";

/// From schema version 1 (envelopes keyed by the 32-byte mailbox id in
/// one global order, acknowledged ids in a table of their own, usage kept
/// by triggers in `mailbox_usage`, which early version-1 databases lack) to
/// version 2, after [`MAILBOX_TABLES`] and before [`MAILBOX_INDEXES`], in
/// the transaction that opens the database. Pending envelopes keep their
/// order (their global `seq` becomes their mailbox sequence number);
/// acknowledged ids keep their receipt time and get negative sequence
/// numbers (they are never listed).
const MIGRATE_1_TO_2: &str = "
INSERT INTO mailboxes (mailbox)
    SELECT mailbox FROM envelopes UNION SELECT mailbox FROM acknowledged;
INSERT INTO envelopes_v2 (mid, seq, id, received_at, size, acknowledged, payload)
    SELECT m.mid, e.seq, e.id, e.received_at, e.size, 0, e.payload
    FROM envelopes e JOIN mailboxes m ON m.mailbox = e.mailbox;
INSERT OR IGNORE INTO envelopes_v2 (mid, seq, id, received_at, size, acknowledged, payload)
    SELECT m.mid, -row_number() OVER (), a.id, a.received_at, 0, 1, X''
    FROM acknowledged a JOIN mailboxes m ON m.mailbox = a.mailbox;
UPDATE mailboxes SET
    envelopes = (SELECT count(*) FROM envelopes_v2 e
                 WHERE e.mid = mailboxes.mid AND e.acknowledged = 0),
    bytes = (SELECT coalesce(sum(size), 0) FROM envelopes_v2 e
             WHERE e.mid = mailboxes.mid AND e.acknowledged = 0),
    next_seq = (SELECT coalesce(max(seq) + 1, 0) FROM envelopes_v2 e
                WHERE e.mid = mailboxes.mid AND e.seq >= 0);
DROP TABLE IF EXISTS mailbox_usage;
DROP TABLE acknowledged;
DROP TABLE envelopes;
";

/// The device lists of schema version 3 (SPEC.md 25.12): per account the
/// retained versions of its chain. The primary key makes a fork
/// impossible even if two writers both passed the head check.
const DEVICE_LIST_TABLE: &str = "
CREATE TABLE device_lists (
    account_id BLOB NOT NULL,
    version INTEGER NOT NULL,
    body_hash BLOB NOT NULL,
    signed BLOB NOT NULL,
    PRIMARY KEY (account_id, version)
) WITHOUT ROWID;
";

/// From schema version 3 to 4 (SPEC.md 16.2, 16.4), the last step of
/// every opening that creates or migrates: each device gets its claim time
/// (the one-time-prekey claim budget, milliseconds, 0 for never claimed
/// from); the table of issued challenges gives way to the table of used
/// ones (challenges are stateless now: the challenges outstanding at the
/// migration were random bytes without a tag and could not be used
/// anyway); the relay key's table holds at most one key, created at the
/// first challenge.
const MIGRATE_3_TO_4: &str = "
ALTER TABLE devices ADD COLUMN claimed_until INTEGER NOT NULL DEFAULT 0;
DROP TABLE challenges;
CREATE TABLE used_challenges (
    mailbox BLOB NOT NULL,
    challenge BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (mailbox, challenge)
) WITHOUT ROWID;
CREATE INDEX used_challenges_by_expiry ON used_challenges (expires_at);
CREATE TABLE relay_key (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    key BLOB NOT NULL
);
";

/// From schema version 4 to 5 (SPEC.md 16.6, 16.8), the last step of
/// every opening that creates or migrates: each device gets the verifiers
/// of its mailbox's access key (current and previous, `NULL` for none, 32
/// bytes each), when the current one was registered (0 for never) and when
/// its owner was last seen (`owner_seen_at`, its last upload's time for an
/// existing device), indexed for the sweeps that look for idle owners; each
/// envelope gets its share (0 contacts, 1 strangers; existing ones were
/// all deposited before shares existed: contacts) and each mailbox the
/// usage of its strangers' share (nothing yet).
const MIGRATE_4_TO_5: &str = "
ALTER TABLE devices ADD COLUMN access BLOB;
ALTER TABLE devices ADD COLUMN previous_access BLOB;
ALTER TABLE devices ADD COLUMN access_changed_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN owner_seen_at INTEGER NOT NULL DEFAULT 0;
UPDATE devices SET owner_seen_at = published_at;
CREATE INDEX devices_by_owner_seen ON devices (owner_seen_at);
ALTER TABLE mailboxes ADD COLUMN stranger_envelopes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE mailboxes ADD COLUMN stranger_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE envelopes ADD COLUMN share INTEGER NOT NULL DEFAULT 0 CHECK (share IN (0, 1));
";

/// The envelopes (and acknowledged ids) of inactive mailboxes received
/// before `?2` (owners seen before `?1`): the idle owners through
/// `devices_by_owner_seen`, their mailboxes' keys through the mailbox
/// index, each mailbox's old envelopes through `envelopes_by_mailbox_time`.
const EXPIRE_INACTIVE: &str = "DELETE FROM envelopes INDEXED BY envelopes_by_mailbox_time
     WHERE mid IN (
         SELECT m.mid FROM devices d INDEXED BY devices_by_owner_seen
         JOIN mailboxes m ON m.mailbox = d.mailbox
         WHERE d.owner_seen_at < ?1)
     AND received_at < ?2";

/// Everything of the devices not seen since `?1`, each statement finding
/// them through `devices_by_owner_seen`: their mailboxes' envelopes,
/// mailbox rows (usage, sequence) and used challenges, their pools, then
/// the devices (with their claim times).
const EXPIRE_DEVICES: [&str; 5] = [
    "DELETE FROM envelopes WHERE mid IN (
         SELECT m.mid FROM devices d INDEXED BY devices_by_owner_seen
         JOIN mailboxes m ON m.mailbox = d.mailbox
         WHERE d.owner_seen_at < ?1)",
    "DELETE FROM mailboxes WHERE mailbox IN (
         SELECT mailbox FROM devices INDEXED BY devices_by_owner_seen
         WHERE owner_seen_at < ?1)",
    "DELETE FROM used_challenges WHERE mailbox IN (
         SELECT mailbox FROM devices INDEXED BY devices_by_owner_seen
         WHERE owner_seen_at < ?1)",
    "DELETE FROM one_time_prekeys WHERE (identity, device_id) IN (
         SELECT identity, device_id FROM devices INDEXED BY devices_by_owner_seen
         WHERE owner_seen_at < ?1)",
    "DELETE FROM devices WHERE owner_seen_at < ?1",
];

/// Raises the owner's `owner_seen_at` of mailbox `?1` to `?2`.
const OWNER_SEEN: &str = "UPDATE devices SET owner_seen_at = ?2
     WHERE mailbox = ?1 AND owner_seen_at < ?2";

/// A share as stored in `envelopes.share`.
fn share_code(share: Share) -> i64 {
    match share {
        Share::Contacts => 0,
        Share::Strangers => 1,
    }
}

/// Whether a stored share code is the strangers' share (any value but the
/// two written is corruption).
fn is_stranger(code: i64) -> Result<bool, RelayStorageError> {
    match code {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(RelayStorageError::Corrupted(format!(
            "an envelope's share is {other}"
        ))),
    }
}

/// The columns of a device record, in the order [`device_record`] reads
/// them.
const DEVICE_COLUMNS: &str = "identity, device_id, counter, spk_id, spk_created, spk_public,
     spk_signature, published_at, access, previous_access, access_changed_at, owner_seen_at";

/// A device record from a row of [`DEVICE_COLUMNS`].
fn device_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let verifier = |i: usize| -> rusqlite::Result<Option<AccessVerifier>> {
        Ok(r.get::<_, Option<[u8; 32]>>(i)?.map(AccessVerifier))
    };
    Ok(DeviceRecord {
        device: DeviceAddress {
            identity: r.get(0)?,
            device_id: r.get(1)?,
        },
        counter: unbits(r.get(2)?),
        signed_prekey: SignedPrekeyRecord {
            id: r.get(3)?,
            created: unbits(r.get(4)?),
            public: r.get(5)?,
            signature: r.get(6)?,
        },
        published_at: count(r.get(7)?),
        access: verifier(8)?,
        previous_access: verifier(9)?,
        access_changed_at: count(r.get(10)?),
        owner_seen_at: count(r.get(11)?),
    })
}

/// A device-list version as an SQLite integer (versions grow by one from
/// 1, so they never reach `i64::MAX`; a larger one is refused).
fn list_version(version: u64) -> Result<i64, RelayStorageError> {
    i64::try_from(version)
        .map_err(|_| RelayStorageError::Backend("device list version out of range".into()))
}

fn stored_list(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDeviceList> {
    let version: i64 = row.get(0)?;
    Ok(StoredDeviceList {
        version: u64::try_from(version)
            .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, version))?,
        body_hash: row.get(1)?,
        signed: row.get(2)?,
    })
}

fn db(error: rusqlite::Error) -> RelayStorageError {
    match error {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            RelayStorageError::Corrupted(error.to_string())
        }
        other => RelayStorageError::Backend(other.to_string()),
    }
}

/// A time the database compares, clamped into SQLite's integer range.
fn time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// A 64-bit value stored bit for bit.
fn bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn unbits(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Relay storage in an SQLite database. See the module docs of
/// [`crate::relay`] for the rules it backs.
#[derive(Debug)]
pub struct SqliteRelayStorage {
    conn: Connection,
    /// The database file (`None` in memory).
    path: Option<std::path::PathBuf>,
    /// Inside [`RelayStorage::begin_group`]: each call is a savepoint of
    /// the group's transaction.
    grouped: bool,
}

/// The transaction of one storage call: its own (committed by
/// [`Tx::commit`]), or a savepoint of the open group (released by it, so
/// that it is committed with the group). Dropped without `commit`, it
/// rolls back (to the savepoint).
enum Tx<'c> {
    Own(rusqlite::Transaction<'c>),
    Nested(rusqlite::Savepoint<'c>),
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            Tx::Own(tx) => tx,
            Tx::Nested(savepoint) => savepoint,
        }
    }
}

impl Tx<'_> {
    fn commit(self) -> rusqlite::Result<()> {
        match self {
            Tx::Own(tx) => tx.commit(),
            Tx::Nested(savepoint) => savepoint.commit(),
        }
    }
}

/// Pages of write-ahead log after which the writer checkpoints in its own
/// commit after [`SqliteRelayStorage::defer_checkpoints`] (a backstop: the
/// caller's checkpoints normally keep the log short).
const BACKSTOP_CHECKPOINT_PAGES: i64 = 8192;
/// The page cache of a relay connection, in KiB (SQLite's negative
/// `cache_size`): the mailbox indexes stay in memory under load.
const CACHE_KIB: i64 = 64 * 1024;
/// Bytes the write-ahead log file is truncated to after it is reset.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

impl SqliteRelayStorage {
    /// Opens (creating if needed) the relay database at `path`.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] if the file cannot be opened,
    /// [`RelayStorageError::Corrupted`] if it is another kind of database,
    /// [`RelayStorageError::UnsupportedSchema`] if its schema is newer.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RelayStorageError> {
        let path = path.as_ref();
        let mut storage = Self::setup(Connection::open(path).map_err(db)?)?;
        storage.path = Some(path.to_path_buf());
        Ok(storage)
    }

    /// The database file (`None` in memory). A server opens its own
    /// connections to it for work it keeps off the writer's commits (see
    /// [`defer_checkpoints`](Self::defer_checkpoints) and
    /// [`defer_log_flush`](Self::defer_log_flush)); its write-ahead log is
    /// the file beside it with `-wal` appended.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// From now on this connection checkpoints the write-ahead log in its
    /// own commits only past 8192 pages, as a backstop (SQLite's default:
    /// the commit that makes the log longer than 1000 pages copies it all
    /// into the database file and syncs it, while the callers of that
    /// commit wait). The caller takes the work over: it runs `PRAGMA
    /// wal_checkpoint(PASSIVE)` regularly on a connection of its own to
    /// [`path`](Self::path) (the relay server does every 50 ms). A
    /// checkpoint never loses a commit: the log stays the durable copy
    /// until its frames are in the synced database file. In memory this
    /// does nothing.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`].
    pub fn defer_checkpoints(&mut self) -> Result<(), RelayStorageError> {
        if self.path.is_none() {
            return Ok(());
        }
        self.conn
            .pragma_update(None, "wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES)
            .map_err(db)
    }

    /// The transaction of one call: an `IMMEDIATE` one of its own (the
    /// write lock taken up front, waiting on the busy timeout, never
    /// upgraded), or a savepoint of the group.
    fn begin(&mut self) -> Result<Tx<'_>, RelayStorageError> {
        if !self.grouped {
            return self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map(Tx::Own)
                .map_err(db);
        }
        if self.conn.is_autocommit() {
            // SQLite rolled the group's transaction back (after an I/O
            // error, for one): a savepoint now would start a new one, and
            // the group's commit would report the lost calls as stored.
            return Err(RelayStorageError::Backend(
                "the group's transaction was rolled back".into(),
            ));
        }
        self.conn.savepoint().map(Tx::Nested).map_err(db)
    }

    /// From now on this connection's commits are written to the
    /// write-ahead log without waiting for it to reach the disk
    /// (`synchronous = NORMAL`): still durable across a crash of the
    /// process (such as `kill -9`), but not across a power loss until the
    /// log file (`path` + `-wal`) is flushed. The caller must flush it
    /// (`fdatasync`, what a `synchronous = FULL` commit does before it
    /// returns) after a commit and before it reports the commit as
    /// durable; one flush covers every commit before it. SQLite keeps the
    /// log file (it truncates it in place, never replaces it) while the
    /// database has an open connection, so a handle to it opened before
    /// this call stays the log as long as the storage is open. In memory
    /// this does nothing.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] (then nothing changed).
    pub fn defer_log_flush(&mut self) -> Result<(), RelayStorageError> {
        if self.path.is_none() {
            return Ok(());
        }
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)
    }

    /// A private in-memory database (lost when dropped).
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`].
    pub fn open_in_memory() -> Result<Self, RelayStorageError> {
        Self::setup(Connection::open_in_memory().map_err(db)?)
    }

    fn setup(mut conn: Connection) -> Result<Self, RelayStorageError> {
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(db)?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(db)?;
        conn.set_prepared_statement_cache_capacity(64);

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let application_id: i32 = tx
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(db)?;
        let version: u32 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db)?;
        match (application_id, version) {
            (0, 0) => {
                let tables: i64 = tx
                    .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .map_err(db)?;
                if tables != 0 {
                    return Err(RelayStorageError::Corrupted(
                        "not a cubbyhole relay database".into(),
                    ));
                }
                tx.execute_batch(COMMON_SCHEMA).map_err(db)?;
                tx.execute_batch(MAILBOX_TABLES).map_err(db)?;
                tx.execute_batch(MAILBOX_INDEXES).map_err(db)?;
                tx.execute_batch(DEVICE_LIST_TABLE).map_err(db)?;
                tx.execute_batch(MIGRATE_3_TO_4).map_err(db)?;
                tx.execute_batch(MIGRATE_4_TO_5).map_err(db)?;
                tx.pragma_update(None, "application_id", APPLICATION_ID)
                    .map_err(db)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(db)?;
            }
            (APPLICATION_ID, 1) => {
                tx.execute_batch(MAILBOX_TABLES).map_err(db)?;
                tx.execute_batch(MIGRATE_1_TO_2).map_err(db)?;
                tx.execute_batch(MAILBOX_INDEXES).map_err(db)?;
                tx.execute_batch(DEVICE_LIST_TABLE).map_err(db)?;
                tx.execute_batch(MIGRATE_3_TO_4).map_err(db)?;
                tx.execute_batch(MIGRATE_4_TO_5).map_err(db)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(db)?;
            }
            (APPLICATION_ID, 2) => {
                tx.execute_batch(DEVICE_LIST_TABLE).map_err(db)?;
                tx.execute_batch(MIGRATE_3_TO_4).map_err(db)?;
                tx.execute_batch(MIGRATE_4_TO_5).map_err(db)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(db)?;
            }
            (APPLICATION_ID, 3) => {
                tx.execute_batch(MIGRATE_3_TO_4).map_err(db)?;
                tx.execute_batch(MIGRATE_4_TO_5).map_err(db)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(db)?;
            }
            (APPLICATION_ID, 4) => {
                tx.execute_batch(MIGRATE_4_TO_5).map_err(db)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(db)?;
            }
            (APPLICATION_ID, SCHEMA_VERSION) => {}
            (APPLICATION_ID, newer) if newer > SCHEMA_VERSION => {
                return Err(RelayStorageError::UnsupportedSchema(newer));
            }
            _ => {
                return Err(RelayStorageError::Corrupted(
                    "not a cubbyhole relay database".into(),
                ))
            }
        }
        tx.commit().map_err(db)?;
        Ok(SqliteRelayStorage {
            conn,
            path: None,
            grouped: false,
        })
    }
}

impl RelayStorage for SqliteRelayStorage {
    fn device_list_head(
        &self,
        account: &AccountId,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        self.conn
            .prepare_cached(
                "SELECT version, body_hash, signed FROM device_lists
                 WHERE account_id = ?1 ORDER BY version DESC LIMIT 1",
            )
            .map_err(db)?
            .query_row(params![account.0], stored_list)
            .optional()
            .map_err(db)
    }

    fn device_list_version(
        &self,
        account: &AccountId,
        version: u64,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        let Ok(version) = i64::try_from(version) else {
            return Ok(None);
        };
        self.conn
            .prepare_cached(
                "SELECT version, body_hash, signed FROM device_lists
                 WHERE account_id = ?1 AND version = ?2",
            )
            .map_err(db)?
            .query_row(params![account.0, version], stored_list)
            .optional()
            .map_err(db)
    }

    fn device_lists_after(
        &self,
        account: &AccountId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredDeviceList>, RelayStorageError> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT version, body_hash, signed FROM device_lists
                 WHERE account_id = ?1 AND version > ?2 ORDER BY version LIMIT ?3",
            )
            .map_err(db)?;
        let rows = statement
            .query_map(params![account.0, after, limit], stored_list)
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn append_device_list(
        &mut self,
        account: &AccountId,
        list: &StoredDeviceList,
        previous: &[u8; 32],
        retain: u32,
    ) -> Result<AppendOutcome, RelayStorageError> {
        let version = list_version(list.version)?;
        // The head check and the insert in one IMMEDIATE transaction (the
        // write lock is taken at BEGIN, so no other writer runs between).
        let tx = self.begin()?;
        let head: Option<(i64, Vec<u8>)> = tx
            .prepare_cached(
                "SELECT version, body_hash FROM device_lists
                 WHERE account_id = ?1 ORDER BY version DESC LIMIT 1",
            )
            .map_err(db)?
            .query_row(params![account.0], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        let extends = match &head {
            None => version == 1,
            Some((v, hash)) => version != 1 && *v == version - 1 && hash[..] == previous[..],
        };
        if !extends {
            return Ok(AppendOutcome::HeadMoved);
        }
        let inserted = tx
            .prepare_cached(
                "INSERT INTO device_lists (account_id, version, body_hash, signed)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )
            .map_err(db)?
            .execute(params![account.0, version, list.body_hash, list.signed])
            .map_err(db)?;
        if inserted == 0 {
            return Ok(AppendOutcome::HeadMoved);
        }
        tx.prepare_cached("DELETE FROM device_lists WHERE account_id = ?1 AND version <= ?2")
            .map_err(db)?
            .execute(params![account.0, version - i64::from(retain.max(1))])
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(AppendOutcome::Appended)
    }

    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE identity = ?1 AND device_id = ?2"
            ))
            .map_err(db)?
            .query_row(params![device.identity, device.device_id], device_record)
            .optional()
            .map_err(db)
    }

    fn mailbox_owner(
        &self,
        mailbox: &MailboxId,
    ) -> Result<Option<DeviceRecord>, RelayStorageError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE mailbox = ?1"
            ))
            .map_err(db)?
            .query_row(params![mailbox.0], device_record)
            .optional()
            .map_err(db)
    }

    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM devices WHERE mailbox = ?1")
            .map_err(db)?;
        stmt.exists(params![mailbox.0]).map_err(db)
    }

    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError> {
        let device = &upload.device;
        let tx = self.begin()?;
        type Stored = (i64, Option<[u8; 32]>, Option<[u8; 32]>, i64);
        let stored: Option<Stored> = tx
            .prepare_cached(
                "SELECT counter, access, previous_access, access_changed_at
                 FROM devices WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(db)?
            .query_row(params![device.identity, device.device_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .map_err(db)?;
        if stored.is_some_and(|(c, ..)| upload.counter <= unbits(c)) {
            return Ok(UploadOutcome::Replayed);
        }
        // The access verifiers: a new one rotates, none (or the same) keeps.
        let (mut access, mut previous_access, mut access_changed_at) =
            stored.map_or((None, None, 0), |(_, a, p, at)| (a, p, at));
        if let Some(verifier) = upload.access_verifier {
            if access != Some(verifier.0) {
                previous_access = access;
                access = Some(verifier.0);
                access_changed_at = time(published_at);
            }
        }
        let spk = &upload.signed_prekey;
        // An upsert, not a replace: the device's claim time stays.
        tx.prepare_cached(
            "INSERT INTO devices (identity, device_id, mailbox, counter, spk_id,
                 spk_created, spk_public, spk_signature, published_at,
                 access, previous_access, access_changed_at, owner_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?9)
             ON CONFLICT (identity, device_id) DO UPDATE SET
                 counter = excluded.counter, spk_id = excluded.spk_id,
                 spk_created = excluded.spk_created, spk_public = excluded.spk_public,
                 spk_signature = excluded.spk_signature, published_at = excluded.published_at,
                 access = excluded.access, previous_access = excluded.previous_access,
                 access_changed_at = excluded.access_changed_at,
                 owner_seen_at = excluded.owner_seen_at",
        )
        .map_err(db)?
        .execute(params![
            device.identity,
            device.device_id,
            device.mailbox().0,
            bits(upload.counter),
            spk.id,
            bits(spk.created),
            spk.public,
            spk.signature,
            time(published_at),
            access,
            previous_access,
            access_changed_at,
        ])
        .map_err(db)?;
        if upload.replace_one_time_prekeys {
            tx.prepare_cached(
                "DELETE FROM one_time_prekeys WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(db)?
            .execute(params![device.identity, device.device_id])
            .map_err(db)?;
        }
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO one_time_prekeys (identity, device_id, key_id, public)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (identity, device_id, key_id)
                     DO UPDATE SET public = excluded.public",
                )
                .map_err(db)?;
            for (id, key) in &upload.one_time_prekeys {
                insert
                    .execute(params![device.identity, device.device_id, id, key])
                    .map_err(db)?;
            }
        }
        let pooled: i64 = tx
            .prepare_cached(
                "SELECT count(*) FROM one_time_prekeys WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(db)?
            .query_row(params![device.identity, device.device_id], |r| r.get(0))
            .map_err(db)?;
        if count(pooled) > u64::from(max_one_time_prekeys) {
            // Dropping the transaction rolls everything back.
            return Ok(UploadOutcome::TooManyOneTimePrekeys);
        }
        tx.commit().map_err(db)?;
        Ok(UploadOutcome::Applied)
    }

    fn claim_one_time_prekey(
        &mut self,
        device: &DeviceAddress,
        budget: Option<ClaimBudget>,
    ) -> Result<ClaimOutcome, RelayStorageError> {
        // In an IMMEDIATE transaction (the write lock is taken up front,
        // waiting on the busy timeout, never upgraded): the claim time
        // read is the one the update replaces.
        let tx = self.begin()?;
        let claimed_until: Option<i64> = tx
            .prepare_cached(
                "SELECT claimed_until FROM devices WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(db)?
            .query_row(params![device.identity, device.device_id], |r| r.get(0))
            .optional()
            .map_err(db)?;
        let Some(claimed_until) = claimed_until else {
            return Ok(ClaimOutcome::Empty);
        };
        let next = match budget {
            Some(budget) => match budget.admit(unbits(claimed_until)) {
                Some(next) => Some(next),
                None => return Ok(ClaimOutcome::Limited),
            },
            None => None,
        };
        let claimed: Option<(u32, [u8; 32])> = tx
            .prepare_cached(
                "DELETE FROM one_time_prekeys WHERE seq = (
                     SELECT seq FROM one_time_prekeys
                     WHERE identity = ?1 AND device_id = ?2 ORDER BY seq LIMIT 1)
                 RETURNING key_id, public",
            )
            .map_err(db)?
            .query_row(params![device.identity, device.device_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(db)?;
        let Some((id, key)) = claimed else {
            return Ok(ClaimOutcome::Empty);
        };
        if let Some(next) = next {
            tx.prepare_cached(
                "UPDATE devices SET claimed_until = ?3 WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(db)?
            .execute(params![device.identity, device.device_id, bits(next)])
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(ClaimOutcome::Claimed(id, key))
    }

    fn one_time_prekey_count(&self, device: &DeviceAddress) -> Result<u32, RelayStorageError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM one_time_prekeys WHERE identity = ?1 AND device_id = ?2",
            )
            .map_err(db)?;
        let n: i64 = stmt
            .query_row(params![device.identity, device.device_id], |r| r.get(0))
            .map_err(db)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn insert_envelope(
        &mut self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        let tx = self.begin()?;
        let mut touched = Touched::new();
        let outcome = insert_one(
            &tx,
            &mut touched,
            mailbox,
            envelope,
            share,
            received_at,
            limits,
        )?;
        write_usage(&tx, &touched)?;
        tx.commit().map_err(db)?;
        Ok(outcome)
    }

    fn insert_envelopes(
        &mut self,
        batch: &[(MailboxId, Envelope, Share)],
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<Vec<InsertOutcome>, RelayStorageError> {
        // Group commit: one transaction (one fsync) for the whole batch.
        let tx = self.begin()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut touched = Touched::new();
        for (mailbox, envelope, share) in batch {
            outcomes.push(insert_one(
                &tx,
                &mut touched,
                mailbox,
                envelope,
                *share,
                received_at,
                limits,
            )?);
        }
        write_usage(&tx, &touched)?;
        tx.commit().map_err(db)?;
        Ok(outcomes)
    }

    fn list_envelopes(
        &self,
        mailbox: &MailboxId,
        received_since: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>, RelayStorageError> {
        let Some(mid) = mailbox_key(&self.conn, mailbox)? else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                // In deposit order through the index of pending envelopes,
                // which has it (the planner could otherwise take the
                // (mid, received_at) index and sort every pending envelope
                // of the mailbox to return the first `limit`).
                "SELECT id, size, payload FROM envelopes INDEXED BY envelopes_pending
                 WHERE mid = ?1 AND acknowledged = 0 AND received_at >= ?2
                 ORDER BY seq LIMIT ?3",
            )
            .map_err(db)?;
        let mut rows = stmt
            .query(params![mid, time(received_since), limit])
            .map_err(db)?;
        let mut out = Vec::new();
        let mut total = 0u64;
        while let Some(row) = rows.next().map_err(db)? {
            let size = count(row.get(1).map_err(db)?);
            if !out.is_empty() && total.saturating_add(size) > max_bytes {
                break;
            }
            total = total.saturating_add(size);
            out.push(Envelope {
                id: EnvelopeId(row.get(0).map_err(db)?),
                payload: row.get(2).map_err(db)?,
            });
        }
        Ok(out)
    }

    fn mailbox_usage(&self, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError> {
        usage_of(&self.conn, mailbox)
    }

    fn acknowledge_envelopes(
        &mut self,
        mailbox: &MailboxId,
        ids: &[EnvelopeId],
    ) -> Result<u64, RelayStorageError> {
        let tx = self.begin()?;
        let Some(mid) = mailbox_key(&tx, mailbox)? else {
            return Ok(0);
        };
        let mut freed = MailboxUsage::default();
        {
            // The row stays (with its receipt time, for expiry) so that the
            // id remains a duplicate; the payload goes.
            let mut acknowledge = tx
                .prepare_cached(
                    "UPDATE envelopes SET acknowledged = 1, payload = X''
                     WHERE mid = ?1 AND id = ?2 AND acknowledged = 0
                     RETURNING size, share",
                )
                .map_err(db)?;
            for id in ids {
                let row: Option<(i64, i64)> = acknowledge
                    .query_row(params![mid, id.0], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(db)?;
                if let Some((size, share)) = row {
                    freed.add(count(size), is_stranger(share)?);
                }
            }
        }
        if freed.envelopes > 0 {
            release(&tx, mid, freed)?;
        }
        tx.commit().map_err(db)?;
        Ok(freed.envelopes)
    }

    fn expire_envelopes(&mut self, received_before: u64) -> Result<u64, RelayStorageError> {
        let tx = self.begin()?;
        let mut freed: HashMap<i64, MailboxUsage> = HashMap::new();
        {
            let mut expire = tx
                .prepare_cached(
                    "DELETE FROM envelopes WHERE received_at < ?1
                     RETURNING mid, acknowledged, size, share",
                )
                .map_err(db)?;
            let rows = expire.query(params![time(received_before)]).map_err(db)?;
            collect_freed(rows, &mut freed)?;
        }
        let expired = release_all(&tx, &freed)?;
        tx.commit().map_err(db)?;
        Ok(expired)
    }

    fn expire_inactive(
        &mut self,
        seen_before: u64,
        received_before: u64,
    ) -> Result<u64, RelayStorageError> {
        let tx = self.begin()?;
        let mut freed: HashMap<i64, MailboxUsage> = HashMap::new();
        {
            let mut expire = tx
                .prepare_cached(&format!(
                    "{EXPIRE_INACTIVE} RETURNING mid, acknowledged, size, share"
                ))
                .map_err(db)?;
            let rows = expire
                .query(params![time(seen_before), time(received_before)])
                .map_err(db)?;
            collect_freed(rows, &mut freed)?;
        }
        let expired = release_all(&tx, &freed)?;
        tx.commit().map_err(db)?;
        Ok(expired)
    }

    fn expire_devices(&mut self, seen_before: u64) -> Result<u64, RelayStorageError> {
        let tx = self.begin()?;
        let seen_before = time(seen_before);
        // The last statement deletes the devices: its count is theirs.
        let mut deleted = 0;
        for statement in EXPIRE_DEVICES {
            deleted = tx
                .prepare_cached(statement)
                .map_err(db)?
                .execute(params![seen_before])
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(deleted as u64)
    }

    fn relay_key(
        &mut self,
        fresh: Option<&RelayKey>,
    ) -> Result<Option<RelayKey>, RelayStorageError> {
        let tx = self.begin()?;
        if let Some(fresh) = fresh {
            tx.prepare_cached("INSERT OR IGNORE INTO relay_key (singleton, key) VALUES (1, ?1)")
                .map_err(db)?
                .execute(params![&fresh.as_bytes()[..]])
                .map_err(db)?;
        }
        let key: Option<Vec<u8>> = tx
            .prepare_cached("SELECT key FROM relay_key WHERE singleton = 1")
            .map_err(db)?
            .query_row([], |r| r.get(0))
            .optional()
            .map_err(db)?;
        tx.commit().map_err(db)?;
        key.map(|bytes| {
            let bytes = zeroize::Zeroizing::new(bytes);
            <[u8; 32]>::try_from(&bytes[..])
                .map(RelayKey::from_bytes)
                .map_err(|_| RelayStorageError::Corrupted("the relay key is not 32 bytes".into()))
        })
        .transpose()
    }

    fn consume_challenge(
        &mut self,
        mailbox: &MailboxId,
        challenge: &[u8; 32],
        now: u64,
        expires_at: u64,
    ) -> Result<bool, RelayStorageError> {
        let tx = self.begin()?;
        tx.prepare_cached("DELETE FROM used_challenges WHERE mailbox = ?1 AND expires_at < ?2")
            .map_err(db)?
            .execute(params![mailbox.0, time(now)])
            .map_err(db)?;
        let recorded = tx
            .prepare_cached(
                "INSERT INTO used_challenges (mailbox, challenge, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (mailbox, challenge) DO NOTHING",
            )
            .map_err(db)?
            .execute(params![mailbox.0, challenge, time(expires_at)])
            .map_err(db)?;
        if recorded == 1 {
            // The owner proved itself: seen now (never earlier than seen).
            tx.prepare_cached(OWNER_SEEN)
                .map_err(db)?
                .execute(params![mailbox.0, time(now)])
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(recorded == 1)
    }

    fn purge_challenges(&mut self, now: u64) -> Result<u64, RelayStorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM used_challenges WHERE expires_at < ?1")
            .map_err(db)?;
        let purged = stmt.execute(params![time(now)]).map_err(db)?;
        Ok(purged as u64)
    }

    fn begin_group(&mut self) -> Result<(), RelayStorageError> {
        if self.grouped {
            return Err(RelayStorageError::Backend("a group is already open".into()));
        }
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
        self.grouped = true;
        Ok(())
    }

    fn commit_group(&mut self) -> Result<(), RelayStorageError> {
        if !self.grouped {
            return Err(RelayStorageError::Backend("no group is open".into()));
        }
        self.grouped = false;
        if self.conn.is_autocommit() {
            return Err(RelayStorageError::Backend(
                "the group's transaction was rolled back".into(),
            ));
        }
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            // Whatever SQLite left open goes; nothing of the group stays.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(db(e));
        }
        Ok(())
    }
}

/// The mailboxes a transaction of deposits has touched: their key, their
/// usage as the transaction has made it, and whether it changed (expired
/// envelopes were deleted, or envelopes stored): [`write_usage`] writes it
/// back before the commit.
type Touched = HashMap<MailboxId, TouchedMailbox>;

#[derive(Debug)]
struct TouchedMailbox {
    mid: i64,
    usage: MailboxUsage,
    next_seq: i64,
    changed: bool,
}

/// One deposit inside an open transaction: expire the mailbox's old
/// envelopes (once per transaction), recognise a duplicate id, check the
/// bounds, insert. A batch shares `touched`, so each of its mailboxes is
/// expired and its usage read once: the cutoff is the same for the whole
/// batch, and the batch's own envelopes are not older than it.
fn insert_one(
    tx: &Connection,
    touched: &mut Touched,
    mailbox: &MailboxId,
    envelope: &Envelope,
    share: Share,
    received_at: u64,
    limits: MailboxLimits,
) -> Result<InsertOutcome, RelayStorageError> {
    let entry = match touched.entry(*mailbox) {
        Entry::Occupied(known) => known.into_mut(),
        Entry::Vacant(new) => new.insert(touch(tx, mailbox, limits.expire_before)?),
    };
    let duplicate = tx
        .prepare_cached("SELECT 1 FROM envelopes WHERE mid = ?1 AND id = ?2")
        .map_err(db)?
        .exists(params![entry.mid, envelope.id.0])
        .map_err(db)?;
    if duplicate {
        return Ok(InsertOutcome::Duplicate);
    }
    let size = envelope.payload.len() as u64;
    // Each share against its own bounds, counting only its envelopes.
    let usage = &entry.usage;
    let (held, held_bytes, max_envelopes, max_bytes) = match share {
        Share::Contacts => (
            usage.envelopes.saturating_sub(usage.stranger_envelopes),
            usage.bytes.saturating_sub(usage.stranger_bytes),
            limits.max_envelopes,
            limits.max_bytes,
        ),
        Share::Strangers => (
            usage.stranger_envelopes,
            usage.stranger_bytes,
            limits.max_stranger_envelopes,
            limits.max_stranger_bytes,
        ),
    };
    if held >= u64::from(max_envelopes) {
        return Ok(InsertOutcome::TooManyEnvelopes);
    }
    if held_bytes.saturating_add(size) > max_bytes {
        return Ok(InsertOutcome::TooManyBytes);
    }
    tx.prepare_cached(
        "INSERT INTO envelopes (mid, seq, id, received_at, size, payload, share)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(db)?
    .execute(params![
        entry.mid,
        entry.next_seq,
        envelope.id.0,
        time(received_at),
        time(size),
        envelope.payload,
        share_code(share),
    ])
    .map_err(db)?;
    entry.usage.envelopes += 1;
    entry.usage.bytes = entry.usage.bytes.saturating_add(size);
    if share == Share::Strangers {
        entry.usage.stranger_envelopes += 1;
        entry.usage.stranger_bytes = entry.usage.stranger_bytes.saturating_add(size);
    }
    entry.next_seq += 1;
    entry.changed = true;
    Ok(InsertOutcome::Stored)
}

/// A mailbox's first deposit in a transaction: its key (a new one for a
/// mailbox never deposited to), with its envelopes and acknowledged ids
/// received before `expire_before` deleted, and its usage after that.
fn touch(
    tx: &Connection,
    mailbox: &MailboxId,
    expire_before: u64,
) -> Result<TouchedMailbox, RelayStorageError> {
    let known = tx
        .prepare_cached(
            "SELECT mid, envelopes, bytes, stranger_envelopes, stranger_bytes, next_seq
             FROM mailboxes WHERE mailbox = ?1",
        )
        .map_err(db)?
        .query_row(params![mailbox.0], |r| {
            Ok((r.get::<_, i64>(0)?, usage_row(r, 1)?, r.get::<_, i64>(5)?))
        })
        .optional()
        .map_err(db)?;
    let Some((mid, mut usage, next_seq)) = known else {
        let mid = tx
            .prepare_cached("INSERT INTO mailboxes (mailbox) VALUES (?1) RETURNING mid")
            .map_err(db)?
            .query_row(params![mailbox.0], |r| r.get(0))
            .map_err(db)?;
        return Ok(TouchedMailbox {
            mid,
            usage: MailboxUsage::default(),
            next_seq: 0,
            changed: false,
        });
    };
    let mut changed = false;
    let mut expire = tx
        .prepare_cached(
            "DELETE FROM envelopes INDEXED BY envelopes_by_mailbox_time
             WHERE mid = ?1 AND received_at < ?2 RETURNING acknowledged, size, share",
        )
        .map_err(db)?;
    let mut rows = expire
        .query(params![mid, time(expire_before)])
        .map_err(db)?;
    while let Some(row) = rows.next().map_err(db)? {
        let acknowledged: i64 = row.get(0).map_err(db)?;
        if acknowledged == 0 {
            let size = count(row.get(1).map_err(db)?);
            usage.envelopes = usage.envelopes.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(size);
            if is_stranger(row.get(2).map_err(db)?)? {
                usage.stranger_envelopes = usage.stranger_envelopes.saturating_sub(1);
                usage.stranger_bytes = usage.stranger_bytes.saturating_sub(size);
            }
            changed = true;
        }
    }
    Ok(TouchedMailbox {
        mid,
        usage,
        next_seq,
        changed,
    })
}

/// Takes `freed` (pending envelopes acknowledged or expired) off the
/// usage of mailbox `mid`.
fn release(tx: &Connection, mid: i64, freed: MailboxUsage) -> Result<(), RelayStorageError> {
    tx.prepare_cached(
        "UPDATE mailboxes SET envelopes = max(envelopes - ?2, 0),
             bytes = max(bytes - ?3, 0),
             stranger_envelopes = max(stranger_envelopes - ?4, 0),
             stranger_bytes = max(stranger_bytes - ?5, 0) WHERE mid = ?1",
    )
    .map_err(db)?
    .execute(params![
        mid,
        time(freed.envelopes),
        time(freed.bytes),
        time(freed.stranger_envelopes),
        time(freed.stranger_bytes),
    ])
    .map_err(db)?;
    Ok(())
}

/// Adds one pending envelope of `size` bytes (of the strangers' share or
/// not) to a count of freed envelopes.
trait Freed {
    fn add(&mut self, size: u64, stranger: bool);
}

impl Freed for MailboxUsage {
    fn add(&mut self, size: u64, stranger: bool) {
        self.envelopes += 1;
        self.bytes = self.bytes.saturating_add(size);
        if stranger {
            self.stranger_envelopes += 1;
            self.stranger_bytes = self.stranger_bytes.saturating_add(size);
        }
    }
}

/// Sums, per mailbox, the pending envelopes among deleted rows of `mid,
/// acknowledged, size, share`.
fn collect_freed(
    mut rows: rusqlite::Rows<'_>,
    freed: &mut HashMap<i64, MailboxUsage>,
) -> Result<(), RelayStorageError> {
    while let Some(row) = rows.next().map_err(db)? {
        let acknowledged: i64 = row.get(1).map_err(db)?;
        if acknowledged == 0 {
            let stranger = is_stranger(row.get(3).map_err(db)?)?;
            freed
                .entry(row.get(0).map_err(db)?)
                .or_default()
                .add(count(row.get(2).map_err(db)?), stranger);
        }
    }
    Ok(())
}

/// [`release`]s each mailbox's freed envelopes; returns how many in all.
fn release_all(
    tx: &Connection,
    freed: &HashMap<i64, MailboxUsage>,
) -> Result<u64, RelayStorageError> {
    let mut released = 0u64;
    for (mid, usage) in freed {
        release(tx, *mid, *usage)?;
        released += usage.envelopes;
    }
    Ok(released)
}

/// A [`MailboxUsage`] from four columns of a `mailboxes` row from `first`
/// (envelopes, bytes, stranger_envelopes, stranger_bytes).
fn usage_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<MailboxUsage> {
    Ok(MailboxUsage {
        envelopes: count(r.get(first)?),
        bytes: count(r.get(first + 1)?),
        stranger_envelopes: count(r.get(first + 2)?),
        stranger_bytes: count(r.get(first + 3)?),
    })
}

/// Writes the usage of the mailboxes a transaction changed.
fn write_usage(tx: &Connection, touched: &Touched) -> Result<(), RelayStorageError> {
    let mut update = tx
        .prepare_cached(
            "UPDATE mailboxes SET envelopes = ?2, bytes = ?3, stranger_envelopes = ?4,
                 stranger_bytes = ?5, next_seq = ?6 WHERE mid = ?1",
        )
        .map_err(db)?;
    for entry in touched.values().filter(|t| t.changed) {
        update
            .execute(params![
                entry.mid,
                time(entry.usage.envelopes),
                time(entry.usage.bytes),
                time(entry.usage.stranger_envelopes),
                time(entry.usage.stranger_bytes),
                entry.next_seq,
            ])
            .map_err(db)?;
    }
    Ok(())
}

/// The mailbox's key, if anything was ever deposited to it.
fn mailbox_key(conn: &Connection, mailbox: &MailboxId) -> Result<Option<i64>, RelayStorageError> {
    conn.prepare_cached("SELECT mid FROM mailboxes WHERE mailbox = ?1")
        .map_err(db)?
        .query_row(params![mailbox.0], |r| r.get(0))
        .optional()
        .map_err(db)
}

/// The mailbox's usage, as the code keeps it in its `mailboxes` row.
fn usage_of(conn: &Connection, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError> {
    let usage = conn
        .prepare_cached(
            "SELECT envelopes, bytes, stranger_envelopes, stranger_bytes
             FROM mailboxes WHERE mailbox = ?1",
        )
        .map_err(db)?
        .query_row(params![mailbox.0], |r| usage_row(r, 0))
        .optional()
        .map_err(db)?;
    Ok(usage.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::keys::{IdentityKeyPair, SignedPrekey};

    const NOW: u64 = 1_800_000_000;

    /// From version 5 back to version 4 as the previous release wrote it.
    const DOWNGRADE_5_TO_4: &str = "
        DROP INDEX devices_by_owner_seen;
        ALTER TABLE devices DROP COLUMN access;
        ALTER TABLE devices DROP COLUMN previous_access;
        ALTER TABLE devices DROP COLUMN access_changed_at;
        ALTER TABLE devices DROP COLUMN owner_seen_at;
        ALTER TABLE mailboxes DROP COLUMN stranger_envelopes;
        ALTER TABLE mailboxes DROP COLUMN stranger_bytes;
        ALTER TABLE envelopes DROP COLUMN share;
        PRAGMA user_version = 4;
    ";

    fn upload(counter: u64) -> BundleSetUpload {
        let keys = IdentityKeyPair::from_seed(&[7; 32]);
        let spk = SignedPrekey::from_secret(&keys, 1, NOW, [8; 32]).unwrap();
        BundleSetUpload {
            device: DeviceAddress::new(keys.public(), 1),
            counter,
            signed_prekey: SignedPrekeyRecord::of(&spk),
            replace_one_time_prekeys: false,
            one_time_prekeys: vec![(1, [1; 32]), (2, [2; 32])],
            access_verifier: None,
            identity_stamp: None,
        }
    }

    fn env(k: u8, len: usize) -> Envelope {
        Envelope {
            id: EnvelopeId([k; 16]),
            payload: vec![k; len],
        }
    }

    const LIMITS: MailboxLimits = MailboxLimits {
        max_envelopes: 2,
        max_bytes: 1000,
        max_stranger_envelopes: 1,
        max_stranger_bytes: 1000,
        expire_before: 0,
    };

    struct TempFile(std::path::PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = self.0.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// A version-4 database opens as version 5: devices are seen at their
    /// last upload and have no verifier, envelopes are the contacts', and
    /// the strangers' share starts empty.
    #[test]
    fn migrates_a_version_4_database() {
        let file = TempFile(std::env::temp_dir().join(format!(
            "cubbyhole-relay-migrate-4-{}.db",
            std::process::id()
        )));
        let up = upload(3);
        let mailbox = up.device.mailbox();
        {
            let mut storage = SqliteRelayStorage::open(&file.0).unwrap();
            storage.apply_upload(&up, NOW - 10, 100).unwrap();
            for k in 1..=2 {
                let outcome = storage
                    .insert_envelope(&mailbox, &env(k, 10), Share::Contacts, NOW, LIMITS)
                    .unwrap();
                assert_eq!(outcome, InsertOutcome::Stored);
            }
            storage
                .acknowledge_envelopes(&mailbox, &[EnvelopeId([1; 16])])
                .unwrap();
        }
        {
            let conn = Connection::open(&file.0).unwrap();
            conn.execute_batch(DOWNGRADE_5_TO_4).unwrap();
        }
        let mut storage = SqliteRelayStorage::open(&file.0).unwrap();
        let version: u32 = storage
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 5);
        let record = storage.mailbox_owner(&mailbox).unwrap().unwrap();
        assert_eq!(
            (record.counter, record.published_at, record.owner_seen_at),
            (3, NOW - 10, NOW - 10)
        );
        assert_eq!(
            (
                record.access,
                record.previous_access,
                record.access_changed_at
            ),
            (None, None, 0)
        );
        assert_eq!(storage.one_time_prekey_count(&up.device).unwrap(), 2);
        assert_eq!(
            storage.mailbox_usage(&mailbox).unwrap(),
            MailboxUsage {
                envelopes: 1,
                bytes: 10,
                stranger_envelopes: 0,
                stranger_bytes: 0,
            }
        );
        // The migrated envelope is a contact's: the contacts' share holds
        // one more, the strangers' share one, the acknowledged id stays.
        let put = |s: &mut SqliteRelayStorage, k: u8, share: Share| {
            s.insert_envelope(&mailbox, &env(k, 10), share, NOW, LIMITS)
                .unwrap()
        };
        assert_eq!(
            put(&mut storage, 1, Share::Strangers),
            InsertOutcome::Duplicate
        );
        assert_eq!(
            put(&mut storage, 3, Share::Strangers),
            InsertOutcome::Stored
        );
        assert_eq!(
            put(&mut storage, 4, Share::Strangers),
            InsertOutcome::TooManyEnvelopes
        );
        assert_eq!(put(&mut storage, 5, Share::Contacts), InsertOutcome::Stored);
        assert_eq!(
            put(&mut storage, 6, Share::Contacts),
            InsertOutcome::TooManyEnvelopes
        );
        // The sweeps find the device by when it was last seen.
        assert_eq!(storage.expire_inactive(NOW - 10, NOW + 1).unwrap(), 0);
        assert_eq!(storage.expire_inactive(NOW - 9, NOW + 1).unwrap(), 3);
        assert_eq!(
            storage.mailbox_usage(&mailbox).unwrap(),
            MailboxUsage::default()
        );
        assert_eq!(storage.expire_devices(NOW - 9).unwrap(), 1);
        assert_eq!(storage.mailbox_owner(&mailbox).unwrap(), None);
    }

    /// A share code other than 0 and 1 is corruption, not a panic (the
    /// column's check keeps new ones out; an old or edited file may hold
    /// one).
    #[test]
    fn a_bad_share_is_corrupted() {
        let mut storage = SqliteRelayStorage::open_in_memory().unwrap();
        let mailbox = MailboxId([3; 32]);
        storage
            .insert_envelope(&mailbox, &env(1, 10), Share::Strangers, NOW, LIMITS)
            .unwrap();
        storage
            .conn
            .execute_batch("PRAGMA ignore_check_constraints = ON; UPDATE envelopes SET share = 7;")
            .unwrap();
        assert!(matches!(
            storage.acknowledge_envelopes(&mailbox, &[EnvelopeId([1; 16])]),
            Err(RelayStorageError::Corrupted(_))
        ));
        assert!(matches!(
            storage.expire_envelopes(NOW + 1),
            Err(RelayStorageError::Corrupted(_))
        ));
        // Nothing was deleted by the refused calls.
        assert_eq!(
            storage.mailbox_usage(&mailbox).unwrap().stranger_envelopes,
            1
        );
    }

    /// The sweeps and the owner's updates go through indexes, not scans of
    /// the envelopes, pools or devices.
    #[test]
    fn sweeps_use_indexes() {
        let storage = SqliteRelayStorage::open_in_memory().unwrap();
        let mut plans = vec![EXPIRE_INACTIVE, OWNER_SEEN];
        plans.extend(EXPIRE_DEVICES);
        for sql in plans {
            let mut stmt = storage
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let zeros = vec![0i64; stmt.parameter_count()];
            let details: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(zeros), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let scans: Vec<&String> = details
                .iter()
                .filter(|d| d.starts_with("SCAN") && !d.contains("LIST SUBQUERY"))
                .collect();
            assert!(
                scans.is_empty() && details.iter().any(|d| d.starts_with("SEARCH")),
                "{sql}: {details:?}"
            );
        }
    }
}
