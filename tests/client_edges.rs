//! Edges of the client layer that the end-to-end tests did not pin down
//! (issue 14, the mutants that survived in src/client): the documented
//! defaults, the exact boundaries of the prekey lifecycle (rotation period,
//! grace period, refill threshold, a directory that lost the device),
//! duplicates inside one fetched batch, a mailbox that never forgets, gap
//! reporting, a stranger's empty frame, new and validated peers in one
//! batch, the exact `max_body`, and `block_on`'s waker.
//!
//! Every expected value is a literal or counted by the test itself.

use cubbyhole::transport::DepositPass;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use cubbyhole::client::{block_on, Client, ClientConfig, ClientError, ContactUpdate, Rejection};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{BlockingStore, DeliveryState, Failure, MemoryStore, PeerRecord, Trust};
use cubbyhole::transport::{
    DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, PrekeyDirectory,
    TransportError,
};
use cubbyhole::{FreshnessPolicy, IdentityKeyPair, PrekeyBundle, Session, SessionConfig};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const T0: u64 = 1_900_000_000;
const DAY: u64 = 86_400;

/// An honest in-process relay with switches for what a test needs.
#[derive(Clone)]
struct Net {
    relay: InProcessRelay<MemoryRelayStorage>,
    /// The directory answers `NotFound` to the next pool-size question (it
    /// lost the device).
    lost: Arc<AtomicBool>,
    /// Each fetched batch holds every envelope twice.
    duplicate: Arc<AtomicBool>,
    /// Acknowledgements are answered but ignored (the relay keeps serving).
    ignore_acks: Arc<AtomicBool>,
    /// The next this-many deposits are claimed done and dropped.
    drop_deposits: Arc<AtomicU32>,
    /// Deposits fail (the relay is unreachable) while this is set.
    refuse_deposits: Arc<AtomicBool>,
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
        let lost = self.lost.swap(false, Ordering::SeqCst);
        let real = self.relay.one_time_prekeys_left(device);
        async move {
            let real = real.await;
            if lost {
                Err(TransportError::NotFound)
            } else {
                real
            }
        }
    }
}

impl Mailbox for Net {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let drop = self
            .drop_deposits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let refuse = self.refuse_deposits.load(Ordering::SeqCst);
        // The in-process relay acts when called: call it only to deposit.
        let relay = self.relay.clone();
        let (to, envelope, pass) = (*to, envelope.clone(), pass.clone());
        async move {
            if refuse {
                Err(TransportError::Unavailable("relay unreachable"))
            } else if drop {
                Ok(())
            } else {
                relay.deposit(&to, &envelope, &pass).await
            }
        }
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
        let duplicate = self.duplicate.load(Ordering::SeqCst);
        let real = self.relay.fetch(auth, limit);
        async move {
            let mut got = real.await?;
            if duplicate {
                let copy = got.clone();
                got.extend(copy);
            }
            Ok(got)
        }
    }
    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let ignore = self.ignore_acks.load(Ordering::SeqCst);
        let relay = self.relay.clone();
        let (auth, ids) = (auth.clone(), ids.to_vec());
        async move {
            if ignore {
                Ok(())
            } else {
                relay.acknowledge(&auth, &ids).await
            }
        }
    }
}

type Dev = Client<MemoryStore, Net, Net>;

struct World {
    clock: Arc<Mutex<u64>>,
    net: Net,
    rng: ChaCha20Rng,
}

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
                lost: Arc::default(),
                duplicate: Arc::default(),
                ignore_acks: Arc::default(),
                drop_deposits: Arc::default(),
                refuse_deposits: Arc::default(),
            },
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }
    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }
    fn set(&self, at: u64) {
        *self.clock.lock().unwrap() = at;
    }
    fn device(&mut self, config: ClientConfig) -> Dev {
        let mut c = block_on(Client::open(
            MemoryStore::new(),
            self.net.clone(),
            self.net.clone(),
            config,
            &mut self.rng,
        ))
        .unwrap();
        let now = self.now();
        assert!(block_on(c.maintain_prekeys(&mut self.rng, now)).unwrap());
        c
    }
    fn maintain(&mut self, c: &mut Dev) -> bool {
        let now = self.now();
        block_on(c.maintain_prekeys(&mut self.rng, now)).unwrap()
    }
    fn send(&mut self, from: &mut Dev, to: &Dev, body: &[u8]) {
        let now = self.now();
        let sent = block_on(from.send(&mut self.rng, &to.address(), body, now)).unwrap();
        assert!(sent.deposited);
    }
    fn receive(&mut self, c: &mut Dev) -> cubbyhole::client::ReceiveReport {
        let now = self.now();
        block_on(c.receive(&mut self.rng, now)).unwrap()
    }
    /// One-time prekeys the directory holds for `c`.
    fn pool(&self, c: &Dev) -> u32 {
        block_on(self.net.relay.one_time_prekeys_left(&c.address())).unwrap()
    }
    /// Takes one bundle of `c` from the directory (uses up a one-time key).
    fn drain(&self, c: &Dev, n: usize) {
        for _ in 0..n {
            block_on(self.net.relay.fetch_bundle(&c.address())).unwrap();
        }
    }
}

fn signed_ids(c: &Dev) -> Vec<u32> {
    let state = c.store().prekeys().unwrap().unwrap();
    let mut ids: Vec<u32> = state.prekeys.signed_prekeys().map(|k| k.id()).collect();
    ids.sort_unstable();
    ids
}

fn current_signed(c: &Dev) -> u32 {
    let state = c.store().prekeys().unwrap().unwrap();
    state.prekeys.current_signed_prekey().id()
}

fn local_one_time(c: &Dev) -> usize {
    let state = c.store().prekeys().unwrap().unwrap();
    state.prekeys.one_time_prekey_count()
}

