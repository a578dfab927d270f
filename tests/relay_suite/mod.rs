//! The relay-rules suite, generic over the storage backend. Shared by the
//! root crate's `tests/relay.rs` (memory, SQLite) and the relay crate's
//! `relay/tests/postgres.rs` (PostgreSQL), each of which includes it with
//! `#[macro_use] #[path = ...] mod relay_suite;`, brings its items into scope
//! with `use relay_suite::*;` and instantiates it with `all_tests!`.
//!
//! Not a test target of its own: Cargo only builds `tests/*.rs` and
//! `tests/*/main.rs`.

// Each including crate uses a different part of the helpers.
#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::relay::{reason, InProcessRelay, Relay, RelayConfig, RelayStorage};
use cubbyhole::transport::stamp::Stamp;
use cubbyhole::transport::{
    AccessKey, BundleSetUpload, DepositPass, DeviceAddress, Envelope, EnvelopeId, Mailbox,
    MailboxAuth, MailboxId, MailboxOp, PrekeyDirectory, TransportError,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, PrekeyBundle, SignedPrekey};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub const NOW: u64 = 1_800_000_000;

// ---------------------------------------------------------------- helpers

pub struct NoopWaker;

impl Wake for NoopWaker {
    fn wake(self: Arc<Self>) {}
}

/// Polls a future to completion (the in-process relay's are ready at once).
pub fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(NoopWaker));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

pub fn assert_send<T: Send>(value: T) -> T {
    value
}

pub struct Device {
    pub keys: IdentityKeyPair,
    pub device_id: u32,
    pub signed_prekey: SignedPrekey,
    pub one_time_prekeys: Vec<OneTimePrekey>,
}

impl Device {
    pub fn new(rng: &mut ChaCha20Rng, device_id: u32, one_time_prekeys: u32) -> Self {
        let keys = IdentityKeyPair::generate(rng);
        let signed_prekey =
            SignedPrekey::generate(rng, &keys, 1, NOW).expect("time in unix seconds");
        let one_time_prekeys = (0..one_time_prekeys)
            .map(|i| OneTimePrekey::generate(rng, 100 + i))
            .collect();
        Device {
            keys,
            device_id,
            signed_prekey,
            one_time_prekeys,
        }
    }

    pub fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.keys.public(), self.device_id)
    }

    pub fn mailbox(&self) -> MailboxId {
        self.address().mailbox()
    }

    pub fn upload_of(
        &self,
        counter: u64,
        opks: &[&OneTimePrekey],
        replace: bool,
    ) -> BundleSetUpload {
        BundleSetUpload::new(
            self.device_id,
            &self.keys,
            counter,
            &self.signed_prekey,
            opks,
            replace,
        )
    }

    /// An upload of all its one-time prekeys.
    pub fn upload(&self, counter: u64, replace: bool) -> Vec<u8> {
        let opks: Vec<&OneTimePrekey> = self.one_time_prekeys.iter().collect();
        self.upload_of(counter, &opks, replace).sign(&self.keys)
    }

    pub fn auth(&self, op: MailboxOp, challenge: [u8; 32]) -> MailboxAuth {
        MailboxAuth::sign(&self.keys, self.device_id, op, challenge)
    }
}

pub fn envelope(n: u8, len: usize) -> Envelope {
    Envelope {
        id: EnvelopeId([n; 16]),
        payload: vec![n; len],
    }
}

pub fn ids(envelopes: &[Envelope]) -> Vec<EnvelopeId> {
    envelopes.iter().map(|e| e.id).collect()
}

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Fetches with a fresh challenge at `now`.
pub fn fetch_all<S: RelayStorage>(
    relay: &mut Relay<S>,
    rng: &mut ChaCha20Rng,
    owner: &Device,
    now: u64,
) -> Vec<Envelope> {
    let challenge = relay.challenge(now, rng, &owner.mailbox()).unwrap();
    relay
        .fetch(now, &owner.auth(MailboxOp::Fetch, challenge), u32::MAX)
        .unwrap()
}

pub fn acknowledge<S: RelayStorage>(
    relay: &mut Relay<S>,
    rng: &mut ChaCha20Rng,
    owner: &Device,
    now: u64,
    ids: &[EnvelopeId],
) {
    let challenge = relay.challenge(now, rng, &owner.mailbox()).unwrap();
    relay
        .acknowledge(now, &owner.auth(MailboxOp::Acknowledge, challenge), ids)
        .unwrap();
}

/// A relay with a published Bob (no one-time prekeys) over `storage`.
pub fn with_bob<S: RelayStorage>(
    storage: S,
    config: RelayConfig,
) -> (Relay<S>, ChaCha20Rng, Device) {
    let mut rng = rng(7);
    let bob = Device::new(&mut rng, 1, 0);
    let mut relay = Relay::new(storage, config);
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    (relay, rng, bob)
}

// ------------------------------------------------- generic test bodies

pub fn publish_and_fetch<S: RelayStorage>(storage: S) {
    let mut rng = rng(1);
    let bob = Device::new(&mut rng, 3, 2);
    let mut relay = Relay::new(storage, RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(1, false)).unwrap();
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(2));

    // Each fetch claims one one-time prekey, oldest first, exactly once.
    for (left, opk) in [(1, &bob.one_time_prekeys[0]), (0, &bob.one_time_prekeys[1])] {
        let bytes = relay.fetch_bundle(NOW, &bob.address()).unwrap();
        assert_eq!(
            bytes,
            PrekeyBundle::new(&bob.keys, &bob.signed_prekey, Some(opk)).encode()
        );
        let bundle = PrekeyBundle::decode(&bytes)
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        assert_eq!(bundle.identity(), bob.keys.public());
        assert_eq!(bundle.one_time_prekey(), Some((opk.id(), opk.public())));
        assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(left));
    }

    // An empty pool gives bundles without a one-time prekey.
    for _ in 0..2 {
        let bytes = relay.fetch_bundle(NOW, &bob.address()).unwrap();
        assert_eq!(
            bytes,
            PrekeyBundle::new(&bob.keys, &bob.signed_prekey, None).encode()
        );
        let bundle = PrekeyBundle::decode(&bytes)
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        assert_eq!(bundle.one_time_prekey(), None);
    }
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(0));

    // Another device number of the same identity is another device.
    let other = DeviceAddress {
        device_id: 4,
        ..bob.address()
    };
    assert_eq!(
        relay.fetch_bundle(NOW, &other),
        Err(TransportError::NotFound)
    );
}

pub fn unknown_device_is_not_found<S: RelayStorage>(storage: S) {
    let mut rng = rng(2);
    let nobody = Device::new(&mut rng, 1, 0);
    let mut relay = Relay::new(storage, RelayConfig::unpriced());
    assert_eq!(
        relay.fetch_bundle(NOW, &nobody.address()),
        Err(TransportError::NotFound)
    );
    assert_eq!(
        relay.one_time_prekeys_left(&nobody.address()),
        Err(TransportError::NotFound)
    );
}

