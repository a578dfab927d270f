//! Deposit access keys in the client (SPEC.md, "Access keys in the client";
//! issue 16): the key travels in every frame, a first contact pays a
//! stamp and lands in the strangers' share, contacts land in the contacts'
//! share, a rotation with an exclusion shuts one contact out after the
//! relay's grace period, keys survive a restart, and only a newer epoch
//! from an authentic frame replaces a stored key.
//!
//! The relays here ask stamps at difficulty 8 (a few hundred hashes), so
//! the tests stay fast while every stamp path runs.

use std::sync::{Arc, Mutex};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{
    InProcessRelay, MailboxUsage, MemoryRelayStorage, Relay, RelayConfig, RelayStorage,
};
use cubbyhole::storage::{AccessKeyRecord, MemoryStore, PeerAccess, Store};
use cubbyhole::transport::{AccessKey, DepositPass, DeviceAddress, Envelope, EnvelopeId, Mailbox};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const T0: u64 = 1_900_000_000;
const DAY: u64 = 86_400;

type Honest = InProcessRelay<MemoryRelayStorage>;
type Device<S> = Client<S, Honest, Honest>;

struct World {
    clock: Arc<Mutex<u64>>,
    relay: Honest,
    rng: ChaCha20Rng,
}

impl World {
    /// A relay asking stamps of `deposit` and `identity` difficulty.
    fn new(deposit: u8, identity: u8) -> Self {
        let clock = Arc::new(Mutex::new(T0));
        let c = clock.clone();
        let config = RelayConfig {
            deposit_stamp_difficulty: deposit,
            identity_stamp_difficulty: identity,
            ..RelayConfig::default()
        };
        World {
            relay: InProcessRelay::with_clock(
                Relay::new(MemoryRelayStorage::new(), config),
                Arc::new(move || *c.lock().unwrap()),
            ),
            clock,
            rng: ChaCha20Rng::seed_from_u64(16),
        }
    }

    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }

    fn advance(&self, seconds: u64) {
        *self.clock.lock().unwrap() += seconds;
    }

    /// A device on `store`, published. Its sessions are v1 (`sealed:
    /// false`): these tests follow every deposit into the published
    /// mailbox; v2 deposits chain messages into private inboxes, whose
    /// access is tested in `tests/privacy.rs`.
    fn device<S: Store>(&mut self, store: S) -> Device<S> {
        let mut device = block_on(Client::open(
            store,
            self.relay.clone(),
            self.relay.clone(),
            ClientConfig {
                sealed: false,
                ..ClientConfig::default()
            },
            &mut self.rng,
        ))
        .unwrap();
        let now = self.now();
        assert!(block_on(device.maintain_prekeys(&mut self.rng, now)).unwrap());
        device
    }

    fn usage(&self, device: &DeviceAddress) -> MailboxUsage {
        self.relay
            .with_relay(|r| r.storage().mailbox_usage(&device.mailbox()))
            .unwrap()
            .unwrap()
    }

    fn send<S: Store>(&mut self, from: &mut Device<S>, to: &DeviceAddress, body: &[u8]) {
        let now = self.now();
        let sent = block_on(from.send(&mut self.rng, to, body, now)).unwrap();
        assert!(sent.deposited, "{body:?} was not deposited");
    }

    /// Receives everything; returns the bodies received.
    fn receive<S: Store>(&mut self, device: &mut Device<S>) -> Vec<Vec<u8>> {
        let now = self.now();
        let report = block_on(device.receive(&mut self.rng, now)).unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        let inbox = block_on(device.inbox()).unwrap();
        for m in &inbox {
            block_on(device.remove_from_inbox(&m.envelope_id)).unwrap();
        }
        inbox.into_iter().map(|m| m.body).collect()
    }
}

fn own<S: Store>(device: &Device<S>) -> AccessKeyRecord {
    block_on(device.access_key())
        .unwrap()
        .expect("an access key")
}

fn held<S: Store>(device: &Device<S>, peer: &DeviceAddress) -> PeerAccess {
    block_on(device.store().peer_access(peer)).unwrap()
}

