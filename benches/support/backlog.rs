//! The backlog scenario shared by the `backlog` (in-memory store) and
//! `backlog_sqlite` (SQLite store) benches: Alice deposits [`MESSAGES`]
//! messages for Bob through an in-process relay while Bob is offline; the
//! timed part is Bob's `Client::receive`, called until every message is
//! received, decrypted and committed to his store (one transaction and one
//! acknowledgement per fetched batch of `ClientConfig::receive_batch`, 500 by
//! default).
//!
//! Everything else (the relay, both clients, publishing, the 10,000 sends,
//! dropping the client and its store afterwards) happens outside the timing:
//! the benches use `iter_custom` and add up only the `receive` calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, SamplingMode, Throughput};
use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, Store};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Messages in the backlog.
pub const MESSAGES: usize = 10_000;
/// Body size of each message, in bytes (the client adds a 5-byte frame).
pub const BODY: usize = 64;
/// Unix time of the whole scenario (the in-process relay's clock too).
const NOW: u64 = 1_900_000_000;

type InProcess = InProcessRelay<MemoryRelayStorage>;

/// Bob, offline, with the backlog waiting for him on the relay.
pub struct Backlog<S> {
    bob: Client<S, InProcess, InProcess>,
}

impl<S: Store> Backlog<S> {
    /// The untimed set-up: a fresh relay, Bob (on `bob_store`) publishes his
    /// prekeys, Alice (in-memory store) sends him [`MESSAGES`] messages.
    pub fn prepare(bob_store: S, rng: &mut ChaCha20Rng) -> Self {
        let relay_config = RelayConfig {
            max_pending_envelopes: 2 * MESSAGES as u32,
            ..RelayConfig::default()
        };
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), relay_config),
            Arc::new(|| NOW),
        );
        let config = ClientConfig::default();
        let mut bob =
            Client::open(bob_store, relay.clone(), relay.clone(), config, rng).expect("bob");
        block_on(bob.maintain_prekeys(rng, NOW)).expect("bob publishes");
        let mut alice = Client::open(
            MemoryStore::new(),
            relay.clone(),
            relay.clone(),
            config,
            rng,
        )
        .expect("alice");
        block_on(alice.maintain_prekeys(rng, NOW)).expect("alice publishes");
        let to = bob.address();
        let mut body = [0x61u8; BODY];
        for i in 0..MESSAGES {
            body[..4].copy_from_slice(&(i as u32).to_be_bytes());
            let sent = block_on(alice.send(rng, &to, &body, NOW)).expect("send");
            assert!(sent.deposited, "message {i} was not deposited");
        }
        Backlog { bob }
    }

    /// The timed part: `receive` until all [`MESSAGES`] are in Bob's inbox.
    pub fn receive_all(&mut self) -> Duration {
        let start = Instant::now();
        let mut received = 0;
        while received < MESSAGES {
            let report = block_on(self.bob.receive(NOW)).expect("receive");
            assert!(
                report.rejected.is_empty(),
                "rejected: {:?}",
                report.rejected
            );
            assert!(report.received > 0, "receive made no progress");
            received += report.received;
        }
        let elapsed = start.elapsed();
        assert_eq!(received, MESSAGES);
        elapsed
    }

    /// Checks (untimed) that the inbox holds the whole backlog.
    pub fn check(&self) {
        assert_eq!(self.bob.inbox().expect("inbox").len(), MESSAGES);
    }
}

/// Benchmarks the scenario as `<group>/<name>`, with `store` making Bob's
/// store (and whatever must outlive it, such as a temporary directory) for
/// each run. Ten samples; `measurement` should be about twice ten timed runs,
/// so that each sample averages two of them.
pub fn bench<S: Store, G>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    measurement: Duration,
    mut store: impl FnMut() -> (S, G),
) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(measurement)
        .throughput(Throughput::Elements(MESSAGES as u64));
    let mut rng = ChaCha20Rng::seed_from_u64(0x0062_6163_6b6c_6f67);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (bob_store, guard) = store();
                let mut backlog = Backlog::prepare(bob_store, &mut rng);
                total += backlog.receive_all();
                backlog.check();
                drop(backlog);
                drop(guard);
            }
            total
        })
    });
}
