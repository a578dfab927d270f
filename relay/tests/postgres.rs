//! The relay's rules against PostgreSQL: the shared rules suite
//! (`tests/relay_suite` of the root crate, also run over memory and
//! SQLite), plus what only a shared database shows: several relay
//! processes (here, threads with their own connections) claiming prekeys,
//! consuming challenges, depositing and uploading concurrently, schema
//! versioning, reconnection, and deposit notifications.
//!
//! Needs `CUBBYHOLE_TEST_POSTGRES`, a `postgres://user:password@host:port/db`
//! URL (or `key=value` string) for a role that may `CREATE DATABASE`: each
//! test runs in its own scratch database, dropped at its end, so tests run
//! in parallel. Without it (at build time) they are ignored, and reported
//! as such; under `CI` that fails (`support/pg.rs`).

#![cfg(feature = "postgres")]

#[macro_use]
#[path = "../../tests/relay_suite/mod.rs"]
mod relay_suite;

use cubbyhole::transport::DepositPass;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use cubbyhole::relay::{reason, Relay, RelayConfig, RelayStorage, RelayStorageError};
use cubbyhole::transport::{MailboxId, MailboxOp, TransportError};
use cubbyhole::{DeviceEntry, DeviceList, IdentityKeyPair, PrekeyBundle, VerifiedDeviceList};
use cubbyhole_relay::postgres::{spawn_listener, PostgresRelayStorage, DEPOSIT_CHANNEL};
use postgres::{Client, NoTls};
use relay_suite::*;

#[path = "support/pg.rs"]
mod pg;

#[test]
fn postgres_tests_are_not_ignored_in_ci() {
    pg::assert_not_ignored_in_ci();
}

/// A scratch database with the relay's storage and plain connections.
struct TestDb(pg::TestDb);

impl std::ops::Deref for TestDb {
    type Target = pg::TestDb;
    fn deref(&self) -> &pg::TestDb {
        &self.0
    }
}

impl TestDb {
    fn create() -> TestDb {
        TestDb(pg::TestDb::create("test"))
    }

    fn storage(&self) -> PostgresRelayStorage {
        PostgresRelayStorage::connect(&self.0.url).unwrap()
    }

    /// A plain connection to the scratch database.
    fn client(&self) -> Client {
        Client::connect(&self.0.url, NoTls).unwrap()
    }

    /// Terminates the scratch database's relay connections: the
    /// listeners' (`listeners`) or the storages'. Returns how many.
    fn terminate(&self, listeners: bool) -> usize {
        let mut admin = Client::connect(&self.0.admin, NoTls).unwrap();
        let listen = format!("LISTEN {DEPOSIT_CHANNEL}");
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'cubbyhole-relay'
                   AND (query = $2) = $3",
                &[&self.0.name, &listen, &listeners],
            )
            .unwrap();
        rows.len()
    }
}

// ----------------------------------------------------- the shared suite

all_tests!(
    #[cfg_attr(
        not(cubbyhole_test_postgres),
        ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
    )]
    pg_suite,
    db = TestDb::create(),
    db.storage()
);

