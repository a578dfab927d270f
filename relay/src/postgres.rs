//! Relay storage over PostgreSQL (feature `postgres`), so that several
//! relay processes can share one database.
//!
//! [`PostgresRelayStorage`] implements [`RelayStorage`] with the same
//! semantics as the SQLite backend
//! ([`SqliteRelayStorage`](cubbyhole::relay::SqliteRelayStorage)): the
//! shared rules test suite runs against both. Every check-then-write of the
//! [`RelayStorage`] contract happens inside one transaction (or one
//! statement) on the database, so relay processes sharing the database stay
//! correct:
//!
//! - an upload ([`RelayStorage::apply_upload`]) locks the device's row
//!   (`INSERT ... ON CONFLICT DO NOTHING`, then `SELECT ... FOR UPDATE`)
//!   before comparing counters, so accepted counters strictly increase;
//! - a one-time prekey claim takes the device's row `FOR UPDATE` (no
//!   upload or other claim changes the pool or the claim time meanwhile),
//!   checks the device's claim budget, deletes the oldest prekey and
//!   advances the claim time: each prekey is handed out once, and
//!   concurrent claims spend one budget;
//! - a deposit takes a transaction-scoped advisory lock on its mailbox
//!   (`pg_advisory_xact_lock`), so the duplicate check and the mailbox's
//!   bounds see every earlier deposit to that mailbox;
//! - challenges are stateless (SPEC.md 16.4): issuing one writes nothing
//!   but, once per database, the relay key (`INSERT ... ON CONFLICT DO
//!   NOTHING`, then read back: every process gets the first key stored);
//!   using one is a single `INSERT ... ON CONFLICT DO NOTHING` into the
//!   used challenges, which succeeds for one caller only.
//!
//! A transaction that PostgreSQL aborts as a deadlock victim or for a
//! serialization failure (possible when an operator makes `SERIALIZABLE`
//! the default isolation) is retried a few times.
//!
//! # Schema
//!
//! [`PostgresRelayStorage::connect`] creates the tables in the connection's
//! current schema (the first schema of its `search_path`, `public` by
//! default) if they are absent. All are named `cubbyhole_relay_*`; the
//! single row of `cubbyhole_relay_meta` holds the schema version. A newer
//! version is refused ([`RelayStorageError::UnsupportedSchema`]). The first
//! connection needs the right to create tables there (in PostgreSQL 15 and
//! later, `public` only admits the database owner by default).
//!
//! Unsigned 64-bit counters and signed-prekey creation times are stored bit
//! for bit in `bigint` columns (compared in Rust, never in SQL); times the
//! database compares (receipt, expiry) are clamped to `i64::MAX`; `u32`
//! values are stored as `bigint`.
//!
//! # Deposit notifications
//!
//! Every stored deposit runs `NOTIFY cubbyhole_deposit, '<mailbox hex>'`
//! ([`DEPOSIT_CHANNEL`]) inside its transaction: PostgreSQL delivers it to
//! every listening connection when (and only if) the deposit commits.
//! [`spawn_listener`] listens on a background thread and calls back, so a
//! relay process can wake its long-polling fetches for deposits made
//! through any process sharing the database.
//!
//! # Connections, TLS, blocking
//!
//! The connection string is a `postgres://user:password@host:port/dbname`
//! URL or a `key=value` string, as [`postgres::Config`] parses them. The
//! storage connects **without TLS** ([`postgres::NoTls`]): reach the database
//! over a Unix socket (`host=/var/run/postgresql`), the loopback interface,
//! or a network you trust or tunnel yourself (WireGuard, SSH, stunnel).
//! Securing that link is the operator's concern; an `sslmode=require` in
//! the URL makes the connection fail rather than silently go in clear.
//!
//! Each storage holds one connection (calls on one storage take turns). The
//! call that finds it broken fails with [`RelayStorageError::Backend`]
//! (whether a write in flight committed is then unknown, as after any lost
//! answer); the next call reconnects. The methods block: in an async server,
//! call them from a blocking thread (`tokio::task::spawn_blocking`), never
//! on an async worker thread (the synchronous `postgres` client runs its own
//! small runtime and panics inside another runtime's worker).

#![deny(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cubbyhole::relay::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InsertOutcome, MailboxLimits,
    MailboxUsage, RelayKey, RelayStorage, RelayStorageError, Share, StoredDeviceList,
    UploadOutcome,
};
use cubbyhole::transport::{
    AccessVerifier, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxId,
    SignedPrekeyRecord,
};
use cubbyhole::AccountId;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Statement};

/// The `LISTEN`/`NOTIFY` channel of deposits. Each notification's payload
/// is the mailbox id in 64 lowercase hex characters.
pub const DEPOSIT_CHANNEL: &str = "cubbyhole_deposit";

/// The schema version this code writes (`cubbyhole_relay_meta`).
const SCHEMA_VERSION: i32 = 4;

/// Advisory lock classes (first key of the two-key advisory locks; the
/// second is the schema's `0` or the first four bytes of a mailbox id, which
/// is a hash). Advisory locks are per database.
const LOCK_SCHEMA: i32 = 0x6362_726c; // "cbrl"
const LOCK_DEPOSIT: i32 = 0x6362_6d62; // "cbmb"
const LOCK_DEVICE_LIST: i32 = 0x6362_646c; // "cbdl"

/// The tables besides `cubbyhole_relay_meta`.
const TABLES: [&str; 8] = [
    "cubbyhole_relay_key",
    "cubbyhole_relay_used_challenges",
    "cubbyhole_relay_device_lists",
    "cubbyhole_relay_devices",
    "cubbyhole_relay_one_time_prekeys",
    "cubbyhole_relay_envelopes",
    "cubbyhole_relay_acknowledged",
    "cubbyhole_relay_challenges",
];

const SCHEMA: &str = "
CREATE TABLE cubbyhole_relay_meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_version integer NOT NULL
);

CREATE TABLE cubbyhole_relay_devices (
    identity bytea NOT NULL,
    device_id bigint NOT NULL,
    mailbox bytea NOT NULL,
    counter bigint NOT NULL,
    spk_id bigint NOT NULL,
    spk_created bigint NOT NULL,
    spk_public bytea NOT NULL,
    spk_signature bytea NOT NULL,
    published_at bigint NOT NULL,
    PRIMARY KEY (identity, device_id)
);
CREATE UNIQUE INDEX cubbyhole_relay_devices_by_mailbox
    ON cubbyhole_relay_devices (mailbox);

CREATE TABLE cubbyhole_relay_one_time_prekeys (
    identity bytea NOT NULL,
    device_id bigint NOT NULL,
    key_id bigint NOT NULL,
    position bigint NOT NULL,
    public bytea NOT NULL,
    PRIMARY KEY (identity, device_id, key_id)
);
CREATE INDEX cubbyhole_relay_one_time_prekeys_by_position
    ON cubbyhole_relay_one_time_prekeys (identity, device_id, position);

