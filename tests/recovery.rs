//! The five ways a conversation used to die (issue 12), each as a
//! regression test through the public API: simultaneous first messages, a
//! relay replaying an old first message once the one-time prekeys ran out,
//! a responder that lost its prekeys, a corrupted session row, and trust
//! kept per device number instead of per identity key.

use cubbyhole::transport::DepositPass;
use std::future::Future;
use std::sync::{Arc, Mutex};

use cubbyhole::client::{block_on, Client, ClientConfig, ClientError, Rejection};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{DeliveryState, LocalIdentity, MemoryStore, PrekeyState, Store, Trust};
use cubbyhole::transport::{
    DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, PrekeyDirectory,
    TransportError,
};
use cubbyhole::{Error, PrekeyStore};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const T0: u64 = 1_900_000_000;
const HOUR: u64 = 3600;

/// An honest in-process relay that keeps a copy of every deposit (what a
/// malicious relay could replay).
#[derive(Clone)]
struct Net {
    relay: InProcessRelay<MemoryRelayStorage>,
    log: Arc<Mutex<Vec<(MailboxId, Envelope)>>>,
}

impl PrekeyDirectory for Net {
    fn publish(&self, upload: &[u8]) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.relay.publish(upload)
    }
    fn fetch_bundle(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send {
        self.relay.fetch_bundle(device)
    }
    fn one_time_prekeys_left(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<u32, TransportError>> + Send {
        self.relay.one_time_prekeys_left(device)
    }
}

impl Mailbox for Net {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.lock().unwrap().push((*to, envelope.clone()));
        self.relay.deposit(to, envelope, pass)
    }
    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + Send {
        self.relay.challenge(mailbox)
    }
    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + Send {
        self.relay.fetch(auth, limit)
    }
    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.relay.acknowledge(auth, ids)
    }
}

struct World {
    clock: Arc<Mutex<u64>>,
    net: Net,
    rng: ChaCha20Rng,
}

type Dev<S> = Client<S, Net, Net>;

impl World {
    fn new(seed: u64) -> Self {
        let clock = Arc::new(Mutex::new(T0));
        let c = clock.clone();
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(move || *c.lock().unwrap()),
        );
        World {
            clock,
            net: Net {
                relay,
                log: Arc::default(),
            },
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }
    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }
    fn advance(&self, seconds: u64) {
        *self.clock.lock().unwrap() += seconds;
    }
    fn device<S: Store>(&mut self, store: S) -> Dev<S> {
        self.device_with(store, ClientConfig::default())
    }
    fn device_with<S: Store>(&mut self, store: S, config: ClientConfig) -> Dev<S> {
        let mut c = Client::open(
            store,
            self.net.clone(),
            self.net.clone(),
            config,
            &mut self.rng,
        )
        .wait()
        .unwrap();
        let now = self.now();
        block_on(c.maintain_prekeys(&mut self.rng, now)).unwrap();
        c
    }
    fn send<S: Store>(&mut self, from: &mut Dev<S>, to: &DeviceAddress, body: &[u8]) {
        let now = self.now();
        let sent = block_on(from.send(&mut self.rng, to, body, now)).unwrap();
        assert!(sent.deposited);
    }
    fn receive<S: Store>(&mut self, c: &mut Dev<S>) -> cubbyhole::client::ReceiveReport {
        let now = self.now();
        block_on(c.receive(&mut self.rng, now)).unwrap()
    }
    /// The envelopes deposited so far.
    fn deposits(&self) -> Vec<(MailboxId, Envelope)> {
        self.net.log.lock().unwrap().clone()
    }
    /// Deposits an old envelope again under a new id, as a relay may.
    fn replay(&mut self, (to, envelope): &(MailboxId, Envelope)) {
        let mut id = [0u8; 16];
        rand_chacha::rand_core::RngCore::fill_bytes(&mut self.rng, &mut id);
        let again = Envelope {
            id: EnvelopeId(id),
            payload: envelope.payload.clone(),
        };
        block_on(self.net.relay.deposit(to, &again, &DepositPass::NONE)).unwrap();
    }
}