// ------------------------------------------------------------- schema

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn schema_is_created_once_and_versioned() {
    let db = TestDb::create();

    // Relays starting together on an empty database: one creates the
    // schema, the others wait for it and use it.
    let start = Arc::new(Barrier::new(6));
    let starters: Vec<_> = (0..6)
        .map(|_| {
            let url = db.url.clone();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                PostgresRelayStorage::connect(&url).map(|_| ())
            })
        })
        .collect();
    for starter in starters {
        starter.join().unwrap().unwrap();
    }

    // What one connection wrote, another (a later process) reads.
    let mut rng = rng(20);
    let bob = Device::new(&mut rng, 1, 3);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(7, true)).unwrap();
    relay.fetch_bundle(NOW, &bob.address()).unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    drop(relay);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(2));
    assert_eq!(
        relay.publish(NOW, &bob.upload(7, true)),
        Err(TransportError::Replayed)
    );
    assert_eq!(
        relay.fetch(NOW + 1, &bob.auth(MailboxOp::Fetch, challenge), 10),
        Ok(vec![envelope(1, 10)])
    );
    drop(relay);

    // A newer schema is refused, a damaged one too.
    let mut client = db.client();
    client
        .batch_execute("UPDATE cubbyhole_relay_meta SET schema_version = 5")
        .unwrap();
    assert!(matches!(
        PostgresRelayStorage::connect(&db.url),
        Err(RelayStorageError::UnsupportedSchema(5))
    ));
    client
        .batch_execute("UPDATE cubbyhole_relay_meta SET schema_version = 0")
        .unwrap();
    assert!(matches!(
        PostgresRelayStorage::connect(&db.url),
        Err(RelayStorageError::Corrupted(_))
    ));
    client
        .batch_execute("DELETE FROM cubbyhole_relay_meta")
        .unwrap();
    assert!(matches!(
        PostgresRelayStorage::connect(&db.url),
        Err(RelayStorageError::Corrupted(_))
    ));
    // Relay tables without the meta table are not ours to take over.
    client
        .batch_execute("DROP TABLE cubbyhole_relay_meta")
        .unwrap();
    assert!(matches!(
        PostgresRelayStorage::connect(&db.url),
        Err(RelayStorageError::Corrupted(_))
    ));
}

/// A device of the device-list tests (keys from a fixed seed).
fn dkey(n: u8) -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0xd0 ^ n; 32])
}

/// The successor of `prev` listing devices `devices`, each signing it.
fn successor(prev: &VerifiedDeviceList, devices: &[u8]) -> VerifiedDeviceList {
    let entries: Vec<DeviceEntry> = devices
        .iter()
        .map(|n| DeviceEntry {
            identity: *dkey(*n).public(),
            device_id: u32::from(*n),
        })
        .collect();
    let mut list = prev.successor(&entries).unwrap();
    for n in devices {
        list.sign(&dkey(*n)).unwrap();
    }
    list.into_list().unwrap().verify_successor(prev).unwrap()
}

/// The state of a version-3 database (no access verifiers, owners seen or
/// envelope shares), as the previous release created it.
fn downgrade_to_schema_3(client: &mut Client) {
    client
        .batch_execute(
            "DROP INDEX cubbyhole_relay_devices_by_owner_seen;
             DROP INDEX cubbyhole_relay_envelopes_by_mailbox_time;
             DROP INDEX cubbyhole_relay_acknowledged_by_mailbox_time;
             ALTER TABLE cubbyhole_relay_devices
                 DROP COLUMN access, DROP COLUMN previous_access,
                 DROP COLUMN access_changed_at, DROP COLUMN owner_seen_at;
             ALTER TABLE cubbyhole_relay_envelopes DROP COLUMN share;
             UPDATE cubbyhole_relay_meta SET schema_version = 3",
        )
        .unwrap();
}

/// The state of a version-2 database (stored outstanding challenges, no
/// claim times, no relay key), as the previous release created it.
fn downgrade_to_schema_2(client: &mut Client) {
    downgrade_to_schema_3(client);
    client
        .batch_execute(
            "DROP TABLE cubbyhole_relay_used_challenges;
             DROP TABLE cubbyhole_relay_key;
             ALTER TABLE cubbyhole_relay_devices DROP COLUMN claimed_until;
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
             UPDATE cubbyhole_relay_meta SET schema_version = 2",
        )
        .unwrap();
}

/// The state of a version-1 database (before device lists): version 2
/// less the device lists' table.
fn downgrade_to_schema_1(client: &mut Client) {
    downgrade_to_schema_2(client);
    client
        .batch_execute(
            "DROP TABLE cubbyhole_relay_device_lists;
             UPDATE cubbyhole_relay_meta SET schema_version = 1",
        )
        .unwrap();
}

fn schema_version(client: &mut Client) -> i32 {
    client
        .query_one("SELECT schema_version FROM cubbyhole_relay_meta", &[])
        .unwrap()
        .get(0)
}