pub fn add_and_replace_pool<S: RelayStorage>(storage: S) {
    let mut rng = rng(3);
    let mut bob = Device::new(&mut rng, 1, 5);
    let opk = &bob.one_time_prekeys;
    let mut relay = Relay::new(storage, RelayConfig::unpriced());
    let addr = bob.address();

    relay
        .publish(
            NOW,
            &bob.upload_of(1, &[&opk[0], &opk[1]], false).sign(&bob.keys),
        )
        .unwrap();
    // Adding: an id already pooled is not counted twice.
    relay
        .publish(
            NOW,
            &bob.upload_of(2, &[&opk[1], &opk[2]], false).sign(&bob.keys),
        )
        .unwrap();
    assert_eq!(relay.one_time_prekeys_left(&addr), Ok(3));
    // Replacing drops the old pool.
    relay
        .publish(NOW, &bob.upload_of(3, &[&opk[4]], true).sign(&bob.keys))
        .unwrap();
    assert_eq!(relay.one_time_prekeys_left(&addr), Ok(1));
    let bundle = PrekeyBundle::decode(&relay.fetch_bundle(NOW, &addr).unwrap()).unwrap();
    assert_eq!(
        bundle.one_time_prekey(),
        Some((opk[4].id(), opk[4].public()))
    );

    // A new signed prekey replaces the old one.
    bob.signed_prekey =
        SignedPrekey::generate(&mut rng, &bob.keys, 2, NOW + 100).expect("time in unix seconds");
    relay
        .publish(NOW + 100, &bob.upload_of(4, &[], false).sign(&bob.keys))
        .unwrap();
    let bundle = PrekeyBundle::decode(&relay.fetch_bundle(NOW, &addr).unwrap()).unwrap();
    assert_eq!(bundle.signed_prekey_id(), 2);
    assert_eq!(bundle.signed_prekey(), bob.signed_prekey.public());

    // Duplicate ids within one upload are malformed.
    let dup = bob.upload_of(5, &[&opk[0], &opk[0]], false).sign(&bob.keys);
    assert!(matches!(
        relay.publish(NOW, &dup),
        Err(TransportError::BadRequest(_))
    ));
}

pub fn replayed_upload_is_refused<S: RelayStorage>(storage: S) {
    let mut rng = rng(4);
    let bob = Device::new(&mut rng, 1, 2);
    let mut relay = Relay::new(storage, RelayConfig::unpriced());
    let first = bob.upload(5, false);
    relay.publish(NOW, &first).unwrap();
    let claimed = relay.fetch_bundle(NOW, &bob.address()).unwrap();
    assert!(PrekeyBundle::decode(&claimed)
        .unwrap()
        .one_time_prekey()
        .is_some());

    // The same upload again would re-add the claimed one-time prekey.
    assert_eq!(relay.publish(NOW, &first), Err(TransportError::Replayed));
    assert_eq!(
        relay.publish(NOW, &bob.upload(4, true)),
        Err(TransportError::Replayed)
    );
    assert_eq!(
        relay.publish(NOW, &bob.upload(5, true)),
        Err(TransportError::Replayed)
    );
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(1));
    relay.publish(NOW, &bob.upload(6, true)).unwrap();
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(2));
}

pub fn forged_upload_is_refused<S: RelayStorage>(storage: S) {
    let mut rng = rng(5);
    let bob = Device::new(&mut rng, 1, 2);
    let mallory = Device::new(&mut rng, 1, 2);
    let mut relay = Relay::new(storage, RelayConfig::unpriced());
    relay.publish(NOW, &bob.upload(1, true)).unwrap();

    // A flipped bit in the upload signature.
    let mut forged = bob.upload(2, true);
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(
        relay.publish(NOW, &forged),
        Err(TransportError::Unauthorized)
    );
    // A changed one-time prekey under Bob's signature.
    let mut forged = bob.upload(2, true);
    let len = forged.len();
    forged[len - 64 - 1] ^= 1;
    assert_eq!(
        relay.publish(NOW, &forged),
        Err(TransportError::Unauthorized)
    );

    // Bob's device, Mallory's keys and signature.
    let mut upload = mallory.upload_of(2, &[&mallory.one_time_prekeys[0]], true);
    upload.device = bob.address();
    assert_eq!(
        relay.publish(NOW, &upload.sign(&mallory.keys)),
        Err(TransportError::Unauthorized)
    );
    // Bob's signature on the upload, Mallory's on the signed prekey.
    let upload = BundleSetUpload::new(1, &bob.keys, 2, &mallory.signed_prekey, &[], true);
    assert_eq!(
        relay.publish(NOW, &upload.sign(&bob.keys)),
        Err(TransportError::Unauthorized)
    );
    // Garbage.
    assert!(matches!(
        relay.publish(NOW, &[1, 2, 3]),
        Err(TransportError::BadRequest(_))
    ));

    // Bob's record and pool are untouched.
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(2));
    let bundle = PrekeyBundle::decode(&relay.fetch_bundle(NOW, &bob.address()).unwrap()).unwrap();
    assert_eq!(bundle.signed_prekey(), bob.signed_prekey.public());
    assert_eq!(
        bundle.one_time_prekey(),
        Some((
            bob.one_time_prekeys[0].id(),
            bob.one_time_prekeys[0].public()
        ))
    );
}

pub fn one_time_prekey_bound<S: RelayStorage>(storage: S) {
    let mut rng = rng(6);
    let bob = Device::new(&mut rng, 1, 4);
    let opk = &bob.one_time_prekeys;
    let config = RelayConfig {
        max_one_time_prekeys: 3,
        ..RelayConfig::unpriced()
    };
    let mut relay = Relay::new(storage, config);
    let limit = Err(TransportError::LimitExceeded(reason::ONE_TIME_PREKEYS));

    assert_eq!(relay.publish(NOW, &bob.upload(1, true)), limit);
    assert_eq!(
        relay.fetch_bundle(NOW, &bob.address()),
        Err(TransportError::NotFound)
    );
    relay
        .publish(
            NOW,
            &bob.upload_of(2, &[&opk[0], &opk[1]], false).sign(&bob.keys),
        )
        .unwrap();
    // Adding two more would make four: refused whole, nothing changes.
    let more = bob.upload_of(3, &[&opk[2], &opk[3]], false).sign(&bob.keys);
    assert_eq!(relay.publish(NOW, &more), limit);
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(2));
    // The refused upload did not use up its counter.
    relay
        .publish(NOW, &bob.upload_of(3, &[&opk[2]], false).sign(&bob.keys))
        .unwrap();
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(3));
    // Replacing with three is fine.
    relay
        .publish(
            NOW,
            &bob.upload_of(4, &[&opk[1], &opk[2], &opk[3]], true)
                .sign(&bob.keys),
        )
        .unwrap();
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(3));
}

pub fn mailbox_round_trip<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob) = with_bob(storage, RelayConfig::unpriced());
    for n in 1..=3 {
        relay
            .deposit(
                NOW + u64::from(n),
                &bob.mailbox(),
                &envelope(n, 10),
                &DepositPass::NONE,
            )
            .unwrap();
    }
    let fetched = fetch_all(&mut relay, &mut rng, &bob, NOW + 5);
    assert_eq!(
        fetched,
        vec![envelope(1, 10), envelope(2, 10), envelope(3, 10)]
    );

    // The limit takes the oldest.
    let challenge = relay.challenge(NOW + 5, &mut rng, &bob.mailbox()).unwrap();
    let two = relay
        .fetch(NOW + 5, &bob.auth(MailboxOp::Fetch, challenge), 2)
        .unwrap();
    assert_eq!(ids(&two), ids(&fetched[..2]));

    // Acknowledging deletes; unknown ids are ignored.
    acknowledge(
        &mut relay,
        &mut rng,
        &bob,
        NOW + 6,
        &[fetched[0].id, fetched[2].id, EnvelopeId([99; 16])],
    );
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW + 7),
        vec![envelope(2, 10)]
    );
    acknowledge(&mut relay, &mut rng, &bob, NOW + 8, &[fetched[1].id]);
    assert!(fetch_all(&mut relay, &mut rng, &bob, NOW + 9).is_empty());
}