fn take_all<S: Store>(c: &mut Dev<S>) -> Vec<Vec<u8>> {
    let msgs = c.inbox().wait().unwrap();
    for m in &msgs {
        c.remove_from_inbox(&m.envelope_id).wait().unwrap();
    }
    msgs.into_iter().map(|m| m.body).collect()
}

/// The id of the session `c` would encrypt to `peer` under.
fn current<S: Store>(c: &Dev<S>, peer: &DeviceAddress) -> [u8; 16] {
    let record = c.store().session(peer).wait().unwrap().expect("a record");
    record
        .current(&c.address(), peer)
        .expect("a current session")
        .id
}

#[test]
fn simultaneous_first_messages_converge_on_one_session() {
    // Every order in which the two first messages can be received.
    for (seed, bob_first) in [(1, true), (2, false)] {
        let mut w = World::new(seed);
        let mut alice = w.device(MemoryStore::new());
        let mut bob = w.device(MemoryStore::new());
        let (a, b) = (alice.address(), bob.address());
        // Time passes between every step: a rule that ranked sessions by
        // when each device happened to create or accept them would pick
        // different sessions on the two sides.
        w.send(&mut alice, &b, b"hi Bob");
        w.advance(10);
        w.send(&mut bob, &a, b"hi Alice");
        w.advance(10);
        if bob_first {
            assert_eq!(take_all_after(&mut w, &mut bob), [b"hi Bob".to_vec()]);
            w.advance(10);
            assert_eq!(take_all_after(&mut w, &mut alice), [b"hi Alice".to_vec()]);
        } else {
            assert_eq!(take_all_after(&mut w, &mut alice), [b"hi Alice".to_vec()]);
            w.advance(10);
            assert_eq!(take_all_after(&mut w, &mut bob), [b"hi Bob".to_vec()]);
        }
        w.advance(10);
        // One round trip later both encrypt under the same session ...
        assert_eq!(current(&alice, &b), current(&bob, &a));
        // ... and every message in both directions arrives, once.
        for i in 0..3u8 {
            w.send(&mut alice, &b, &[i]);
            w.send(&mut bob, &a, &[10 + i]);
            assert_eq!(take_all_after(&mut w, &mut bob), [vec![i]]);
            assert_eq!(take_all_after(&mut w, &mut alice), [vec![10 + i]]);
            assert_eq!(current(&alice, &b), current(&bob, &a));
        }
    }
}

/// Receives, checks nothing was rejected, and takes the inbox.
fn take_all_after<S: Store>(w: &mut World, c: &mut Dev<S>) -> Vec<Vec<u8>> {
    let report = w.receive(c);
    assert!(report.rejected.is_empty(), "{report:?}");
    take_all(c)
}

#[test]
fn a_replayed_first_message_is_a_duplicate_after_the_one_time_prekeys_ran_out() {
    let mut w = World::new(3);
    let mut alice = w.device(MemoryStore::new());
    let mut bob = w.device(MemoryStore::new());
    let (a, b) = (alice.address(), bob.address());
    w.send(&mut alice, &b, b"first");
    let first = w.deposits().pop().unwrap();
    assert_eq!(take_all_after(&mut w, &mut bob), [b"first".to_vec()]);
    // A stranger empties Bob's one-time prekeys, as fast as the relay's
    // claim budget allows (a minute per claim after the burst); Bob and
    // Alice go on.
    while block_on(w.net.relay.one_time_prekeys_left(&b)).unwrap() > 0 {
        block_on(w.net.relay.fetch_bundle(&b)).unwrap();
        w.advance(60);
    }
    w.send(&mut bob, &a, b"reply");
    assert_eq!(take_all_after(&mut w, &mut alice), [b"reply".to_vec()]);
    let live = current(&bob, &a);

    // The relay replays the opening prekey message under a new id.
    w.replay(&first);
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0, "{report:?}");
    assert!(take_all(&mut bob).is_empty(), "shown again");
    assert_eq!(current(&bob, &a), live, "the live session was replaced");
    // Both directions still work.
    w.send(&mut alice, &b, b"still here");
    assert_eq!(take_all_after(&mut w, &mut bob), [b"still here".to_vec()]);
    w.send(&mut bob, &a, b"me too");
    assert_eq!(take_all_after(&mut w, &mut alice), [b"me too".to_vec()]);

    w.receive(&mut bob); // Alice's receipt

    // Even once the session itself is gone, the replay digest refuses it.
    bob.store_mut().remove_session(&a).wait().unwrap();
    w.replay(&first);
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0);
    assert_eq!(
        report.rejected.iter().map(|r| r.1).collect::<Vec<_>>(),
        [Rejection::Protocol(Error::Duplicate)]
    );
    assert!(take_all(&mut bob).is_empty(), "shown again");
}

