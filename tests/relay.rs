//! The relay's rules, against every storage backend: signed and
//! counter-protected publishing, one-time prekeys handed out once, mailbox
//! proofs over fresh single-use challenges, idempotent deposits, bounds,
//! retention, and (SQLite) persistence across reopening.
//!
//! The generic bodies are in `relay_suite/mod.rs`, shared with the relay
//! crate's PostgreSQL tests.

#[macro_use]
#[path = "relay_suite/mod.rs"]
mod relay_suite;

use cubbyhole::relay::{MemoryRelayStorage, RelayConfig};
use cubbyhole::transport::DepositPass;
use relay_suite::*;

all_tests!(memory, MemoryRelayStorage::new());

#[cfg(feature = "sqlite")]
all_tests!(
    sqlite,
    cubbyhole::relay::SqliteRelayStorage::open_in_memory().unwrap()
);

#[test]
fn default_bounds_are_the_documented_ones() {
    let c = RelayConfig::unpriced();
    assert_eq!(c.max_envelope_bytes, 256 * 1024);
    assert_eq!(c.max_pending_envelopes, 10_000);
    assert_eq!(c.max_pending_bytes, 64 * 1024 * 1024);
    assert_eq!(c.max_one_time_prekeys, 1_000);
    assert_eq!(c.retention, 30 * 24 * 60 * 60);
    assert_eq!(c.challenge_ttl, 300);
    assert_eq!(c.claims_per_device_burst, 20);
    assert_eq!(c.claims_per_device_per_hour, 60);
    assert_eq!(c.max_fetch_envelopes, 1_000);
    assert_eq!(c.max_fetch_bytes, 8 * 1024 * 1024);
    assert_eq!(c.max_acknowledge_ids, 1_000);
    assert!(c.require_published_mailbox);
}

// ------------------------------------------------------ SQLite files