CREATE TABLE cubbyhole_relay_envelopes (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox bytea NOT NULL,
    id bytea NOT NULL,
    received_at bigint NOT NULL,
    size bigint NOT NULL,
    payload bytea NOT NULL,
    UNIQUE (mailbox, id)
);
-- Payloads are ciphertext: do not try to compress them.
ALTER TABLE cubbyhole_relay_envelopes ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX cubbyhole_relay_envelopes_by_mailbox
    ON cubbyhole_relay_envelopes (mailbox, seq);
CREATE INDEX cubbyhole_relay_envelopes_by_time
    ON cubbyhole_relay_envelopes (received_at);

CREATE TABLE cubbyhole_relay_acknowledged (
    mailbox bytea NOT NULL,
    id bytea NOT NULL,
    received_at bigint NOT NULL,
    PRIMARY KEY (mailbox, id)
);
CREATE INDEX cubbyhole_relay_acknowledged_by_time
    ON cubbyhole_relay_acknowledged (received_at);

CREATE TABLE cubbyhole_relay_challenges (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox bytea NOT NULL,
    challenge bytea NOT NULL,
    expires_at bigint NOT NULL,
    UNIQUE (mailbox, challenge)
);
CREATE INDEX cubbyhole_relay_challenges_by_mailbox
    ON cubbyhole_relay_challenges (mailbox, seq);
CREATE INDEX cubbyhole_relay_challenges_by_expiry
    ON cubbyhole_relay_challenges (expires_at);
";

/// The device lists (schema version 2): per account the retained versions
/// of its chain (SPEC.md 25.12). The primary key keeps two writers from
/// both storing one version, whatever else happens.
const DEVICE_LIST_TABLE: &str = "
CREATE TABLE cubbyhole_relay_device_lists (
    account_id bytea NOT NULL,
    version bigint NOT NULL,
    body_hash bytea NOT NULL,
    signed bytea NOT NULL,
    PRIMARY KEY (account_id, version)
);
";

/// From schema version 2 to 3 (SPEC.md 16.2, 16.4), the last step of
/// every creation or migration: each device gets its claim time (the
/// one-time-prekey claim budget, milliseconds, 0 for never claimed from);
/// the table of issued challenges gives way to the table of used ones
/// (challenges are stateless now: those outstanding at the migration carry
/// no tag and could not be used anyway); the relay key's table holds at
/// most one key, created at the first challenge.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE cubbyhole_relay_devices ADD COLUMN claimed_until bigint NOT NULL DEFAULT 0;
DROP TABLE cubbyhole_relay_challenges;
CREATE TABLE cubbyhole_relay_used_challenges (
    mailbox bytea NOT NULL,
    challenge bytea NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (mailbox, challenge)
);
CREATE INDEX cubbyhole_relay_used_challenges_by_expiry
    ON cubbyhole_relay_used_challenges (expires_at);
CREATE TABLE cubbyhole_relay_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key bytea NOT NULL
);
";

/// From schema version 3 to 4 (SPEC.md 16.6, 16.8), the last step of
/// every creation or migration: each device gets the verifiers of its
/// mailbox's access key (current and previous, `NULL` for none), when the
/// current one was registered (0 for never) and when its owner was last
/// seen (`owner_seen_at`: its last upload's time for an existing device),
/// indexed for the sweeps that look for idle owners; each envelope gets its
/// share (0 contacts, 1 strangers; existing ones were deposited before
/// shares existed: contacts). The envelopes get an index by mailbox and
/// receipt time, for the expiry of inactive mailboxes.
const MIGRATE_3_TO_4: &str = "
ALTER TABLE cubbyhole_relay_devices
    ADD COLUMN access bytea CHECK (length(access) = 32),
    ADD COLUMN previous_access bytea CHECK (length(previous_access) = 32),
    ADD COLUMN access_changed_at bigint NOT NULL DEFAULT 0,
    ADD COLUMN owner_seen_at bigint NOT NULL DEFAULT 0;
UPDATE cubbyhole_relay_devices SET owner_seen_at = published_at;
CREATE INDEX cubbyhole_relay_devices_by_owner_seen
    ON cubbyhole_relay_devices (owner_seen_at);
ALTER TABLE cubbyhole_relay_envelopes
    ADD COLUMN share smallint NOT NULL DEFAULT 0 CHECK (share IN (0, 1));
CREATE INDEX cubbyhole_relay_envelopes_by_mailbox_time
    ON cubbyhole_relay_envelopes (mailbox, received_at);
CREATE INDEX cubbyhole_relay_acknowledged_by_mailbox_time
    ON cubbyhole_relay_acknowledged (mailbox, received_at);
";

/// The columns of a device record, in the order [`device_record`] reads
/// them.
const DEVICE_COLUMNS: &str = "identity, device_id, counter, spk_id, spk_created, spk_public,
     spk_signature, published_at, access, previous_access, access_changed_at, owner_seen_at";

/// A share as stored in `share` columns.
fn share_code(share: Share) -> i16 {
    match share {
        Share::Contacts => 0,
        Share::Strangers => 1,
    }
}

/// How often a transaction aborted as a deadlock victim or for a
/// serialization failure is tried again.
const MAX_RETRIES: u32 = 8;
/// The connect timeout when the connection string sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The listener checks an idle connection this often.
const LISTEN_IDLE_CHECK: Duration = Duration::from_secs(30);
/// How long that check may take.
const LISTEN_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// The listener's reconnection backoff: first and longest wait.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

// ------------------------------------------------------------- errors

/// A failure inside one storage operation.
enum Failure {
    Db(postgres::Error),
    Corrupted(String),
}

impl From<postgres::Error> for Failure {
    fn from(error: postgres::Error) -> Self {
        Failure::Db(error)
    }
}