/// Replaces a device's private prekeys with fresh ones, as a reinstall with
/// the same identity (or an old backup of the prekeys) does, and publishes.
fn lose_prekeys<S: Store>(w: &mut World, c: &mut Dev<S>) {
    let now = w.now();
    let identity: LocalIdentity = c.store().identity().wait().unwrap().unwrap();
    let old = c.store().prekeys().wait().unwrap().unwrap();
    let fresh = PrekeyState {
        prekeys: PrekeyStore::new(&mut w.rng, &identity.keys, now).expect("time in unix seconds"),
        upload_counter: old.upload_counter,
        last_rotation: now,
        retired_at: Vec::new(),
        one_time_retired: Vec::new(),
        upload_pending: true,
        accepted: Vec::new(),
    };
    c.store_mut().set_prekeys(&fresh).wait().unwrap();
    block_on(c.maintain_prekeys(&mut w.rng, now)).unwrap();
}

/// v1 sessions (`sealed: false`): the prekey message names its sender in
/// clear, so the rejection does too.
fn v1() -> ClientConfig {
    ClientConfig {
        sealed: false,
        ..ClientConfig::default()
    }
}

#[test]
fn a_sender_whose_responder_lost_its_prekeys_starts_again_after_a_timeout() {
    for sealed in [false, true] {
        lost_prekeys_then_timeout(sealed);
    }
}

fn lost_prekeys_then_timeout(sealed: bool) {
    let mut w = World::new(4);
    let config = if sealed {
        ClientConfig::default()
    } else {
        v1()
    };
    let mut alice = w.device_with(MemoryStore::new(), config);
    let mut bob = w.device_with(MemoryStore::new(), config);
    let (a, b) = (alice.address(), bob.address());
    let now = w.now();
    let sent = block_on(alice.send(&mut w.rng, &b, b"lost?", now)).unwrap();
    lose_prekeys(&mut w, &mut bob);
    let report = w.receive(&mut bob);
    assert_eq!(report.rejected.len(), 1);
    if sealed {
        // A sealed prekey message no held signed prekey opens names no one
        // (SPEC.md 26.7): Bob cannot tell whom to notify.
        assert_eq!(report.rejected[0].1, Rejection::Protocol(Error::Auth));
        assert!(report.notices.is_empty());
    } else {
        // The rejection names the sender's identity key (the new signed
        // prekey has the old one's id: the AEAD fails).
        assert!(
            matches!(
                report.rejected[0].1,
                Rejection::Prekey { identity, error: Error::Auth | Error::UnknownPrekey }
                    if identity == a.identity
            ),
            "{report:?}"
        );
    }
    assert_eq!(
        alice.delivery(&sent.message).wait().unwrap(),
        Some(DeliveryState::Deposited)
    );
    // Nothing comes back; after the resend time Alice presumes the session
    // dead, starts one from Bob's new bundle and re-sends.
    w.advance(HOUR);
    let now = w.now();
    let resend = block_on(alice.resend(&mut w.rng, now)).unwrap();
    assert_eq!((resend.resent, resend.new_sessions), (1, 1), "{resend:?}");
    assert_eq!(take_all_after(&mut w, &mut bob), [b"lost?".to_vec()]);
    // Bob's receipt tells Alice.
    let report = w.receive(&mut alice);
    assert_eq!(report.delivered, [sent.message]);
    assert_eq!(
        alice.delivery(&sent.message).wait().unwrap(),
        Some(DeliveryState::Delivered)
    );
    assert!(
        take_all(&mut alice).is_empty(),
        "a receipt is not a message"
    );
}