pub fn deposit_is_idempotent<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob) = with_bob(storage, RelayConfig::unpriced());
    let mailbox = bob.mailbox();
    relay
        .deposit(NOW, &mailbox, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW + 1, &mailbox, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    // Same id, other bytes: still the first one, stored once.
    let mut other = envelope(1, 20);
    other.payload[0] = 0xee;
    relay
        .deposit(NOW + 2, &mailbox, &other, &DepositPass::NONE)
        .unwrap();
    let usage = relay.storage().mailbox_usage(&mailbox).unwrap();
    assert_eq!((usage.envelopes, usage.bytes), (1, 10));
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW + 3),
        vec![envelope(1, 10)]
    );

    // The same id in another mailbox is another envelope.
    let mut rng2 = ChaCha20Rng::seed_from_u64(70);
    let carol = Device::new(&mut rng2, 1, 0);
    relay.publish(NOW, &carol.upload(1, true)).unwrap();
    relay
        .deposit(NOW, &carol.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &carol, NOW + 3),
        vec![envelope(1, 10)]
    );

    // A retry after the acknowledgment is not delivered again.
    acknowledge(&mut relay, &mut rng, &bob, NOW + 4, &[EnvelopeId([1; 16])]);
    relay
        .deposit(NOW + 5, &mailbox, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    assert!(fetch_all(&mut relay, &mut rng, &bob, NOW + 6).is_empty());
    // ... until the retention period of the original is over.
    let later = NOW + RelayConfig::DEFAULT_RETENTION + 1;
    relay
        .deposit(later, &mailbox, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, later),
        vec![envelope(1, 10)]
    );
}

pub fn deposit_needs_a_published_mailbox<S: RelayStorage>(storage: S) {
    let mut rng = rng(8);
    let stranger = Device::new(&mut rng, 1, 0);
    let mut relay = Relay::new(storage, RelayConfig::unpriced());
    assert_eq!(
        relay.deposit(
            NOW,
            &stranger.mailbox(),
            &envelope(1, 10),
            &DepositPass::NONE
        ),
        Err(TransportError::NotFound)
    );
    assert_eq!(
        relay.challenge(NOW, &mut rng, &stranger.mailbox()),
        Err(TransportError::NotFound)
    );
    relay.publish(NOW, &stranger.upload(1, true)).unwrap();
    relay
        .deposit(
            NOW,
            &stranger.mailbox(),
            &envelope(1, 10),
            &DepositPass::NONE,
        )
        .unwrap();

    // The check can be turned off.
    let anyone = MailboxId([5; 32]);
    let mut open = Relay::new(
        relay.into_storage(),
        RelayConfig {
            require_published_mailbox: false,
            ..RelayConfig::unpriced()
        },
    );
    open.deposit(NOW, &anyone, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    open.challenge(NOW, &mut rng, &anyone).unwrap();
}

pub fn stranger_cannot_read_or_delete<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob) = with_bob(storage, RelayConfig::unpriced());
    let mallory = Device::new(&mut rng, 1, 0);
    relay.publish(NOW, &mallory.upload(1, true)).unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();

    let mut bobs_challenges = Vec::new();
    for op in [MailboxOp::Fetch, MailboxOp::Acknowledge] {
        // Mallory's signature under Bob's address, over a challenge for Bob.
        let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
        bobs_challenges.push(challenge);
        let mut auth = mallory.auth(op, challenge);
        auth.device = bob.address();
        assert_eq!(auth.mailbox(), bob.mailbox());
        let result = match op {
            MailboxOp::Fetch => relay.fetch(NOW, &auth, 10).map(|_| ()),
            MailboxOp::Acknowledge => relay.acknowledge(NOW, &auth, &[EnvelopeId([1; 16])]),
        };
        assert_eq!(result, Err(TransportError::Unauthorized));

        // A valid proof for Mallory's own mailbox, over Bob's challenge.
        let auth = mallory.auth(op, challenge);
        let result = match op {
            MailboxOp::Fetch => relay.fetch(NOW, &auth, 10).map(|_| ()),
            MailboxOp::Acknowledge => relay.acknowledge(NOW, &auth, &[EnvelopeId([1; 16])]),
        };
        assert_eq!(result, Err(TransportError::Unauthorized));

        // A challenge nobody issued.
        let auth = bob.auth(op, [0x42; 32]);
        let result = match op {
            MailboxOp::Fetch => relay.fetch(NOW, &auth, 10).map(|_| ()),
            MailboxOp::Acknowledge => relay.acknowledge(NOW, &auth, &[EnvelopeId([1; 16])]),
        };
        assert_eq!(result, Err(TransportError::Unauthorized));
    }
    // Bob's envelope is still there, and his challenges were not burnt by
    // the refused proofs.
    for challenge in bobs_challenges {
        assert_eq!(
            relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 10),
            Ok(vec![envelope(1, 10)])
        );
    }
}

pub fn challenges_are_single_use_fresh_and_per_op<S: RelayStorage>(storage: S) {
    let config = RelayConfig::unpriced();
    let ttl = config.challenge_ttl;
    let (mut relay, mut rng, bob) = with_bob(storage, config);
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();

    // Reuse.
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    let auth = bob.auth(MailboxOp::Fetch, challenge);
    assert_eq!(relay.fetch(NOW, &auth, 10).unwrap().len(), 1);
    assert_eq!(
        relay.fetch(NOW, &auth, 10),
        Err(TransportError::Unauthorized)
    );
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    let ack = bob.auth(MailboxOp::Acknowledge, challenge);
    relay.acknowledge(NOW, &ack, &[]).unwrap();
    assert_eq!(
        relay.acknowledge(NOW, &ack, &[]),
        Err(TransportError::Unauthorized)
    );

    // Expiry: valid up to `ttl` seconds after issue, not after.
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    relay
        .fetch(NOW + ttl, &bob.auth(MailboxOp::Fetch, challenge), 10)
        .unwrap();
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(
        relay.fetch(NOW + ttl + 1, &bob.auth(MailboxOp::Fetch, challenge), 10),
        Err(TransportError::Unauthorized)
    );
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(
        relay.acknowledge(
            NOW + ttl + 1,
            &bob.auth(MailboxOp::Acknowledge, challenge),
            &[EnvelopeId([1; 16])]
        ),
        Err(TransportError::Unauthorized)
    );

    // Wrong op, both ways; the challenge survives a refused proof.
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(
        relay.acknowledge(
            NOW,
            &bob.auth(MailboxOp::Fetch, challenge),
            &[EnvelopeId([1; 16])]
        ),
        Err(TransportError::Unauthorized)
    );
    assert_eq!(
        relay.fetch(NOW, &bob.auth(MailboxOp::Acknowledge, challenge), 10),
        Err(TransportError::Unauthorized)
    );
    assert_eq!(
        relay
            .fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 10)
            .unwrap(),
        vec![envelope(1, 10)]
    );
}