fn bodies(c: &Dev) -> Vec<Vec<u8>> {
    let mut got: Vec<Vec<u8>> = c.inbox().wait().into_iter().map(|m| m.body).collect();
    got.sort();
    got
}

trait Wait: Future + Sized {
    fn wait(self) -> <Self::Output as Unwrap>::T
    where
        Self::Output: Unwrap,
    {
        block_on(self).unwrap_it()
    }
}
impl<F: Future> Wait for F {}
trait Unwrap {
    type T;
    fn unwrap_it(self) -> Self::T;
}
impl<T, E: std::fmt::Debug> Unwrap for Result<T, E> {
    type T = T;
    fn unwrap_it(self) -> T {
        self.unwrap()
    }
}

#[test]
fn default_settings_are_the_documented_ones() {
    // The values the field docs state, written out (not computed from the
    // crate's own constants).
    let c = ClientConfig::default();
    assert_eq!(c.device_id, 1);
    assert_eq!(c.signed_prekey_rotation, 604_800, "7 days");
    assert_eq!(c.signed_prekey_grace, 3_024_000, "35 days");
    assert_eq!(c.one_time_prekeys, 100);
    assert_eq!(c.refill_below, 25);
    assert_eq!(c.receive_batch, 500);
    assert_eq!(c.deposit_attempts, 3);
    assert_eq!(c.processed_retention, 5_184_000, "60 days");
    assert_eq!(c.max_body, 261_888, "256 KiB minus 256 bytes");
    assert_eq!(c.max_receive_rounds, 100);
    assert_eq!(c.archived_sessions, 40);
    assert_eq!(c.resend_after, 3_600, "1 hour");
    assert_eq!(c.resend_max_interval, 86_400, "1 day");
    assert_eq!(c.give_up_after, 2_592_000, "30 days");
    assert_eq!(c.notice_interval, 3_600, "1 hour");
    assert_eq!(c.dead_after_messages, 50);
}

#[test]
fn the_signed_prekey_rotates_exactly_when_the_period_is_over() {
    let mut w = World::new(1);
    let mut bob = w.device(ClientConfig::default());
    let first = current_signed(&bob);
    // One second short of 7 days: nothing to do (the pool is full).
    w.set(T0 + 7 * DAY - 1);
    assert!(!w.maintain(&mut bob));
    assert_eq!(current_signed(&bob), first);
    assert_eq!(signed_ids(&bob), vec![first]);
    // At 7 days exactly: rotated, the old one kept for its grace period.
    w.set(T0 + 7 * DAY);
    assert!(w.maintain(&mut bob));
    let second = current_signed(&bob);
    assert_ne!(second, first);
    assert_eq!(signed_ids(&bob).len(), 2);
    // The rotation restarted the period.
    w.set(T0 + 14 * DAY - 1);
    assert!(!w.maintain(&mut bob));
    assert_eq!(current_signed(&bob), second);
}

#[test]
fn retired_signed_prekeys_are_forgotten_just_after_their_grace_period() {
    // With a pool of one-time prekeys (whose withdrawn keys expire at the
    // same time) and without one (the signed prekey alone expires).
    for one_time_prekeys in [10, 0] {
        retired_signed_prekeys_expire(one_time_prekeys);
    }
}

fn retired_signed_prekeys_expire(one_time_prekeys: u32) {
    let mut w = World::new(2);
    let config = ClientConfig {
        signed_prekey_rotation: 7 * DAY,
        signed_prekey_grace: 3 * DAY,
        one_time_prekeys,
        refill_below: one_time_prekeys / 2,
        ..ClientConfig::default()
    };
    let mut bob = w.device(config);
    let first = current_signed(&bob);
    w.set(T0 + 7 * DAY);
    assert!(w.maintain(&mut bob));
    let second = current_signed(&bob);
    // At the end of the grace period exactly the old key is still held ...
    w.set(T0 + 10 * DAY);
    assert!(!w.maintain(&mut bob));
    assert_eq!(signed_ids(&bob), sorted(vec![first, second]));
    // ... one second later it is gone, and that is stored although nothing
    // was uploaded.
    w.set(T0 + 10 * DAY + 1);
    assert!(!w.maintain(&mut bob));
    assert_eq!(signed_ids(&bob), vec![second]);
    let state = bob.store().prekeys().unwrap().unwrap();
    assert!(state.retired_at.is_empty(), "{:?}", state.retired_at);
    // The next rotation's retired key gets its own grace period, counted
    // from its own retirement.
    w.set(T0 + 14 * DAY);
    assert!(w.maintain(&mut bob));
    let third = current_signed(&bob);
    assert_eq!(signed_ids(&bob), sorted(vec![second, third]));
    w.set(T0 + 17 * DAY + 1);
    assert!(!w.maintain(&mut bob));
    assert_eq!(signed_ids(&bob), vec![third]);
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

#[test]
fn a_directory_that_lost_the_device_gets_a_fresh_pool_and_the_old_one_is_forgotten_later() {
    let mut w = World::new(3);
    let config = ClientConfig {
        one_time_prekeys: 10,
        refill_below: 5,
        signed_prekey_rotation: 30 * DAY,
        signed_prekey_grace: 3 * DAY,
        ..ClientConfig::default()
    };
    let mut bob = w.device(config);
    assert_eq!(w.pool(&bob), 10);
    assert_eq!(local_one_time(&bob), 10);
    let signed = current_signed(&bob);
    // The directory says it does not know the device: the whole pool is
    // replaced (fresh keys, none published twice), the old keys are held
    // for the grace period.
    w.set(T0 + DAY);
    w.net.lost.store(true, Ordering::SeqCst);
    assert!(w.maintain(&mut bob));
    assert_eq!(w.pool(&bob), 10);
    assert_eq!(local_one_time(&bob), 20);
    assert_eq!(current_signed(&bob), signed, "no rotation");
    // At the end of the grace period exactly they are still held ...
    w.set(T0 + 4 * DAY);
    assert!(!w.maintain(&mut bob));
    assert_eq!(local_one_time(&bob), 20);
    // ... one second later they are gone (stored, without an upload).
    w.set(T0 + 4 * DAY + 1);
    assert!(!w.maintain(&mut bob));
    assert_eq!(local_one_time(&bob), 10);
    let state = bob.store().prekeys().unwrap().unwrap();
    assert!(state.one_time_retired.is_empty());
    assert!(!state.upload_pending);
    assert_eq!(w.pool(&bob), 10);
}

#[test]
fn the_pool_is_refilled_below_the_threshold_and_not_at_it() {
    let mut w = World::new(4);
    let config = ClientConfig {
        one_time_prekeys: 10,
        refill_below: 5,
        ..ClientConfig::default()
    };
    let mut bob = w.device(config);
    assert_eq!(w.pool(&bob), 10);
    w.drain(&bob, 5);
    assert_eq!(w.pool(&bob), 5);
    // 5 left, threshold 5: nothing to do.
    assert!(!w.maintain(&mut bob));
    assert_eq!(w.pool(&bob), 5);
    assert_eq!(local_one_time(&bob), 10);
    // 4 left: topped up to 10 with 6 new keys, the 4 left in place.
    w.drain(&bob, 1);
    assert!(w.maintain(&mut bob));
    assert_eq!(w.pool(&bob), 10);
    assert_eq!(local_one_time(&bob), 16);
    // Full again: nothing to do.
    assert!(!w.maintain(&mut bob));
    assert_eq!(w.pool(&bob), 10);
}

#[test]
fn duplicates_inside_one_batch_are_redelivered_not_rejected() {
    let mut w = World::new(5);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    for i in 0..3u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    w.net.duplicate.store(true, Ordering::SeqCst);
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 3, "{report:?}");
    assert_eq!(report.redelivered, 3, "{report:?}");
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(report.duplicates, 0);
    assert_eq!(bodies(&bob), vec![vec![0], vec![1], vec![2]]);
}

