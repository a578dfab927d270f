//! The client over an in-process relay, honest and not: drops, duplicates,
//! reorders and replays envelopes, substituted and stale bundles, strangers
//! at the mailbox, an exhausted one-time-prekey pool, restarts.

use cubbyhole::transport::DepositPass;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use cubbyhole::client::{block_on, Client, ClientConfig, ClientError, Rejection};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{BlockingStore, DeliveryState, MemoryStore, Trust};
use cubbyhole::transport::{
    DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, MailboxOp,
    PrekeyDirectory, TransportError,
};
use cubbyhole::{Error, IdentityKeyPair};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const T0: u64 = 1_900_000_000;
const DAY: u64 = 86_400;

type Honest = InProcessRelay<MemoryRelayStorage>;

fn relay_at(clock: Arc<Mutex<u64>>) -> Honest {
    let c = clock.clone();
    InProcessRelay::with_clock(
        Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
        Arc::new(move || *c.lock().unwrap()),
    )
}

/// What a misbehaving relay does to the mailbox.
#[derive(Clone, Default)]
struct Misbehaviour {
    /// Drop deposits whose envelope id's first byte is in this list.
    drop_first_bytes: Vec<u8>,
    /// Return every fetched envelope twice.
    duplicate: bool,
    /// Reverse each fetched batch.
    reverse: bool,
    /// Keep a copy of everything fetched and serve it again later.
    replay: bool,
    /// Serve this bundle instead of the real one.
    substitute_bundle: Option<Vec<u8>>,
    /// Fail this many uploads (as if the connection dropped).
    fail_publishes: u32,
}

/// A relay wrapper that misbehaves as told, over an honest relay.
#[derive(Clone)]
struct Evil {
    inner: Honest,
    how: Arc<Mutex<Misbehaviour>>,
    replay_log: Arc<Mutex<VecDeque<Envelope>>>,
}

impl PrekeyDirectory for Evil {
    fn publish(&self, upload: &[u8]) -> impl Future<Output = Result<(), TransportError>> + Send {
        let fail = {
            let mut how = self.how.lock().unwrap();
            let fail = how.fail_publishes > 0;
            how.fail_publishes = how.fail_publishes.saturating_sub(1);
            fail
        };
        let inner = self.inner.clone();
        let upload = upload.to_vec();
        async move {
            if fail {
                Err(TransportError::Unavailable("connection lost"))
            } else {
                inner.publish(&upload).await
            }
        }
    }
    fn fetch_bundle(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send {
        let sub = self.how.lock().unwrap().substitute_bundle.clone();
        let real = self.inner.fetch_bundle(device);
        async move {
            let real = real.await;
            match sub {
                Some(bytes) => Ok(bytes),
                None => real,
            }
        }
    }
    fn one_time_prekeys_left(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<u32, TransportError>> + Send {
        self.inner.one_time_prekeys_left(device)
    }
}

impl Mailbox for Evil {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let drop = self
            .how
            .lock()
            .unwrap()
            .drop_first_bytes
            .contains(&envelope.id.0[0]);
        let inner = self.inner.clone();
        let (to, envelope, pass) = (*to, envelope.clone(), pass.clone());
        async move {
            if drop {
                Ok(()) // claims success, keeps nothing
            } else {
                inner.deposit(&to, &envelope, &pass).await
            }
        }
    }
    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + Send {
        self.inner.challenge(mailbox)
    }
    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + Send {
        let how = self.how.lock().unwrap().clone();
        let inner = self.inner.clone();
        let log = self.replay_log.clone();
        let auth = auth.clone();
        async move {
            let mut got = inner.fetch(&auth, limit).await?;
            if how.replay {
                let mut log = log.lock().unwrap();
                let old: Vec<Envelope> = log.drain(..).collect();
                log.extend(got.iter().cloned());
                got.extend(old);
            }
            if how.duplicate {
                let copy = got.clone();
                got.extend(copy);
            }
            if how.reverse {
                got.reverse();
            }
            Ok(got)
        }
    }
    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.acknowledge(auth, ids)
    }
}

type EvilClient = Client<MemoryStore, Evil, Evil>;

struct World {
    clock: Arc<Mutex<u64>>,
    evil: Evil,
    rng: ChaCha20Rng,
}