/// Requesting challenges writes nothing, so a stranger who requests many
/// for a mailbox cannot evict the owner's (SPEC.md 16.4).
pub fn strangers_cannot_evict_a_challenge<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob) = with_bob(storage, RelayConfig::unpriced());
    let bobs = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    let mut strangers = ChaCha20Rng::seed_from_u64(99);
    for _ in 0..10_000 {
        relay
            .challenge(NOW + 1, &mut strangers, &bob.mailbox())
            .unwrap();
    }
    // Nothing was stored for them (nor for Bob's).
    assert_eq!(relay.storage_mut().purge_challenges(u64::MAX).unwrap(), 0);
    relay
        .fetch(NOW + 2, &bob.auth(MailboxOp::Fetch, bobs), 10)
        .unwrap();
    // Used once, it is refused the second time.
    assert_eq!(
        relay.fetch(NOW + 3, &bob.auth(MailboxOp::Fetch, bobs), 10),
        Err(TransportError::Unauthorized)
    );
}

/// A challenge is checked by its tag (SPEC.md 16.4): one altered in any
/// byte, one issued for another mailbox and one from a relay with another
/// key are refused; none of them is used up by the refusal.
pub fn challenges_are_authenticated<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob) = with_bob(storage, RelayConfig::unpriced());
    let mallory = Device::new(&mut rng, 2, 0);
    relay.publish(NOW, &mallory.upload(1, true)).unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .unwrap();

    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(challenge[..8], NOW.to_be_bytes(), "issued_at first");
    for byte in [0, 7, 8, 15, 16, 31] {
        let mut forged = challenge;
        forged[byte] ^= 1;
        assert_eq!(
            relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, forged), 10),
            Err(TransportError::Unauthorized),
            "a challenge with byte {byte} altered"
        );
    }
    // An issue time moved back into the window with the tag kept: refused.
    let mut moved = challenge;
    moved[..8].copy_from_slice(&(NOW - 1).to_be_bytes());
    assert_eq!(
        relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, moved), 10),
        Err(TransportError::Unauthorized)
    );

    // Mallory's own challenge, signed by Bob for his mailbox.
    let mallorys = relay.challenge(NOW, &mut rng, &mallory.mailbox()).unwrap();
    assert_eq!(
        relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, mallorys), 10),
        Err(TransportError::Unauthorized)
    );
    // ... which still works for Mallory (the refusal did not use it).
    relay
        .fetch(NOW, &mallory.auth(MailboxOp::Fetch, mallorys), 10)
        .unwrap();

    // A challenge made with another key (another relay's).
    let mut other = Relay::new(
        cubbyhole::relay::MemoryRelayStorage::new(),
        RelayConfig {
            require_published_mailbox: false,
            ..RelayConfig::unpriced()
        },
    );
    let foreign = other.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert_eq!(
        relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, foreign), 10),
        Err(TransportError::Unauthorized)
    );

    // The genuine one still works, once.
    assert_eq!(
        relay
            .fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 10)
            .unwrap(),
        vec![envelope(1, 10)]
    );
    assert_eq!(
        relay.fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 10),
        Err(TransportError::Unauthorized)
    );
}

/// Whether a bundle carries a one-time prekey (and is a bundle of `owner`).
fn has_one_time_prekey(bytes: &[u8], owner: &Device) -> bool {
    let bundle = PrekeyBundle::decode(bytes)
        .unwrap()
        .verify(NOW, FreshnessPolicy::default())
        .unwrap();
    assert_eq!(bundle.identity(), owner.keys.public());
    bundle.one_time_prekey().is_some()
}

/// One-time-prekey claims are limited per device, whoever asks (SPEC.md
/// 16.2): a burst, then the rate; the bundles keep coming, without a
/// one-time prekey.
pub fn one_time_prekey_claims_are_limited_per_device<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        claims_per_device_burst: 5,
        claims_per_device_per_hour: 60,
        ..RelayConfig::unpriced()
    };
    let mut rng = rng(11);
    let bob = Device::new(&mut rng, 1, 50);
    let alice = Device::new(&mut rng, 2, 3);
    let mut relay = Relay::new(storage, config);
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    relay.publish(NOW, &alice.upload(1, true)).unwrap();

    let claimed = |relay: &mut Relay<S>, at: u64, fetches: u32| -> u32 {
        (0..fetches)
            .filter(|_| has_one_time_prekey(&relay.fetch_bundle(at, &bob.address()).unwrap(), &bob))
            .count() as u32
    };
    // A flood (as from any number of addresses): the burst, then nothing.
    assert_eq!(claimed(&mut relay, NOW, 200), 5);
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(45));
    // Another device's budget is its own.
    assert!(has_one_time_prekey(
        &relay.fetch_bundle(NOW, &alice.address()).unwrap(),
        &alice
    ));
    // One a minute.
    assert_eq!(claimed(&mut relay, NOW + 59, 10), 0);
    assert_eq!(claimed(&mut relay, NOW + 60, 10), 1);
    assert_eq!(claimed(&mut relay, NOW + 180, 10), 2);
    // An hour of quiet refills the burst, no more.
    assert_eq!(claimed(&mut relay, NOW + 3780, 100), 5);
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(37));
    // Bob's refill (an upload) does not reset the budget.
    relay.publish(NOW + 3780, &bob.upload(2, true)).unwrap();
    assert_eq!(claimed(&mut relay, NOW + 3780, 10), 0);
    assert_eq!(relay.one_time_prekeys_left(&bob.address()), Ok(50));

    // With the budget off, every fetch claims.
    let mut open = Relay::new(
        relay.into_storage(),
        RelayConfig {
            claims_per_device_per_hour: 0,
            ..RelayConfig::unpriced()
        },
    );
    assert_eq!(claimed(&mut open, NOW + 3780, 60), 50);
}

pub fn envelope_size_bound<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_envelope_bytes: 100,
        ..RelayConfig::unpriced()
    };
    let (mut relay, mut rng, bob) = with_bob(storage, config);
    assert_eq!(
        relay.deposit(NOW, &bob.mailbox(), &envelope(1, 101), &DepositPass::NONE),
        Err(TransportError::LimitExceeded(reason::ENVELOPE_SIZE))
    );
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(2, 100), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW),
        vec![envelope(2, 100)]
    );
}

/// An empty payload is refused (no wire message is empty), before any
/// other check, and nothing is stored.
pub fn empty_payload_is_refused<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob) = with_bob(storage, RelayConfig::unpriced());
    assert_eq!(
        relay.deposit(NOW, &bob.mailbox(), &envelope(1, 0), &DepositPass::NONE),
        Err(TransportError::BadRequest(reason::EMPTY_PAYLOAD))
    );
    let unknown = DeviceAddress {
        identity: [9; 32],
        device_id: 1,
    }
    .mailbox();
    assert_eq!(
        relay.deposit(NOW, &unknown, &envelope(2, 0), &DepositPass::NONE),
        Err(TransportError::BadRequest(reason::EMPTY_PAYLOAD))
    );
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(3, 1), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW),
        vec![envelope(3, 1)]
    );
}