#[test]
fn a_mailbox_that_never_forgets_is_fetched_once_more_not_forever() {
    let mut w = World::new(6);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    for i in 0..3u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    w.net.ignore_acks.store(true, Ordering::SeqCst);
    // The first fetch brings three new envelopes, the second the same three
    // again: nothing new, so the receive stops there.
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 3, "{report:?}");
    assert_eq!(report.redelivered, 3, "{report:?}");
    assert!(report.rejected.is_empty());
    // The same with copies inside each batch (and the first three, never
    // acknowledged, still there): the first round brings twelve envelopes,
    // three new and nine known, the second the same twelve, all known, and
    // it stops there.
    for i in 3..6u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    w.net.duplicate.store(true, Ordering::SeqCst);
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 3, "{report:?}");
    assert_eq!(report.redelivered, 9 + 12, "{report:?}");
}

#[test]
fn small_batches_take_everything_in_one_receive() {
    let mut w = World::new(7);
    let mut bob = w.device(ClientConfig {
        receive_batch: 2,
        ..ClientConfig::default()
    });
    let mut alice = w.device(ClientConfig::default());
    for i in 0..5u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 5, "{report:?}");
    assert_eq!(report.redelivered, 0);
    assert_eq!(bodies(&bob).len(), 5);
}

#[test]
fn gaps_are_reported_for_the_peer_that_has_them_only() {
    let mut w = World::new(8);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    let mut carol = w.device(ClientConfig::default());
    w.send(&mut alice, &bob, b"a0");
    w.send(&mut carol, &bob, b"c0");
    // Alice's second and third messages are lost by the relay.
    w.net.drop_deposits.store(2, Ordering::SeqCst);
    let now = w.now();
    block_on(alice.send(&mut w.rng, &bob.address(), b"a1", now)).unwrap();
    block_on(alice.send(&mut w.rng, &bob.address(), b"a2", now)).unwrap();
    w.send(&mut alice, &bob, b"a3");
    w.send(&mut carol, &bob, b"c1");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 4, "{report:?}");
    assert_eq!(report.missing, vec![(alice.address(), 2)]);
    assert_eq!(bob.missing().wait(), vec![(alice.address(), 2)]);
    // A receive without gaps reports none, and a peer without gaps is
    // never listed.
    w.send(&mut carol, &bob, b"c2");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 1);
    assert_eq!(report.missing, vec![]);
    assert_eq!(bob.missing().wait(), vec![(alice.address(), 2)]);
    // Before anything was lost, nobody is missing anything.
    assert_eq!(alice.missing().wait(), vec![]);
}

#[test]
fn an_empty_frame_from_a_stranger_is_refused_and_changes_nothing() {
    let mut w = World::new(9);
    let config = ClientConfig {
        one_time_prekeys: 10,
        refill_below: 5,
        ..ClientConfig::default()
    };
    let mut bob = w.device(config);
    let stranger = IdentityKeyPair::generate(&mut w.rng);
    let now = w.now();
    let bytes = block_on(w.net.relay.fetch_bundle(&bob.address())).unwrap();
    let bundle = PrekeyBundle::decode(&bytes)
        .unwrap()
        .verify(now, FreshnessPolicy::default())
        .unwrap();
    let mut session =
        Session::initiate(&mut w.rng, &stranger, &bundle, SessionConfig::default()).unwrap();
    // A valid prekey message whose plaintext (the client frame) is empty,
    // and one whose frame is a lone version byte.
    for plaintext in [&[][..], &[2][..]] {
        let payload = session.encrypt(&mut w.rng, plaintext).unwrap();
        let mut id = [0u8; 16];
        w.rng.fill_bytes(&mut id);
        block_on(w.net.relay.deposit(
            &bob.address().mailbox(),
            &Envelope {
                id: EnvelopeId(id),
                payload,
            },
            &DepositPass::NONE,
        ))
        .unwrap();
    }
    let before = bob.store().prekeys().unwrap().unwrap();
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 0);
    assert_eq!(report.rejected.len(), 2, "{report:?}");
    // The first is refused for its frame; the second names the same
    // session (same EK_A) and is refused for its frame too.
    assert_eq!(report.rejected[0].1, Rejection::BadFrame);
    assert_eq!(report.rejected[1].1, Rejection::BadFrame);
    // Nothing was consumed or stored for the stranger.
    let after = bob.store().prekeys().unwrap().unwrap();
    assert_eq!(
        after.prekeys.one_time_prekey_count(),
        before.prekeys.one_time_prekey_count()
    );
    assert!(after.accepted.is_empty());
    assert!(bob.store().sessions().unwrap().is_empty());
    assert!(bob.store().peers().unwrap().is_empty());
    assert_eq!(bob.inbox().wait(), vec![]);
}