impl World {
    fn new(seed: u64) -> Self {
        let clock = Arc::new(Mutex::new(T0));
        let evil = Evil {
            inner: relay_at(clock.clone()),
            how: Arc::default(),
            replay_log: Arc::default(),
        };
        World {
            clock,
            evil,
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }
    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }
    fn advance(&self, seconds: u64) {
        *self.clock.lock().unwrap() += seconds;
    }
    fn device(&mut self, store: MemoryStore, config: ClientConfig) -> EvilClient {
        let mut c = Client::open(
            store,
            self.evil.clone(),
            self.evil.clone(),
            config,
            &mut self.rng,
        )
        .wait()
        .unwrap();
        let now = self.now();
        block_on(c.maintain_prekeys(&mut self.rng, now)).unwrap();
        c
    }
    fn send(&mut self, from: &mut EvilClient, to: &EvilClient, body: &[u8]) -> EnvelopeId {
        let now = self.now();
        let sent = block_on(from.send(&mut self.rng, &to.address(), body, now)).unwrap();
        assert!(sent.deposited);
        sent.id
    }
    fn receive(&mut self, c: &mut EvilClient) -> cubbyhole::client::ReceiveReport {
        let now = self.now();
        block_on(c.receive(&mut self.rng, now)).unwrap()
    }
}

fn bodies(c: &EvilClient) -> Vec<Vec<u8>> {
    c.inbox()
        .wait()
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect()
}

fn take_all(c: &mut EvilClient) -> Vec<Vec<u8>> {
    let msgs = c.inbox().wait().unwrap();
    for m in &msgs {
        c.remove_from_inbox(&m.envelope_id).wait().unwrap();
    }
    msgs.into_iter().map(|m| m.body).collect()
}

#[test]
fn offline_conversation_both_ways() {
    let mut w = World::new(1);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    for i in 0..5u8 {
        w.send(&mut alice, &bob, &[b'a', i]);
    }
    w.advance(3 * DAY);
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 5);
    assert!(report.rejected.is_empty());
    assert_eq!(
        take_all(&mut bob),
        (0..5u8).map(|i| vec![b'a', i]).collect::<Vec<_>>()
    );
    let from = bob.inbox().wait().unwrap();
    assert!(from.is_empty());
    w.send(&mut bob, &alice, b"reply");
    let report = w.receive(&mut alice);
    assert_eq!(report.received, 1);
    let msg = &alice.inbox().wait().unwrap()[0];
    assert_eq!(msg.body, b"reply");
    assert_eq!(msg.from, bob.address());
    // And on: several DH ratchet steps.
    for round in 0..4u8 {
        w.send(&mut alice, &bob, &[round]);
        assert_eq!(w.receive(&mut bob).received, 1);
        w.send(&mut bob, &alice, &[round, round]);
        assert_eq!(w.receive(&mut alice).received, 1);
    }
    assert_eq!(
        bob.safety_number(&alice.address()).unwrap(),
        alice.safety_number(&bob.address()).unwrap()
    );
}

#[test]
fn duplicated_reordered_and_replayed_envelopes_are_delivered_once() {
    let mut w = World::new(2);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    {
        let mut how = w.evil.how.lock().unwrap();
        how.duplicate = true;
        how.reverse = true;
        how.replay = true;
    }
    for i in 0..6u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 6);
    assert!(report.redelivered >= 6, "each envelope came at least twice");
    let mut got = take_all(&mut bob);
    got.sort();
    assert_eq!(got, (0..6u8).map(|i| vec![i]).collect::<Vec<_>>());
    // The replayed copies come back on the next fetch: recognised, not shown.
    w.send(&mut alice, &bob, b"new");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 1);
    assert!(report.redelivered > 0, "{report:?}");
    assert_eq!(take_all(&mut bob), vec![b"new".to_vec()]);
}

#[test]
fn dropped_envelopes_are_reported_as_missing() {
    let mut w = World::new(3);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    let mut dropped = 0;
    let mut delivered = 0;
    for i in 0..40u8 {
        let id = {
            let now = w.now();
            // Decide to drop by the id the client will choose: drop ids whose
            // first byte is even, after the first message (which starts the
            // session).
            let mut how = w.evil.how.lock().unwrap();
            how.drop_first_bytes = if i == 0 {
                vec![]
            } else {
                (0..=255).step_by(2).collect()
            };
            drop(how);
            block_on(alice.send(&mut w.rng, &bob.address(), &[i], now))
                .unwrap()
                .id
        };
        if i > 0 && id.0[0] % 2 == 0 {
            dropped += 1;
        } else {
            delivered += 1;
        }
    }
    // Bob's last received message must come after the dropped ones for the
    // counters to show them: send one more, delivered.
    w.evil.how.lock().unwrap().drop_first_bytes.clear();
    w.send(&mut alice, &bob, b"last");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, delivered + 1);
    assert_eq!(report.missing, vec![(alice.address(), dropped)]);
    assert!(dropped > 5);
}