/// An error with its cause (the `postgres` error's own text is terse:
/// "db error").
fn describe(error: &postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

fn backend(error: &postgres::Error) -> RelayStorageError {
    RelayStorageError::Backend(describe(error))
}

/// Worth trying the transaction again: it was rolled back for a conflict
/// with another one, not for anything it did.
fn is_transient(error: &postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

// ------------------------------------------------------ value mapping

/// A time the database compares, clamped into `bigint`.
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

fn small(v: i64, what: &str) -> Result<u32, Failure> {
    u32::try_from(v).map_err(|_| Failure::Corrupted(format!("{what} out of range: {v}")))
}

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], Failure> {
    bytes
        .try_into()
        .map_err(|_| Failure::Corrupted(format!("{what} is {} bytes, not {N}", bytes.len())))
}

/// The second key of an account's device-list advisory lock.
fn account_lock_key(account: &AccountId) -> i32 {
    i32::from_be_bytes([account.0[0], account.0[1], account.0[2], account.0[3]])
}

/// A device-list row (`version, body_hash, signed`).
fn stored_list(row: &postgres::Row) -> Result<StoredDeviceList, Failure> {
    let version: i64 = row.try_get(0)?;
    Ok(StoredDeviceList {
        version: u64::try_from(version)
            .map_err(|_| Failure::Corrupted(format!("device list version {version}")))?,
        body_hash: fixed(row.try_get(1)?, "device list hash")?,
        signed: row.try_get(2)?,
    })
}

/// An access verifier column (`NULL` for none).
fn verifier(row: &postgres::Row, column: usize) -> Result<Option<AccessVerifier>, Failure> {
    row.try_get::<_, Option<&[u8]>>(column)?
        .map(|bytes| fixed(bytes, "access verifier").map(AccessVerifier))
        .transpose()
}

/// A device record from a row of [`DEVICE_COLUMNS`].
fn device_record(row: &postgres::Row) -> Result<DeviceRecord, Failure> {
    Ok(DeviceRecord {
        device: DeviceAddress {
            identity: fixed(row.try_get(0)?, "identity key")?,
            device_id: small(row.try_get(1)?, "device id")?,
        },
        counter: unbits(row.try_get(2)?),
        signed_prekey: SignedPrekeyRecord {
            id: small(row.try_get(3)?, "signed prekey id")?,
            created: unbits(row.try_get(4)?),
            public: fixed(row.try_get(5)?, "signed prekey")?,
            signature: fixed(row.try_get(6)?, "signed prekey signature")?,
        },
        published_at: count(row.try_get(7)?),
        access: verifier(row, 8)?,
        previous_access: verifier(row, 9)?,
        access_changed_at: count(row.try_get(10)?),
        owner_seen_at: count(row.try_get(11)?),
    })
}

/// A usage from four `bigint` columns from `first` (envelopes, bytes,
/// stranger envelopes, stranger bytes).
fn usage_row(row: &postgres::Row, first: usize) -> Result<MailboxUsage, Failure> {
    Ok(MailboxUsage {
        envelopes: count(row.try_get(first)?),
        bytes: count(row.try_get(first + 1)?),
        stranger_envelopes: count(row.try_get(first + 2)?),
        stranger_bytes: count(row.try_get(first + 3)?),
    })
}

/// The second key of a mailbox's advisory locks.
fn lock_key(mailbox: &MailboxId) -> i32 {
    i32::from_be_bytes([mailbox.0[0], mailbox.0[1], mailbox.0[2], mailbox.0[3]])
}

fn parse_config(url: &str) -> Result<Config, RelayStorageError> {
    let mut config = Config::from_str(url).map_err(|e| {
        RelayStorageError::Backend(format!("invalid PostgreSQL connection string: {e}"))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("cubbyhole-relay");
    }
    Ok(config)
}

// --------------------------------------------------------- connection

/// Every statement, prepared once per connection.
struct Statements {
    device: Statement,
    mailbox_owner: Statement,
    mailbox_exists: Statement,
    insert_device: Statement,
    lock_device: Statement,
    update_device: Statement,
    clear_pool: Statement,
    extend_pool: Statement,
    pool_count: Statement,
    lock_claims: Statement,
    set_claimed_until: Statement,
    claim: Statement,
    lock_mailbox: Statement,
    list_envelopes: Statement,
    usage: Statement,
    expire_mailboxes: Statement,
    usage_of_mailboxes: Statement,
    batch_duplicates: Statement,
    insert_batch: Statement,
    notify_batch: Statement,
    acknowledge: Statement,
    expire_all: Statement,
    insert_key: Statement,
    key: Statement,
    expire_used: Statement,
    use_challenge: Statement,
    purge_challenges: Statement,
    owner_seen: Statement,
    expire_inactive: Statement,
    expire_devices: Statement,
}

impl Statements {
    fn prepare(client: &mut Client) -> Result<Self, postgres::Error> {
        let mut p = |sql: &str| client.prepare(sql);
        Ok(Statements {
            device: p(&format!(
                "SELECT {DEVICE_COLUMNS} FROM cubbyhole_relay_devices
                 WHERE identity = $1 AND device_id = $2"
            ))?,
            mailbox_owner: p(&format!(
                "SELECT {DEVICE_COLUMNS} FROM cubbyhole_relay_devices WHERE mailbox = $1"
            ))?,
            mailbox_exists: p("SELECT EXISTS (
                                   SELECT 1 FROM cubbyhole_relay_devices WHERE mailbox = $1)")?,
            insert_device: p(
                "INSERT INTO cubbyhole_relay_devices (identity, device_id, mailbox,
                                  counter, spk_id, spk_created, spk_public, spk_signature,
                                  published_at, access, access_changed_at, owner_seen_at)
                              VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                                      CASE WHEN $10::bytea IS NULL THEN 0 ELSE $9::bigint END, $9::bigint)
                              -- No conflict target: the mailbox is derived
                              -- from (identity, device_id), so a racing first
                              -- upload hits either unique index for the same
                              -- row, and both mean it is already there.
                              ON CONFLICT DO NOTHING",
            )?,
            lock_device: p("SELECT counter, access, previous_access, access_changed_at
                            FROM cubbyhole_relay_devices
                            WHERE identity = $1 AND device_id = $2 FOR UPDATE")?,
            update_device: p("UPDATE cubbyhole_relay_devices
                              SET counter = $3, spk_id = $4, spk_created = $5, spk_public = $6,
                                  spk_signature = $7, published_at = $8, owner_seen_at = $8,
                                  access = $9, previous_access = $10, access_changed_at = $11
                              WHERE identity = $1 AND device_id = $2")?,
            clear_pool: p("DELETE FROM cubbyhole_relay_one_time_prekeys
                           WHERE identity = $1 AND device_id = $2")?,
            // New ids go to the back in upload order; a pooled id keeps its
            // position and takes the new key.
            extend_pool: p("INSERT INTO cubbyhole_relay_one_time_prekeys
                                (identity, device_id, key_id, position, public)
                            SELECT $1::bytea, $2::bigint, k.key_id, last.position + k.n, k.public
                            FROM (SELECT coalesce(max(position), 0) AS position
                                  FROM cubbyhole_relay_one_time_prekeys
                                  WHERE identity = $1 AND device_id = $2) AS last,
                                 unnest($3::bigint[], $4::bytea[])
                                     WITH ORDINALITY AS k(key_id, public, n)
                            ON CONFLICT (identity, device_id, key_id)
                            DO UPDATE SET public = excluded.public")?,
            pool_count: p("SELECT count(*) FROM cubbyhole_relay_one_time_prekeys
                           WHERE identity = $1 AND device_id = $2")?,
            lock_claims: p("SELECT claimed_until FROM cubbyhole_relay_devices
                            WHERE identity = $1 AND device_id = $2 FOR UPDATE")?,
            set_claimed_until: p("UPDATE cubbyhole_relay_devices SET claimed_until = $3
                                  WHERE identity = $1 AND device_id = $2")?,
            claim: p("DELETE FROM cubbyhole_relay_one_time_prekeys
                      WHERE identity = $1 AND device_id = $2 AND key_id = (
                          SELECT key_id FROM cubbyhole_relay_one_time_prekeys
                          WHERE identity = $1 AND device_id = $2
                          ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED)
                      RETURNING key_id, public")?,
            lock_mailbox: p(&format!(
                "SELECT pg_advisory_xact_lock({LOCK_DEPOSIT}, $1::integer)"
            ))?,
            // The byte cap as a running sum, so that no payload past it is
            // read.
            list_envelopes: p("WITH head AS (
                                   SELECT seq, row_number() OVER w AS n, sum(size) OVER w AS total
                                   FROM cubbyhole_relay_envelopes
                                   WHERE mailbox = $1 AND received_at >= $2
                                   WINDOW w AS (ORDER BY seq)
                                   ORDER BY seq LIMIT $3::bigint)
                               SELECT e.id, e.payload
                               FROM head JOIN cubbyhole_relay_envelopes e ON e.seq = head.seq
                               WHERE head.n = 1 OR head.total <= $4::bigint
                               ORDER BY head.seq")?,
            usage: p("SELECT count(*), coalesce(sum(size), 0)::bigint,
                             count(*) FILTER (WHERE share = 1),
                             coalesce(sum(size) FILTER (WHERE share = 1), 0)::bigint
                      FROM cubbyhole_relay_envelopes WHERE mailbox = $1")?,
            // One statement per step for all of a deposit batch's mailboxes.
            expire_mailboxes: p("WITH acknowledged AS (
                                     DELETE FROM cubbyhole_relay_acknowledged
                                     WHERE mailbox = ANY($1::bytea[]) AND received_at < $2)
                                 DELETE FROM cubbyhole_relay_envelopes
                                 WHERE mailbox = ANY($1::bytea[]) AND received_at < $2")?,
            usage_of_mailboxes: p("SELECT mailbox, count(*), coalesce(sum(size), 0)::bigint,
                                          count(*) FILTER (WHERE share = 1),
                                          coalesce(sum(size) FILTER (WHERE share = 1), 0)::bigint
                                   FROM cubbyhole_relay_envelopes
                                   WHERE mailbox = ANY($1::bytea[])
                                   GROUP BY mailbox")?,
            batch_duplicates: p("SELECT e.mailbox, e.id
                                 FROM unnest($1::bytea[], $2::bytea[]) AS b(mailbox, id)
                                 JOIN cubbyhole_relay_envelopes e
                                     ON e.mailbox = b.mailbox AND e.id = b.id
                                 UNION ALL
                                 SELECT a.mailbox, a.id
                                 FROM unnest($1::bytea[], $2::bytea[]) AS b(mailbox, id)
                                 JOIN cubbyhole_relay_acknowledged a
                                     ON a.mailbox = b.mailbox AND a.id = b.id")?,
            // In batch order, so that `seq` (the delivery order) follows it.
            insert_batch: p("INSERT INTO cubbyhole_relay_envelopes
                                 (mailbox, id, received_at, size, payload, share)
                             SELECT b.mailbox, b.id, $5, b.size, b.payload, b.share
                             FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bytea[],
                                         $6::smallint[])
                                 WITH ORDINALITY AS b(mailbox, id, size, payload, share, n)
                             ORDER BY b.n")?,
            notify_batch: p(&format!(
                "SELECT pg_notify('{DEPOSIT_CHANNEL}', m) FROM unnest($1::text[]) AS m"
            ))?,
            acknowledge: p("WITH deleted AS (
                                DELETE FROM cubbyhole_relay_envelopes
                                WHERE mailbox = $1 AND id = ANY($2::bytea[])
                                RETURNING id, received_at),
                            remembered AS (
                                INSERT INTO cubbyhole_relay_acknowledged (mailbox, id, received_at)
                                SELECT $1::bytea, id, received_at FROM deleted
                                ON CONFLICT (mailbox, id) DO NOTHING)
                            SELECT count(*) FROM deleted")?,
            expire_all: p("WITH acknowledged AS (
                               DELETE FROM cubbyhole_relay_acknowledged WHERE received_at < $1)
                           DELETE FROM cubbyhole_relay_envelopes WHERE received_at < $1")?,
            insert_key: p("INSERT INTO cubbyhole_relay_key (key) VALUES ($1)
                           ON CONFLICT DO NOTHING")?,
            key: p("SELECT key FROM cubbyhole_relay_key")?,
            expire_used: p("DELETE FROM cubbyhole_relay_used_challenges
                            WHERE mailbox = $1 AND expires_at < $2")?,
            use_challenge: p("INSERT INTO cubbyhole_relay_used_challenges
                                  (mailbox, challenge, expires_at)
                              VALUES ($1, $2, $3)
                              ON CONFLICT (mailbox, challenge) DO NOTHING")?,
            purge_challenges: p(
                "DELETE FROM cubbyhole_relay_used_challenges WHERE expires_at < $1",
            )?,
            owner_seen: p("UPDATE cubbyhole_relay_devices SET owner_seen_at = $2
                           WHERE mailbox = $1 AND owner_seen_at < $2")?,
            // The idle owners through the owner-seen index, then each
            // mailbox's old rows through its (mailbox, received_at) index.
            expire_inactive: p("WITH inactive AS (
                                    SELECT mailbox FROM cubbyhole_relay_devices
                                    WHERE owner_seen_at < $1),
                                acknowledged AS (
                                    DELETE FROM cubbyhole_relay_acknowledged a
                                    USING inactive i
                                    WHERE a.mailbox = i.mailbox AND a.received_at < $2)
                                DELETE FROM cubbyhole_relay_envelopes e USING inactive i
                                WHERE e.mailbox = i.mailbox AND e.received_at < $2")?,
            // One statement: the devices and everything of theirs.
            expire_devices: p("WITH idle AS (
                                   DELETE FROM cubbyhole_relay_devices WHERE owner_seen_at < $1
                                   RETURNING identity, device_id, mailbox),
                               pools AS (
                                   DELETE FROM cubbyhole_relay_one_time_prekeys o USING idle
                                   WHERE o.identity = idle.identity
                                       AND o.device_id = idle.device_id),
                               envelopes AS (
                                   DELETE FROM cubbyhole_relay_envelopes e USING idle
                                   WHERE e.mailbox = idle.mailbox),
                               acknowledged AS (
                                   DELETE FROM cubbyhole_relay_acknowledged a USING idle
                                   WHERE a.mailbox = idle.mailbox),
                               challenges AS (
                                   DELETE FROM cubbyhole_relay_used_challenges c USING idle
                                   WHERE c.mailbox = idle.mailbox)
                               SELECT count(*) FROM idle")?,
        })
    }
}

/// One open connection with its prepared statements.
struct Connection {
    client: Client,
    statements: Statements,
}

impl Connection {
    fn open(config: &Config) -> Result<Self, RelayStorageError> {
        let mut client = config.connect(NoTls).map_err(|e| backend(&e))?;
        ensure_schema(&mut client)?;
        let statements = Statements::prepare(&mut client).map_err(|e| backend(&e))?;
        Ok(Connection { client, statements })
    }
}

/// Creates the schema if absent (under an advisory lock, so that relay
/// processes starting together do not race), else checks its version.
fn ensure_schema(client: &mut Client) -> Result<(), RelayStorageError> {
    let db = |e: postgres::Error| backend(&e);
    let mut tx = client.transaction().map_err(db)?;
    tx.execute(
        &format!("SELECT pg_advisory_xact_lock({LOCK_SCHEMA}, 0)"),
        &[],
    )
    .map_err(db)?;
    let has_meta: bool = tx
        .query_one(
            "SELECT to_regclass('cubbyhole_relay_meta') IS NOT NULL",
            &[],
        )
        .and_then(|row| row.try_get(0))
        .map_err(db)?;
    if has_meta {
        let rows = tx
            .query("SELECT schema_version FROM cubbyhole_relay_meta", &[])
            .map_err(db)?;
        let version: i32 = match rows.as_slice() {
            [row] => row.try_get(0).map_err(db)?,
            _ => {
                return Err(RelayStorageError::Corrupted(
                    "cubbyhole_relay_meta does not hold one row".into(),
                ))
            }
        };
        return match version {
            SCHEMA_VERSION => Ok(()),
            1..=3 => {
                if version == 1 {
                    // Version 1 to 2: the device lists' table.
                    tx.batch_execute(DEVICE_LIST_TABLE).map_err(db)?;
                }
                if version <= 2 {
                    tx.batch_execute(MIGRATE_2_TO_3).map_err(db)?;
                }
                tx.batch_execute(MIGRATE_3_TO_4).map_err(db)?;
                tx.execute(
                    "UPDATE cubbyhole_relay_meta SET schema_version = $1",
                    &[&SCHEMA_VERSION],
                )
                .map_err(db)?;
                tx.commit().map_err(db)
            }
            newer if newer > SCHEMA_VERSION => Err(RelayStorageError::UnsupportedSchema(
                u32::try_from(newer).unwrap_or(u32::MAX),
            )),
            older => Err(RelayStorageError::Corrupted(format!(
                "unknown relay schema version {older}"
            ))),
        };
    }
    let tables: Vec<&str> = TABLES.to_vec();
    let present: i64 = tx
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) AS t(name)
             WHERE to_regclass(t.name) IS NOT NULL",
            &[&tables],
        )
        .and_then(|row| row.try_get(0))
        .map_err(db)?;
    if present != 0 {
        return Err(RelayStorageError::Corrupted(
            "cubbyhole_relay_* tables exist without cubbyhole_relay_meta".into(),
        ));
    }
    tx.batch_execute(SCHEMA).map_err(db)?;
    tx.batch_execute(DEVICE_LIST_TABLE).map_err(db)?;
    tx.batch_execute(MIGRATE_2_TO_3).map_err(db)?;
    tx.batch_execute(MIGRATE_3_TO_4).map_err(db)?;
    tx.execute(
        "INSERT INTO cubbyhole_relay_meta (schema_version) VALUES ($1)",
        &[&SCHEMA_VERSION],
    )
    .map_err(db)?;
    tx.commit().map_err(db)
}

// ------------------------------------------------------------ storage

/// Relay storage in a PostgreSQL database, which several relay processes
/// may share. See the [module docs](self) for the schema, how each
/// operation stays atomic across processes, and the connection's caveats
/// (no TLS, blocking calls).
pub struct PostgresRelayStorage {
    config: Config,
    /// `None` after the connection broke, until the next call reconnects.
    connection: Mutex<Option<Connection>>,
}

impl fmt::Debug for PostgresRelayStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresRelayStorage")
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

impl PostgresRelayStorage {
    /// Connects to the database at `url` (a `postgres://` URL or a
    /// `key=value` connection string; no TLS, see the module docs) and
    /// creates the relay's tables if they are absent.
    ///
    /// A connect timeout of 10 s and the application name
    /// `cubbyhole-relay` apply unless the string sets them.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] for a malformed string or a database
    /// that cannot be reached, logged into or written,
    /// [`RelayStorageError::Corrupted`] if relay tables exist without a
    /// valid `cubbyhole_relay_meta`, [`RelayStorageError::UnsupportedSchema`]
    /// if the schema is newer than this code.
    pub fn connect(url: &str) -> Result<Self, RelayStorageError> {
        let config = parse_config(url)?;
        let connection = Connection::open(&config)?;
        Ok(PostgresRelayStorage {
            config,
            connection: Mutex::new(Some(connection)),
        })
    }

    /// The step to run once after restoring the database from a backup,
    /// before any relay serves it ([`crate::restore`] explains why): in
    /// one transaction, deletes every one-time prekey, every record of a
    /// used challenge and the relay key, and raises the stored upload counter of every
    /// device below `floor` to `floor` (stored counters are compared as
    /// unsigned: a stored value at or above 2^63 is above any floor and
    /// stays). `floor` is capped at `i64::MAX`.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] if the database fails; nothing is
    /// changed then.
    pub fn after_restore(
        &self,
        floor: u64,
    ) -> Result<crate::restore::RestoreReport, RelayStorageError> {
        let floor = floor.min(i64::MAX as u64);
        let floor_bits = bits(floor);
        self.run(|client, _| {
            let mut tx = client.transaction()?;
            let one_time_prekeys_deleted =
                tx.execute("DELETE FROM cubbyhole_relay_one_time_prekeys", &[])?;
            let challenges_deleted =
                tx.execute("DELETE FROM cubbyhole_relay_used_challenges", &[])?;
            tx.execute("DELETE FROM cubbyhole_relay_key", &[])?;
            let devices: i64 = tx
                .query_one("SELECT count(*) FROM cubbyhole_relay_devices", &[])?
                .try_get(0)?;
            // A negative bigint is a counter of 2^63 or more: above the floor.
            let counters_raised = tx.execute(
                "UPDATE cubbyhole_relay_devices SET counter = $1
                 WHERE counter >= 0 AND counter < $1",
                &[&floor_bits],
            )?;
            tx.commit()?;
            Ok(crate::restore::RestoreReport {
                one_time_prekeys_deleted,
                challenges_deleted,
                devices: count(devices),
                counters_raised,
                counter_floor: floor,
            })
        })
    }

    /// Runs `op` on the connection (reconnecting first if it broke),
    /// retrying it when PostgreSQL rolled it back as a deadlock victim or
    /// for a serialization failure. `op` must do all its writes in one
    /// transaction or one statement, so that a retry starts afresh.
    fn run<T>(
        &self,
        mut op: impl FnMut(&mut Client, &Statements) -> Result<T, Failure>,
    ) -> Result<T, RelayStorageError> {
        let mut slot = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut connection = match slot.take() {
            Some(connection) if !connection.client.is_closed() => connection,
            _ => Connection::open(&self.config)?,
        };
        let mut retries = 0;
        let result = loop {
            match op(&mut connection.client, &connection.statements) {
                Ok(value) => break Ok(value),
                Err(Failure::Db(e)) if is_transient(&e) && retries < MAX_RETRIES => {
                    retries += 1;
                    thread::sleep(retry_pause(retries));
                }
                Err(Failure::Db(e)) => break Err(backend(&e)),
                Err(Failure::Corrupted(why)) => break Err(RelayStorageError::Corrupted(why)),
            }
        };
        if !connection.client.is_closed() {
            *slot = Some(connection);
        }
        result
    }
}

/// A short, growing, jittered pause before retrying a transaction.
fn retry_pause(retries: u32) -> Duration {
    let jitter = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() % 5_000_000);
    Duration::from_millis(u64::from(retries) * 2) + Duration::from_nanos(u64::from(jitter))
}

impl RelayStorage for PostgresRelayStorage {
    fn device_list_head(
        &self,
        account: &AccountId,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        self.run(|client, _| {
            client
                .query_opt(
                    "SELECT version, body_hash, signed FROM cubbyhole_relay_device_lists
                     WHERE account_id = $1 ORDER BY version DESC LIMIT 1",
                    &[&&account.0[..]],
                )?
                .map(|row| stored_list(&row))
                .transpose()
        })
    }

    fn device_list_version(
        &self,
        account: &AccountId,
        version: u64,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        let Ok(version) = i64::try_from(version) else {
            return Ok(None);
        };
        self.run(|client, _| {
            client
                .query_opt(
                    "SELECT version, body_hash, signed FROM cubbyhole_relay_device_lists
                     WHERE account_id = $1 AND version = $2",
                    &[&&account.0[..], &version],
                )?
                .map(|row| stored_list(&row))
                .transpose()
        })
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
        self.run(|client, _| {
            client
                .query(
                    "SELECT version, body_hash, signed FROM cubbyhole_relay_device_lists
                     WHERE account_id = $1 AND version > $2 ORDER BY version LIMIT $3",
                    &[&&account.0[..], &after, &i64::from(limit)],
                )?
                .iter()
                .map(stored_list)
                .collect()
        })
    }

    fn append_device_list(
        &mut self,
        account: &AccountId,
        list: &StoredDeviceList,
        previous: &[u8; 32],
        retain: u32,
    ) -> Result<AppendOutcome, RelayStorageError> {
        let version = i64::try_from(list.version)
            .map_err(|_| RelayStorageError::Backend("device list version out of range".into()))?;
        let account_key = &account.0[..];
        self.run(|client, _| {
            let mut tx = client.transaction()?;
            // One writer per account at a time (also for a first version,
            // which has no row to lock): the head read below is the head
            // the insert extends. The primary key backs it up.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCK_DEVICE_LIST, &account_lock_key(account)],
            )?;
            let head = tx.query_opt(
                "SELECT version, body_hash FROM cubbyhole_relay_device_lists
                 WHERE account_id = $1 ORDER BY version DESC LIMIT 1",
                &[&account_key],
            )?;
            let extends = match &head {
                None => version == 1,
                Some(row) => {
                    let v: i64 = row.try_get(0)?;
                    let hash: &[u8] = row.try_get(1)?;
                    version != 1 && v == version - 1 && hash == &previous[..]
                }
            };
            if !extends {
                return Ok(AppendOutcome::HeadMoved);
            }
            let inserted = tx.execute(
                "INSERT INTO cubbyhole_relay_device_lists (account_id, version, body_hash, signed)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&account_key, &version, &&list.body_hash[..], &list.signed],
            )?;
            if inserted == 0 {
                return Ok(AppendOutcome::HeadMoved);
            }
            tx.execute(
                "DELETE FROM cubbyhole_relay_device_lists WHERE account_id = $1 AND version <= $2",
                &[&account_key, &(version - i64::from(retain.max(1)))],
            )?;
            tx.commit()?;
            Ok(AppendOutcome::Appended)
        })
    }

    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError> {
        let device = *device;
        self.run(|client, st| {
            client
                .query_opt(
                    &st.device,
                    &[&&device.identity[..], &i64::from(device.device_id)],
                )?
                .map(|row| device_record(&row))
                .transpose()
        })
    }

    fn mailbox_owner(
        &self,
        mailbox: &MailboxId,
    ) -> Result<Option<DeviceRecord>, RelayStorageError> {
        self.run(|client, st| {
            client
                .query_opt(&st.mailbox_owner, &[&&mailbox.0[..]])?
                .map(|row| device_record(&row))
                .transpose()
        })
    }

    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError> {
        self.run(|client, st| {
            Ok(client
                .query_one(&st.mailbox_exists, &[&&mailbox.0[..]])?
                .try_get(0)?)
        })
    }

    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError> {
        let device = &upload.device;
        let identity = &device.identity[..];
        let device_id = i64::from(device.device_id);
        let mailbox = device.mailbox();
        let spk = &upload.signed_prekey;
        let key_ids: Vec<i64> = upload
            .one_time_prekeys
            .iter()
            .map(|(id, _)| i64::from(*id))
            .collect();
        let keys: Vec<&[u8]> = upload
            .one_time_prekeys
            .iter()
            .map(|(_, key)| &key[..])
            .collect();
        let new_access: Option<&[u8]> = upload.access_verifier.as_ref().map(|v| &v.0[..]);
        self.run(|client, st| {
            let mut tx = client.transaction()?;
            // A new device's row is inserted (and locked) at once, with the
            // upload's verifier; a concurrent first upload of the same
            // device waits for this transaction, then finds the row.
            let inserted = tx.execute(
                &st.insert_device,
                &[
                    &identity,
                    &device_id,
                    &&mailbox.0[..],
                    &bits(upload.counter),
                    &i64::from(spk.id),
                    &bits(spk.created),
                    &&spk.public[..],
                    &&spk.signature[..],
                    &time(published_at),
                    &new_access,
                ],
            )?;
            if inserted == 0 {
                let row = tx.query_one(&st.lock_device, &[&identity, &device_id])?;
                let stored: i64 = row.try_get(0)?;
                if upload.counter <= unbits(stored) {
                    // Dropping the transaction rolls it back.
                    return Ok(UploadOutcome::Replayed);
                }
                // A new verifier rotates; none (or the same) keeps.
                let mut access: Option<&[u8]> = row.try_get(1)?;
                let mut previous: Option<&[u8]> = row.try_get(2)?;
                let mut changed_at: i64 = row.try_get(3)?;
                if new_access.is_some() && new_access != access {
                    previous = access;
                    access = new_access;
                    changed_at = time(published_at);
                }
                tx.execute(
                    &st.update_device,
                    &[
                        &identity,
                        &device_id,
                        &bits(upload.counter),
                        &i64::from(spk.id),
                        &bits(spk.created),
                        &&spk.public[..],
                        &&spk.signature[..],
                        &time(published_at),
                        &access,
                        &previous,
                        &changed_at,
                    ],
                )?;
            }
            if upload.replace_one_time_prekeys {
                tx.execute(&st.clear_pool, &[&identity, &device_id])?;
            }
            if !key_ids.is_empty() {
                tx.execute(&st.extend_pool, &[&identity, &device_id, &key_ids, &keys])?;
            }
            let pooled: i64 = tx
                .query_one(&st.pool_count, &[&identity, &device_id])?
                .try_get(0)?;
            if count(pooled) > u64::from(max_one_time_prekeys) {
                return Ok(UploadOutcome::TooManyOneTimePrekeys);
            }
            tx.commit()?;
            Ok(UploadOutcome::Applied)
        })
    }

    fn claim_one_time_prekey(
        &mut self,
        device: &DeviceAddress,
        budget: Option<ClaimBudget>,
    ) -> Result<ClaimOutcome, RelayStorageError> {
        let identity = &device.identity[..];
        let device_id = i64::from(device.device_id);
        self.run(|client, st| {
            let mut tx = client.transaction()?;
            // Exclusive with uploads and other claims of this device: the
            // pool and the claim time do not change under us.
            let Some(row) = tx.query_opt(&st.lock_claims, &[&identity, &device_id])? else {
                return Ok(ClaimOutcome::Empty);
            };
            let claimed_until: i64 = row.try_get(0)?;
            let next = match budget {
                Some(budget) => match budget.admit(unbits(claimed_until)) {
                    Some(next) => Some(next),
                    None => return Ok(ClaimOutcome::Limited),
                },
                None => None,
            };
            let Some(row) = tx.query_opt(&st.claim, &[&identity, &device_id])? else {
                return Ok(ClaimOutcome::Empty);
            };
            let claimed = ClaimOutcome::Claimed(
                small(row.try_get(0)?, "one-time prekey id")?,
                fixed(row.try_get(1)?, "one-time prekey")?,
            );
            if let Some(next) = next {
                tx.execute(&st.set_claimed_until, &[&identity, &device_id, &bits(next)])?;
            }
            tx.commit()?;
            Ok(claimed)
        })
    }

    fn one_time_prekey_count(&self, device: &DeviceAddress) -> Result<u32, RelayStorageError> {
        let identity = &device.identity[..];
        let device_id = i64::from(device.device_id);
        self.run(|client, st| {
            let n: i64 = client
                .query_one(&st.pool_count, &[&identity, &device_id])?
                .try_get(0)?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    /// A batch of one: the rules and the statements are those of
    /// [`insert_envelopes`](RelayStorage::insert_envelopes).
    fn insert_envelope(
        &mut self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        let batch = [(*mailbox, envelope.clone(), share)];
        let outcome = self.insert_envelopes(&batch, received_at, limits)?;
        outcome
            .into_iter()
            .next()
            .ok_or_else(|| RelayStorageError::Corrupted("a batch of one gave no outcome".into()))
    }

    /// One transaction for the batch (group commit), with a fixed number of
    /// statements whatever its size: the advisory locks of its mailboxes
    /// (taken in key order, so that processes depositing overlapping
    /// batches cannot deadlock), their expiry and usage, the batch's ids
    /// already pending or acknowledged, then the checks in batch order (as
    /// [`insert_envelope`](RelayStorage::insert_envelope) one by one would
    /// make them, counting the batch's own earlier envelopes), one insert
    /// and one notification per mailbox that got an envelope.
    fn insert_envelopes(
        &mut self,
        batch: &[(MailboxId, Envelope, Share)],
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<Vec<InsertOutcome>, RelayStorageError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut mailboxes: Vec<MailboxId> = batch.iter().map(|(m, ..)| *m).collect();
        mailboxes.sort_unstable_by_key(|m| m.0);
        mailboxes.dedup();
        let mut keys: Vec<i32> = mailboxes.iter().map(lock_key).collect();
        keys.sort_unstable();
        keys.dedup();
        let mailbox_list: Vec<&[u8]> = mailboxes.iter().map(|m| &m.0[..]).collect();
        let batch_mailboxes: Vec<&[u8]> = batch.iter().map(|(m, ..)| &m.0[..]).collect();
        let batch_ids: Vec<&[u8]> = batch.iter().map(|(_, e, _)| &e.id.0[..]).collect();
        let cutoff = time(limits.expire_before);
        self.run(|client, st| {
            let mut tx = client.transaction()?;
            for key in &keys {
                tx.execute(&st.lock_mailbox, &[key])?;
            }
            tx.execute(&st.expire_mailboxes, &[&mailbox_list, &cutoff])?;
            // Per mailbox and share: (envelopes, bytes), contacts first.
            let mut usage: HashMap<MailboxId, [(u64, u64); 2]> = HashMap::new();
            for row in tx.query(&st.usage_of_mailboxes, &[&mailbox_list])? {
                let mailbox = MailboxId(fixed(row.try_get(0)?, "mailbox id")?);
                let all = usage_row(&row, 1)?;
                let contacts = (
                    all.envelopes.saturating_sub(all.stranger_envelopes),
                    all.bytes.saturating_sub(all.stranger_bytes),
                );
                let strangers = (all.stranger_envelopes, all.stranger_bytes);
                usage.insert(mailbox, [contacts, strangers]);
            }
            let mut seen: HashSet<(MailboxId, EnvelopeId)> = HashSet::new();
            for row in tx.query(&st.batch_duplicates, &[&batch_mailboxes, &batch_ids])? {
                seen.insert((
                    MailboxId(fixed(row.try_get(0)?, "mailbox id")?),
                    EnvelopeId(fixed(row.try_get(1)?, "envelope id")?),
                ));
            }
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut stored_mailboxes = Vec::new();
            let mut ids = Vec::new();
            let mut sizes = Vec::new();
            let mut payloads = Vec::new();
            let mut shares = Vec::new();
            let mut notices = Vec::new();
            let mut notified = HashSet::new();
            for (mailbox, envelope, share) in batch {
                let size = envelope.payload.len() as u64;
                // Each share against its own bounds.
                let (slot, max_envelopes, max_bytes) = match share {
                    Share::Contacts => (0, limits.max_envelopes, limits.max_bytes),
                    Share::Strangers => {
                        (1, limits.max_stranger_envelopes, limits.max_stranger_bytes)
                    }
                };
                let (envelopes, bytes) = &mut usage.entry(*mailbox).or_default()[slot];
                let outcome = if seen.contains(&(*mailbox, envelope.id)) {
                    InsertOutcome::Duplicate
                } else if *envelopes >= u64::from(max_envelopes) {
                    InsertOutcome::TooManyEnvelopes
                } else if bytes.saturating_add(size) > max_bytes {
                    InsertOutcome::TooManyBytes
                } else {
                    *envelopes += 1;
                    *bytes = bytes.saturating_add(size);
                    seen.insert((*mailbox, envelope.id));
                    if notified.insert(*mailbox) {
                        notices.push(hex::encode(mailbox.0));
                    }
                    stored_mailboxes.push(&mailbox.0[..]);
                    ids.push(&envelope.id.0[..]);
                    sizes.push(time(size));
                    payloads.push(&envelope.payload[..]);
                    shares.push(share_code(*share));
                    InsertOutcome::Stored
                };
                outcomes.push(outcome);
            }
            if !ids.is_empty() {
                tx.execute(
                    &st.insert_batch,
                    &[
                        &stored_mailboxes,
                        &ids,
                        &sizes,
                        &payloads,
                        &time(received_at),
                        &shares,
                    ],
                )?;
                // Delivered on commit, once per mailbox.
                tx.query(&st.notify_batch, &[&notices])?;
            }
            // Commits the expiry too, whatever the outcomes.
            tx.commit()?;
            Ok(outcomes)
        })
    }

    fn list_envelopes(
        &self,
        mailbox: &MailboxId,
        received_since: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>, RelayStorageError> {
        let mailbox = &mailbox.0[..];
        self.run(|client, st| {
            let rows = client.query(
                &st.list_envelopes,
                &[
                    &mailbox,
                    &time(received_since),
                    &i64::from(limit),
                    &time(max_bytes),
                ],
            )?;
            rows.iter()
                .map(|row| {
                    Ok(Envelope {
                        id: EnvelopeId(fixed(row.try_get(0)?, "envelope id")?),
                        payload: row.try_get(1)?,
                    })
                })
                .collect()
        })
    }

    fn mailbox_usage(&self, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError> {
        let mailbox = &mailbox.0[..];
        self.run(|client, st| {
            let row = client.query_one(&st.usage, &[&mailbox])?;
            usage_row(&row, 0)
        })
    }

    fn acknowledge_envelopes(
        &mut self,
        mailbox: &MailboxId,
        ids: &[EnvelopeId],
    ) -> Result<u64, RelayStorageError> {
        let mailbox = &mailbox.0[..];
        let ids: Vec<&[u8]> = ids.iter().map(|id| &id.0[..]).collect();
        // One statement: deletes and remembers the ids together.
        self.run(|client, st| {
            let deleted: i64 = client
                .query_one(&st.acknowledge, &[&mailbox, &ids])?
                .try_get(0)?;
            Ok(count(deleted))
        })
    }

    fn expire_envelopes(&mut self, received_before: u64) -> Result<u64, RelayStorageError> {
        let cutoff = time(received_before);
        self.run(|client, st| Ok(client.execute(&st.expire_all, &[&cutoff])?))
    }

    fn expire_inactive(
        &mut self,
        seen_before: u64,
        received_before: u64,
    ) -> Result<u64, RelayStorageError> {
        let (seen_before, received_before) = (time(seen_before), time(received_before));
        self.run(|client, st| {
            Ok(client.execute(&st.expire_inactive, &[&seen_before, &received_before])?)
        })
    }

    fn expire_devices(&mut self, seen_before: u64) -> Result<u64, RelayStorageError> {
        let seen_before = time(seen_before);
        self.run(|client, st| {
            let expired: i64 = client
                .query_one(&st.expire_devices, &[&seen_before])?
                .try_get(0)?;
            Ok(count(expired))
        })
    }

    fn relay_key(
        &mut self,
        fresh: Option<&RelayKey>,
    ) -> Result<Option<RelayKey>, RelayStorageError> {
        self.run(|client, st| {
            if let Some(fresh) = fresh {
                // Of concurrent first calls, one inserts; all read it.
                client.execute(&st.insert_key, &[&&fresh.as_bytes()[..]])?;
            }
            match client.query_opt(&st.key, &[])? {
                None => Ok(None),
                // Borrowed from the row: no copy of the key is left behind
                // but the one returned (wiped when dropped).
                Some(row) => Ok(Some(RelayKey::from_bytes(fixed(
                    row.try_get::<_, &[u8]>(0)?,
                    "the relay key",
                )?))),
            }
        })
    }

    fn consume_challenge(
        &mut self,
        mailbox: &MailboxId,
        challenge: &[u8; 32],
        now: u64,
        expires_at: u64,
    ) -> Result<bool, RelayStorageError> {
        let mailbox = &mailbox.0[..];
        let challenge = &challenge[..];
        self.run(|client, st| {
            let mut tx = client.transaction()?;
            tx.execute(&st.expire_used, &[&mailbox, &time(now)])?;
            // Of concurrent uses, one inserts the row.
            let recorded = tx.execute(
                &st.use_challenge,
                &[&mailbox, &challenge, &time(expires_at)],
            )?;
            if recorded == 1 {
                // The owner proved itself: seen now (never earlier).
                tx.execute(&st.owner_seen, &[&mailbox, &time(now)])?;
            }
            tx.commit()?;
            Ok(recorded == 1)
        })
    }

    fn purge_challenges(&mut self, now: u64) -> Result<u64, RelayStorageError> {
        let now = time(now);
        self.run(|client, st| Ok(client.execute(&st.purge_challenges, &[&now])?))
    }
}

// ----------------------------------------------------------- listener

/// Starts a background thread that listens on [`DEPOSIT_CHANNEL`] over its
/// own connection to `url` and calls `on_deposit` with the mailbox of each
/// committed deposit, made through any [`PostgresRelayStorage`] on that
/// database (this process's included). Notifications whose payload is not
/// a mailbox id are ignored; a panic in `on_deposit` is caught and logged.
///
/// The first connection is made (and `LISTEN` issued) before this returns,
/// so every deposit committed afterwards is seen, as long as the connection
/// holds. When it breaks (it is checked every 30 s when idle), the thread
/// reconnects with exponential backoff (0.1 s doubling up to 30 s), logging
/// through `tracing`. Deposits committed while it is disconnected are
/// **not** reported: treat a call as a hint to look at the mailbox, and
/// have waiters re-check it on their own now and then.
///
/// The thread runs for the rest of the process. Call this from a plain
/// thread (or `spawn_blocking`), not an async worker.
///
/// # Errors
/// [`RelayStorageError::Backend`] if the string is malformed, the first
/// connection or `LISTEN` fails, or the thread cannot be started.
pub fn spawn_listener(
    url: &str,
    on_deposit: impl Fn(MailboxId) + Send + Sync + 'static,
) -> Result<(), RelayStorageError> {
    let config = parse_config(url)?;
    let client = listen(&config).map_err(|e| backend(&e))?;
    thread::Builder::new()
        .name("cubbyhole-relay-listen".into())
        .spawn(move || listen_forever(&config, client, &on_deposit))
        .map_err(|e| {
            RelayStorageError::Backend(format!("cannot start the listener thread: {e}"))
        })?;
    Ok(())
}

fn listen(config: &Config) -> Result<Client, postgres::Error> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!("LISTEN {DEPOSIT_CHANNEL}"))?;
    Ok(client)
}

fn listen_forever(config: &Config, mut client: Client, on_deposit: &dyn Fn(MailboxId)) {
    loop {
        let why = deliver_until_broken(&mut client, on_deposit);
        tracing::warn!(error = %why, "deposit listener lost its PostgreSQL connection");
        client = reconnect(config);
        tracing::info!("deposit listener reconnected");
    }
}

/// Delivers notifications until the connection breaks; returns why.
fn deliver_until_broken(client: &mut Client, on_deposit: &dyn Fn(MailboxId)) -> String {
    loop {
        {
            let mut notifications = client.notifications();
            // Ends after LISTEN_IDLE_CHECK without a notification, or when
            // the connection closed.
            let mut pending = notifications.timeout_iter(LISTEN_IDLE_CHECK);
            loop {
                match pending.next() {
                    Ok(Some(notification)) => {
                        if notification.channel() == DEPOSIT_CHANNEL {
                            deliver(notification.payload(), on_deposit);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return describe(&e),
                }
            }
        }
        if client.is_closed() {
            return "connection closed".into();
        }
        if let Err(e) = client.is_valid(LISTEN_PING_TIMEOUT) {
            return describe(&e);
        }
    }
}

fn deliver(payload: &str, on_deposit: &dyn Fn(MailboxId)) {
    let mut mailbox = [0u8; 32];
    if hex::decode_to_slice(payload, &mut mailbox).is_err() {
        tracing::debug!("ignoring a malformed deposit notification");
        return;
    }
    if catch_unwind(AssertUnwindSafe(|| on_deposit(MailboxId(mailbox)))).is_err() {
        tracing::error!("the deposit callback panicked");
    }
}

fn reconnect(config: &Config) -> Client {
    let mut pause = RECONNECT_MIN;
    loop {
        thread::sleep(pause);
        match listen(config) {
            Ok(client) => return client,
            Err(e) => {
                pause = (pause * 2).min(RECONNECT_MAX);
                tracing::warn!(
                    error = %describe(&e),
                    retry_in = ?pause,
                    "deposit listener cannot reconnect"
                );
            }
        }
    }
}
