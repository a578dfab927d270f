//! The step to run once after restoring a relay database from a backup.
//!
//! A backup is older than the database it replaces, and two of the relay's
//! guarantees depend on state that only ever moves forward:
//!
//! - **One-time prekeys are handed out once.** A prekey claimed after the
//!   backup was deleted from the live database, and its owner may already
//!   have used and deleted its private half. The restored database has it
//!   again: the relay would hand it out a second time (two senders sharing
//!   one one-time prekey), or hand out a key whose private half is gone (a
//!   session the owner's device cannot accept).
//! - **Upload counters only go up.** The relay refuses an upload whose
//!   counter is not above the device's last accepted one, so nobody can
//!   replay an old upload to roll back a signed prekey or re-add handed-out
//!   one-time prekeys. The restored database has the counters of the backup:
//!   an upload made between the backup and the restore, if someone kept
//!   its bytes, would be accepted again.
//!
//! A third is closed on the way: **a challenge is used once.** The relay
//! records the challenges used since the backup only in the live database
//! (SPEC.md 16.4), so the step also deletes the relay key: the next
//! challenge makes a new one, and every challenge issued before the
//! restore, used or not, is refused.
//!
//! [`after_restore`] closes them in one transaction: it deletes every
//! one-time prekey, every record of a used challenge and the relay key,
//! and raises every
//! device's stored counter to at least a floor, **the time of the restore
//! plus a margin** (default [`DEFAULT_COUNTER_MARGIN_SECS`]). Clients take
//! `max(last counter, now) + 1` as an upload's counter (SPEC.md 17.2), so
//! every upload made before the restore by a device whose clock was at
//! most the margin ahead has a counter at or below the floor and is
//! refused as `replayed`; a device's next upload is accepted once its
//! clock passes the floor, that is at most the margin after the restore
//! for a device with a correct clock (until then its uploads are refused
//! and its client retries at its next prekey maintenance, SPEC.md 17.2).
//!
//! Devices notice the empty pool the next time they maintain their
//! prekeys (`one_time_prekeys_left` is below their refill threshold) and
//! upload fresh one-time prekeys with their current signed prekey; until
//! then senders get bundles without a one-time prekey (X3DH without the
//! fourth DH, as the protocol allows when a pool is empty).
//!
//! The binary runs it as `cubbyhole-relay after-restore`; see the crate
//! README ("Backup and restore") for the whole procedure.

use std::path::Path;

use cubbyhole::relay::SqliteRelayStorage;

use crate::server::lock_database;
use crate::{ServerError, StorageConfig};

/// Default margin added to the time of the restore to make the counter
/// floor: one hour. It covers devices whose clock is up to an hour ahead;
/// a device with a correct clock cannot upload for that long after the
/// restore.
pub const DEFAULT_COUNTER_MARGIN_SECS: u64 = 3_600;

/// What [`after_restore`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    /// One-time prekeys deleted (all of them).
    pub one_time_prekeys_deleted: u64,
    /// Records of used mailbox challenges deleted (all of them; the relay
    /// key goes with them, so every challenge issued before is refused).
    pub challenges_deleted: u64,
    /// Devices in the database.
    pub devices: u64,
    /// Devices whose stored upload counter was below the floor and was
    /// raised to it.
    pub counters_raised: u64,
    /// The floor: every device's next accepted upload has a counter above
    /// it.
    pub counter_floor: u64,
}

/// Runs the after-restore step ([module docs](self)) on the database of
/// `storage`, with the counter floor `now + margin_secs` (`now` in unix
/// seconds). Run it once, after restoring and before starting any relay on
/// the database; running it again only deletes the one-time prekeys
/// uploaded since (harmless: devices upload new ones) and raises the floor.
///
/// On a SQLite file it takes the database's lock first (as [`crate::serve`]
/// does), so it refuses to run while a relay serves the file. PostgreSQL
/// has no such lock: stop every relay process sharing the database first.
/// This call blocks (do not call it on an async worker).
///
/// # Errors
/// [`ServerError::Config`] for SQLite in memory (there is nothing to
/// restore), [`ServerError::DatabaseInUse`] if a relay holds the SQLite
/// database, [`ServerError::Storage`] if it cannot be opened or written
/// (nothing is changed then), [`ServerError::PostgresNotCompiled`] or
/// [`ServerError::Postgres`] for PostgreSQL.
pub fn after_restore(
    storage: &StorageConfig,
    now: u64,
    margin_secs: u64,
) -> Result<RestoreReport, ServerError> {
    let floor = now.saturating_add(margin_secs).min(i64::MAX as u64);
    match storage {
        StorageConfig::SqliteMemory => Err(ServerError::Config(
            "an in-memory database has no backup to restore".into(),
        )),
        StorageConfig::Sqlite(path) => {
            let _lock = lock_database(path)?;
            sqlite_after_restore(path, floor)
        }
        #[cfg(feature = "postgres")]
        StorageConfig::Postgres(url) => crate::postgres::PostgresRelayStorage::connect(url)
            .and_then(|storage| storage.after_restore(floor))
            .map_err(|e| ServerError::Postgres(e.to_string())),
        #[cfg(not(feature = "postgres"))]
        StorageConfig::Postgres(_) => Err(ServerError::PostgresNotCompiled),
    }
}

fn sqlite_after_restore(path: &Path, floor: u64) -> Result<RestoreReport, ServerError> {
    if !path.exists() {
        return Err(ServerError::Config(format!(
            "the database {} does not exist",
            path.display()
        )));
    }
    // Checks that it is a relay database and brings its schema up to date.
    drop(SqliteRelayStorage::open(path)?);
    let sql = |e: rusqlite::Error| {
        ServerError::Storage(cubbyhole::relay::RelayStorageError::Backend(format!(
            "{}: {e}",
            path.display()
        )))
    };
    let mut conn = rusqlite::Connection::open(path).map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql)?;
    let one_time_prekeys_deleted = tx
        .execute("DELETE FROM one_time_prekeys", [])
        .map_err(sql)?;
    let challenges_deleted = tx.execute("DELETE FROM used_challenges", []).map_err(sql)?;
    tx.execute("DELETE FROM relay_key", []).map_err(sql)?;
    let devices: i64 = tx
        .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
        .map_err(sql)?;
    // Counters are stored as the i64 with the same bits: a negative value
    // is a counter of 2^63 or more, above any floor.
    let floor_bits = i64::try_from(floor).unwrap_or(i64::MAX);
    let counters_raised = tx
        .execute(
            "UPDATE devices SET counter = ?1 WHERE counter >= 0 AND counter < ?1",
            [floor_bits],
        )
        .map_err(sql)?;
    tx.commit().map_err(sql)?;
    Ok(RestoreReport {
        one_time_prekeys_deleted: one_time_prekeys_deleted as u64,
        challenges_deleted: challenges_deleted as u64,
        devices: u64::try_from(devices).unwrap_or(0),
        counters_raised: counters_raised as u64,
        counter_floor: floor,
    })
}