#[test]
fn substituted_and_stale_bundles_are_refused() {
    let mut w = World::new(4);
    let bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    let mallory = w.device(MemoryStore::new(), ClientConfig::default());
    // The relay serves Mallory's bundle when Alice asks for Bob's.
    let mallory_bundle = block_on(w.evil.inner.fetch_bundle(&mallory.address())).unwrap();
    w.evil.how.lock().unwrap().substitute_bundle = Some(mallory_bundle.clone());
    let now = w.now();
    let err = block_on(alice.send(&mut w.rng, &bob.address(), b"x", now)).unwrap_err();
    assert!(matches!(err, ClientError::WrongIdentity), "{err}");
    // Bob's identity with Mallory's signed prekey: the signature fails.
    let mut forged = block_on(w.evil.inner.fetch_bundle(&bob.address())).unwrap();
    forged[37..77].copy_from_slice(&mallory_bundle[37..77]);
    w.evil.how.lock().unwrap().substitute_bundle = Some(forged);
    let err = block_on(alice.send(&mut w.rng, &bob.address(), b"x", now)).unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(Error::Signature)),
        "{err}"
    );
    // Bob's genuine but old bundle, served 31 days later: stale.
    let old = block_on(w.evil.inner.fetch_bundle(&bob.address())).unwrap();
    w.evil.how.lock().unwrap().substitute_bundle = Some(old);
    let later = now + 31 * DAY;
    let err = block_on(alice.send(&mut w.rng, &bob.address(), b"x", later)).unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(Error::StaleBundle)),
        "{err}"
    );
    // Nothing of these attempts left a session behind.
    assert!(alice.store().session(&bob.address()).unwrap().is_none());
}

#[test]
fn strangers_cannot_read_or_delete_a_mailbox() {
    let mut w = World::new(5);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    w.send(&mut alice, &bob, b"private");
    let mallory = IdentityKeyPair::generate(&mut w.rng);
    let mailbox = bob.address().mailbox();
    let challenge = block_on(w.evil.challenge(&mailbox)).unwrap();
    // Mallory signs with her key for Bob's device address: the relay checks
    // the proof against Bob's identity key.
    let mut auth = MailboxAuth::sign(&mallory, 1, MailboxOp::Fetch, challenge);
    auth.device = bob.address();
    assert_eq!(
        block_on(w.evil.fetch(&auth, 10)).unwrap_err(),
        TransportError::Unauthorized
    );
    let challenge = block_on(w.evil.challenge(&mailbox)).unwrap();
    let mut auth = MailboxAuth::sign(&mallory, 1, MailboxOp::Acknowledge, challenge);
    auth.device = bob.address();
    assert_eq!(
        block_on(w.evil.acknowledge(&auth, &[EnvelopeId([0; 16])])).unwrap_err(),
        TransportError::Unauthorized
    );
    // Bob still gets his message.
    assert_eq!(w.receive(&mut bob).received, 1);
    assert_eq!(bodies(&bob), vec![b"private".to_vec()]);
}

#[test]
fn sessions_without_one_time_prekeys_when_the_pool_is_empty() {
    let mut w = World::new(6);
    let config = ClientConfig {
        one_time_prekeys: 2,
        refill_below: 0,
        ..ClientConfig::default()
    };
    let mut bob = w.device(MemoryStore::new(), config);
    let mut senders: Vec<EvilClient> = (0..4)
        .map(|_| w.device(MemoryStore::new(), ClientConfig::default()))
        .collect();
    for (i, s) in senders.iter_mut().enumerate() {
        w.send(s, &bob, &[i as u8]);
    }
    assert_eq!(
        block_on(w.evil.one_time_prekeys_left(&bob.address())).unwrap(),
        0
    );
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 4, "{report:?}");
    // Refill brings the pool back.
    let config_refill = ClientConfig {
        one_time_prekeys: 5,
        refill_below: 3,
        ..ClientConfig::default()
    };
    let store = bob.into_store();
    let mut bob = Client::open(
        store,
        w.evil.clone(),
        w.evil.clone(),
        config_refill,
        &mut w.rng,
    )
    .wait()
    .unwrap();
    let now = w.now();
    assert!(block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap());
    assert_eq!(
        block_on(w.evil.one_time_prekeys_left(&bob.address())).unwrap(),
        5
    );
}