#[test]
fn new_senders_in_one_batch_are_recorded_and_a_validated_peer_keeps_its_record() {
    let mut w = World::new(10);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    let mut carol = w.device(ClientConfig::default());
    let mut dave = w.device(ClientConfig::default());
    w.send(&mut alice, &bob, b"a0");
    assert_eq!(w.receive(&mut bob).received, 1);
    let now = w.now();
    block_on(bob.set_trust(&alice.address(), Trust::Validated, now)).unwrap();
    let validated = PeerRecord {
        address: alice.address(),
        trust: Trust::Validated,
        first_seen: T0,
    };
    assert_eq!(
        bob.store().peer(&alice.address()).unwrap(),
        Some(validated.clone())
    );
    // Later, one batch: two senders never seen, and Alice again.
    w.set(T0 + DAY);
    w.send(&mut carol, &bob, b"c0");
    w.send(&mut alice, &bob, b"a1");
    w.send(&mut dave, &bob, b"d0");
    w.send(&mut carol, &bob, b"c1");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 4, "{report:?}");
    for new in [&carol, &dave] {
        assert_eq!(
            bob.store().peer(&new.address()).unwrap(),
            Some(PeerRecord {
                address: new.address(),
                trust: Trust::Unvalidated,
                first_seen: T0 + DAY,
            })
        );
    }
    assert_eq!(bob.store().peer(&alice.address()).unwrap(), Some(validated));
    assert_eq!(bob.store().peers().unwrap().len(), 3);
}

#[test]
fn max_body_is_the_longest_body_accepted() {
    let mut w = World::new(11);
    let bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig {
        max_body: 100,
        ..ClientConfig::default()
    });
    assert_eq!(alice.config().max_body, 100);
    let now = w.now();
    let sent = block_on(alice.send(&mut w.rng, &bob.address(), &[7; 100], now)).unwrap();
    assert!(sent.deposited);
    assert!(matches!(
        block_on(alice.send(&mut w.rng, &bob.address(), &[7; 101], now)),
        Err(ClientError::TooLong)
    ));
}

/// Pending once, after waking its waker (by value or by reference), then
/// ready: `block_on` must be woken by it or it parks for ever.
struct WakeOnce {
    woken: bool,
    by_value: bool,
}

impl Future for WakeOnce {
    type Output = &'static str;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.woken {
            return Poll::Ready("done");
        }
        self.woken = true;
        let waker = cx.waker().clone();
        let by_value = self.by_value;
        // Woken from another thread, after this poll returned (or not:
        // either order must work).
        std::thread::spawn(move || {
            if by_value {
                waker.wake();
            } else {
                waker.wake_by_ref();
            }
        });
        Poll::Pending
    }
}

#[test]
fn block_on_is_woken_by_value_and_by_reference() {
    for by_value in [true, false] {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let out = block_on(WakeOnce {
                woken: false,
                by_value,
            });
            tx.send(out).unwrap();
        });
        // A watchdog, not a timing assertion: the wake takes microseconds;
        // without it the thread parks for ever.
        let out = rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            out,
            Ok("done"),
            "block_on was not woken (by_value: {by_value})"
        );
    }
}

#[test]
fn receipts_reach_each_sender_across_batches() {
    let mut w = World::new(12);
    // Batches of two: the receipts of one sender span three batches, and
    // each batch holds messages of both senders.
    let mut bob = w.device(ClientConfig {
        receive_batch: 2,
        ..ClientConfig::default()
    });
    let mut alice = w.device(ClientConfig::default());
    let mut carol = w.device(ClientConfig::default());
    let mut sent = Vec::new();
    for i in 0..3u8 {
        for (from, tag) in [(&mut alice, b'a'), (&mut carol, b'c')] {
            let now = w.now();
            let s = block_on(from.send(&mut w.rng, &bob.address(), &[tag, i], now)).unwrap();
            assert_eq!(
                from.delivery(&s.message).wait(),
                Some(DeliveryState::Deposited)
            );
            sent.push((tag, s.message));
        }
    }
    assert_eq!(w.receive(&mut bob).received, 6);
    let report_a = w.receive(&mut alice);
    let report_c = w.receive(&mut carol);
    for (tag, id) in &sent {
        let (from, report) = if *tag == b'a' {
            (&alice, &report_a)
        } else {
            (&carol, &report_c)
        };
        assert_eq!(from.delivery(id).wait(), Some(DeliveryState::Delivered));
        assert!(report.delivered.contains(id));
    }
    assert_eq!(report_a.delivered.len(), 3);
    assert_eq!(report_c.delivered.len(), 3);
}