#[cfg(feature = "sqlite")]
mod sqlite_file {
    use super::*;
    use cubbyhole::bundle::FreshnessPolicy;
    use cubbyhole::relay::Relay;
    use cubbyhole::relay::{RelayStorageError, SqliteRelayStorage};
    use cubbyhole::transport::{EnvelopeId, MailboxAuth, MailboxOp, TransportError};
    use cubbyhole::PrekeyBundle;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// A fresh path in the temp dir, removed (with its WAL files) on drop.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let path = std::env::temp_dir().join(format!(
                "cubbyhole-relay-{name}-{}-{nanos}.db",
                std::process::id()
            ));
            TempDb(path)
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

    #[test]
    fn survives_reopen() {
        let db = TempDb::new("reopen");
        let mut rng = rng(10);
        let bob = Device::new(&mut rng, 1, 3);
        let first_upload = bob.upload(7, true);
        let challenge;
        {
            let storage = SqliteRelayStorage::open(&db.0).unwrap();
            let mut relay = Relay::new(storage, RelayConfig::unpriced());
            relay.publish(NOW, &first_upload).unwrap();
            relay.fetch_bundle(NOW, &bob.address()).unwrap();
            relay
                .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
                .unwrap();
            relay
                .deposit(
                    NOW + 1,
                    &bob.mailbox(),
                    &envelope(2, 20),
                    &DepositPass::NONE,
                )
                .unwrap();
            challenge = relay.challenge(NOW + 2, &mut rng, &bob.mailbox()).unwrap();
        }
        let storage = SqliteRelayStorage::open(&db.0).unwrap();
        let mut relay = Relay::new(storage, RelayConfig::unpriced());
        // The device record, its counter and its pool are still there.
        assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(2));
        assert_eq!(
            relay.publish(NOW, &first_upload),
            Err(TransportError::Replayed)
        );
        let bundle = PrekeyBundle::decode(&relay.fetch_bundle(NOW, &bob.address()).unwrap())
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        assert_eq!(
            bundle.one_time_prekey(),
            Some((
                bob.one_time_prekeys[1].id(),
                bob.one_time_prekeys[1].public()
            ))
        );
        // So are the envelopes, in order, and the relay key: the challenge
        // issued before the restart is good.
        let fetched = relay
            .fetch(NOW + 3, &bob.auth(MailboxOp::Fetch, challenge), 10)
            .unwrap();
        assert_eq!(fetched, vec![envelope(1, 10), envelope(2, 20)]);
        acknowledge(&mut relay, &mut rng, &bob, NOW + 4, &[EnvelopeId([1; 16])]);
        drop(relay);

        // The acknowledgment persisted too (and its id is remembered).
        let mut relay = Relay::new(
            SqliteRelayStorage::open(&db.0).unwrap(),
            RelayConfig::unpriced(),
        );
        relay
            .deposit(
                NOW + 5,
                &bob.mailbox(),
                &envelope(1, 10),
                &DepositPass::NONE,
            )
            .unwrap();
        assert_eq!(
            fetch_all(&mut relay, &mut rng, &bob, NOW + 6),
            vec![envelope(2, 20)]
        );
    }

    #[test]
    fn connections_sharing_a_file_claim_each_prekey_once() {
        let db = TempDb::new("shared");
        let mut rng = rng(11);
        let bob = Device::new(&mut rng, 1, 40);
        let mut relay = Relay::new(
            SqliteRelayStorage::open(&db.0).unwrap(),
            RelayConfig::unpriced(),
        );
        relay.publish(NOW, &bob.upload(1, true)).unwrap();
        let challenges: Vec<[u8; 32]> = (0..40)
            .map(|_| relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap())
            .collect();
        drop(relay);

        let address = bob.address();
        let auths: Vec<MailboxAuth> = challenges
            .iter()
            .map(|c| bob.auth(MailboxOp::Fetch, *c))
            .collect();
        let auths = Arc::new(auths);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let path = db.0.clone();
                let auths = Arc::clone(&auths);
                std::thread::spawn(move || {
                    let storage = SqliteRelayStorage::open(&path).unwrap();
                    let mut relay = Relay::new(storage, shared_budget());
                    let mut claimed = Vec::new();
                    let mut authorized = 0;
                    for auth in auths.iter() {
                        let bundle =
                            PrekeyBundle::decode(&relay.fetch_bundle(NOW, &address).unwrap())
                                .unwrap();
                        if let Some((id, _)) = bundle.one_time_prekey() {
                            claimed.push(id);
                        }
                        if relay.fetch(NOW, auth, 1).is_ok() {
                            authorized += 1;
                        }
                    }
                    (claimed, authorized)
                })
            })
            .collect();
        let mut all_claimed = Vec::new();
        let mut all_authorized = 0;
        for thread in threads {
            let (claimed, authorized) = thread.join().unwrap();
            all_claimed.extend(claimed);
            all_authorized += authorized;
        }
        // Every one-time prekey went out at most once, the oldest 30 (the
        // connections spent one claim budget of 30), and every challenge
        // authorized exactly one fetch.
        all_claimed.sort_unstable();
        let expected: Vec<u32> = bob.one_time_prekeys[..30].iter().map(|k| k.id()).collect();
        assert_eq!(all_claimed, expected);
        assert_eq!(all_authorized, 40);
    }

    /// A claim budget of a burst of 30 (an hour to refill).
    fn shared_budget() -> RelayConfig {
        RelayConfig {
            claims_per_device_burst: 30,
            claims_per_device_per_hour: 1,
            ..RelayConfig::unpriced()
        }
    }

    /// Two relays over one file share the relay key (the first one stored)
    /// and the record of used challenges: each accepts the other's
    /// challenges, once.
    #[test]
    fn relays_sharing_a_file_share_the_relay_key() {
        let db = TempDb::new("shared-key");
        let mut rng = rng(12);
        let bob = Device::new(&mut rng, 1, 0);
        let mut a = Relay::new(
            SqliteRelayStorage::open(&db.0).unwrap(),
            RelayConfig::unpriced(),
        );
        let mut b = Relay::new(
            SqliteRelayStorage::open(&db.0).unwrap(),
            RelayConfig::unpriced(),
        );
        a.publish(NOW, &bob.upload(1, true)).unwrap();
        let from_a = a.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
        let from_b = b.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
        for (relay, challenge) in [(&mut a, from_b), (&mut b, from_a)] {
            relay
                .fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 1)
                .unwrap();
        }
        for (relay, challenge) in [(&mut a, from_a), (&mut b, from_b)] {
            assert_eq!(
                relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 1),
                Err(TransportError::Unauthorized)
            );
        }
    }

    /// From the schema version 5 to version 4 as the previous release wrote
    /// it: no access verifiers, owner-seen times or envelope shares.
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

    /// From the schema version 4 to version 3 as the previous release wrote
    /// it: outstanding challenges, no used ones, no relay key, no claim
    /// times.
    const DOWNGRADE_4_TO_3: &str = "
        DROP TABLE used_challenges;
        DROP TABLE relay_key;
        ALTER TABLE devices DROP COLUMN claimed_until;
        CREATE TABLE challenges (
            seq INTEGER PRIMARY KEY,
            mailbox BLOB NOT NULL,
            challenge BLOB NOT NULL,
            expires_at INTEGER NOT NULL,
            UNIQUE (mailbox, challenge)
        );
        CREATE INDEX challenges_by_mailbox ON challenges (mailbox, seq);
        CREATE INDEX challenges_by_expiry ON challenges (expires_at);
        PRAGMA user_version = 3;
    ";

    /// A version-3 database (outstanding challenges stored, no claim
    /// times, no relay key) opens as version 5: its devices and pools stay,
    /// claims are budgeted from a full budget, the old challenges are gone
    /// and a relay key is made at the first challenge.
    #[test]
    fn migrates_a_version_3_database() {
        let db = TempDb::new("migrate-3");
        let mut rng = rng(13);
        let bob = Device::new(&mut rng, 1, 30);
        {
            let mut relay = Relay::new(
                SqliteRelayStorage::open(&db.0).unwrap(),
                RelayConfig::unpriced(),
            );
            relay.publish(NOW, &bob.upload(1, true)).unwrap();
        }
        {
            // Back to version 3, as the previous release wrote it, with an
            // outstanding challenge.
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            conn.execute_batch(DOWNGRADE_5_TO_4).unwrap();
            conn.execute_batch(DOWNGRADE_4_TO_3).unwrap();
            conn.execute(
                "INSERT INTO challenges (mailbox, challenge, expires_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![bob.mailbox().0, [7u8; 32], NOW as i64 + 300],
            )
            .unwrap();
        }
        let mut relay = Relay::new(
            SqliteRelayStorage::open(&db.0).unwrap(),
            RelayConfig::unpriced(),
        );
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            let version: u32 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 5);
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%challenge%'")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(tables, vec!["used_challenges".to_string()]);
            let keys: i64 = conn
                .query_row("SELECT count(*) FROM relay_key", [], |r| r.get(0))
                .unwrap();
            assert_eq!(keys, 0);
        }
        // The record and pool stayed; the budget starts full (20).
        assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(30));
        let claimed = (0..30)
            .filter(|_| {
                PrekeyBundle::decode(&relay.fetch_bundle(NOW, &bob.address()).unwrap())
                    .unwrap()
                    .one_time_prekey()
                    .is_some()
            })
            .count();
        assert_eq!(claimed, 20);
        // The old challenge is refused; new ones work.
        assert_eq!(
            relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, [7; 32]), 1),
            Err(TransportError::Unauthorized)
        );
        fetch_all(&mut relay, &mut rng, &bob, NOW);
    }

    #[test]
    fn refuses_foreign_or_newer_databases() {
        let db = TempDb::new("foreign");
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            conn.execute_batch("CREATE TABLE t (x INTEGER);").unwrap();
        }
        assert!(matches!(
            SqliteRelayStorage::open(&db.0),
            Err(RelayStorageError::Corrupted(_))
        ));

        let db = TempDb::new("newer");
        drop(SqliteRelayStorage::open(&db.0).unwrap());
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            conn.pragma_update(None, "user_version", 6).unwrap();
        }
        assert!(matches!(
            SqliteRelayStorage::open(&db.0),
            Err(RelayStorageError::UnsupportedSchema(6))
        ));
    }

    /// A relay database (its application id) whose schema version is 0,
    /// or any version this build does not know below its own, is
    /// `Corrupted`, not a newer schema: only a version above the current
    /// one is `UnsupportedSchema`.
    #[test]
    fn a_relay_database_with_version_0_is_corrupted_not_newer() {
        let db = TempDb::new("version0");
        drop(SqliteRelayStorage::open(&db.0).unwrap());
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            conn.pragma_update(None, "user_version", 0).unwrap();
        }
        let r = SqliteRelayStorage::open(&db.0);
        assert!(
            matches!(r, Err(RelayStorageError::Corrupted(_))),
            "{:?}",
            r.err()
        );
    }

    /// After `defer_checkpoints` the storage's own commits leave the
    /// write-ahead log to the caller up to 8192 pages: 8 MiB of deposits
    /// (about 2000 pages) grow the log past SQLite's default 1000-page
    /// autocheckpoint, which would have reset it at about 4 MiB.
    #[test]
    fn defer_checkpoints_lets_the_log_grow_past_the_default_checkpoint() {
        use cubbyhole::relay::{InsertOutcome, MailboxLimits, RelayStorage, Share};
        use cubbyhole::transport::{Envelope, MailboxId};

        let wal_after_8_mib = |defer: bool| {
            let db = TempDb::new(if defer { "deferred" } else { "default" });
            let mut s = SqliteRelayStorage::open(&db.0).unwrap();
            if defer {
                s.defer_checkpoints().unwrap();
            }
            let limits = MailboxLimits {
                max_stranger_envelopes: u32::MAX,
                max_stranger_bytes: u64::MAX,
                max_envelopes: 1_000,
                max_bytes: 1 << 30,
                expire_before: 0,
            };
            for i in 0..40u8 {
                let envelope = Envelope {
                    id: EnvelopeId([i; 16]),
                    payload: vec![i; 200 * 1024],
                };
                let outcome = s
                    .insert_envelope(&MailboxId([7; 32]), &envelope, Share::Contacts, 100, limits)
                    .unwrap();
                assert_eq!(outcome, InsertOutcome::Stored);
            }
            let mut wal = db.0.clone().into_os_string();
            wal.push("-wal");
            std::fs::metadata(wal).unwrap().len()
        };
        let (default, deferred) = (wal_after_8_mib(false), wal_after_8_mib(true));
        assert!(
            default < 6 << 20,
            "without deferral the log is reset at 1000 pages: {default} bytes"
        );
        assert!(
            deferred > 7 << 20,
            "deferred checkpoints: the log holds every deposit: {deferred} bytes"
        );
    }

    /// `path()` names the file a storage was opened on (the server opens
    /// its checkpoint and log-flush connections to it), and none in memory.
    #[test]
    fn path_is_the_file_opened_and_none_in_memory() {
        let db = TempDb::new("path");
        let storage = SqliteRelayStorage::open(&db.0).unwrap();
        assert_eq!(storage.path(), Some(db.0.as_path()));
        assert_eq!(SqliteRelayStorage::open_in_memory().unwrap().path(), None);
    }

    /// The relay server runs each turn of calls as one storage group: the
    /// calls' writes become durable together at `commit_group`, a call
    /// that fails inside the group writes nothing, and an uncommitted
    /// group leaves nothing behind.
    #[test]
    fn a_group_commits_its_calls_together() {
        use cubbyhole::relay::{InsertOutcome, MailboxLimits, RelayStorage, Share, UploadOutcome};

        let db = TempDb::new("group");
        let mut rng = rng(13);
        let bob = Device::new(&mut rng, 1, 4);
        let opk = &bob.one_time_prekeys;
        let mailbox = bob.mailbox();
        let limits = MailboxLimits {
            max_stranger_envelopes: u32::MAX,
            max_stranger_bytes: u64::MAX,
            max_envelopes: 100,
            max_bytes: 1 << 20,
            expire_before: 0,
        };
        let too_many = bob.upload_of(2, &[&opk[1], &opk[2], &opk[3]], false);
        let run_group = |storage: &mut SqliteRelayStorage| {
            storage.begin_group().unwrap();
            assert!(storage.begin_group().is_err(), "groups do not nest");
            assert_eq!(
                storage
                    .insert_envelope(&mailbox, &envelope(1, 10), Share::Contacts, NOW, limits)
                    .unwrap(),
                InsertOutcome::Stored
            );
            // Writes the device record and two keys, then refuses: its
            // savepoint is rolled back, the group goes on.
            assert_eq!(
                storage.apply_upload(&too_many, NOW, 2).unwrap(),
                UploadOutcome::TooManyOneTimePrekeys
            );
            assert_eq!(
                storage
                    .insert_envelope(&mailbox, &envelope(2, 20), Share::Contacts, NOW, limits)
                    .unwrap(),
                InsertOutcome::Stored
            );
            assert_eq!(
                storage
                    .acknowledge_envelopes(&mailbox, &[EnvelopeId([1; 16])])
                    .unwrap(),
                1
            );
            // Reads inside the group see its writes.
            assert_eq!(
                storage.list_envelopes(&mailbox, 0, 10, u64::MAX).unwrap(),
                vec![envelope(2, 20)]
            );
        };

        {
            let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
            assert!(storage.commit_group().is_err(), "no group is open");
            assert_eq!(
                storage
                    .apply_upload(&bob.upload_of(1, &[&opk[0]], true), NOW, 10)
                    .unwrap(),
                UploadOutcome::Applied
            );
            run_group(&mut storage);
            // Closed before the commit (a crash): nothing of the group.
        }
        let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
        assert!(storage
            .list_envelopes(&mailbox, 0, 10, u64::MAX)
            .unwrap()
            .is_empty());
        assert_eq!(storage.mailbox_usage(&mailbox).unwrap(), Default::default());

        run_group(&mut storage);
        storage.commit_group().unwrap();
        assert!(storage.commit_group().is_err(), "the group is closed");
        drop(storage);

        let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
        assert_eq!(
            storage.list_envelopes(&mailbox, 0, 10, u64::MAX).unwrap(),
            vec![envelope(2, 20)]
        );
        assert_eq!(storage.mailbox_usage(&mailbox).unwrap().envelopes, 1);
        assert_eq!(
            storage
                .insert_envelope(&mailbox, &envelope(1, 10), Share::Contacts, NOW, limits)
                .unwrap(),
            InsertOutcome::Duplicate
        );
        // The refused upload left the record and the pool as they were.
        assert_eq!(storage.device(&bob.address()).unwrap().unwrap().counter, 1);
        assert_eq!(storage.one_time_prekey_count(&bob.address()).unwrap(), 1);
        // Outside a group every call commits on its own again.
        assert_eq!(
            storage
                .insert_envelope(&mailbox, &envelope(3, 5), Share::Contacts, NOW, limits)
                .unwrap(),
            InsertOutcome::Stored
        );
        drop(storage);
        let storage = SqliteRelayStorage::open(&db.0).unwrap();
        assert_eq!(storage.mailbox_usage(&mailbox).unwrap().envelopes, 2);
    }

    /// The relay schema of version 1 as it was last written (2026-11,
    /// `378b872`), kept here verbatim so that the migration is tested
    /// against a real version-1 file, not against what the code thinks it
    /// was.
    const SCHEMA_V1: &str = "
        CREATE TABLE devices (identity BLOB NOT NULL, device_id INTEGER NOT NULL,
            mailbox BLOB NOT NULL, counter INTEGER NOT NULL, spk_id INTEGER NOT NULL,
            spk_created INTEGER NOT NULL, spk_public BLOB NOT NULL,
            spk_signature BLOB NOT NULL, published_at INTEGER NOT NULL,
            PRIMARY KEY (identity, device_id)) WITHOUT ROWID;
        CREATE UNIQUE INDEX devices_by_mailbox ON devices (mailbox);
        CREATE TABLE one_time_prekeys (seq INTEGER PRIMARY KEY, identity BLOB NOT NULL,
            device_id INTEGER NOT NULL, key_id INTEGER NOT NULL, public BLOB NOT NULL,
            UNIQUE (identity, device_id, key_id));
        CREATE INDEX one_time_prekeys_by_device ON one_time_prekeys (identity, device_id, seq);
        CREATE TABLE envelopes (seq INTEGER PRIMARY KEY, mailbox BLOB NOT NULL,
            id BLOB NOT NULL, received_at INTEGER NOT NULL, size INTEGER NOT NULL,
            payload BLOB NOT NULL, UNIQUE (mailbox, id));
        CREATE INDEX envelopes_by_mailbox ON envelopes (mailbox, seq, received_at, size);
        CREATE INDEX envelopes_by_time ON envelopes (received_at);
        CREATE TABLE acknowledged (mailbox BLOB NOT NULL, id BLOB NOT NULL,
            received_at INTEGER NOT NULL, PRIMARY KEY (mailbox, id)) WITHOUT ROWID;
        CREATE INDEX acknowledged_by_time ON acknowledged (received_at);
        CREATE TABLE challenges (seq INTEGER PRIMARY KEY, mailbox BLOB NOT NULL,
            challenge BLOB NOT NULL, expires_at INTEGER NOT NULL,
            UNIQUE (mailbox, challenge));
        CREATE INDEX challenges_by_mailbox ON challenges (mailbox, seq);
        CREATE INDEX challenges_by_expiry ON challenges (expires_at);
        CREATE TABLE mailbox_usage (mailbox BLOB PRIMARY KEY, envelopes INTEGER NOT NULL,
            bytes INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TRIGGER envelopes_usage_insert AFTER INSERT ON envelopes BEGIN
            INSERT INTO mailbox_usage (mailbox, envelopes, bytes) VALUES (NEW.mailbox, 1, NEW.size)
            ON CONFLICT (mailbox) DO UPDATE SET
                envelopes = envelopes + 1, bytes = bytes + excluded.bytes;
        END;
        CREATE TRIGGER envelopes_usage_delete AFTER DELETE ON envelopes BEGIN
            UPDATE mailbox_usage SET envelopes = envelopes - 1, bytes = bytes - OLD.size
            WHERE mailbox = OLD.mailbox;
        END;
        CREATE INDEX envelopes_by_mailbox_time ON envelopes (mailbox, received_at);
        CREATE INDEX acknowledged_by_mailbox_time ON acknowledged (mailbox, received_at);
        PRAGMA application_id = 1667396204; -- 'cbrl'
        PRAGMA user_version = 1;
    ";

    #[test]
    fn migrates_a_version_1_database() {
        use cubbyhole::relay::{InsertOutcome, MailboxLimits, MailboxUsage, RelayStorage, Share};
        use cubbyhole::transport::MailboxId;

        let db = TempDb::new("migrate");
        let a = MailboxId([0xa1; 32]);
        let b = MailboxId([0xb2; 32]);
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            let mut insert = conn
                .prepare(
                    "INSERT INTO envelopes (seq, mailbox, id, received_at, size, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .unwrap();
            // Mailbox a: three pending envelopes whose deposit order is
            // not their id order, and one acknowledged id.
            for (seq, n, len, at) in [
                (5, 9u8, 30usize, NOW),
                (7, 3, 10, NOW + 1),
                (9, 6, 20, NOW + 2),
            ] {
                let e = envelope(n, len);
                insert
                    .execute(rusqlite::params![
                        seq, a.0, e.id.0, at as i64, len as i64, e.payload
                    ])
                    .unwrap();
            }
            // Mailbox b: pending in a, acknowledged in b (ids are per mailbox).
            let e = envelope(3, 10);
            insert
                .execute(rusqlite::params![
                    11, b.0, e.id.0, NOW as i64, 10, e.payload
                ])
                .unwrap();
            conn.execute("DELETE FROM envelopes WHERE seq = 11", [])
                .unwrap();
            let mut ack = conn
                .prepare("INSERT INTO acknowledged (mailbox, id, received_at) VALUES (?1, ?2, ?3)")
                .unwrap();
            ack.execute(rusqlite::params![a.0, [1u8; 16], NOW as i64])
                .unwrap();
            ack.execute(rusqlite::params![b.0, [3u8; 16], (NOW + 10) as i64])
                .unwrap();
        }
        let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            let version: u32 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 5);
        }
        // The device lists' table came with the migration.
        assert_device_lists_work(&mut storage);
        // Pending envelopes in deposit order, usage counted.
        assert_eq!(
            storage.list_envelopes(&a, 0, 10, u64::MAX).unwrap(),
            vec![envelope(9, 30), envelope(3, 10), envelope(6, 20)]
        );
        assert_eq!(
            storage.mailbox_usage(&a).unwrap(),
            MailboxUsage {
                envelopes: 3,
                bytes: 60,
                ..MailboxUsage::default()
            }
        );
        assert_eq!(storage.mailbox_usage(&b).unwrap(), MailboxUsage::default());
        assert!(storage
            .list_envelopes(&b, 0, 10, u64::MAX)
            .unwrap()
            .is_empty());
        // Acknowledged ids are still duplicates, pending ones too.
        let limits = MailboxLimits {
            max_stranger_envelopes: u32::MAX,
            max_stranger_bytes: u64::MAX,
            max_envelopes: 100,
            max_bytes: 1 << 20,
            expire_before: 0,
        };
        for (mailbox, n) in [(&a, 1u8), (&a, 9), (&b, 3)] {
            assert_eq!(
                storage
                    .insert_envelope(mailbox, &envelope(n, 5), Share::Contacts, NOW + 20, limits)
                    .unwrap(),
                InsertOutcome::Duplicate,
                "envelope {n}"
            );
        }
        // New deposits go after the migrated ones.
        assert_eq!(
            storage
                .insert_envelope(&a, &envelope(2, 5), Share::Contacts, NOW + 20, limits)
                .unwrap(),
            InsertOutcome::Stored
        );
        assert_eq!(
            storage
                .acknowledge_envelopes(&a, &[EnvelopeId([3; 16])])
                .unwrap(),
            1
        );
        assert_eq!(
            storage.list_envelopes(&a, 0, 10, u64::MAX).unwrap(),
            vec![envelope(9, 30), envelope(6, 20), envelope(2, 5)]
        );
        assert_eq!(
            storage.mailbox_usage(&a).unwrap(),
            MailboxUsage {
                envelopes: 3,
                bytes: 55,
                ..MailboxUsage::default()
            }
        );
        // Receipt times survived: expiring before NOW + 5 drops a's two
        // pending migrated envelopes, the one acknowledged since and a's
        // migrated acknowledged id, and keeps b's, received at NOW + 10.
        assert_eq!(storage.expire_envelopes(NOW + 5).unwrap(), 2);
        assert_eq!(
            storage.mailbox_usage(&a).unwrap(),
            MailboxUsage {
                envelopes: 1,
                bytes: 5,
                ..MailboxUsage::default()
            }
        );
        assert_eq!(
            storage
                .insert_envelope(&a, &envelope(1, 5), Share::Contacts, NOW + 20, limits)
                .unwrap(),
            InsertOutcome::Stored
        );
        assert_eq!(
            storage
                .insert_envelope(&b, &envelope(3, 5), Share::Contacts, NOW + 20, limits)
                .unwrap(),
            InsertOutcome::Duplicate
        );
        assert_eq!(
            storage.list_envelopes(&a, 0, 10, u64::MAX).unwrap(),
            vec![envelope(2, 5), envelope(1, 5)]
        );
    }

    /// The device-list table exists and keeps a chain.
    fn assert_device_lists_work(storage: &mut SqliteRelayStorage) {
        use cubbyhole::relay::{AppendOutcome, RelayStorage, StoredDeviceList};
        use cubbyhole::AccountId;
        let account = AccountId([0x5a; 32]);
        let v1 = StoredDeviceList {
            version: 1,
            body_hash: [1; 32],
            signed: vec![1, 2, 3],
        };
        assert_eq!(storage.device_list_head(&account).unwrap(), None);
        assert_eq!(
            storage
                .append_device_list(&account, &v1, &[0; 32], 64)
                .unwrap(),
            AppendOutcome::Appended
        );
        assert_eq!(storage.device_list_head(&account).unwrap(), Some(v1));
    }

    /// A version-2 database (schema 3 without `device_lists`) opens as
    /// version 3 with its data and a working device-list table.
    #[test]
    fn migrates_a_version_2_database() {
        use cubbyhole::relay::{InsertOutcome, MailboxLimits, RelayStorage, Share};
        use cubbyhole::transport::MailboxId;

        let db = TempDb::new("migrate-2");
        let a = MailboxId([0xa1; 32]);
        let limits = MailboxLimits {
            max_stranger_envelopes: u32::MAX,
            max_stranger_bytes: u64::MAX,
            max_envelopes: 100,
            max_bytes: 1 << 20,
            expire_before: 0,
        };
        {
            let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
            assert_eq!(
                storage
                    .insert_envelope(&a, &envelope(4, 12), Share::Contacts, NOW, limits)
                    .unwrap(),
                InsertOutcome::Stored
            );
        }
        {
            // Back to version 2, as the previous release wrote it.
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            conn.execute_batch(DOWNGRADE_5_TO_4).unwrap();
            conn.execute_batch(DOWNGRADE_4_TO_3).unwrap();
            conn.execute_batch("DROP TABLE device_lists; PRAGMA user_version = 2;")
                .unwrap();
        }
        let mut storage = SqliteRelayStorage::open(&db.0).unwrap();
        {
            let conn = rusqlite::Connection::open(&db.0).unwrap();
            let version: u32 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 5);
        }
        assert_eq!(
            storage.list_envelopes(&a, 0, 10, u64::MAX).unwrap(),
            vec![envelope(4, 12)]
        );
        assert_device_lists_work(&mut storage);
    }
}