/// Schema 1 -> 4 (device lists, then stateless challenges and claim
/// times, then access verifiers, owners seen and shares): relays starting
/// together on a version-1 database migrate it once; what it held stays;
/// device lists work.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn schema_1_is_migrated_to_2() {
    let db = TestDb::create();
    let mut rng = rng(21);
    let bob = Device::new(&mut rng, 1, 3);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(7, true)).unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    drop(relay);
    let mut client = db.client();
    downgrade_to_schema_1(&mut client);
    assert_eq!(schema_version(&mut client), 1);

    let start = Arc::new(Barrier::new(4));
    let starters: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                PostgresRelayStorage::connect(&url).map(|_| ())
            })
        })
        .collect();
    for starter in starters {
        starter.join().unwrap().unwrap();
    }
    assert_eq!(schema_version(&mut client), 4);

    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(3));
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(
        relay.fetch(NOW + 1, &bob.auth(MailboxOp::Fetch, challenge), 10),
        Ok(vec![envelope(1, 10)])
    );
    let v1 = DeviceList::genesis(&dkey(1), 1).verify_genesis().unwrap();
    let v2 = successor(&v1, &[1, 2]);
    relay.publish_device_list(&v1.encode()).unwrap();
    relay.publish_device_list(&v2.encode()).unwrap();
    drop(relay);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    assert_eq!(
        relay.fetch_device_lists(v1.account_id(), 0),
        Ok(vec![v1.encode(), v2.encode()])
    );
}

/// Schema 2 -> 3: relays starting together on a version-2 database
/// migrate it once; devices and pools stay; the stored challenges are gone
/// (and refused); claims are budgeted from a full budget; the relay key is
/// made at the first challenge.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn schema_2_is_migrated_to_3() {
    let db = TestDb::create();
    let mut rng = rng(23);
    let bob = Device::new(&mut rng, 1, 30);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(7, true)).unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    drop(relay);
    let mut client = db.client();
    downgrade_to_schema_2(&mut client);
    let mailbox = &bob.mailbox().0[..];
    let old_challenge = &[7u8; 32][..];
    client
        .execute(
            "INSERT INTO cubbyhole_relay_challenges (mailbox, challenge, expires_at)
             VALUES ($1, $2, $3)",
            &[&mailbox, &old_challenge, &(NOW as i64 + 300)],
        )
        .unwrap();
    assert_eq!(schema_version(&mut client), 2);

    let start = Arc::new(Barrier::new(4));
    let starters: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                PostgresRelayStorage::connect(&url).map(|_| ())
            })
        })
        .collect();
    for starter in starters {
        starter.join().unwrap().unwrap();
    }
    assert_eq!(schema_version(&mut client), 4);
    let old_table: bool = client
        .query_one(
            "SELECT to_regclass('cubbyhole_relay_challenges') IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!old_table);
    let keys: i64 = client
        .query_one("SELECT count(*) FROM cubbyhole_relay_key", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 0);

    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(30));
    let claimed = (0..30)
        .filter(|_| {
            PrekeyBundle::decode(&relay.fetch_bundle(NOW, &bob.address()).unwrap())
                .unwrap()
                .one_time_prekey()
                .is_some()
        })
        .count();
    assert_eq!(claimed, 20, "the default burst");
    assert_eq!(
        relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, [7; 32]), 10),
        Err(TransportError::Unauthorized)
    );
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(
        relay.fetch(NOW + 1, &bob.auth(MailboxOp::Fetch, challenge), 10),
        Ok(vec![envelope(1, 10)])
    );
}

