//! Fan-out (issue 15): one message to a person with 5 devices from a person
//! with 3 devices, `Client::send_to_account` (7 encryptions: the 5 devices
//! of the recipient and the sender's 2 other devices, each in its own
//! pairwise session, committed to the outbox in one `commit_send_many`),
//! beside its floor: 7 `Client::send` to the same 7 devices (today's
//! single-device path, 7 `commit_send`), so that the figure reads as a
//! ratio. The claim to check: the fan-out costs no more than the 7 sends
//! plus one commit.
//!
//! ```text
//! cargo bench --features sqlite --bench fanout
//! cargo bench --features sqlite --bench fanout -- 'fanout/memory/'   # one store
//! ```
//!
//! Benches (`<store>` = `memory` (`MemoryStore`) or `sqlite` (`SqliteStore`
//! on a file in the temporary directory, WAL, `synchronous = FULL`: every
//! write transaction is an fsync); the sender's store is the one under
//! test, every other device keeps its state in memory):
//!
//! - `fanout/<store>/steady/send_to_account` and `.../steady/send_x7`:
//!   established sessions (every device has answered the sender, which has
//!   read the receipts), so each copy is a chain step and a seal of a
//!   64-byte body (plus the account header's 57 bytes in the fan-out's
//!   copies); one iteration is one logical message.
//! - `fanout/<store>/first/send_to_account` and `.../first/send_x7`: no
//!   session with any of the 7 devices (removed before each timed
//!   iteration, untimed): each copy fetches and verifies a bundle and runs
//!   X3DH (a one-time prekey each time: the recipients refill, untimed).
//!
//! - `fanout/<store>/steady/verify_lists`: not a send: the decoding and
//!   verification of the two device lists (sender's, recipient's) as
//!   `send_to_account` does them from the store before each message.
//!
//! What is timed is the whole send, deposits included, but the mailbox the
//! sender deposits into is a sink during the timing (each deposit accepted
//! and dropped, counted), so that the relay's mailboxes do not grow with
//! the iterations; both sides of each ratio deposit 7 envelopes.
//!
//! Structural checks (every run, `--test` mode included, never timings):
//! before the timing each world sends once each way and asserts that the
//! fan-out made exactly 7 copies to the 7 expected devices (5 of the
//! recipient's, the sender's 2 others), 7 deposits, exactly one outbox
//! commit (one `commit_send_many` of 7 copies, no `commit_send`), exactly
//! one record of the deposits (one `commit_deposits` of 7, no per-copy
//! `remove_outbox` or `update_sent`; with established sessions, 2 write
//! transactions in all), and that the 7 sends made 7 `commit_send` (and
//! their 7 + 7 per-copy writes); each timed fan-out asserts its 7
//! copies again; with established sessions, that the fan-out's envelopes
//! are the sends' plus the 57-byte account header each. `FANOUT_VERBOSE=1`
//! prints the sizes and the store writes of each.

use cubbyhole::transport::DepositPass;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};
use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
#[cfg(feature = "sqlite")]
use cubbyhole::storage::SqliteStore;
use cubbyhole::storage::{BlockingStore, MemoryStore, Store};
use cubbyhole::transport::{
    DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, TransportError,
};
use cubbyhole::{AccountId, DeviceList};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[path = "support/counted.rs"]
mod counted;
#[path = "support/scenario.rs"]
mod scenario;

use counted::Counted;

/// Unix time of the whole bench (the relay's clock too).
const NOW: u64 = 1_900_000_000;
/// The recipient's devices.
const RECIPIENT_DEVICES: u32 = 5;
/// The sender's devices (the sending one included).
const SENDER_DEVICES: u32 = 3;
/// Copies of one message: the recipient's devices and the sender's others.
const COPIES: usize = (RECIPIENT_DEVICES + SENDER_DEVICES - 1) as usize;

type Relayed = InProcessRelay<MemoryRelayStorage>;
type Device = Client<MemoryStore, Relayed, Relayed>;

/// The sender's mailbox: the in-process relay, except that while `sink` is
/// set a deposit is accepted, counted and dropped.
#[derive(Clone)]
struct Sink {
    relay: Relayed,
    sink: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
    /// Payload bytes of the dropped envelopes.
    bytes: Arc<AtomicUsize>,
}

