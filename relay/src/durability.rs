//! What a server on a SQLite file runs beside the writer, so that the
//! writer's commits neither wait for the disk ([`WalSync`]) nor copy the
//! write-ahead log into the database ([`SqliteCheckpointer`]). Both work on
//! their own handles to the files of a [`SqliteRelayStorage`] (its
//! [`path`](SqliteRelayStorage::path)), after switching the storage's
//! connection over with
//! [`defer_log_flush`](SqliteRelayStorage::defer_log_flush) and
//! [`defer_checkpoints`](SqliteRelayStorage::defer_checkpoints).

use std::time::Duration;

use cubbyhole::relay::{RelayStorageError, SqliteRelayStorage};
use rusqlite::Connection;

fn backend(what: &str) -> impl Fn(rusqlite::Error) -> RelayStorageError + '_ {
    move |e| RelayStorageError::Backend(format!("{what}: {e}"))
}

/// A second connection to a relay database that copies its write-ahead log
/// into the database file ([`SqliteCheckpointer::checkpoint`]) off the
/// writer's commit path.
///
/// SQLite's default is that the connection whose commit makes the log
/// longer than 1000 pages checkpoints it there and then: that commit (a
/// batch of deposits waiting for its answer) then also reads and writes
/// every page of the log and syncs the database file. A server that opens a
/// checkpointer ([`SqliteCheckpointer::open`]) and runs
/// [`SqliteCheckpointer::checkpoint`] every few tens of milliseconds on
/// another thread keeps that work out of the commits; the writer only
/// checkpoints itself past a much longer log (8192 pages), as a backstop.
/// A checkpoint never loses a commit: the log stays the durable copy until
/// its frames are in the (synced) database file.
#[derive(Debug)]
pub(crate) struct SqliteCheckpointer {
    conn: Connection,
}

/// What one [`SqliteCheckpointer::checkpoint`] found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CheckpointReport {
    /// Frames in the write-ahead log.
    pub(crate) log_frames: u64,
    /// Frames of it now in the database file.
    pub(crate) checkpointed_frames: u64,
}