/// Relays sharing a database, each publishing another authentic version 2
/// of one account at once: exactly one is stored, every other upload is a
/// conflict, and the chain the relays serve has one version 2.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn relays_sharing_a_database_never_fork_a_device_list() {
    const RELAYS: u8 = 6;
    let v1 = DeviceList::genesis(&dkey(1), 1).verify_genesis().unwrap();
    // Version 2 adding device 0x40 + i, for each relay i.
    let forks: Vec<Vec<u8>> = (0..RELAYS)
        .map(|i| successor(&v1, &[1, 0x40 + i]).encode())
        .collect();
    for _round in 0..3 {
        let db = TestDb::create();
        let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
        relay.publish_device_list(&v1.encode()).unwrap();
        drop(relay);
        let start = Arc::new(Barrier::new(usize::from(RELAYS)));
        let racers: Vec<_> = forks
            .iter()
            .cloned()
            .map(|list| {
                let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
                let start = Arc::clone(&start);
                thread::spawn(move || {
                    start.wait();
                    relay.publish_device_list(&list)
                })
            })
            .collect();
        let results: Vec<Result<(), TransportError>> =
            racers.into_iter().map(|r| r.join().unwrap()).collect();
        let winners: Vec<usize> = (0..results.len()).filter(|i| results[*i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for (i, result) in results.iter().enumerate() {
            if i != winners[0] {
                assert_eq!(result, &Err(TransportError::Conflict), "relay {i}");
            }
        }
        let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
        assert_eq!(
            relay.fetch_device_lists(v1.account_id(), 0),
            Ok(vec![v1.encode(), forks[winners[0]].clone()])
        );
    }
}

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn bad_connection_strings_and_servers_are_backend_errors() {
    let db = TestDb::create();
    assert!(matches!(
        PostgresRelayStorage::connect("postgres://[nonsense"),
        Err(RelayStorageError::Backend(_))
    ));
    let missing = pg::with_database(&db.url, "cubbyhole_no_such_database");
    assert!(matches!(
        PostgresRelayStorage::connect(&missing),
        Err(RelayStorageError::Backend(_))
    ));
    assert!(matches!(
        spawn_listener(&missing, |_| {}),
        Err(RelayStorageError::Backend(_))
    ));
}

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn large_counters_compare_unsigned() {
    let db = TestDb::create();
    let mut rng = rng(21);
    let bob = Device::new(&mut rng, 1, 0);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(5, true)).unwrap();
    // Above i64::MAX: stored bit for bit, compared as u64.
    relay.publish(NOW, &bob.upload(1 << 63, true)).unwrap();
    assert_eq!(
        relay.publish(NOW, &bob.upload(6, true)),
        Err(TransportError::Replayed)
    );
    relay.publish(NOW, &bob.upload(u64::MAX - 1, true)).unwrap();
    assert_eq!(
        relay.publish(NOW, &bob.upload(u64::MAX - 1, true)),
        Err(TransportError::Replayed)
    );
    relay.publish(NOW, &bob.upload(u64::MAX, true)).unwrap();
    let record = relay.storage().device(&bob.address()).unwrap().unwrap();
    assert_eq!(record.counter, u64::MAX);
}

// -------------------------------------------------------- concurrency