/// Usage as (envelopes, of which strangers').
fn shares(usage: MailboxUsage) -> (u64, u64) {
    (usage.envelopes, usage.stranger_envelopes)
}

#[test]
fn a_first_contact_pays_a_stamp_then_contacts_use_the_key() {
    let mut w = World::new(8, 8);
    // Publishing needed identity stamps: both devices are on the relay,
    // each with its key's verifier.
    let mut alice = w.device(MemoryStore::new());
    let mut bob = w.device(MemoryStore::new());
    let (a, b) = (alice.address(), bob.address());
    for (device, address) in [(&alice, a), (&bob, b)] {
        let key = own(device);
        assert_eq!(key.epoch, 1);
        let record = w
            .relay
            .with_relay(|r| r.storage().device(&address))
            .unwrap()
            .unwrap()
            .expect("published");
        assert_eq!(record.access, Some(key.key.verifier(&address.mailbox())));
    }

    // The first message: no key yet, a stamp, the strangers' share.
    w.send(&mut alice, &b, b"hello bob");
    assert_eq!(shares(w.usage(&b)), (1, 1));
    assert_eq!(w.receive(&mut bob), [b"hello bob".to_vec()]);
    // Bob now holds Alice's key (from the frame), not before.
    assert_eq!(held(&bob, &a).key, Some(own(&alice)));
    assert!(!held(&bob, &a).excluded);

    // Bob's receipt and reply show Alice's key: the contacts' share.
    w.send(&mut bob, &a, b"hi alice");
    assert_eq!(shares(w.usage(&a)), (2, 0), "receipt and reply");
    assert_eq!(w.receive(&mut alice), [b"hi alice".to_vec()]);
    assert_eq!(held(&alice, &b).key, Some(own(&bob)));

    // And so does every later message, both ways (the receipts included).
    w.send(&mut alice, &b, b"second");
    assert_eq!(shares(w.usage(&b)), (2, 0), "a receipt and a message");
    assert_eq!(w.receive(&mut bob), [b"second".to_vec()]);
    w.send(&mut bob, &a, b"third");
    assert_eq!(shares(w.usage(&a)), (2, 0));
    assert_eq!(w.receive(&mut alice), [b"third".to_vec()]);
}

#[test]
fn an_excluded_contact_is_a_stranger_after_the_grace_period() {
    let mut w = World::new(8, 8);
    let mut alice = w.device(MemoryStore::new());
    let mut bob = w.device(MemoryStore::new());
    let mut carol = w.device(MemoryStore::new());
    let (a, b, c) = (alice.address(), bob.address(), carol.address());
    // Both contacts hold Bob's first key.
    for (other, address) in [(&mut alice, a), (&mut carol, c)] {
        w.send(other, &b, b"hi bob");
        assert_eq!(w.receive(&mut bob), [b"hi bob".to_vec()]);
        w.send(&mut bob, &address, b"hi");
        assert_eq!(w.receive(other), [b"hi".to_vec()]);
        assert_eq!(held(other, &b).key.map(|k| k.epoch), Some(1));
    }
    assert_eq!(w.receive(&mut bob), Vec::<Vec<u8>>::new()); // receipts

    // Bob shuts Carol out: a new key (epoch 2), registered in one upload;
    // Alice gets it in Bob's next frame, Carol does not.
    let now = w.now();
    assert_eq!(
        block_on(bob.exclude_contact(&mut w.rng, &[c], now)).unwrap(),
        2
    );
    assert!(held(&bob, &c).excluded && !held(&bob, &a).excluded);
    let key2 = own(&bob);
    assert_eq!(key2.epoch, 2);
    w.send(&mut bob, &a, b"new key inside");
    w.send(&mut bob, &c, b"no key inside");
    assert_eq!(w.receive(&mut alice), [b"new key inside".to_vec()]);
    assert_eq!(w.receive(&mut carol), [b"no key inside".to_vec()]);
    assert_eq!(held(&alice, &b).key, Some(key2.clone()));
    assert_eq!(held(&carol, &b).key.map(|k| k.epoch), Some(1));
    // Clear Bob's mailbox (the receipts).
    w.receive(&mut bob);
    assert_eq!(shares(w.usage(&b)), (0, 0));

    // Within the grace period the old key still admits Carol.
    w.send(&mut carol, &b, b"within grace");
    assert_eq!(shares(w.usage(&b)), (1, 0));
    assert_eq!(w.receive(&mut bob), [b"within grace".to_vec()]);
    // Bob's receipt to Carol carries no key either.
    w.receive(&mut carol);
    assert_eq!(held(&carol, &b).key.map(|k| k.epoch), Some(1));

    // After it, Carol's deposit needs a stamp and lands with strangers;
    // Alice's, with the new key, with contacts.
    w.advance(DAY + 60);
    w.send(&mut carol, &b, b"after grace");
    assert_eq!(shares(w.usage(&b)), (1, 1));
    w.send(&mut alice, &b, b"from a contact");
    assert_eq!(shares(w.usage(&b)), (2, 1));
    let mut got = w.receive(&mut bob);
    got.sort();
    assert_eq!(got, [b"after grace".to_vec(), b"from a contact".to_vec()]);

    // Included again: Bob's next frame hands Carol the current key.
    block_on(bob.include_contact(&[c])).unwrap();
    w.send(&mut bob, &c, b"welcome back");
    assert_eq!(w.receive(&mut carol), [b"welcome back".to_vec()]);
    assert_eq!(held(&carol, &b).key, Some(key2));
    w.receive(&mut bob); // the receipts
    w.send(&mut carol, &b, b"back in");
    assert_eq!(shares(w.usage(&b)), (1, 0));
}