/// A v1 behaviour: with v2 the lost prekey message names no sender, and the
/// sender recovers after its resend timeout instead (the test above).
#[test]
fn a_responder_that_lost_its_prekeys_tells_a_known_sender_at_once() {
    let mut w = World::new(5);
    let mut alice = w.device_with(MemoryStore::new(), v1());
    let mut bob = w.device_with(MemoryStore::new(), v1());
    let (a, b) = (alice.address(), bob.address());
    // Bob knows Alice (he wrote to her); Alice, before reading it, starts
    // her own session, and Bob loses the prekeys it used.
    w.send(&mut bob, &a, b"from Bob");
    let now = w.now();
    let sent = block_on(alice.send(&mut w.rng, &b, b"from Alice", now)).unwrap();
    lose_prekeys(&mut w, &mut bob);
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0);
    assert_eq!(report.notices, [a], "{report:?}");
    // Alice learns it within the same round trip: no clock advance.
    let report = w.receive(&mut alice);
    assert_eq!(report.resend.resent, 1, "{report:?}");
    assert_eq!(take_all(&mut alice), [b"from Bob".to_vec()]);
    assert_eq!(take_all_after(&mut w, &mut bob), [b"from Alice".to_vec()]);
    w.receive(&mut alice);
    assert_eq!(
        alice.delivery(&sent.message).wait().unwrap(),
        Some(DeliveryState::Delivered)
    );
    assert_eq!(current(&alice, &b), current(&bob, &a));
}

#[cfg(feature = "sqlite")]
#[test]
fn a_corrupted_session_row_is_quarantined_and_the_others_keep_working() {
    use cubbyhole::storage::SqliteStore;
    let dir = std::env::temp_dir().join(format!("cubbyhole-recovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bob.db");
    let _ = std::fs::remove_file(&path);
    let mut w = World::new(6);
    let mut bob = w.device(SqliteStore::open(&path, &[7; 32]).unwrap());
    let mut alice = w.device(MemoryStore::new());
    let mut carol = w.device(MemoryStore::new());
    let (a, b, c) = (alice.address(), bob.address(), carol.address());
    w.send(&mut alice, &b, b"a1");
    w.send(&mut carol, &b, b"c1");
    assert_eq!(take_all_after(&mut w, &mut bob).len(), 2);
    w.receive(&mut alice);
    w.receive(&mut carol);

    // One row rots on disk.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE sessions SET state = X'00112233' WHERE identity = ?1",
        [&a.identity[..]],
    )
    .unwrap();
    drop(raw);

    w.send(&mut carol, &b, b"c2");
    w.send(&mut alice, &b, b"a2");
    let report = w.receive(&mut bob);
    // Carol's message arrives; Alice's row is set aside with its bytes.
    assert_eq!(report.quarantined, [a]);
    assert_eq!(take_all(&mut bob), [b"c2".to_vec()]);
    let q = bob.store().quarantined().wait().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].peer, a);
    assert_eq!(&q[0].bytes[..], &[0x00, 0x11, 0x22, 0x33]);
    // Bob started a new session with Alice at once (RESET); Alice re-sends
    // what had no receipt on it, and it is shown once.
    assert_eq!(report.resend.new_sessions, 1, "{report:?}");
    let report = w.receive(&mut alice);
    assert!(report.resend.resent >= 1, "{report:?}");
    assert_eq!(take_all_after(&mut w, &mut bob), [b"a2".to_vec()]);
    w.send(&mut bob, &a, b"back");
    assert_eq!(take_all_after(&mut w, &mut alice), [b"back".to_vec()]);
    assert_eq!(current(&alice, &b), current(&bob, &a));
    let _ = c;
    drop(bob);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn trust_belongs_to_the_identity_key_not_the_device_number() {
    let mut w = World::new(7);
    let mut alice = w.device(MemoryStore::new());
    let mut mallory = w.device(MemoryStore::new());
    let (a, m) = (alice.address(), mallory.address());
    w.send(&mut mallory, &a, b"hello");
    assert_eq!(take_all_after(&mut w, &mut alice).len(), 1);
    let now = w.now();
    alice.set_trust(&m, Trust::Compromised, now).wait().unwrap();

    // The same key publishes under another device number.
    let identity = mallory.store().identity().wait().unwrap().unwrap();
    let mut store = MemoryStore::new();
    store
        .set_identity(&LocalIdentity {
            keys: identity.keys.clone(),
            device_id: 2,
        })
        .wait()
        .unwrap();
    let mut mallory2 = w.device(store);
    let m2 = mallory2.address();
    assert_eq!(m2.identity, m.identity);
    assert_ne!(m2.device_id, m.device_id);
    w.send(&mut mallory2, &a, b"it's me, a new device");
    let report = w.receive(&mut alice);
    assert_eq!(report.received, 0);
    assert_eq!(
        report.rejected.iter().map(|r| r.1).collect::<Vec<_>>(),
        [Rejection::Compromised]
    );
    assert!(take_all(&mut alice).is_empty());
    let now = w.now();
    let err = block_on(alice.send(&mut w.rng, &m2, b"x", now)).unwrap_err();
    assert!(matches!(err, ClientError::Compromised), "{err:?}");
    assert_eq!(
        alice.trust(&m.identity).wait().unwrap(),
        Some(Trust::Compromised)
    );
}