pub fn mailbox_count_bound<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_pending_envelopes: 2,
        ..RelayConfig::unpriced()
    };
    let (mut relay, mut rng, bob) = with_bob(storage, config);
    let mailbox = bob.mailbox();
    relay
        .deposit(NOW, &mailbox, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW, &mailbox, &envelope(2, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        relay.deposit(NOW, &mailbox, &envelope(3, 10), &DepositPass::NONE),
        Err(TransportError::LimitExceeded(reason::PENDING_ENVELOPES))
    );
    // A retry of a stored envelope is still accepted.
    relay
        .deposit(NOW, &mailbox, &envelope(2, 10), &DepositPass::NONE)
        .unwrap();
    // Acknowledging makes room.
    acknowledge(&mut relay, &mut rng, &bob, NOW, &[EnvelopeId([1; 16])]);
    relay
        .deposit(NOW, &mailbox, &envelope(3, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        ids(&fetch_all(&mut relay, &mut rng, &bob, NOW)),
        vec![EnvelopeId([2; 16]), EnvelopeId([3; 16])]
    );
}

pub fn mailbox_bytes_bound<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_pending_bytes: 250,
        ..RelayConfig::unpriced()
    };
    let (mut relay, mut rng, bob) = with_bob(storage, config);
    let mailbox = bob.mailbox();
    relay
        .deposit(NOW, &mailbox, &envelope(1, 100), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW, &mailbox, &envelope(2, 100), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        relay.deposit(NOW, &mailbox, &envelope(3, 100), &DepositPass::NONE),
        Err(TransportError::LimitExceeded(reason::PENDING_BYTES))
    );
    relay
        .deposit(NOW, &mailbox, &envelope(4, 50), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        relay.deposit(NOW, &mailbox, &envelope(5, 1), &DepositPass::NONE),
        Err(TransportError::LimitExceeded(reason::PENDING_BYTES))
    );
    acknowledge(&mut relay, &mut rng, &bob, NOW, &[EnvelopeId([1; 16])]);
    relay
        .deposit(NOW, &mailbox, &envelope(3, 100), &DepositPass::NONE)
        .unwrap();
    let usage = relay.storage().mailbox_usage(&mailbox).unwrap();
    assert_eq!((usage.envelopes, usage.bytes), (3, 250));
}

/// Group commit: `deposit_batch` answers each envelope as `deposit` one by
/// one would (duplicates within the batch and against pending or
/// acknowledged ids, both mailbox bounds counting the batch's own earlier
/// envelopes, unknown mailboxes, oversized envelopes), keeps the batch's
/// order in each mailbox, and expires old envelopes first.
pub fn deposit_batch_checks_each_envelope<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_envelope_bytes: 100,
        max_pending_envelopes: 5,
        max_pending_bytes: 250,
        ..RelayConfig::unpriced()
    };
    let mut rng = rng(21);
    let bob = Device::new(&mut rng, 1, 0);
    let carol = Device::new(&mut rng, 2, 0);
    let mut relay = Relay::new(storage, config);
    relay.publish(NOW, &bob.upload(1, true)).unwrap();
    relay.publish(NOW, &carol.upload(1, true)).unwrap();
    let unknown = DeviceAddress {
        identity: [9; 32],
        device_id: 1,
    }
    .mailbox();
    let (b, c) = (bob.mailbox(), carol.mailbox());
    // Pending before the batch: 1 (old enough to expire during it) and 2;
    // acknowledged: 3.
    relay
        .deposit(NOW, &b, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    let later = NOW + RelayConfig::DEFAULT_RETENTION / 2 + 1;
    relay
        .deposit(later, &b, &envelope(2, 10), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(later, &b, &envelope(3, 10), &DepositPass::NONE)
        .unwrap();
    acknowledge(&mut relay, &mut rng, &bob, later, &[EnvelopeId([3; 16])]);
    let now = NOW + RelayConfig::DEFAULT_RETENTION + 1;
    let batch = vec![
        (b, envelope(2, 10), DepositPass::NONE),  // pending: a repeat
        (b, envelope(3, 10), DepositPass::NONE),  // acknowledged: a repeat
        (b, envelope(1, 10), DepositPass::NONE),  // expired just now: new again
        (b, envelope(4, 101), DepositPass::NONE), // too big
        (c, envelope(5, 100), DepositPass::NONE), // stored
        (b, envelope(6, 100), DepositPass::NONE), // stored: Bob has 2, 1, 6 (120 bytes)
        (c, envelope(5, 100), DepositPass::NONE), // a repeat within the batch
        (b, envelope(7, 100), DepositPass::NONE), // stored: 220 bytes
        (b, envelope(8, 40), DepositPass::NONE),  // 260 bytes: over the byte bound
        (unknown, envelope(9, 10), DepositPass::NONE), // never published
        (b, envelope(10, 30), DepositPass::NONE), // stored: five envelopes, 250 bytes
        (b, envelope(11, 1), DepositPass::NONE),  // a sixth: over the count bound
        (b, envelope(13, 0), DepositPass::NONE),  // empty: refused before anything
        (c, envelope(12, 100), DepositPass::NONE), // stored
    ];
    let results = relay.deposit_batch(now, &batch);
    let pending_envelopes = Err(TransportError::LimitExceeded(reason::PENDING_ENVELOPES));
    let pending_bytes = Err(TransportError::LimitExceeded(reason::PENDING_BYTES));
    let size = Err(TransportError::LimitExceeded(reason::ENVELOPE_SIZE));
    assert_eq!(
        results,
        vec![
            Ok(false),
            Ok(false),
            Ok(true),
            size,
            Ok(true),
            Ok(true),
            Ok(false),
            Ok(true),
            pending_bytes,
            Err(TransportError::NotFound),
            Ok(true),
            pending_envelopes,
            Err(TransportError::BadRequest(reason::EMPTY_PAYLOAD)),
            Ok(true),
        ]
    );
    let listed = |relay: &Relay<S>, mailbox| {
        relay
            .storage()
            .list_envelopes(&mailbox, 0, 100, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| e.id.0[0])
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(&relay, b), vec![2, 1, 6, 7, 10]);
    assert_eq!(listed(&relay, c), vec![5, 12]);
    let usage = relay.storage().mailbox_usage(&b).unwrap();
    assert_eq!((usage.envelopes, usage.bytes), (5, 250));
    // An empty batch is fine.
    assert!(relay.deposit_batch(now, &[]).is_empty());
}

pub fn fetch_and_acknowledge_bounds<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_fetch_envelopes: 3,
        max_fetch_bytes: 250,
        max_acknowledge_ids: 2,
        ..RelayConfig::unpriced()
    };
    let (mut relay, mut rng, bob) = with_bob(storage, config);
    for n in 1..=5 {
        relay
            .deposit(NOW, &bob.mailbox(), &envelope(n, 10), &DepositPass::NONE)
            .unwrap();
    }
    // At most three per fetch.
    assert_eq!(fetch_all(&mut relay, &mut rng, &bob, NOW).len(), 3);
    // A zero limit returns nothing.
    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    assert!(relay
        .fetch(NOW, &bob.auth(MailboxOp::Fetch, challenge), 0)
        .unwrap()
        .is_empty());

    let challenge = relay.challenge(NOW, &mut rng, &bob.mailbox()).unwrap();
    let ack = bob.auth(MailboxOp::Acknowledge, challenge);
    let three = [
        EnvelopeId([1; 16]),
        EnvelopeId([2; 16]),
        EnvelopeId([3; 16]),
    ];
    assert_eq!(
        relay.acknowledge(NOW, &ack, &three),
        Err(TransportError::LimitExceeded(reason::ACKNOWLEDGE_IDS))
    );
    relay.acknowledge(NOW, &ack, &three[..2]).unwrap();
    acknowledge(&mut relay, &mut rng, &bob, NOW, &[three[2]]);

    // Bytes: at most 250 per fetch, but an envelope larger than that
    // still comes, alone.
    acknowledge(
        &mut relay,
        &mut rng,
        &bob,
        NOW,
        &[EnvelopeId([4; 16]), EnvelopeId([5; 16])],
    );
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(6, 300), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(7, 200), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(8, 50), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW, &bob.mailbox(), &envelope(9, 1), &DepositPass::NONE)
        .unwrap();
    let batch = fetch_all(&mut relay, &mut rng, &bob, NOW);
    assert_eq!(ids(&batch), vec![EnvelopeId([6; 16])]);
    acknowledge(&mut relay, &mut rng, &bob, NOW, &ids(&batch));
    let batch = fetch_all(&mut relay, &mut rng, &bob, NOW);
    assert_eq!(ids(&batch), vec![EnvelopeId([7; 16]), EnvelopeId([8; 16])]);
}