#[test]
fn a_refused_deposit_waits_in_the_outbox_and_is_flushed_once() {
    let mut w = World::new(13);
    let bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    w.net.refuse_deposits.store(true, Ordering::SeqCst);
    let now = w.now();
    let s = block_on(alice.send(&mut w.rng, &bob.address(), b"first", now)).unwrap();
    assert!(!s.deposited);
    assert_eq!(
        alice.delivery(&s.message).wait(),
        Some(DeliveryState::Stored)
    );
    assert_eq!(block_on(alice.flush_outbox()).unwrap(), 0);
    w.net.refuse_deposits.store(false, Ordering::SeqCst);
    assert_eq!(block_on(alice.flush_outbox()).unwrap(), 1);
    assert_eq!(
        alice.delivery(&s.message).wait(),
        Some(DeliveryState::Deposited)
    );
    assert_eq!(block_on(alice.flush_outbox()).unwrap(), 0);
    // A re-send whose deposit is refused is flushed as re-sent.
    w.set(T0 + 3_600);
    w.net.refuse_deposits.store(true, Ordering::SeqCst);
    let now = w.now();
    let report = block_on(alice.resend(&mut w.rng, now)).unwrap();
    assert_eq!(report.resent, 1, "{report:?}");
    assert_eq!(
        alice.delivery(&s.message).wait(),
        Some(DeliveryState::Stored)
    );
    w.net.refuse_deposits.store(false, Ordering::SeqCst);
    // The re-sent message (on a new session: nothing came back) is the
    // one envelope waiting.
    assert_eq!(block_on(alice.flush_outbox()).unwrap(), 1);
    assert_eq!(
        alice.delivery(&s.message).wait(),
        Some(DeliveryState::Resent)
    );
}

#[test]
fn re_sends_wait_exactly_their_interval_and_give_up_exactly_after_the_limit() {
    let mut w = World::new(14);
    let bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig {
        resend_after: 3_600,
        resend_max_interval: DAY,
        give_up_after: 3 * DAY,
        ..ClientConfig::default()
    });
    let now = w.now();
    let s = block_on(alice.send(&mut w.rng, &bob.address(), b"hello?", now)).unwrap();
    let mut resend_at = |w: &mut World, at: u64| {
        w.set(at);
        block_on(alice.resend(&mut w.rng, at)).unwrap()
    };
    // Bob never answers. First wait: one interval.
    assert_eq!(resend_at(&mut w, T0 + 3_599).resent, 0);
    assert_eq!(resend_at(&mut w, T0 + 3_600).resent, 1);
    // Then twice as long, counted from the re-send.
    assert_eq!(resend_at(&mut w, T0 + 3_600 + 7_199).resent, 0);
    assert_eq!(resend_at(&mut w, T0 + 3_600 + 7_200).resent, 1);
    // Then four times.
    assert_eq!(resend_at(&mut w, T0 + 10_800 + 14_399).resent, 0);
    assert_eq!(resend_at(&mut w, T0 + 10_800 + 14_400).resent, 1);
    // Exactly at the limit it is still pending (and re-sent: the wait is
    // capped at a day) ...
    let report = resend_at(&mut w, T0 + 3 * DAY);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.resent, 1);
    // ... one second later it is given up.
    let report = resend_at(&mut w, T0 + 3 * DAY + 1);
    assert_eq!(report.failed, vec![(s.message, Failure::TimedOut)]);
    assert_eq!(report.resent, 0);
    assert_eq!(
        alice.delivery(&s.message).wait(),
        Some(DeliveryState::Failed(Failure::TimedOut))
    );
}