#[test]
fn signed_prekey_rotation_keeps_late_prekey_messages_decryptable() {
    for sealed in [true, false] {
        rotation_keeps_late_prekey_messages(sealed);
    }
}

fn rotation_keeps_late_prekey_messages(sealed: bool) {
    let mut w = World::new(7);
    let config = ClientConfig {
        sealed,
        ..ClientConfig::default()
    };
    let mut bob = w.device(MemoryStore::new(), config);
    let mut alice = w.device(MemoryStore::new(), config);
    w.send(&mut alice, &bob, b"before rotation");
    // Bob rotates (8 days later) before reading; the prekey message names
    // the old signed prekey, still held for the grace period.
    w.advance(8 * DAY);
    let now = w.now();
    assert!(block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap());
    assert_eq!(w.receive(&mut bob).received, 1);
    // A new sender gets the new signed prekey.
    let mut carol = w.device(MemoryStore::new(), config);
    w.send(&mut carol, &bob, b"after rotation");
    assert_eq!(w.receive(&mut bob).received, 1);
    // After the grace period the old signed prekey is gone: a prekey message
    // naming it, held back by the relay, is rejected (and reported).
    let short_grace = ClientConfig {
        signed_prekey_grace: 10 * DAY,
        ..config
    };
    let store = bob.into_store();
    let mut bob = Client::open(
        store,
        w.evil.clone(),
        w.evil.clone(),
        short_grace,
        &mut w.rng,
    )
    .wait()
    .unwrap();
    let mut dave = w.device(MemoryStore::new(), config);
    w.send(&mut dave, &bob, b"late");
    w.advance(8 * DAY); // Dave's signed prekey is retired now ...
    let now = w.now();
    assert!(block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap());
    w.advance(11 * DAY); // ... and past its grace (the envelope is 19 days old)
    let now = w.now();
    block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap();
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0);
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    // v1: the rejection names the identity key the prekey message claims;
    // v2: no held signed prekey opens the seal, which names no one.
    let expected = if sealed {
        Rejection::Protocol(Error::Auth)
    } else {
        Rejection::Prekey {
            identity: identity_of(&dave),
            error: Error::UnknownPrekey,
        }
    };
    assert_eq!(report.rejected[0].1, expected);
}

fn identity_of(c: &EvilClient) -> [u8; 32] {
    c.address().identity
}

#[test]
fn compromised_peers_are_refused() {
    let mut w = World::new(8);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    w.send(&mut alice, &bob, b"one");
    assert_eq!(w.receive(&mut bob).received, 1);
    let now = w.now();
    bob.set_trust(&alice.address(), Trust::Compromised, now)
        .wait()
        .unwrap();
    w.send(&mut alice, &bob, b"two");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0);
    assert_eq!(report.rejected[0].1, Rejection::Compromised);
    let err = block_on(bob.send(&mut w.rng, &alice.address(), b"x", now)).unwrap_err();
    assert!(matches!(err, ClientError::Compromised));
}