impl SqliteCheckpointer {
    /// A checkpointer for the storage's database (`None` in memory, which
    /// has no log), and from now on the storage's connection checkpoints
    /// in its own commits only as a backstop: run
    /// [`checkpoint`](Self::checkpoint) regularly (the relay server does
    /// every 50 ms).
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] if the second connection cannot be
    /// opened (then nothing changed).
    pub(crate) fn open(
        storage: &mut SqliteRelayStorage,
    ) -> Result<Option<SqliteCheckpointer>, RelayStorageError> {
        let Some(path) = storage.path() else {
            return Ok(None);
        };
        let conn = Connection::open(path).map_err(backend("checkpointer"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(backend("checkpointer"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend("checkpointer"))?;
        storage.defer_checkpoints()?;
        Ok(Some(SqliteCheckpointer { conn }))
    }

    /// Copies what it can of the write-ahead log into the database without
    /// waiting for or blocking the writer (a `PASSIVE` checkpoint).
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`].
    pub(crate) fn checkpoint(&self) -> Result<CheckpointReport, RelayStorageError> {
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok(CheckpointReport {
                    log_frames: count(r.get(1)?),
                    checkpointed_frames: count(r.get(2)?),
                })
            })
            .map_err(backend("checkpoint"))
    }
}

/// Makes the commits of a relay database durable from another thread, so
/// that the writer does not wait for the disk.
///
/// After [`WalSync::open`], the writer's commits are written to the
/// write-ahead log without waiting for it to reach the disk
/// (`synchronous = NORMAL`: still durable across a crash of the process,
/// such as `kill -9`), and [`WalSync::sync`] makes every commit made before
/// it durable across a power loss too: it flushes the log file
/// (`fdatasync`), which is what a `synchronous = FULL` commit does before
/// it returns. A server answers a call only after a `sync` that started
/// after the call's commit; one `sync` covers every commit before it, so
/// the writer can go on with the next group of calls while the disk works
/// (pipelined group commit).
///
/// SQLite keeps the log file (it truncates it in place, never replaces it)
/// while the database has an open connection, so the file opened here
/// stays the log as long as the storage is open.
#[derive(Debug)]
pub(crate) struct WalSync {
    log: std::fs::File,
}

impl WalSync {
    /// A `WalSync` for the storage's database (`None` in memory), and from
    /// now on the storage's commits do not wait for the disk: the caller
    /// must [`sync`](Self::sync) after a commit and before it reports the
    /// commit as durable.
    ///
    /// # Errors
    /// [`RelayStorageError::Backend`] if the log file cannot be opened
    /// (then nothing changed).
    pub(crate) fn open(
        storage: &mut SqliteRelayStorage,
    ) -> Result<Option<WalSync>, RelayStorageError> {
        let Some(path) = storage.path() else {
            return Ok(None);
        };
        let mut log = path.as_os_str().to_owned();
        log.push("-wal");
        // Opened before the switch, so that a failure changes nothing.
        let log = std::fs::File::open(&log)
            .map_err(|e| RelayStorageError::Backend(format!("write-ahead log: {e}")))?;
        storage.defer_log_flush()?;
        Ok(Some(WalSync { log }))
    }

    /// Flushes the write-ahead log to the disk: every commit made before
    /// this call is then durable across a power loss.
    ///
    /// # Errors
    /// The I/O error (then the commits may not be durable: do not answer
    /// them as stored).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use cubbyhole::relay::{InsertOutcome, MailboxLimits, RelayStorage, Share};
    use cubbyhole::transport::{Envelope, EnvelopeId, MailboxId};

    use super::*;

    const NOW: u64 = 1_800_000_000;
    const MAILBOX: MailboxId = MailboxId([7; 32]);
    const LIMITS: MailboxLimits = MailboxLimits {
        max_envelopes: 1_000,
        max_bytes: 1 << 24,
        max_stranger_envelopes: 0,
        max_stranger_bytes: 0,
        expire_before: 0,
    };

    /// A fresh path in the temp dir, removed (with its WAL files) on drop.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(name: &str) -> Self {
            TempDb(std::env::temp_dir().join(format!(
                "cubbyhole-relay-durability-{name}-{}.db",
                std::process::id()
            )))
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = self.0.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn envelope(n: u8, len: usize) -> Envelope {
        Envelope {
            id: EnvelopeId([n; 16]),
            payload: vec![n; len],
        }
    }

    fn store(storage: &mut SqliteRelayStorage, envelope: &Envelope) {
        assert_eq!(
            storage
                .insert_envelope(&MAILBOX, envelope, Share::Contacts, NOW, LIMITS)
                .unwrap(),
            InsertOutcome::Stored
        );
    }

    #[test]
    fn checkpointer_copies_the_log_beside_the_writer() {
        let mut memory = SqliteRelayStorage::open_in_memory().unwrap();
        assert!(SqliteCheckpointer::open(&mut memory).unwrap().is_none());
        let db = TempDb::new("checkpoint");
        let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
        let checkpointer = SqliteCheckpointer::open(&mut storage).unwrap().unwrap();
        // The checkpointer runs on its own thread while the writer commits.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoints = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut copied = 0;
                loop {
                    // One more after the stop: the writer is done by then.
                    let last = stop.load(std::sync::atomic::Ordering::SeqCst);
                    let report = checkpointer.checkpoint().unwrap();
                    assert!(report.checkpointed_frames <= report.log_frames);
                    copied = copied.max(report.checkpointed_frames);
                    if last {
                        return copied;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let sent: Vec<_> = (0..=255u8)
            .map(|i| envelope(i, 1000 + usize::from(i)))
            .collect();
        for e in &sent {
            store(&mut storage, e);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(checkpoints.join().unwrap() > 0, "nothing was checkpointed");
        drop(storage);
        // Every committed envelope is there after reopening, in order.
        let storage = SqliteRelayStorage::open(&db.0).unwrap();
        assert_eq!(
            storage
                .list_envelopes(&MAILBOX, 0, 1_000, u64::MAX)
                .unwrap(),
            sent
        );
    }

    #[test]
    fn wal_sync_flushes_the_log_of_a_file() {
        let mut memory = SqliteRelayStorage::open_in_memory().unwrap();
        assert!(WalSync::open(&mut memory).unwrap().is_none());
        let db = TempDb::new("walsync");
        let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
        let wal = WalSync::open(&mut storage)
            .unwrap()
            .expect("a file has a log");
        for n in 1..=3 {
            store(&mut storage, &envelope(n, 10));
            wal.sync().unwrap();
        }
        drop(storage);
        // The log is flushed from its own file handle, which outlives the
        // storage harmlessly.
        wal.sync().unwrap();
        let storage = SqliteRelayStorage::open(&db.0).unwrap();
        assert_eq!(
            storage.list_envelopes(&MAILBOX, 0, 10, u64::MAX).unwrap(),
            vec![envelope(1, 10), envelope(2, 10), envelope(3, 10)]
        );
    }
}