pub fn retention_expires_envelopes<S: RelayStorage>(storage: S) {
    let config = RelayConfig {
        max_pending_envelopes: 2,
        ..RelayConfig::unpriced()
    };
    let retention = config.retention;
    let (mut relay, mut rng, bob) = with_bob(storage, config);
    let mailbox = bob.mailbox();
    relay
        .deposit(NOW, &mailbox, &envelope(1, 10), &DepositPass::NONE)
        .unwrap();
    relay
        .deposit(NOW + 10, &mailbox, &envelope(2, 10), &DepositPass::NONE)
        .unwrap();
    // A used challenge is remembered until it expires.
    fetch_all(&mut relay, &mut rng, &bob, NOW);

    // Exactly `retention` old: kept.
    let report = relay.sweep(NOW + retention).unwrap();
    assert_eq!(report.envelopes_expired, 0);
    assert_eq!(report.challenges_expired, 1);
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW + retention).len(),
        2
    );

    // Older: not fetched even before the sweep, not counted by a deposit.
    let later = NOW + retention + 1;
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, later),
        vec![envelope(2, 10)]
    );
    relay
        .deposit(later, &mailbox, &envelope(3, 10), &DepositPass::NONE)
        .unwrap();
    assert_eq!(
        relay.storage().mailbox_usage(&mailbox).unwrap().envelopes,
        2
    );

    let report = relay.sweep(NOW + retention + 11).unwrap();
    assert_eq!(report.envelopes_expired, 1);
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &bob, NOW + retention + 11),
        vec![envelope(3, 10)]
    );
    assert_eq!(
        relay.storage().mailbox_usage(&mailbox).unwrap().envelopes,
        1
    );
}

pub fn in_process_relay<S: RelayStorage + Send + 'static>(storage: S) {
    let mut rng = rng(9);
    let alice = Device::new(&mut rng, 1, 0);
    let bob = Device::new(&mut rng, 2, 1);
    let clock = Arc::new(AtomicU64::new(NOW));
    let relay = InProcessRelay::with_clock(Relay::new(storage, RelayConfig::unpriced()), {
        let clock = Arc::clone(&clock);
        Arc::new(move || clock.load(Ordering::SeqCst))
    });
    let directory = relay.clone();

    block_on(assert_send(directory.publish(&bob.upload(1, true)))).unwrap();
    block_on(directory.publish(&alice.upload(1, true))).unwrap();
    assert_eq!(
        block_on(directory.one_time_prekeys_left(&bob.address())),
        Ok(1)
    );
    let bundle = block_on(assert_send(directory.fetch_bundle(&bob.address()))).unwrap();
    PrekeyBundle::decode(&bundle)
        .unwrap()
        .verify(NOW, FreshnessPolicy::default())
        .unwrap();
    assert_eq!(
        block_on(directory.one_time_prekeys_left(&bob.address())),
        Ok(0)
    );

    block_on(assert_send(relay.deposit(
        &bob.mailbox(),
        &envelope(1, 10),
        &DepositPass::NONE,
    )))
    .unwrap();
    clock.store(NOW + 60, Ordering::SeqCst);
    let challenge = block_on(assert_send(relay.challenge(&bob.mailbox()))).unwrap();
    let fetched = block_on(assert_send(
        relay.fetch(&bob.auth(MailboxOp::Fetch, challenge), 10),
    ))
    .unwrap();
    assert_eq!(fetched, vec![envelope(1, 10)]);

    // Time moves past the challenge's lifetime.
    let challenge = block_on(relay.challenge(&bob.mailbox())).unwrap();
    clock.store(
        NOW + 60 + RelayConfig::DEFAULT_CHALLENGE_TTL + 1,
        Ordering::SeqCst,
    );
    assert_eq!(
        block_on(relay.acknowledge(&bob.auth(MailboxOp::Acknowledge, challenge), &ids(&fetched))),
        Err(TransportError::Unauthorized)
    );
    let challenge = block_on(relay.challenge(&bob.mailbox())).unwrap();
    block_on(assert_send(relay.acknowledge(
        &bob.auth(MailboxOp::Acknowledge, challenge),
        &ids(&fetched),
    )))
    .unwrap();
    let challenge = block_on(relay.challenge(&bob.mailbox())).unwrap();
    assert!(
        block_on(relay.fetch(&bob.auth(MailboxOp::Fetch, challenge), 10))
            .unwrap()
            .is_empty()
    );

    // Retention through the in-process sweep.
    block_on(relay.deposit(&alice.mailbox(), &envelope(2, 10), &DepositPass::NONE)).unwrap();
    clock.fetch_add(RelayConfig::DEFAULT_RETENTION + 1, Ordering::SeqCst);
    assert_eq!(relay.sweep().unwrap().envelopes_expired, 1);
    assert_eq!(relay.now(), clock.load(Ordering::SeqCst));
    let usage = relay
        .with_relay(|r| r.storage().mailbox_usage(&alice.mailbox()).unwrap())
        .unwrap();
    assert_eq!(usage.envelopes, 0);
}

// --------------------------------------------------- instantiations

// ------------------------------------------ access keys, stamps, shares

/// Low difficulties (a test mints in microseconds) and a small strangers'
/// share.
pub fn priced() -> RelayConfig {
    RelayConfig {
        deposit_stamp_difficulty: 8,
        identity_stamp_difficulty: 8,
        max_stranger_envelopes: 3,
        max_stranger_bytes: 1_000,
        ..RelayConfig::unpriced()
    }
}

/// A stamp on this deposit at `now` (difficulty 8).
pub fn stamp(to: &MailboxId, envelope: &Envelope, now: u64) -> DepositPass {
    let len = envelope.payload.len() as u32;
    let stamp = Stamp::mint(to, &envelope.id, len, 8, now, 0, u64::MAX)
        .unwrap()
        .unwrap();
    DepositPass::with_stamp(stamp)
}

/// An identity stamp for `device`'s first upload at `now` (difficulty 8).
pub fn identity_stamp(device: &Device, now: u64) -> Stamp {
    Stamp::mint_identity(&device.address(), 8, now, 0, u64::MAX)
        .unwrap()
        .unwrap()
}