#[test]
fn a_session_is_presumed_dead_after_enough_unanswered_messages() {
    let mut w = World::new(8);
    let config = ClientConfig {
        dead_after_messages: 3,
        ..ClientConfig::default()
    };
    let mut alice = w.device_with(MemoryStore::new(), config);
    let mut bob = w.device(MemoryStore::new());
    let (a, b) = (alice.address(), bob.address());
    w.send(&mut alice, &b, b"hello");
    assert_eq!(take_all_after(&mut w, &mut bob), [b"hello".to_vec()]);
    w.receive(&mut alice); // the receipt: Alice's session is answered
                           // Bob loses the session without knowing whose it was (say a bad
                           // restore); Alice's next messages are undecryptable for him.
    bob.store_mut().remove_session(&a).wait().unwrap();
    w.advance(1);
    for body in [b"one", b"two", b"tri"] {
        w.send(&mut alice, &b, body);
    }
    let report = w.receive(&mut bob);
    assert_eq!(report.rejected.len(), 3, "{report:?}");
    // No clock advance: three unanswered messages are enough.
    let now = w.now();
    let resend = block_on(alice.resend(&mut w.rng, now)).unwrap();
    assert_eq!((resend.resent, resend.new_sessions), (3, 1), "{resend:?}");
    assert_eq!(
        take_all_after(&mut w, &mut bob),
        [b"one".to_vec(), b"two".to_vec(), b"tri".to_vec()]
    );
    w.receive(&mut alice);
    assert_eq!(current(&alice, &b), current(&bob, &a));
    // Answered: nothing more is re-sent.
    let now = w.now();
    let resend = block_on(alice.resend(&mut w.rng, now)).unwrap();
    assert_eq!((resend.resent, resend.new_sessions), (0, 0));
}