#[cfg(feature = "sqlite")]
#[test]
fn access_keys_survive_a_restart() {
    use cubbyhole::storage::SqliteStore;
    let dir = std::env::temp_dir().join(format!(
        "cubbyhole-access-keys-{}-{}",
        std::process::id(),
        T0
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bob.db");
    let db_key = [0x42; 32];
    let mut w = World::new(8, 8);
    let mut alice = w.device(MemoryStore::new());
    let mut bob = w.device(SqliteStore::open(&path, &db_key).unwrap());
    let (a, b) = (alice.address(), bob.address());
    w.send(&mut alice, &b, b"hello");
    assert_eq!(w.receive(&mut bob), [b"hello".to_vec()]);
    let (mine, theirs) = (own(&bob), held(&bob, &a));
    assert!(theirs.key.is_some());
    drop(bob);

    let store = SqliteStore::open(&path, &db_key).unwrap();
    let mut bob = block_on(Client::open(
        store,
        w.relay.clone(),
        w.relay.clone(),
        ClientConfig {
            sealed: false,
            ..ClientConfig::default()
        },
        &mut w.rng,
    ))
    .unwrap();
    assert_eq!(own(&bob), mine);
    assert_eq!(held(&bob, &a), theirs);
    // No new key at the next maintenance, and the reply still goes to
    // Alice's contacts' share.
    let now = w.now();
    block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap();
    assert_eq!(own(&bob), mine);
    w.receive(&mut alice); // the receipt
    w.send(&mut bob, &a, b"after the restart");
    assert_eq!(shares(w.usage(&a)), (1, 0));
    assert_eq!(w.receive(&mut alice), [b"after the restart".to_vec()]);
    drop(bob);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_older_epoch_does_not_replace_a_newer_key() {
    let mut w = World::new(0, 0);
    let mut alice = w.device(MemoryStore::new());
    let mut bob = w.device(MemoryStore::new());
    let b = bob.address();
    let a = alice.address();
    let now = w.now();
    assert_eq!(
        block_on(alice.rotate_access_key(&mut w.rng, now)).unwrap(),
        2
    );
    let newer = own(&alice);
    w.send(&mut alice, &b, b"epoch 2");
    assert_eq!(w.receive(&mut bob), [b"epoch 2".to_vec()]);
    assert_eq!(held(&bob, &a).key, Some(newer.clone()));

    // Frames with an older epoch, or the same epoch with another key
    // (as a replayed or reordered old frame would carry), change nothing.
    for stale in [
        AccessKeyRecord {
            epoch: 1,
            key: AccessKey::from_bytes([1; 16]),
            inbox: None,
        },
        AccessKeyRecord {
            epoch: 2,
            key: AccessKey::from_bytes([2; 16]),
            inbox: None,
        },
    ] {
        block_on(alice.store_mut().set_own_access_key(&stale)).unwrap();
        w.send(&mut alice, &b, b"stale");
        assert_eq!(w.receive(&mut bob), [b"stale".to_vec()]);
        assert_eq!(held(&bob, &a).key, Some(newer.clone()), "{}", stale.epoch);
    }
    // A newer one does.
    let newest = AccessKeyRecord {
        epoch: 3,
        key: AccessKey::from_bytes([3; 16]),
        inbox: None,
    };
    block_on(alice.store_mut().set_own_access_key(&newest)).unwrap();
    w.send(&mut alice, &b, b"epoch 3");
    assert_eq!(w.receive(&mut bob), [b"epoch 3".to_vec()]);
    assert_eq!(held(&bob, &a).key, Some(newest));
}

#[test]
fn an_envelope_that_does_not_decrypt_stores_no_key() {
    let mut w = World::new(0, 0);
    let mut alice = w.device(MemoryStore::new());
    let mut bob = w.device(MemoryStore::new());
    let (a, b) = (alice.address(), bob.address());
    w.send(&mut alice, &b, b"hello");
    // Take the envelope off the relay and put back a copy with its last
    // byte (the authentication tag) changed, under another id.
    let original: Envelope = w
        .relay
        .with_relay(|r| {
            let envelopes = r
                .storage()
                .list_envelopes(&b.mailbox(), 0, 10, u64::MAX)
                .unwrap();
            r.storage_mut()
                .acknowledge_envelopes(&b.mailbox(), &[envelopes[0].id])
                .unwrap();
            envelopes[0].clone()
        })
        .unwrap();
    let mut forged = original.clone();
    forged.id = EnvelopeId([0xf0; 16]);
    *forged.payload.last_mut().unwrap() ^= 1;
    block_on(w.relay.deposit(&b.mailbox(), &forged, &DepositPass::NONE)).unwrap();
    let now = w.now();
    let report = block_on(bob.receive(&mut w.rng, now)).unwrap();
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(held(&bob, &a), PeerAccess::default());

    // The authentic bytes (under a fresh id) do store it.
    let mut authentic = original;
    authentic.id = EnvelopeId([0xf1; 16]);
    block_on(
        w.relay
            .deposit(&b.mailbox(), &authentic, &DepositPass::NONE),
    )
    .unwrap();
    assert_eq!(w.receive(&mut bob), [b"hello".to_vec()]);
    assert_eq!(held(&bob, &a).key, Some(own(&alice)));
}

#[test]
fn a_full_strangers_share_keeps_the_message_queued() {
    // A relay whose strangers' share holds one envelope.
    let clock = Arc::new(Mutex::new(T0));
    let c = clock.clone();
    let relay: Honest = InProcessRelay::with_clock(
        Relay::new(
            MemoryRelayStorage::new(),
            RelayConfig {
                deposit_stamp_difficulty: 8,
                identity_stamp_difficulty: 0,
                max_stranger_envelopes: 1,
                ..RelayConfig::default()
            },
        ),
        Arc::new(move || *c.lock().unwrap()),
    );
    let mut w = World {
        clock,
        relay,
        rng: ChaCha20Rng::seed_from_u64(17),
    };
    let mut alice = w.device(MemoryStore::new());
    let mut carol = w.device(MemoryStore::new());
    let bob = w.device(MemoryStore::new());
    let b = bob.address();
    w.send(&mut alice, &b, b"first stranger");
    let now = w.now();
    let sent = block_on(carol.send(&mut w.rng, &b, b"second stranger", now)).unwrap();
    assert!(!sent.deposited, "the strangers' share is full");
    assert_eq!(
        block_on(carol.delivery(&sent.message)).unwrap(),
        Some(cubbyhole::storage::DeliveryState::Stored)
    );
    assert_eq!(block_on(carol.store().outbox()).unwrap().len(), 1);
    let _ = bob;
}