#[test]
fn restart_from_the_same_store_and_outbox_flush() {
    let mut w = World::new(9);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    w.send(&mut alice, &bob, b"first");
    // The mailbox is unreachable: the envelope stays in the outbox.
    let alice_store = alice.into_store();
    struct Down;
    impl Mailbox for Down {
        async fn deposit(
            &self,
            _: &MailboxId,
            _: &Envelope,
            _: &DepositPass,
        ) -> Result<(), TransportError> {
            Err(TransportError::Unavailable("down"))
        }
        async fn challenge(&self, _: &MailboxId) -> Result<[u8; 32], TransportError> {
            Err(TransportError::Unavailable("down"))
        }
        async fn fetch(&self, _: &MailboxAuth, _: u32) -> Result<Vec<Envelope>, TransportError> {
            Err(TransportError::Unavailable("down"))
        }
        async fn acknowledge(
            &self,
            _: &MailboxAuth,
            _: &[EnvelopeId],
        ) -> Result<(), TransportError> {
            Err(TransportError::Unavailable("down"))
        }
    }
    let mut offline = Client::open(
        alice_store,
        w.evil.clone(),
        Down,
        ClientConfig::default(),
        &mut w.rng,
    )
    .wait()
    .unwrap();
    let now = w.now();
    let sent = block_on(offline.send(&mut w.rng, &bob.address(), b"second", now)).unwrap();
    assert!(!sent.deposited);
    assert_eq!(offline.store().outbox().unwrap().len(), 1);
    assert_eq!(
        offline.delivery(&sent.message).wait().unwrap(),
        Some(DeliveryState::Stored)
    );
    // Back online (a restart with the same store): the outbox is flushed.
    let store = offline.into_store();
    let mut alice = Client::open(
        store,
        w.evil.clone(),
        w.evil.clone(),
        ClientConfig::default(),
        &mut w.rng,
    )
    .wait()
    .unwrap();
    assert_eq!(block_on(alice.flush_outbox()).unwrap(), 1);
    assert!(alice.store().outbox().unwrap().is_empty());
    // The flush moved the message's state; Bob's receipt moves it again.
    assert_eq!(
        alice.delivery(&sent.message).wait().unwrap(),
        Some(DeliveryState::Deposited)
    );
    assert_eq!(w.receive(&mut bob).received, 2);
    assert_eq!(bodies(&bob), vec![b"first".to_vec(), b"second".to_vec()]);
    w.receive(&mut alice);
    assert_eq!(
        alice.delivery(&sent.message).wait().unwrap(),
        Some(DeliveryState::Delivered)
    );
}

/// A mailbox whose acknowledgements are lost (the receiver "crashes" between
/// its commit and the acknowledgement, as far as the relay can tell).
#[derive(Clone)]
struct LosesAcks(Evil);

impl Mailbox for LosesAcks {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.0.deposit(to, envelope, pass)
    }
    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + Send {
        self.0.challenge(mailbox)
    }
    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + Send {
        self.0.fetch(auth, limit)
    }
    async fn acknowledge(&self, _: &MailboxAuth, _: &[EnvelopeId]) -> Result<(), TransportError> {
        Err(TransportError::Unavailable("connection lost"))
    }
}

#[test]
fn committed_but_unacknowledged_envelopes_are_recognised() {
    let mut w = World::new(10);
    let bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    for i in 0..3u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    let store = bob.into_store();
    let mut flaky = Client::open(
        store,
        w.evil.clone(),
        LosesAcks(w.evil.clone()),
        ClientConfig::default(),
        &mut w.rng,
    )
    .wait()
    .unwrap();
    let now = w.now();
    assert!(matches!(
        block_on(flaky.receive(&mut w.rng, now)),
        Err(ClientError::Transport(_))
    ));
    assert_eq!(
        flaky.inbox().wait().unwrap().len(),
        3,
        "committed before the acknowledgement"
    );
    let store = flaky.into_store();
    let mut bob = Client::open(
        store,
        w.evil.clone(),
        w.evil.clone(),
        ClientConfig::default(),
        &mut w.rng,
    )
    .wait()
    .unwrap();
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0);
    assert_eq!(report.redelivered, 3);
    assert!(report.rejected.is_empty());
    assert_eq!(bodies(&bob), vec![vec![0], vec![1], vec![2]]);
}