/// `device`'s upload registering `key`, with an identity stamp.
pub fn keyed_upload(device: &Device, counter: u64, key: &AccessKey, now: u64) -> Vec<u8> {
    let mut upload = device.upload_of(counter, &[], true);
    upload.access_verifier = Some(key.verifier(&device.mailbox()));
    upload.identity_stamp = Some(identity_stamp(device, now));
    upload.sign(&device.keys)
}

/// A relay (config [`priced`]) with Bob published with access key `[1; 16]`.
pub fn with_keyed_bob<S: RelayStorage>(
    storage: S,
    config: RelayConfig,
) -> (Relay<S>, ChaCha20Rng, Device, AccessKey) {
    let mut rng = rng(11);
    let bob = Device::new(&mut rng, 1, 0);
    let key = AccessKey::from_bytes([1; 16]);
    let mut relay = Relay::new(storage, config);
    relay
        .publish(NOW, &keyed_upload(&bob, 1, &key, NOW))
        .unwrap();
    (relay, rng, bob, key)
}

pub fn contacts_share_needs_the_access_key<S: RelayStorage>(storage: S) {
    let (mut relay, _, bob, key) = with_keyed_bob(storage, priced());
    let to = bob.mailbox();
    let contact = DepositPass::with_access(key.clone());
    let stranger = |e: &Envelope| stamp(&to, e, NOW);
    // The key admits without work, to the contacts' share.
    relay.deposit(NOW, &to, &envelope(1, 10), &contact).unwrap();
    // No key, a wrong key, a stamp of another deposit, of another mailbox,
    // of an epoch too old: a stamp is required.
    let required = Err(TransportError::StampRequired(8));
    assert_eq!(
        relay.deposit(NOW, &to, &envelope(2, 10), &DepositPass::NONE),
        required
    );
    let wrong = DepositPass::with_access(AccessKey::from_bytes([2; 16]));
    assert_eq!(relay.deposit(NOW, &to, &envelope(2, 10), &wrong), required);
    let other = stranger(&envelope(3, 10));
    assert_eq!(relay.deposit(NOW, &to, &envelope(2, 10), &other), required);
    let elsewhere = stamp(&MailboxId([9; 32]), &envelope(2, 10), NOW);
    assert_eq!(
        relay.deposit(NOW, &to, &envelope(2, 10), &elsewhere),
        required
    );
    let old = stamp(&to, &envelope(2, 10), NOW - 7200);
    assert_eq!(relay.deposit(NOW, &to, &envelope(2, 10), &old), required);
    let usage = relay.storage().mailbox_usage(&to).unwrap();
    assert_eq!((usage.envelopes, usage.stranger_envelopes), (1, 0));
    // A stamp admits to the strangers' share; the previous hour's too.
    relay
        .deposit(NOW, &to, &envelope(2, 10), &stranger(&envelope(2, 10)))
        .unwrap();
    let last_hour = stamp(&to, &envelope(4, 10), NOW - 3600);
    relay
        .deposit(NOW, &to, &envelope(4, 10), &last_hour)
        .unwrap();
    relay
        .deposit(NOW, &to, &envelope(5, 10), &stranger(&envelope(5, 10)))
        .unwrap();
    let usage = relay.storage().mailbox_usage(&to).unwrap();
    assert_eq!((usage.envelopes, usage.stranger_envelopes), (4, 3));
    assert_eq!(usage.stranger_bytes, 30);
    // The strangers' share is full (3): strangers are refused, contacts not.
    assert_eq!(
        relay.deposit(NOW, &to, &envelope(6, 10), &stranger(&envelope(6, 10))),
        Err(TransportError::LimitExceeded(reason::STRANGER_ENVELOPES))
    );
    relay.deposit(NOW, &to, &envelope(7, 10), &contact).unwrap();
    // A repeat of a stranger's id is a repeat, whatever the pass.
    relay.deposit(NOW, &to, &envelope(2, 99), &contact).unwrap();
    let usage = relay.storage().mailbox_usage(&to).unwrap();
    assert_eq!((usage.envelopes, usage.stranger_envelopes), (5, 3));
}

pub fn strangers_share_has_a_byte_bound<S: RelayStorage>(storage: S) {
    let (mut relay, mut rng, bob, key) = with_keyed_bob(storage, priced());
    let to = bob.mailbox();
    let big = envelope(1, 900);
    relay
        .deposit(NOW, &to, &big, &stamp(&to, &big, NOW))
        .unwrap();
    let over = envelope(2, 101);
    assert_eq!(
        relay.deposit(NOW, &to, &over, &stamp(&to, &over, NOW)),
        Err(TransportError::LimitExceeded(reason::STRANGER_BYTES))
    );
    let fits = envelope(3, 100);
    relay
        .deposit(NOW, &to, &fits, &stamp(&to, &fits, NOW))
        .unwrap();
    // Contacts' bytes do not count against it, and the share refills once
    // the owner acknowledges.
    relay
        .deposit(
            NOW,
            &to,
            &envelope(4, 5_000),
            &DepositPass::with_access(key),
        )
        .unwrap();
    acknowledge(&mut relay, &mut rng, &bob, NOW, &[EnvelopeId([1; 16])]);
    relay
        .deposit(NOW, &to, &over, &stamp(&to, &over, NOW))
        .unwrap();
    let usage = relay.storage().mailbox_usage(&to).unwrap();
    assert_eq!((usage.stranger_envelopes, usage.stranger_bytes), (2, 201));
    assert_eq!((usage.envelopes, usage.bytes), (3, 5_201));
}

pub fn rotation_keeps_the_previous_key_for_the_grace<S: RelayStorage>(storage: S) {
    let config = priced();
    let grace = config.access_grace;
    let (mut relay, _, bob, old) = with_keyed_bob(storage, config);
    let to = bob.mailbox();
    let new = AccessKey::from_bytes([3; 16]);
    let rotated = NOW + 100;
    relay
        .publish(rotated, &keyed_upload(&bob, 2, &new, rotated))
        .unwrap();
    let old_pass = DepositPass::with_access(old.clone());
    let new_pass = DepositPass::with_access(new.clone());
    relay
        .deposit(rotated, &to, &envelope(1, 10), &new_pass)
        .unwrap();
    relay
        .deposit(rotated + grace, &to, &envelope(2, 10), &old_pass)
        .unwrap();
    assert_eq!(
        relay.deposit(rotated + grace + 1, &to, &envelope(3, 10), &old_pass),
        Err(TransportError::StampRequired(8))
    );
    relay
        .deposit(rotated + grace + 1, &to, &envelope(4, 10), &new_pass)
        .unwrap();
    // An upload without a verifier keeps the key.
    let plain = bob.upload_of(3, &[], true).sign(&bob.keys);
    relay.publish(rotated + 2, &plain).unwrap();
    relay
        .deposit(rotated + grace + 2, &to, &envelope(5, 10), &new_pass)
        .unwrap();
    let usage = relay.storage().mailbox_usage(&to).unwrap();
    assert_eq!((usage.envelopes, usage.stranger_envelopes), (4, 0));
}

pub fn strangers_share_closes_while_the_owner_is_away<S: RelayStorage>(storage: S) {
    let config = priced();
    let idle = config.stranger_idle;
    let (mut relay, mut rng, bob, key) = with_keyed_bob(storage, config);
    let to = bob.mailbox();
    let later = NOW + idle + 1;
    let e = envelope(1, 10);
    assert_eq!(
        relay.deposit(later, &to, &e, &stamp(&to, &e, later)),
        Err(TransportError::LimitExceeded(reason::STRANGERS_CLOSED))
    );
    // Contacts still get through.
    relay
        .deposit(later, &to, &envelope(2, 10), &DepositPass::with_access(key))
        .unwrap();
    // The owner fetches: the share opens again.
    assert_eq!(fetch_all(&mut relay, &mut rng, &bob, later).len(), 1);
    relay
        .deposit(later, &to, &e, &stamp(&to, &e, later))
        .unwrap();
}