/// Relays on separate connections: every one-time prekey is handed out
/// exactly once, and while any is left none of the racing fetches goes
/// without; every challenge authorizes exactly one fetch.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn relays_sharing_a_database_claim_prekeys_and_consume_challenges_once() {
    let db = TestDb::create();
    const THREADS: usize = 8;
    const PER_THREAD: usize = 8;
    const KEYS: u32 = (THREADS * PER_THREAD) as u32;
    // One claim budget for the device, whichever relay claims: 48 of 64.
    const BURST: u32 = 48;
    let config = RelayConfig {
        claims_per_device_burst: BURST,
        claims_per_device_per_hour: 1,
        ..RelayConfig::unpriced()
    };
    let mut rng = rng(22);
    let bob = Device::new(&mut rng, 1, KEYS);
    let mut relay = Relay::new(db.storage(), config.clone());
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    drop(relay);

    let challenges = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let address = bob.address();
    let bob = Arc::new(bob);
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|n| {
            let storage = db.storage();
            let challenges = Arc::clone(&challenges);
            let kept = Arc::clone(&kept);
            let start = Arc::clone(&start);
            let bob = Arc::clone(&bob);
            let config = config.clone();
            thread::spawn(move || {
                let mut relay = Relay::new(storage, config);
                let mut rng = relay_suite::rng(100 + n as u64);
                let mut claimed = Vec::new();
                let mut authorized = 0;
                start.wait();
                // The relays' first challenges race to create the relay
                // key: they must all end up with the same one.
                for _ in 0..PER_THREAD {
                    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
                    challenges.lock().unwrap().push(challenge);
                    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
                    kept.lock().unwrap().push(challenge);
                }
                // As many fetches in all as there are prekeys.
                for _ in 0..PER_THREAD {
                    let bundle = relay.fetch_bundle(NOW, &address).unwrap();
                    let bundle = PrekeyBundle::decode(&bundle).unwrap();
                    if let Some((id, _)) = bundle.one_time_prekey() {
                        claimed.push(id);
                    }
                }
                start.wait();
                // Every thread tries every challenge.
                let all: Vec<[u8; 32]> = challenges.lock().unwrap().clone();
                for challenge in all {
                    match relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 1) {
                        Ok(_) => authorized += 1,
                        Err(TransportError::Unauthorized) => {}
                        Err(e) => panic!("{e:?}: {:?}", relay.take_storage_error()),
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
    all_claimed.sort_unstable();
    let expected: Vec<u32> = bob.one_time_prekeys[..BURST as usize]
        .iter()
        .map(|k| k.id())
        .collect();
    assert_eq!(all_claimed, expected, "the oldest {BURST}, each once");
    assert_eq!(all_authorized, KEYS, "every challenge once");
    let mut client = db.client();
    let keys: i64 = client
        .query_one("SELECT count(*) FROM cubbyhole_relay_key", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 1);
    // Every relay issued its challenges under the key stored: a new relay
    // process accepts each of them, once.
    let mut relay = Relay::new(db.storage(), config);
    let kept: Vec<[u8; 32]> = kept.lock().unwrap().clone();
    for round in [true, false] {
        let accepted = kept
            .iter()
            .filter(|c| {
                relay
                    .fetch(NOW, &bob.auth(MailboxOp::Fetch, **c), 1)
                    .is_ok()
            })
            .count();
        assert_eq!(accepted, if round { kept.len() } else { 0 });
    }
    // The budget is spent: bundles come without, the pool keeps the rest.
    let bundle = relay.fetch_bundle(NOW, &address).unwrap();
    assert_eq!(
        PrekeyBundle::decode(&bundle).unwrap().one_time_prekey(),
        None
    );
    assert_eq!(relay.one_time_prekeys_left(&address), Ok(KEYS - BURST));
}

/// Deposits racing for the last places of a mailbox: exactly as many are
/// stored as fit, by count and by bytes; racing retries of one envelope
/// store it once.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn concurrent_deposits_respect_mailbox_bounds() {
    let db = TestDb::create();
    const THREADS: usize = 8;
    let config = RelayConfig {
        max_pending_envelopes: 20,
        max_pending_bytes: 1_000,
        ..RelayConfig::unpriced()
    };
    let mut rng = rng(23);
    let bob = Device::new(&mut rng, 1, 0);
    let carol = Device::new(&mut rng, 2, 0);
    let dave = Device::new(&mut rng, 3, 0);
    let mut relay = Relay::new(db.storage(), config.clone());
    for device in [&bob, &carol, &dave] {
        relay.publish(NOW, &device.upload(1, true)).unwrap();
    }
    // Bob's mailbox: 15 of 20 envelopes. Carol's: 700 of 1000 bytes.
    for n in 0..15 {
        relay
            .deposit(NOW, &bob.mailbox(), &envelope(n, 10), &DepositPass::NONE)
            .unwrap();
    }
    for n in 0..7 {
        relay
            .deposit(NOW, &carol.mailbox(), &envelope(n, 100), &DepositPass::NONE)
            .unwrap();
    }
    drop(relay);

    let (bob_box, carol_box, dave_box) = (bob.mailbox(), carol.mailbox(), dave.mailbox());
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let storage = db.storage();
            let config = config.clone();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let mut relay = Relay::new(storage, config);
                let mut stored = [0u32; 2];
                start.wait();
                for i in 0..5u8 {
                    // Distinct ids across threads, above the prefilled ones.
                    let n = 100 + (t as u8) * 5 + i;
                    for (k, (mailbox, size, refusal)) in [
                        (bob_box, 10, reason::PENDING_ENVELOPES),
                        (carol_box, 100, reason::PENDING_BYTES),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        match relay.deposit(NOW, &mailbox, &envelope(n, size), &DepositPass::NONE) {
                            Ok(()) => stored[k] += 1,
                            Err(TransportError::LimitExceeded(r)) if r == refusal => {}
                            Err(e) => panic!("{e:?}: {:?}", relay.take_storage_error()),
                        }
                    }
                    // Everyone retries the same envelope to Dave.
                    relay
                        .deposit(NOW, &dave_box, &envelope(1, 10), &DepositPass::NONE)
                        .unwrap();
                }
                stored
            })
        })
        .collect();
    let mut stored = [0u32; 2];
    for thread in threads {
        let s = thread.join().unwrap();
        stored[0] += s[0];
        stored[1] += s[1];
    }
    assert_eq!(stored, [5, 3]);
    let storage = db.storage();
    let usage = |m: &MailboxId| {
        let u = storage.mailbox_usage(m).unwrap();
        (u.envelopes, u.bytes)
    };
    assert_eq!(usage(&bob.mailbox()), (20, 200));
    assert_eq!(usage(&carol.mailbox()), (10, 1_000));
    assert_eq!(usage(&dave.mailbox()), (1, 10));
}

