//! PostgreSQL relay storage, schema 4 (SPEC.md 16.6, 16.8): the migration
//! from schema 3 (access verifiers, owner seen, envelope shares), the
//! refusal of a newer schema, the plans of the sweeps, and a stored share
//! out of range. Through the storage trait only (the relay's rules are in
//! `tests/postgres.rs`). Needs a PostgreSQL server (`support/pg.rs`).

#![cfg(feature = "postgres")]

use std::sync::{Arc, Barrier};
use std::thread;

use cubbyhole::relay::{
    InsertOutcome, MailboxLimits, MailboxUsage, RelayStorage, RelayStorageError, Share,
};
use cubbyhole::transport::{
    AccessVerifier, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, SignedPrekeyRecord,
};
use cubbyhole::IdentityKeyPair;
use cubbyhole_relay::postgres::PostgresRelayStorage;
use postgres::{Client, NoTls};

#[path = "support/pg.rs"]
mod pg;

const NOW: u64 = 1_800_000_000;

#[test]
fn postgres_tests_are_not_ignored_in_ci() {
    pg::assert_not_ignored_in_ci();
}

const LIMITS: MailboxLimits = MailboxLimits {
    max_envelopes: 2,
    max_bytes: 1000,
    max_stranger_envelopes: 1,
    max_stranger_bytes: 1000,
    expire_before: 0,
};

/// From schema 4 back to schema 3, as the previous release created it
/// (`tests/postgres.rs` has the same, before its older downgrades).
const DOWNGRADE_4_TO_3: &str = "
    DROP INDEX cubbyhole_relay_devices_by_owner_seen;
    DROP INDEX cubbyhole_relay_envelopes_by_mailbox_time;
    DROP INDEX cubbyhole_relay_acknowledged_by_mailbox_time;
    ALTER TABLE cubbyhole_relay_devices
        DROP COLUMN access, DROP COLUMN previous_access,
        DROP COLUMN access_changed_at, DROP COLUMN owner_seen_at;
    ALTER TABLE cubbyhole_relay_envelopes DROP COLUMN share;
    UPDATE cubbyhole_relay_meta SET schema_version = 3;
";

fn upload(counter: u64, access: Option<AccessVerifier>) -> BundleSetUpload {
    let keys = IdentityKeyPair::from_seed(&[7; 32]);
    let spk = cubbyhole::SignedPrekey::from_secret(&keys, 1, NOW, [8; 32]).unwrap();
    BundleSetUpload {
        device: DeviceAddress::new(keys.public(), 1),
        counter,
        signed_prekey: SignedPrekeyRecord::of(&spk),
        replace_one_time_prekeys: false,
        one_time_prekeys: vec![(1, [1; 32]), (2, [2; 32])],
        access_verifier: access,
        identity_stamp: None,
    }
}

fn env(k: u8, len: usize) -> Envelope {
    Envelope {
        id: EnvelopeId([k; 16]),
        payload: vec![k; len],
    }
}

fn schema_version(client: &mut Client) -> i32 {
    client
        .query_one("SELECT schema_version FROM cubbyhole_relay_meta", &[])
        .unwrap()
        .get(0)
}

/// Schema 3 -> 4: relays starting together on a version-3 database
/// migrate it once; devices are seen at their last upload and have no
/// verifier; envelopes are the contacts'; the strangers' share starts
/// empty; the sweeps then work.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn schema_3_is_migrated_to_4() {
    let db = pg::TestDb::create("schema4");
    let up = upload(3, None);
    let mailbox = up.device.mailbox();
    {
        let mut storage = PostgresRelayStorage::connect(&db.url).unwrap();
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
    let mut client = Client::connect(&db.url, NoTls).unwrap();
    client.batch_execute(DOWNGRADE_4_TO_3).unwrap();
    assert_eq!(schema_version(&mut client), 3);

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

    let mut storage = PostgresRelayStorage::connect(&db.url).unwrap();
    let record = storage.mailbox_owner(&mailbox).unwrap().unwrap();
    assert_eq!(record, storage.device(&up.device).unwrap().unwrap());
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
    // The migrated envelope is a contact's; the acknowledged id stays.
    let mut put = |k: u8, share: Share| {
        storage
            .insert_envelope(&mailbox, &env(k, 10), share, NOW, LIMITS)
            .unwrap()
    };
    assert_eq!(put(1, Share::Strangers), InsertOutcome::Duplicate);
    assert_eq!(put(3, Share::Strangers), InsertOutcome::Stored);
    assert_eq!(put(4, Share::Strangers), InsertOutcome::TooManyEnvelopes);
    assert_eq!(put(5, Share::Contacts), InsertOutcome::Stored);
    assert_eq!(put(6, Share::Contacts), InsertOutcome::TooManyEnvelopes);
    // A verifier now rotates in.
    storage
        .apply_upload(&upload(4, Some(AccessVerifier([9; 32]))), NOW, 100)
        .unwrap();
    let record = storage.device(&up.device).unwrap().unwrap();
    assert_eq!(
        (
            record.access,
            record.access_changed_at,
            record.owner_seen_at
        ),
        (Some(AccessVerifier([9; 32])), NOW, NOW)
    );
    // The sweeps find the device by when it was last seen.
    assert_eq!(storage.expire_inactive(NOW, NOW + 1).unwrap(), 0);
    assert_eq!(storage.expire_inactive(NOW + 1, NOW + 1).unwrap(), 3);
    assert_eq!(
        storage.mailbox_usage(&mailbox).unwrap(),
        MailboxUsage::default()
    );
    assert_eq!(storage.expire_devices(NOW + 1).unwrap(), 1);
    assert_eq!(storage.mailbox_owner(&mailbox).unwrap(), None);
    assert_eq!(storage.one_time_prekey_count(&up.device).unwrap(), 0);
}