impl Mailbox for Sink {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let sink = self.sink.load(Relaxed);
        if sink {
            self.dropped.fetch_add(1, Relaxed);
            self.bytes.fetch_add(envelope.payload.len(), Relaxed);
        }
        let forward = (!sink).then(|| self.relay.deposit(to, envelope, pass));
        async move {
            match forward {
                Some(f) => f.await,
                None => Ok(()),
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

/// The sender (device 1 of its account, on the store under test), its
/// account's other devices and the recipient's devices (in memory).
struct World<S: BlockingStore> {
    sender: Client<Counted<S>, Relayed, Sink>,
    sink: Sink,
    recipient: AccountId,
    /// The 7 devices a message goes to, sorted.
    targets: Vec<DeviceAddress>,
    /// Every other device (to refill their prekeys).
    others: Vec<Device>,
    rng: ChaCha20Rng,
}

fn open(relay: &Relayed, device_id: u32, rng: &mut ChaCha20Rng) -> Device {
    let config = ClientConfig {
        device_id,
        ..ClientConfig::default()
    };
    let mut device = block_on(Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        config,
        rng,
    ))
    .expect("open");
    block_on(device.maintain_prekeys(rng, NOW)).expect("publish");
    device
}

/// `first` joins the account of `first`'s devices the others.
fn make_account<St: Store, M: Mailbox>(
    first: &mut Client<St, Relayed, M>,
    others: &mut [Device],
) -> AccountId {
    let account = block_on(first.create_account(NOW)).expect("create account");
    for device in others {
        let next = block_on(first.add_device(&device.address())).expect("add device");
        block_on(device.join_account(&next, NOW)).expect("join");
        block_on(first.refresh_own_account(NOW)).expect("refresh own");
    }
    account
}

impl<S: BlockingStore + Send + Sync> World<S> {
    /// Sets the world up; with `established`, sessions with every target
    /// are made and answered (a fan-out, every target receives and sends
    /// its receipt, the sender receives them).
    fn new(store: S, established: bool) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(0x0000_6661_6e6f_7574);
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(|| NOW),
        );
        let sink = Sink {
            relay: relay.clone(),
            sink: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicUsize::new(0)),
            bytes: Arc::new(AtomicUsize::new(0)),
        };
        let mut sender = block_on(Client::open(
            Counted::new(store),
            relay.clone(),
            sink.clone(),
            ClientConfig {
                device_id: 1,
                ..ClientConfig::default()
            },
            &mut rng,
        ))
        .expect("open the sender");
        block_on(sender.maintain_prekeys(&mut rng, NOW)).expect("publish");
        let mut own: Vec<Device> = (2..=SENDER_DEVICES)
            .map(|id| open(&relay, id, &mut rng))
            .collect();
        make_account(&mut sender, &mut own);
        let mut theirs: Vec<Device> = (1..=RECIPIENT_DEVICES)
            .map(|id| open(&relay, id, &mut rng))
            .collect();
        let (first, rest) = theirs.split_first_mut().expect("devices");
        let recipient = make_account(first, rest);
        block_on(sender.refresh_account(&recipient, NOW)).expect("refresh");
        for d in &mut own {
            block_on(d.refresh_account(&recipient, NOW)).expect("refresh");
        }
        let mut targets: Vec<DeviceAddress> =
            own.iter().chain(&theirs).map(|d| d.address()).collect();
        targets.sort();
        let mut others = own;
        others.append(&mut theirs);
        if established {
            block_on(sender.send_to_account(&mut rng, &recipient, b"hello", NOW)).expect("send");
            for d in &mut others {
                let report = block_on(d.receive(&mut rng, NOW)).expect("receive");
                assert_eq!(report.received, 1, "every device receives the first copy");
            }
            let report = block_on(sender.receive(&mut rng, NOW)).expect("receipts");
            assert!(report.rejected.is_empty(), "{:?}", report.rejected);
            assert!(
                block_on(sender.inbox()).expect("inbox").is_empty(),
                "receipts only"
            );
        }
        sink.sink.store(true, Relaxed);
        let mut world = World {
            sender,
            sink,
            recipient,
            targets,
            others,
            rng,
        };
        world.check(established);
        world
    }

    /// The structural claims, once each way (see the module's doc).
    fn check(&mut self, established: bool) {
        self.sender.store().take();
        self.sink.dropped.store(0, Relaxed);
        self.sink.bytes.store(0, Relaxed);
        let mut copies = self.fan_out();
        copies.sort();
        assert_eq!(copies, self.targets, "one copy to each of the 7 devices");
        let fan_out = self.sender.store().take();
        assert_eq!(self.sink.dropped.swap(0, Relaxed), COPIES, "7 deposits");
        let fan_out_bytes = self.sink.bytes.swap(0, Relaxed);
        assert_eq!(
            (
                fan_out.commit_send_many,
                fan_out.copies,
                fan_out.commit_send
            ),
            (1, COPIES, 0),
            "the fan-out commits its 7 copies to the outbox at once"
        );
        assert_eq!(
            (
                fan_out.commit_deposits,
                fan_out.deposits,
                fan_out.remove_outbox,
                fan_out.update_sent
            ),
            (1, COPIES, 0, 0),
            "the fan-out records its 7 deposits at once, nothing per copy"
        );
        if established {
            // Peers are known: nothing but the two commits.
            assert_eq!(fan_out.writes, 2, "2 write transactions: {fan_out:?}");
        }
        self.refill();
        self.sends();
        let sends = self.sender.store().take();
        assert_eq!(self.sink.dropped.swap(0, Relaxed), COPIES, "7 deposits");
        let sends_bytes = self.sink.bytes.swap(0, Relaxed);
        assert_eq!(
            (sends.commit_send_many, sends.commit_send),
            (0, COPIES),
            "7 sends, 7 outbox commits"
        );
        assert_eq!(
            (
                sends.commit_deposits,
                sends.remove_outbox,
                sends.update_sent
            ),
            (0, COPIES, COPIES),
            "7 sends record their deposits per copy"
        );
        if established {
            // Profile v2 pads every payload to its size class (SPEC.md
            // 26.5): the account header of a short message rides inside
            // the 512-byte class, so a copy costs a single send's bytes.
            assert_eq!(sends_bytes, COPIES * cubbyhole::sealed::MIN_CLASS);
            assert_eq!(
                fan_out_bytes, sends_bytes,
                "each copy is a single send's envelope, the account header inside its padding"
            );
        }
        if std::env::var_os("FANOUT_VERBOSE").is_some() {
            let own = block_on(self.sender.own_account())
                .expect("own account")
                .expect("own account")
                .encode()
                .len();
            let theirs = block_on(self.sender.account(&self.recipient))
                .expect("account")
                .expect("account")
                .head
                .len();
            eprintln!(
                "fan-out: {fan_out:?}, {fan_out_bytes} payload bytes\n\
                 7 sends: {sends:?}, {sends_bytes} payload bytes\n\
                 device lists: sender's {own} bytes, recipient's {theirs} bytes"
            );
        }
    }

    /// One message to the person; returns the devices of its copies.
    fn fan_out(&mut self) -> Vec<DeviceAddress> {
        let sent = block_on(self.sender.send_to_account(
            &mut self.rng,
            &self.recipient,
            &scenario::body(0),
            NOW,
        ))
        .expect("send_to_account");
        assert_eq!(sent.deposited, COPIES);
        sent.copies.into_iter().map(|(to, _)| to).collect()
    }

    /// The same body sent to each of the 7 devices.
    fn sends(&mut self) {
        for to in &self.targets {
            let sent = block_on(self.sender.send(&mut self.rng, to, &scenario::body(0), NOW))
                .expect("send");
            assert!(sent.deposited);
        }
    }

    /// Forgets every session with the targets (untimed).
    fn forget_sessions(&mut self) {
        for to in &self.targets {
            BlockingStore::remove_session(self.sender.store_mut(), to).expect("remove session");
        }
    }

    /// The targets refill their one-time prekeys (untimed).
    fn refill(&mut self) {
        for d in &mut self.others {
            block_on(d.maintain_prekeys(&mut self.rng, NOW)).expect("refill");
        }
    }
}

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// `<store>/steady/*` and `<store>/first/*`, with `store` making the
/// sender's store (and what must outlive it).
fn bench_store<S: BlockingStore + Send + Sync, G>(
    group: &mut Group<'_>,
    name: &str,
    mut store: impl FnMut() -> (S, G),
) {
    for (op, fan_out) in [("send_to_account", true), ("send_x7", false)] {
        let (s, guard) = store();
        let mut world = World::new(s, true);
        group.bench_function(format!("{name}/steady/{op}"), |b| {
            b.iter(|| {
                if fan_out {
                    assert_eq!(world.fan_out().len(), COPIES);
                } else {
                    world.sends();
                }
            })
        });
        drop(world);
        drop(guard);
    }
    // What send_to_account does beyond its 7 copies before encrypting: it
    // loads both accounts' device lists from the store and verifies them
    // (`restore`: decode, parent taken as stored, head verified as its
    // successor: its signatures and every listed identity key).
    let (s, guard) = store();
    let world = World::new(s, true);
    let records = [
        BlockingStore::own_account(world.sender.store()).expect("own"),
        BlockingStore::account(world.sender.store(), &world.recipient).expect("theirs"),
    ]
    .map(|r| r.expect("stored account"));
    group.bench_function(format!("{name}/steady/verify_lists"), |b| {
        b.iter(|| {
            for r in &records {
                let head = DeviceList::decode(&r.head).expect("head");
                let parent = DeviceList::decode(r.parent.as_deref().expect("parent"))
                    .and_then(|p| p.accept_unverified())
                    .expect("parent");
                head.verify_successor(&parent).expect("successor");
            }
        })
    });
    drop(world);
    drop(guard);
    for (op, fan_out) in [("send_to_account", true), ("send_x7", false)] {
        let (s, guard) = store();
        let mut world = World::new(s, false);
        group.bench_function(format!("{name}/first/{op}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    world.forget_sessions();
                    world.refill();
                    let start = Instant::now();
                    if fan_out {
                        assert_eq!(world.fan_out().len(), COPIES);
                    } else {
                        world.sends();
                    }
                    total += start.elapsed();
                }
                total
            })
        });
        drop(world);
        drop(guard);
    }
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group
        .sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    bench_store(&mut group, "memory", || (MemoryStore::new(), ()));
    #[cfg(feature = "sqlite")]
    bench_store(&mut group, "sqlite", || {
        let dir = scenario::TempDir::new("cubbyhole-bench-fanout");
        let store = SqliteStore::open(dir.0.join("sender.db"), &[7; 32]).expect("SQLite store");
        (store, dir)
    });
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
