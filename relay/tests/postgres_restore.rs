//! The after-restore step (`cubbyhole_relay::restore`) on PostgreSQL:
//! every one-time prekey and challenge is gone, and uploads at or below
//! the counter floor are refused (counters at or above 2^63, stored as
//! negative `bigint`s, stay). Needs `CUBBYHOLE_TEST_POSTGRES` (see
//! `support/pg.rs`); ignored without it.

#![cfg(feature = "postgres")]

use cubbyhole::relay::{Relay, RelayConfig};
use cubbyhole::transport::{
    BundleSetUpload, DeviceAddress, MailboxAuth, MailboxOp, TransportError,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, PrekeyStore};
use cubbyhole_relay::postgres::PostgresRelayStorage;
use cubbyhole_relay::restore::after_restore;
use cubbyhole_relay::StorageConfig;

#[path = "support/pg.rs"]
mod pg;

#[test]
fn postgres_tests_are_not_ignored_in_ci() {
    pg::assert_not_ignored_in_ci();
}

const NOW: u64 = 1_800_000_000;
const MARGIN: u64 = 600;

struct Device {
    identity: IdentityKeyPair,
    store: PrekeyStore,
}

impl Device {
    fn new(one_time: u32) -> Device {
        let identity = IdentityKeyPair::generate(&mut OsRng);
        let mut store =
            PrekeyStore::new(&mut OsRng, &identity, 1_700_000_000).expect("time in unix seconds");
        store.generate_one_time_prekeys(&mut OsRng, one_time);
        Device { identity, store }
    }

    fn upload(&self, counter: u64) -> Vec<u8> {
        let one_time: Vec<&OneTimePrekey> = self.store.one_time_prekeys().collect();
        BundleSetUpload::new(
            1,
            &self.identity,
            counter,
            self.store.current_signed_prekey(),
            &one_time,
            true,
        )
        .sign(&self.identity)
    }

    fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.identity.public(), 1)
    }
}

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn after_restore_on_postgres() {
    let db = pg::TestDb::create("restore");
    let device = Device::new(3);
    let high = Device::new(0);
    let mut relay = Relay::new(
        PostgresRelayStorage::connect(&db.url).unwrap(),
        RelayConfig::unpriced(),
    );
    relay.publish(NOW - 100, &device.upload(100)).unwrap();
    relay
        .publish(NOW - 100, &high.upload(u64::MAX - 5))
        .unwrap();
    relay.fetch_bundle(NOW, &device.address()).unwrap();
    let mailbox = device.address().mailbox();
    // One challenge used (recorded), one issued and not used.
    let used = relay.challenge(NOW - 10, &mut OsRng, &mailbox).unwrap();
    relay
        .fetch(
            NOW - 10,
            &MailboxAuth::sign(&device.identity, 1, MailboxOp::Fetch, used),
            10,
        )
        .unwrap();
    let challenge = relay.challenge(NOW - 10, &mut OsRng, &mailbox).unwrap();
    let replayable = device.upload(NOW - 50);
    drop(relay);

    let report = after_restore(&StorageConfig::Postgres(db.url.clone()), NOW, MARGIN).unwrap();
    assert_eq!(report.one_time_prekeys_deleted, 2);
    assert_eq!(report.challenges_deleted, 1);
    assert_eq!(report.devices, 2);
    assert_eq!(report.counters_raised, 1);
    assert_eq!(report.counter_floor, NOW + MARGIN);

    let mut relay = Relay::new(
        PostgresRelayStorage::connect(&db.url).unwrap(),
        RelayConfig::unpriced(),
    );
    assert_eq!(relay.one_time_prekeys_left(&device.address()).unwrap(), 0);
    // The relay key was replaced: a challenge issued before the restore
    // is refused; new ones work.
    let proof = MailboxAuth::sign(&device.identity, 1, MailboxOp::Fetch, challenge);
    assert!(matches!(
        relay.fetch(NOW, &proof, 10),
        Err(TransportError::Unauthorized)
    ));
    let fresh = relay.challenge(NOW, &mut OsRng, &mailbox).unwrap();
    relay
        .fetch(
            NOW,
            &MailboxAuth::sign(&device.identity, 1, MailboxOp::Fetch, fresh),
            10,
        )
        .unwrap();
    for counter in [NOW - 50, NOW + MARGIN] {
        let upload = if counter == NOW - 50 {
            replayable.clone()
        } else {
            device.upload(counter)
        };
        assert!(
            matches!(relay.publish(NOW, &upload), Err(TransportError::Replayed)),
            "counter {counter}"
        );
    }
    relay
        .publish(NOW, &device.upload(NOW + MARGIN + 1))
        .unwrap();
    assert_eq!(relay.one_time_prekeys_left(&device.address()).unwrap(), 3);
    assert!(matches!(
        relay.publish(NOW, &high.upload(u64::MAX - 5)),
        Err(TransportError::Replayed)
    ));
    relay.publish(NOW, &high.upload(u64::MAX - 4)).unwrap();
}