#[test]
fn contacts_at_their_limits() {
    let mut w = World::new(15);
    let mut bob = w.device(ClientConfig::default());
    let alice = IdentityKeyPair::generate(&mut w.rng);
    let at = |k: &IdentityKeyPair, device: u32| DeviceAddress::new(k.public(), device);
    let a1 = at(&alice, 1);
    let now = w.now();
    let save =
        |bob: &mut Dev, name: &[u8], a: &DeviceAddress| block_on(bob.save_contact(name, a, now));
    // Names: 255 bytes at most.
    assert!(save(&mut bob, &[b'n'; 255], &a1).is_ok());
    assert!(matches!(
        save(&mut bob, &[b'n'; 256], &a1),
        Err(ClientError::TooLong)
    ));
    assert_eq!(save(&mut bob, b"alice", &a1).unwrap(), ContactUpdate::New);
    assert_eq!(
        save(&mut bob, b"alice", &a1).unwrap(),
        ContactUpdate::Unchanged
    );
    assert_eq!(
        save(&mut bob, b"alice", &at(&alice, 3)).unwrap(),
        ContactUpdate::NewDevice
    );
    assert_eq!(
        save(&mut bob, b"alice", &at(&alice, 2)).unwrap(),
        ContactUpdate::NewDevice
    );
    let contact = bob.contact(b"alice").wait().unwrap();
    let ids: Vec<u32> = contact.devices.iter().map(|d| d.device_id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(contact.previous.is_empty());
    // The new devices' peer records inherit the key's trust.
    block_on(bob.set_trust(&a1, Trust::Validated, now)).unwrap();
    assert_eq!(
        save(&mut bob, b"alice", &at(&alice, 4)).unwrap(),
        ContactUpdate::NewDevice
    );
    assert_eq!(
        bob.store().peer(&at(&alice, 4)).unwrap().unwrap().trust,
        Trust::Validated
    );
    // Device 1 gets a new key: reported with the old key and its trust.
    let alice2 = IdentityKeyPair::generate(&mut w.rng);
    assert_eq!(
        save(&mut bob, b"alice", &at(&alice2, 1)).unwrap(),
        ContactUpdate::KeyChanged {
            device_id: 1,
            previous: *alice.public().as_bytes(),
            previous_trust: Some(Trust::Validated),
        }
    );
    let contact = bob.contact(b"alice").wait().unwrap();
    assert_eq!(contact.previous, vec![*alice.public().as_bytes()]);
    assert_eq!(contact.changed_at, now);
    assert_eq!(contact.devices[0], at(&alice2, 1));
    assert_eq!(
        bob.store().peer(&at(&alice2, 1)).unwrap().unwrap().trust,
        Trust::Unvalidated
    );
    // A third key: both earlier ones are remembered, oldest first.
    let alice3 = IdentityKeyPair::generate(&mut w.rng);
    assert!(matches!(
        save(&mut bob, b"alice", &at(&alice3, 1)).unwrap(),
        ContactUpdate::KeyChanged { device_id: 1, .. }
    ));
    assert_eq!(
        bob.contact(b"alice").wait().unwrap().previous,
        vec![*alice.public().as_bytes(), *alice2.public().as_bytes()]
    );
    // Devices: 255 at most.
    let carol = IdentityKeyPair::generate(&mut w.rng);
    for device in 1..=255 {
        save(&mut bob, b"carol", &at(&carol, device)).unwrap();
    }
    assert!(matches!(
        save(&mut bob, b"carol", &at(&carol, 256)),
        Err(ClientError::TooLong)
    ));
    assert_eq!(bob.contact(b"carol").wait().unwrap().devices.len(), 255);
}

#[test]
fn a_restore_keeps_only_the_new_signed_prekey_and_resets_every_session() {
    let mut w = World::new(16);
    let config = ClientConfig {
        one_time_prekeys: 10,
        refill_below: 5,
        ..ClientConfig::default()
    };
    let mut bob = w.device(config);
    let mut alice = w.device(ClientConfig::default());
    let mut carol = w.device(ClientConfig::default());
    w.send(&mut alice, &bob, b"hi");
    w.send(&mut carol, &bob, b"hi too");
    assert_eq!(w.receive(&mut bob).received, 2);
    w.set(T0 + 7 * DAY);
    assert!(w.maintain(&mut bob));
    assert_eq!(signed_ids(&bob).len(), 2);
    let now = w.now();
    let pending = block_on(bob.send(&mut w.rng, &alice.address(), b"pending", now)).unwrap();
    let old = bob
        .store()
        .session(&alice.address())
        .unwrap()
        .unwrap()
        .current(&bob.address(), &alice.address())
        .unwrap()
        .id;
    w.set(T0 + 7 * DAY + 60);
    let now = w.now();
    block_on(bob.restored_from_backup(&mut w.rng, now)).unwrap();
    // One signed prekey, new; a fresh pool of ten only; no replay digests.
    let state = bob.store().prekeys().unwrap().unwrap();
    assert_eq!(
        signed_ids(&bob),
        vec![state.prekeys.current_signed_prekey().id()]
    );
    assert_eq!(state.prekeys.one_time_prekey_count(), 10);
    assert!(state.accepted.is_empty());
    assert!(!state.upload_pending);
    assert_eq!(w.pool(&bob), 10);
    // A new session, marked RESET, replaced the old one; the pending
    // message went again.
    let record = bob.store().session(&alice.address()).unwrap().unwrap();
    let current = record.current(&bob.address(), &alice.address()).unwrap();
    assert_ne!(current.id, old);
    assert!(current.reset);
    assert_eq!(
        bob.delivery(&pending.message).wait(),
        Some(DeliveryState::Resent)
    );
    // Carol, with nothing pending, gets a RESET session at once too.
    let record = bob.store().session(&carol.address()).unwrap().unwrap();
    let current = record.current(&bob.address(), &carol.address()).unwrap();
    assert!(current.reset);
    // Alice gets the message once, and both ends go on.
    let report = w.receive(&mut alice);
    assert_eq!(report.received, 1, "{report:?}");
    w.send(&mut alice, &bob, b"again");
    assert_eq!(w.receive(&mut bob).received, 1);
}

#[test]
fn errors_and_the_client_describe_themselves() {
    use std::error::Error as _;
    let errors = [
        ClientError::Protocol(cubbyhole::Error::Duplicate),
        ClientError::Store(cubbyhole::storage::StoreError::WrongKey),
        ClientError::Transport(TransportError::NotFound),
        ClientError::WrongIdentity,
        ClientError::Compromised,
        ClientError::TooLong,
    ];
    let texts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for (e, text) in errors.iter().zip(&texts) {
        assert!(!text.is_empty(), "{e:?}");
    }
    let mut unique = texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), texts.len(), "{texts:?}");
    let sources: Vec<bool> = errors.iter().map(|e| e.source().is_some()).collect();
    assert_eq!(sources, [true, true, true, false, false, false]);
    assert_eq!(
        errors[0].source().unwrap().to_string(),
        cubbyhole::Error::Duplicate.to_string()
    );
    assert!(matches!(
        ClientError::from(cubbyhole::Error::Duplicate),
        ClientError::Protocol(cubbyhole::Error::Duplicate)
    ));
    let mut w = World::new(17);
    let bob = w.device(ClientConfig::default());
    let shown = format!("{bob:?}");
    assert!(shown.starts_with("Client"), "{shown}");
    assert!(shown.contains("config"), "{shown}");
}

#[test]
fn trust_covers_every_device_of_the_key_and_a_compromise_fails_only_its_messages() {
    let mut w = World::new(18);
    let mut alice = w.device(ClientConfig::default());
    let bob = w.device(ClientConfig::default());
    let carol = w.device(ClientConfig::default());
    let now = w.now();
    let to_bob = block_on(alice.send(&mut w.rng, &bob.address(), b"b", now)).unwrap();
    let to_carol = block_on(alice.send(&mut w.rng, &carol.address(), b"c", now)).unwrap();
    // Bob's device 2 was never seen: validating it creates its record, and
    // device 1 (known) gets the same trust.
    let bob2 = DeviceAddress::new(bob.identity(), 2);
    assert_eq!(bob.address().device_id, 1);
    block_on(alice.set_trust(&bob2, Trust::Validated, now)).unwrap();
    for device in [bob.address(), bob2] {
        assert_eq!(
            alice.store().peer(&device).unwrap().map(|p| p.trust),
            Some(Trust::Validated),
            "{device:?}"
        );
    }
    // Compromised: Bob's pending message fails, Carol's does not.
    block_on(alice.set_trust(&bob.address(), Trust::Compromised, now)).unwrap();
    assert_eq!(
        alice.delivery(&to_bob.message).wait(),
        Some(DeliveryState::Failed(Failure::Compromised))
    );
    assert_eq!(
        alice.delivery(&to_carol.message).wait(),
        Some(DeliveryState::Deposited)
    );
    assert_eq!(
        alice.store().peer(&bob2).unwrap().map(|p| p.trust),
        Some(Trust::Compromised)
    );
}