/// Uploads racing (the very first one included): no counter is accepted
/// twice, none is refused for anything but a replay, the highest wins.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn concurrent_uploads_keep_counters_increasing() {
    let db = TestDb::create();
    const THREADS: usize = 6;
    const COUNTERS: u64 = 15;
    let mut rng = rng(24);
    let bob = Arc::new(Device::new(&mut rng, 1, 3));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let storage = db.storage();
            let bob = Arc::clone(&bob);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let uploads: Vec<Vec<u8>> =
                    (1..=COUNTERS).map(|c| bob.upload(c, c % 2 == 0)).collect();
                let mut relay = Relay::new(storage, RelayConfig::unpriced());
                let mut applied = Vec::new();
                start.wait();
                for (upload, counter) in uploads.iter().zip(1..) {
                    match relay.publish(NOW, upload) {
                        Ok(()) => applied.push(counter),
                        Err(TransportError::Replayed) => {}
                        Err(e) => panic!("{e:?}: {:?}", relay.take_storage_error()),
                    }
                    // Claims race with the uploads too.
                    relay.fetch_bundle(NOW, &bob.address()).unwrap();
                }
                applied
            })
        })
        .collect();
    let mut applied: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    applied.sort_unstable();
    let mut distinct = applied.clone();
    distinct.dedup();
    assert_eq!(applied, distinct, "a counter was accepted twice");
    assert_eq!(applied.last(), Some(&COUNTERS));
    let storage = db.storage();
    let record = storage.device(&bob.address()).unwrap().unwrap();
    assert_eq!(record.counter, COUNTERS);
    assert!(storage.one_time_prekey_count(&bob.address()).unwrap() <= 3);
}

// ------------------------------------------------------ notifications

/// Receives the next notification, if any within `within`.
fn next(rx: &mpsc::Receiver<MailboxId>, within: Duration) -> Option<MailboxId> {
    rx.recv_timeout(within).ok()
}