#[cfg(feature = "sqlite")]
#[test]
fn corrupted_peer_and_sent_rows_stop_only_what_they_concern() {
    use cubbyhole::storage::SqliteStore;
    let dir = std::env::temp_dir().join(format!("cubbyhole-recovery-rows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bob.db");
    let _ = std::fs::remove_file(&path);
    let mut w = World::new(9);
    let mut bob = w.device(SqliteStore::open(&path, &[9; 32]).unwrap());
    let mut alice = w.device(MemoryStore::new());
    let mut carol = w.device(MemoryStore::new());
    let (a, b, c) = (alice.address(), bob.address(), carol.address());
    w.send(&mut alice, &b, b"a1");
    w.send(&mut carol, &b, b"c1");
    assert_eq!(take_all_after(&mut w, &mut bob).len(), 2);
    let now = w.now();
    let pending = block_on(bob.send(&mut w.rng, &a, b"b1", now)).unwrap();

    // Carol's peer row and Bob's sent row rot on disk.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE peers SET auth = X'00' WHERE identity = ?1",
        [&c.identity[..]],
    )
    .unwrap();
    raw.execute("UPDATE sent SET body = X'00'", []).unwrap();
    drop(raw);

    w.send(&mut alice, &b, b"a2");
    w.send(&mut carol, &b, b"c2");
    let report = w.receive(&mut bob);
    // Alice's message arrives; Carol's is refused (her trust cannot be
    // read: fail closed); the re-send step names the rotten sent row.
    assert_eq!(take_all(&mut bob), [b"a2".to_vec()]);
    assert_eq!(
        report.rejected.iter().map(|r| r.1).collect::<Vec<_>>(),
        [Rejection::Unverified]
    );
    assert_eq!(report.resend.problems.len(), 1, "{report:?}");

    // The application repairs both; Carol's message comes with her re-send.
    let now = w.now();
    bob.set_trust(&c, Trust::Unvalidated, now).wait().unwrap();
    bob.store_mut().remove_sent(&pending.message).unwrap();
    w.advance(HOUR);
    let now = w.now();
    block_on(carol.resend(&mut w.rng, now)).unwrap();
    assert_eq!(take_all_after(&mut w, &mut bob), [b"c2".to_vec()]);
    drop(bob);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_contact_whose_key_changed_is_reported_as_such() {
    use cubbyhole::client::ContactUpdate;
    let mut w = World::new(10);
    let mut alice = w.device(MemoryStore::new());
    let bob = w.device(MemoryStore::new());
    let old = bob.address();
    let now = w.now();
    assert_eq!(
        alice.save_contact(b"bob", &old, now).wait().unwrap(),
        ContactUpdate::New
    );
    assert_eq!(
        alice.save_contact(b"bob", &old, now).wait().unwrap(),
        ContactUpdate::Unchanged
    );
    alice.set_trust(&old, Trust::Validated, now).wait().unwrap();

    // Bob reinstalls: a new identity key under the same device number.
    drop(bob);
    let mut bob = w.device(MemoryStore::new());
    let new = bob.address();
    assert_eq!(new.device_id, old.device_id);
    w.send(&mut bob, &alice.address(), b"it's me, reinstalled");
    assert_eq!(take_all_after(&mut w, &mut alice).len(), 1);
    // When the application learns the person's new address, the client
    // says that a known (and validated) contact's key changed.
    let now = w.now();
    assert_eq!(
        alice.save_contact(b"bob", &new, now).wait().unwrap(),
        ContactUpdate::KeyChanged {
            device_id: old.device_id,
            previous: old.identity,
            previous_trust: Some(Trust::Validated),
        }
    );
    // Trust stays with each key: the new one is not validated.
    assert_eq!(
        alice.trust(&new.identity).wait().unwrap(),
        Some(Trust::Unvalidated)
    );
    assert_eq!(
        alice.trust(&old.identity).wait().unwrap(),
        Some(Trust::Validated)
    );
    let contact = alice.contact(b"bob").wait().unwrap().unwrap();
    assert_eq!(contact.devices, [new]);
    assert_eq!(contact.previous, [old.identity]);
    assert_eq!(contact.changed_at, now);
    // A second device of the person is a new device, not a key change.
    let other = DeviceAddress {
        identity: [9; 32],
        device_id: 2,
    };
    assert_eq!(
        alice.save_contact(b"bob", &other, now).wait().unwrap(),
        ContactUpdate::NewDevice
    );
    let too_long = [b'x'; 256];
    assert!(matches!(
        alice.save_contact(&too_long, &new, now).wait(),
        Err(ClientError::TooLong)
    ));
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