#[test]
fn a_send_over_a_record_without_a_current_session_starts_a_reset_session() {
    let mut w = World::new(19);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    w.send(&mut alice, &bob, b"hi");
    assert_eq!(w.receive(&mut bob).received, 1);
    // Every session of Bob's with Alice is superseded (what a restore or a
    // dead-session notice leaves), the record stays.
    let mut record = bob.store().session(&alice.address()).unwrap().unwrap();
    let old = record.current(&bob.address(), &alice.address()).unwrap().id;
    record.supersede_all();
    bob.store_mut()
        .set_session(&alice.address(), &record)
        .unwrap();
    w.send(&mut bob, &alice, b"after");
    let record = bob.store().session(&alice.address()).unwrap().unwrap();
    let current = record.current(&bob.address(), &alice.address()).unwrap();
    assert_ne!(current.id, old);
    assert!(current.reset, "the new session says the old ones were lost");
    let report = w.receive(&mut alice);
    assert_eq!(report.received, 1, "{report:?}");
}

#[test]
fn a_compromised_peer_gets_no_new_session_after_a_restore() {
    let mut w = World::new(20);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    let mut carol = w.device(ClientConfig::default());
    w.send(&mut alice, &bob, b"a");
    w.send(&mut carol, &bob, b"c");
    assert_eq!(w.receive(&mut bob).received, 2);
    assert_eq!(w.receive(&mut alice).delivered.len(), 1);
    assert_eq!(w.receive(&mut carol).delivered.len(), 1);
    let now = w.now();
    block_on(bob.set_trust(&alice.address(), Trust::Compromised, now)).unwrap();
    block_on(bob.restored_from_backup(&mut w.rng, now)).unwrap();
    // Carol gets a RESET session at once; Alice (compromised) nothing.
    let current = |c: &Dev, peer: &Dev| {
        c.store()
            .session(&peer.address())
            .unwrap()
            .unwrap()
            .current(&c.address(), &peer.address())
            .map(|e| e.reset)
    };
    assert_eq!(current(&bob, &carol), Some(true));
    assert_eq!(current(&bob, &alice), None);
    let report = w.receive(&mut alice);
    assert_eq!(
        (report.received, report.redelivered, report.rejected.len()),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(alice.store().sessions().unwrap().len() == 1);
}

#[test]
fn a_session_is_presumed_dead_by_count_only_when_nothing_came_back_since() {
    let mut w = World::new(21);
    let config = ClientConfig {
        dead_after_messages: 3,
        ..ClientConfig::default()
    };
    // More than the limit, nothing ever heard: dead at once (not only at
    // exactly the limit).
    let dave = w.device(ClientConfig::default());
    let mut carol = w.device(config);
    let now = w.now();
    for i in 0..4u8 {
        block_on(carol.send(&mut w.rng, &dave.address(), &[i], now)).unwrap();
    }
    let report = block_on(carol.resend(&mut w.rng, now)).unwrap();
    assert_eq!((report.resent, report.new_sessions), (4, 1), "{report:?}");
    // A dead session is replaced, not lost: the new one is not RESET.
    let record = carol.store().session(&dave.address()).unwrap().unwrap();
    assert!(
        !record
            .current(&carol.address(), &dave.address())
            .unwrap()
            .reset
    );
    // Due by count and, an hour later, by time as well: still one new
    // session and one re-send each.
    let mut erin = w.device(config);
    for i in 0..4u8 {
        block_on(erin.send(&mut w.rng, &dave.address(), &[i], now)).unwrap();
    }
    let later = now + 3_600;
    let report = block_on(erin.resend(&mut w.rng, later)).unwrap();
    assert_eq!((report.resent, report.new_sessions), (4, 1), "{report:?}");

    // Enough unanswered messages, but the peer was heard from at the very
    // second the first of them was sent: alive.
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(config);
    w.send(&mut alice, &bob, b"hi");
    assert_eq!(w.receive(&mut bob).received, 1);
    w.send(&mut bob, &alice, b"yo");
    assert_eq!(w.receive(&mut alice).received, 1);
    w.set(T0 + 10);
    for i in 0..3u8 {
        w.send(&mut alice, &bob, &[i]);
    }
    w.send(&mut bob, &alice, b"meanwhile");
    let report = w.receive(&mut alice);
    assert_eq!(report.received, 1);
    assert_eq!(
        (report.resend.resent, report.resend.new_sessions),
        (0, 0),
        "{report:?}"
    );
}

#[test]
fn a_re_send_to_a_peer_heard_from_since_it_was_sent_keeps_the_session() {
    let mut w = World::new(22);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    w.send(&mut alice, &bob, b"hi");
    assert_eq!(w.receive(&mut bob).received, 1);
    w.send(&mut bob, &alice, b"yo");
    assert_eq!(w.receive(&mut alice).received, 1);
    // At T1 Alice's message is lost by the relay, and Bob's arrives: Alice
    // heard from Bob at the very second she sent it.
    w.set(T0 + 100);
    w.net.drop_deposits.store(1, Ordering::SeqCst);
    let now = w.now();
    let lost = block_on(alice.send(&mut w.rng, &bob.address(), b"lost", now)).unwrap();
    w.send(&mut bob, &alice, b"meanwhile");
    assert_eq!(w.receive(&mut alice).received, 1);
    let session = |a: &Dev| {
        a.store()
            .session(&bob.address())
            .unwrap()
            .unwrap()
            .current(&a.address(), &bob.address())
            .unwrap()
            .id
    };
    let before = session(&alice);
    // Due an hour later: re-sent on the same session (Bob is alive).
    let later = T0 + 100 + 3_600;
    w.set(later);
    let report = block_on(alice.resend(&mut w.rng, later)).unwrap();
    assert_eq!((report.resent, report.new_sessions), (1, 0), "{report:?}");
    assert_eq!(session(&alice), before);
    assert_eq!(w.receive(&mut bob).received, 1);
    w.receive(&mut alice);
    assert_eq!(
        alice.delivery(&lost.message).wait(),
        Some(DeliveryState::Delivered)
    );
}

#[test]
fn dead_session_notices_are_rate_limited_to_one_per_interval() {
    use cubbyhole::storage::{LocalIdentity, PrekeyState};
    let mut w = World::new(23);
    let mut bob = w.device(ClientConfig::default());
    let alice = w.device(ClientConfig::default());
    let now = w.now();
    // Bob knows Alice.
    block_on(bob.set_trust(&alice.address(), Trust::Unvalidated, now)).unwrap();
    // Three first messages from Alice's key to Bob's current prekeys ...
    let keys = alice.store().identity().unwrap().unwrap().keys;
    let mut first_messages = Vec::new();
    for _ in 0..3 {
        let bytes = block_on(w.net.relay.fetch_bundle(&bob.address())).unwrap();
        let bundle = PrekeyBundle::decode(&bytes)
            .unwrap()
            .verify(now, FreshnessPolicy::default())
            .unwrap();
        let mut session =
            Session::initiate(&mut w.rng, &keys, &bundle, SessionConfig::default()).unwrap();
        first_messages.push(session.encrypt(&mut w.rng, b"x").unwrap());
    }
    // ... which Bob can no longer open: he lost those prekeys.
    let identity: LocalIdentity = bob.store().identity().unwrap().unwrap();
    let old = bob.store().prekeys().unwrap().unwrap();
    let fresh = PrekeyState {
        prekeys: cubbyhole::PrekeyStore::new(&mut w.rng, &identity.keys, now).unwrap(),
        upload_counter: old.upload_counter,
        last_rotation: now,
        retired_at: Vec::new(),
        one_time_retired: Vec::new(),
        upload_pending: true,
        accepted: Vec::new(),
    };
    bob.store_mut().set_prekeys(&fresh).unwrap();
    w.maintain(&mut bob);
    let deliver = |w: &mut World, bob: &mut Dev, payload: Vec<u8>, at: u64| {
        let mut id = [0u8; 16];
        w.rng.fill_bytes(&mut id);
        block_on(w.net.relay.deposit(
            &bob.address().mailbox(),
            &Envelope {
                id: EnvelopeId(id),
                payload,
            },
            &DepositPass::NONE,
        ))
        .unwrap();
        w.set(at);
        let report = block_on(bob.receive(&mut w.rng, at)).unwrap();
        assert_eq!(report.rejected.len(), 1, "{report:?}");
        report.notices
    };
    let interval = ClientConfig::default().notice_interval;
    let mut m = first_messages.into_iter();
    assert_eq!(
        deliver(&mut w, &mut bob, m.next().unwrap(), now),
        vec![alice.address()]
    );
    // One second short of the interval: no second notice ...
    let second = deliver(&mut w, &mut bob, m.next().unwrap(), now + interval - 1);
    assert_eq!(second, vec![]);
    // ... at the interval exactly, one.
    let third = deliver(&mut w, &mut bob, m.next().unwrap(), now + interval);
    assert_eq!(third, vec![alice.address()]);
}

#[test]
fn a_second_receipt_for_a_delivered_message_changes_nothing() {
    let mut w = World::new(24);
    let mut bob = w.device(ClientConfig::default());
    // One envelope per batch: the two receipts come in two batches.
    let mut alice = w.device(ClientConfig {
        receive_batch: 1,
        ..ClientConfig::default()
    });
    let now = w.now();
    let m = block_on(alice.send(&mut w.rng, &bob.address(), b"once", now)).unwrap();
    assert_eq!(w.receive(&mut bob).received, 1);
    // Alice re-sends before reading Bob's receipt; Bob sees a duplicate and
    // answers it again.
    let later = now + 3_600;
    w.set(later);
    assert_eq!(block_on(alice.resend(&mut w.rng, later)).unwrap().resent, 1);
    let report = w.receive(&mut bob);
    assert_eq!((report.received, report.duplicates), (0, 1), "{report:?}");
    assert_eq!(bob.inbox().wait().len(), 1);
    let report = w.receive(&mut alice);
    assert_eq!(report.delivered, vec![m.message], "{report:?}");
    assert_eq!(
        alice.delivery(&m.message).wait(),
        Some(DeliveryState::Delivered)
    );
}

#[test]
fn a_new_chain_is_routed_to_its_owner_among_several_awaiting_records() {
    let mut w = World::new(25);
    let mut bob = w.device(ClientConfig::default());
    let mut alice = w.device(ClientConfig::default());
    let mut carol = w.device(ClientConfig::default());
    for peer in [&mut alice, &mut carol] {
        w.send(peer, &bob, b"hi");
    }
    assert_eq!(w.receive(&mut bob).received, 2);
    // Bob answers both, Carol last: both records await a new ratchet key,
    // Carol's the most recently written (tried first).
    w.send(&mut bob, &alice, b"to alice");
    w.send(&mut bob, &carol, b"to carol");
    assert_eq!(w.receive(&mut alice).received, 1);
    // Alice's answer starts a new chain that only her record opens.
    w.send(&mut alice, &bob, b"new chain");
    let report = w.receive(&mut bob);
    assert_eq!(report.received, 1, "{report:?}");
    assert!(report.rejected.is_empty(), "{report:?}");
}