/// How long a notification that must come may take: far more than it does
/// even on a loaded machine (only a hang guard; nothing is measured).
const HEARD: Duration = Duration::from_secs(60);

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn deposits_wake_the_listener() {
    let db = TestDb::create();
    let (tx, rx) = mpsc::channel();
    spawn_listener(&db.url, move |mailbox| {
        let _ = tx.send(mailbox);
    })
    .unwrap();

    let config = RelayConfig {
        max_pending_envelopes: 1,
        ..RelayConfig::unpriced()
    };
    let mut rng = rng(25);
    let bob = Device::new(&mut rng, 1, 0);
    let carol = Device::new(&mut rng, 2, 0);
    let mut relay = Relay::new(db.storage(), config);
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    relay.publish(NOW, &carol.upload(1, true)).unwrap();

    // A stored deposit wakes the listener.
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(next(&rx, HEARD), Some(bob.mailbox()));

    // A retry (not stored again) and a refused deposit notify nobody:
    // checked below, where the next notification heard is Carol's
    // (PostgreSQL delivers notifications in commit order, so one for Bob
    // sent now would come first).
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        relay.deposit(NOW, &bob.mailbox(), &envelope(2, 10), &DepositPass::NONE),
        Err(TransportError::LimitExceeded(reason::PENDING_ENVELOPES))
    );

    // Malformed notifications on the channel are ignored; the listener
    // goes on.
    let mut client = db.client();
    client
        .batch_execute(&format!(
            "NOTIFY {DEPOSIT_CHANNEL}, 'not hex'; NOTIFY {DEPOSIT_CHANNEL}, 'abcd'"
        ))
        .unwrap();
    relay
        .deposit(NOW, &carol.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(next(&rx, HEARD), Some(carol.mailbox()));

    // A deposit through another connection (another relay process) too.
    let mut other = Relay::new(db.storage(), RelayConfig::unpriced());
    other
        .deposit(NOW, &carol.mailbox(), &envelope(2, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(next(&rx, HEARD), Some(carol.mailbox()));
}

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn the_listener_reconnects() {
    let db = TestDb::create();
    let (tx, rx) = mpsc::channel();
    spawn_listener(&db.url, move |mailbox| {
        let _ = tx.send(mailbox);
    })
    .unwrap();
    let mut rng = rng(26);
    let bob = Device::new(&mut rng, 1, 0);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(0, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(next(&rx, HEARD), Some(bob.mailbox()));

    assert_eq!(db.terminate(true), 1);
    // Deposits made while it is away are lost; keep depositing until one
    // is heard again (the deadline is only a hang guard).
    let deadline = Instant::now() + HEARD;
    let mut n = 1;
    loop {
        assert!(Instant::now() < deadline, "the listener did not come back");
        relay
            .deposit(NOW, &bob.mailbox(), &envelope(n, 10), &DepositPass::NONE)
            .unwrap();
        n += 1;
        if next(&rx, Duration::from_millis(200)) == Some(bob.mailbox()) {
            break;
        }
    }
}

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn the_storage_reconnects() {
    let db = TestDb::create();
    let mut rng = rng(27);
    let bob = Device::new(&mut rng, 1, 0);
    let mut relay = Relay::new(db.storage(), RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    assert_eq!(db.terminate(false), 1);
    // The call that finds the connection broken may fail (Unavailable,
    // with the cause kept); the next one reconnects.
    let mut failures = 0;
    while let Err(e) = relay.deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE) {
        assert_eq!(e, TransportError::Unavailable("relay storage"));
        assert!(matches!(
            relay.take_storage_error(),
            Some(RelayStorageError::Backend(_))
        ));
        failures += 1;
        // The termination is asynchronous: the first failing call may be
        // either of the two a deposit makes, so allow a few.
        assert!(failures < 4, "the storage did not reconnect");
    }
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW),
        vec![envelope(1, 10)]
    );
}

/// The way an async server uses it: from the blocking pool.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn works_from_a_tokio_blocking_thread() {
    let db = TestDb::create();
    let url = db.url.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let left = runtime.block_on(async move {
        tokio::task::spawn_blocking(move || {
            let mut rng = rng(28);
            let bob = Device::new(&mut rng, 1, 2);
            let mut relay = Relay::new(
                PostgresRelayStorage::connect(&url).unwrap(),
                RelayConfig::unpriced(),
            );
            relay.publish(NOW, &bob.upload(1, true)).unwrap();
            relay.fetch_bundle(NOW, &bob.address()).unwrap();
            relay.one_time_prekeys_left(&bob.address())
        })
        .await
        .unwrap()
    });
    assert_eq!(left, Ok(1));
}