/// The memory storage gives back the memory of a mailbox it has emptied:
/// once every envelope and acknowledged id of a mailbox has expired, the
/// storage is as a new one (an in-memory relay that keeps an empty queue
/// per mailbox ever used grows without bound). Not visible through the
/// trait, so compared through `Debug`, which shows every map.
#[test]
fn memory_storage_forgets_a_mailbox_once_everything_in_it_expired() {
    use cubbyhole::relay::{InsertOutcome, MailboxLimits, RelayStorage, Share};
    use cubbyhole::transport::{Envelope, EnvelopeId, MailboxId};

    let empty = format!("{:?}", MemoryRelayStorage::new());
    let mut s = MemoryRelayStorage::new();
    let limits = MailboxLimits {
        max_stranger_envelopes: u32::MAX,
        max_stranger_bytes: u64::MAX,
        max_envelopes: 10,
        max_bytes: 1_000,
        expire_before: 0,
    };
    let (a, b) = (MailboxId([0xa1; 32]), MailboxId([0xb2; 32]));
    for (mailbox, id, at) in [(&a, 1u8, 100), (&a, 2, 101), (&b, 3, 102)] {
        let envelope = Envelope {
            id: EnvelopeId([id; 16]),
            payload: vec![id; 5],
        };
        assert_eq!(
            s.insert_envelope(mailbox, &envelope, Share::Contacts, at, limits)
                .unwrap(),
            InsertOutcome::Stored
        );
    }
    // One acknowledged id (remembered until it expires), two pending.
    assert_eq!(
        s.acknowledge_envelopes(&a, &[EnvelopeId([1; 16])]).unwrap(),
        1
    );
    assert_ne!(format!("{s:?}"), empty);
    // Nothing is old enough: everything stays.
    assert_eq!(s.expire_envelopes(100).unwrap(), 0);
    assert_ne!(format!("{s:?}"), empty);
    assert_eq!(s.expire_envelopes(103).unwrap(), 2);
    assert_eq!(format!("{s:?}"), empty, "an expired mailbox is kept");
}