#[test]
fn a_failed_upload_is_redone_and_local_one_time_prekeys_stay_bounded() {
    let mut w = World::new(11);
    let config = ClientConfig {
        one_time_prekeys: 10,
        refill_below: 5,
        ..ClientConfig::default()
    };
    let mut bob = w.device(MemoryStore::new(), config);
    let spk = |c: &EvilClient| {
        c.store()
            .prekeys()
            .unwrap()
            .unwrap()
            .prekeys
            .current_signed_prekey()
            .id()
    };
    // The rotation's upload fails: the directory still has the old key.
    w.advance(8 * DAY);
    w.evil.how.lock().unwrap().fail_publishes = 1;
    let now = w.now();
    assert!(matches!(
        block_on(bob.maintain_prekeys(&mut w.rng, now)),
        Err(ClientError::Transport(TransportError::Unavailable(_)))
    ));
    let fetched = |w: &World, bob: &EvilClient| {
        let bytes = block_on(w.evil.inner.fetch_bundle(&bob.address())).unwrap();
        cubbyhole::PrekeyBundle::decode(&bytes)
            .unwrap()
            .signed_prekey_id()
    };
    assert_ne!(fetched(&w, &bob), spk(&bob));
    // The next call redoes it.
    let now = w.now();
    assert!(block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap());
    assert_eq!(fetched(&w, &bob), spk(&bob));
    assert!(!bob.store().prekeys().unwrap().unwrap().upload_pending);
    // Strangers drain the pool again and again; refills and rotations go on
    // for months. Keys handed out but never used are forgotten after the
    // grace period, so the local pool stays bounded.
    for _ in 0..40 {
        for _ in 0..8 {
            let _ = block_on(w.evil.inner.fetch_bundle(&bob.address()));
        }
        w.advance(3 * DAY);
        let now = w.now();
        block_on(bob.maintain_prekeys(&mut w.rng, now)).unwrap();
    }
    let held = bob
        .store()
        .prekeys()
        .unwrap()
        .unwrap()
        .prekeys
        .one_time_prekey_count();
    // At most the pools of the last grace period (35 days): about twelve
    // refills of ten keys, plus the rotations' fresh pools.
    assert!(held <= 200, "{held} one-time prekeys held");
    assert!(held >= 10);
}

#[test]
fn receive_takes_everything_even_when_batches_are_cut_by_size() {
    let mut w = World::new(12);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    // Bob writes first, so that Alice holds his access key: 9 MiB from a
    // stranger would not fit the strangers' share (1 MiB).
    w.send(&mut bob, &alice, b"hello");
    w.receive(&mut alice);
    // 36 envelopes of ~250 KiB: the relay's 8 MiB fetch limit cuts batches.
    let body = vec![7u8; 250 * 1024];
    for _ in 0..36 {
        w.send(&mut alice, &bob, &body);
    }
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 36);
    // A body too long for the relay is refused before anything is committed.
    let now = w.now();
    let long = vec![0u8; 300 * 1024];
    let before = alice
        .store()
        .session(&bob.address())
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(matches!(
        block_on(alice.send(&mut w.rng, &bob.address(), &long, now)),
        Err(ClientError::TooLong)
    ));
    let after = alice
        .store()
        .session(&bob.address())
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(*before, *after);
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}

/// Profile v2 routes a chain message only within W = 32 of the receiver's
/// window (SPEC.md 26.6). A relay that drops more than that of one chain
/// makes the next message unroutable; the conversation recovers when the
/// receiver writes (the sender's next chain starts inside the window) and
/// the sender re-sends what got no receipt: every message arrives, once.
#[test]
fn a_gap_beyond_the_routing_window_heals_and_nothing_is_lost() {
    let mut w = World::new(12);
    let mut bob = w.device(MemoryStore::new(), ClientConfig::default());
    let mut alice = w.device(MemoryStore::new(), ClientConfig::default());
    // A v2 conversation with chains both ways.
    w.send(&mut alice, &bob, b"hello");
    assert_eq!(w.receive(&mut bob).received, 1);
    w.send(&mut bob, &alice, b"hi");
    assert_eq!(w.receive(&mut alice).received, 1);
    take_all(&mut bob);
    // The relay drops the next 40 messages of Alice's chain.
    w.evil.how.lock().unwrap().drop_first_bytes = (0..=255).collect();
    for i in 0..40u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    w.evil.how.lock().unwrap().drop_first_bytes.clear();
    w.send(&mut alice, &bob, b"beyond the window");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0, "{report:?}");
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(report.rejected[0].1, Rejection::NoSession);
    // Bob writes; Alice's next chain starts at n = 0, inside Bob's window,
    // and her re-sends (no receipt came for 41 messages) travel on it.
    w.send(&mut bob, &alice, b"are you there?");
    assert_eq!(w.receive(&mut alice).received, 1);
    w.advance(2 * 3600);
    let now = w.now();
    let resend = block_on(alice.resend(&mut w.rng, now)).unwrap();
    assert_eq!(resend.resent, 41, "{resend:?}");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 41, "{report:?}");
    let mut got = take_all(&mut bob);
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i]).collect();
    want.push(b"beyond the window".to_vec());
    want.sort();
    assert_eq!(got, want);
}
