//! Group commit: `Relay::deposit_batch` answers each envelope as
//! `Relay::deposit` would, and stores the batch with one commit.

use cubbyhole::relay::{MemoryRelayStorage, Relay, RelayConfig, RelayStorage};
use cubbyhole::transport::{BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, TransportError};
use cubbyhole::{IdentityKeyPair, PrekeyStore};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_900_000_000;

fn published<S: RelayStorage>(relay: &mut Relay<S>, rng: &mut ChaCha20Rng) -> DeviceAddress {
    let id = IdentityKeyPair::generate(rng);
    let prekeys = PrekeyStore::new(rng, &id, NOW);
    let upload =
        BundleSetUpload::new(1, &id, 1, prekeys.current_signed_prekey(), &[], true).sign(&id);
    relay.publish(NOW, &upload).unwrap();
    DeviceAddress::new(id.public(), 1)
}

fn envelope(n: u8, len: usize) -> Envelope {
    Envelope {
        id: EnvelopeId([n; 16]),
        payload: vec![n; len],
    }
}

fn check<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_envelope_bytes: 100,
        max_pending_envelopes: 3,
        ..RelayConfig::default()
    };
    let mut relay = Relay::new(storage, config);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let bob = published(&mut relay, &mut rng).mailbox();
    let carol = published(&mut relay, &mut rng).mailbox();
    let unknown = DeviceAddress {
        identity: [9; 32],
        device_id: 1,
    }
    .mailbox();
    relay.deposit(NOW, &bob, &envelope(1, 10)).unwrap();
    let batch = vec![
        (bob, envelope(1, 10)),     // already there
        (bob, envelope(2, 10)),     // stored
        (bob, envelope(3, 101)),    // too big
        (carol, envelope(4, 10)),   // stored
        (bob, envelope(5, 10)),     // stored (third in Bob's mailbox)
        (bob, envelope(6, 10)),     // mailbox full
        (unknown, envelope(7, 10)), // never published
        (carol, envelope(4, 10)),   // repeated within the batch
    ];
    let results = relay.deposit_batch(NOW, &batch);
    assert_eq!(results[0], Ok(false));
    assert_eq!(results[1], Ok(true));
    assert_eq!(
        results[2],
        Err(TransportError::LimitExceeded(
            cubbyhole::relay::reason::ENVELOPE_SIZE
        ))
    );
    assert_eq!(results[3], Ok(true));
    assert_eq!(results[4], Ok(true));
    assert_eq!(
        results[5],
        Err(TransportError::LimitExceeded(
            cubbyhole::relay::reason::PENDING_ENVELOPES
        ))
    );
    assert_eq!(results[6], Err(TransportError::NotFound));
    assert_eq!(results[7], Ok(false));
    let listed = |relay: &Relay<S>, mailbox| {
        relay
            .storage()
            .list_envelopes(&mailbox, 0, 100, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| e.id.0[0])
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(&relay, bob), vec![1, 2, 5]);
    assert_eq!(listed(&relay, carol), vec![4]);
}

#[test]
fn deposit_batch_in_memory() {
    check(MemoryRelayStorage::new());
}

#[cfg(feature = "sqlite")]
#[test]
fn deposit_batch_in_sqlite() {
    check(cubbyhole::relay::SqliteRelayStorage::open_in_memory().unwrap());
}