/// A schema newer than 4 is refused.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn schema_5_is_refused() {
    let db = pg::TestDb::create("schema5");
    drop(PostgresRelayStorage::connect(&db.url).unwrap());
    let mut client = Client::connect(&db.url, NoTls).unwrap();
    assert_eq!(schema_version(&mut client), 4);
    client
        .batch_execute("UPDATE cubbyhole_relay_meta SET schema_version = 5")
        .unwrap();
    assert!(matches!(
        PostgresRelayStorage::connect(&db.url),
        Err(RelayStorageError::UnsupportedSchema(5))
    ));
}

/// The columns' checks keep a share out of range, and a verifier of
/// another length, out of the tables; a verifier of another length that
/// got in anyway (the check dropped) reads as `Corrupted`, not a panic.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn bad_stored_values_are_refused_or_corrupted() {
    let db = pg::TestDb::create("badvalues");
    let mut storage = PostgresRelayStorage::connect(&db.url).unwrap();
    let up = upload(1, Some(AccessVerifier([9; 32])));
    storage.apply_upload(&up, NOW, 100).unwrap();
    storage
        .insert_envelope(
            &up.device.mailbox(),
            &env(1, 10),
            Share::Strangers,
            NOW,
            LIMITS,
        )
        .unwrap();
    let mut client = Client::connect(&db.url, NoTls).unwrap();
    assert!(client
        .batch_execute("UPDATE cubbyhole_relay_envelopes SET share = 7")
        .is_err());
    assert!(client
        .batch_execute("UPDATE cubbyhole_relay_devices SET access = '\\x0102'")
        .is_err());
    client
        .batch_execute(
            "ALTER TABLE cubbyhole_relay_devices DROP CONSTRAINT cubbyhole_relay_devices_access_check;
             UPDATE cubbyhole_relay_devices SET access = '\\x0102'",
        )
        .unwrap();
    assert!(matches!(
        storage.device(&up.device),
        Err(RelayStorageError::Corrupted(_))
    ));
    assert!(matches!(
        storage.mailbox_owner(&up.device.mailbox()),
        Err(RelayStorageError::Corrupted(_))
    ));
}

/// The sweeps find idle owners and their rows through indexes (with
/// sequential scans off, as the planner would on large tables).
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn the_sweeps_use_indexes() {
    let db = pg::TestDb::create("sweepplans");
    drop(PostgresRelayStorage::connect(&db.url).unwrap());
    let mut client = Client::connect(&db.url, NoTls).unwrap();
    client.batch_execute("SET enable_seqscan = off").unwrap();
    for (sql, index) in [
        (
            "SELECT mailbox FROM cubbyhole_relay_devices WHERE owner_seen_at < 5",
            "cubbyhole_relay_devices_by_owner_seen",
        ),
        (
            "SELECT 1 FROM cubbyhole_relay_envelopes WHERE mailbox = '\\x00' AND received_at < 5",
            "cubbyhole_relay_envelopes_by_mailbox_time",
        ),
        (
            "SELECT 1 FROM cubbyhole_relay_acknowledged WHERE mailbox = '\\x00' AND received_at < 5",
            "cubbyhole_relay_acknowledged",
        ),
    ] {
        let plan: Vec<String> = client
            .query(&format!("EXPLAIN {sql}"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains(index) && !plan.contains("Seq Scan"), "{sql}:\n{plan}");
    }
}