pub fn a_first_upload_needs_an_identity_stamp<S: RelayStorage>(storage: S) {
    let mut rng = rng(12);
    let bob = Device::new(&mut rng, 1, 0);
    let carol = Device::new(&mut rng, 2, 0);
    let mut relay = Relay::new(storage, priced());
    let plain = bob.upload_of(1, &[], true).sign(&bob.keys);
    assert_eq!(
        relay.publish(NOW, &plain),
        Err(TransportError::StampRequired(8))
    );
    // Carol's stamp does not pay for Bob.
    let mut upload = bob.upload_of(1, &[], true);
    upload.identity_stamp = Some(identity_stamp(&carol, NOW));
    assert_eq!(
        relay.publish(NOW, &upload.sign(&bob.keys)),
        Err(TransportError::StampRequired(8))
    );
    assert_eq!(
        relay.fetch_bundle(NOW, &bob.address()),
        Err(TransportError::NotFound)
    );
    upload.identity_stamp = Some(identity_stamp(&bob, NOW));
    relay.publish(NOW, &upload.sign(&bob.keys)).unwrap();
    // Later uploads need none.
    relay
        .publish(NOW + 1, &bob.upload_of(2, &[], true).sign(&bob.keys))
        .unwrap();
}

pub fn sweep_expires_inactive_mailboxes_and_idle_devices<S: RelayStorage>(storage: S) {
    const DAY: u64 = 24 * 3600;
    let config = RelayConfig {
        inactive_after: 10 * DAY,
        inactive_retention: 2 * DAY,
        directory_idle: 20 * DAY,
        ..priced()
    };
    let (mut relay, mut rng, bob, key) = with_keyed_bob(storage, config);
    let carol = Device::new(&mut rng, 2, 0);
    let carol_key = AccessKey::from_bytes([5; 16]);
    relay
        .publish(NOW, &keyed_upload(&carol, 1, &carol_key, NOW))
        .unwrap();
    let to_bob = DepositPass::with_access(key);
    let to_carol = DepositPass::with_access(carol_key);
    relay
        .deposit(NOW + 5 * DAY, &bob.mailbox(), &envelope(1, 10), &to_bob)
        .unwrap();
    relay
        .deposit(NOW + 10 * DAY, &bob.mailbox(), &envelope(2, 10), &to_bob)
        .unwrap();
    relay
        .deposit(NOW + 5 * DAY, &carol.mailbox(), &envelope(3, 10), &to_carol)
        .unwrap();
    // Carol fetches on day 9 (and so stays active); Bob was last seen on
    // day 0.
    assert_eq!(
        fetch_all(&mut relay, &mut rng, &carol, NOW + 9 * DAY).len(),
        1
    );
    let report = relay.sweep(NOW + 11 * DAY).unwrap();
    // Bob's mailbox is inactive: its envelope of day 5 is older than 2
    // days and goes; day 10's stays. Carol's stays (active).
    assert_eq!(report.inactive_expired, 1);
    assert_eq!(report.devices_expired, 0);
    assert_eq!(
        relay
            .storage()
            .mailbox_usage(&bob.mailbox())
            .unwrap()
            .envelopes,
        1
    );
    assert_eq!(
        relay
            .storage()
            .mailbox_usage(&carol.mailbox())
            .unwrap()
            .envelopes,
        1
    );
    // Day 21: Bob is idle for 20 days and is deleted with his mailbox;
    // Carol (seen on day 9) stays.
    let report = relay.sweep(NOW + 21 * DAY).unwrap();
    assert_eq!(report.devices_expired, 1);
    assert_eq!(
        relay.fetch_bundle(NOW + 21 * DAY, &bob.address()),
        Err(TransportError::NotFound)
    );
    assert_eq!(
        relay.storage().mailbox_usage(&bob.mailbox()).unwrap(),
        Default::default()
    );
    assert!(relay.fetch_bundle(NOW + 21 * DAY, &carol.address()).is_ok());
    // A deposit to the deleted mailbox is refused; Bob can publish again
    // (with a new identity stamp).
    assert_eq!(
        relay.deposit(NOW + 21 * DAY, &bob.mailbox(), &envelope(4, 10), &to_bob),
        Err(TransportError::NotFound)
    );
}

/// One test of the suite: runs `setup` (statements, in braces), then the
/// generic body over `make`.
macro_rules! suite_test {
    ($test:ident, [$(#[$attr:meta])*], { $($setup:tt)* }, $make:expr) => {
        #[test]
        $(#[$attr])*
        fn $test() {
            $($setup)*
            super::$test($make);
        }
    };
}

/// The suite's tests for one backend, as a module of `#[test]`s.
macro_rules! for_backend {
    ($backend:ident, $attrs:tt, $setup:tt, $make:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $(
                suite_test!($test, $attrs, $setup, $make);
            )*
        }
    };
}

/// Instantiates the whole suite for a backend: `all_tests!(name, make)`
/// builds each test's storage with the expression `make`;
/// `all_tests!(name, guard = setup, make)` first binds `guard` to `setup`,
/// which `make` may use and which lives until the test ends (a scratch
/// database to drop afterwards, say). Attributes before the name go on
/// every test (`#[cfg_attr(..., ignore)]`, say).
macro_rules! all_tests {
    (@list $backend:ident, $attrs:tt, { $($setup:tt)* }, $make:expr) => {
        for_backend!(
            $backend,
            $attrs,
            { $($setup)* },
            $make,
            [
                publish_and_fetch,
                unknown_device_is_not_found,
                add_and_replace_pool,
                replayed_upload_is_refused,
                forged_upload_is_refused,
                one_time_prekey_bound,
                mailbox_round_trip,
                deposit_is_idempotent,
                deposit_needs_a_published_mailbox,
                stranger_cannot_read_or_delete,
                challenges_are_single_use_fresh_and_per_op,
                strangers_cannot_evict_a_challenge,
                challenges_are_authenticated,
                one_time_prekey_claims_are_limited_per_device,
                envelope_size_bound,
                empty_payload_is_refused,
                mailbox_count_bound,
                mailbox_bytes_bound,
                deposit_batch_checks_each_envelope,
                fetch_and_acknowledge_bounds,
                retention_expires_envelopes,
                in_process_relay,
                contacts_share_needs_the_access_key,
                strangers_share_has_a_byte_bound,
                rotation_keeps_the_previous_key_for_the_grace,
                strangers_share_closes_while_the_owner_is_away,
                a_first_upload_needs_an_identity_stamp,
                sweep_expires_inactive_mailboxes_and_idle_devices,
            ]
        );
    };
    ($(#[$attr:meta])* $backend:ident, $guard:ident = $setup:expr, $make:expr) => {
        all_tests!(@list $backend, [$(#[$attr])*], { let $guard = $setup; }, $make);
    };
    ($(#[$attr:meta])* $backend:ident, $make:expr) => {
        all_tests!(@list $backend, [$(#[$attr])*], {}, $make);
    };
}
