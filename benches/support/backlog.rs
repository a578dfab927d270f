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
use std::time::Duration;

use criterion::{BenchmarkGroup, SamplingMode, Throughput};
use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, Store};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[path = "scenario.rs"]
pub mod scenario;

/// Messages in the backlog.
pub const MESSAGES: usize = 10_000;
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
            // The backlog is a first contact's (Alice holds no access key
            // of Bob's: he never wrote to her), so it lands in Bob's
            // strangers' share, made as large as the contacts' here.
            max_stranger_envelopes: 2 * MESSAGES as u32,
            max_stranger_bytes: RelayConfig::DEFAULT_MAX_PENDING_BYTES,
            ..RelayConfig::unpriced()
        };
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), relay_config),
            Arc::new(|| NOW),
        );
        let config = ClientConfig::default();
        let mut bob = Client::open(bob_store, relay.clone(), relay.clone(), config, rng)
            .wait()
            .expect("bob");
        let mut alice = Client::open(
            MemoryStore::new(),
            relay.clone(),
            relay.clone(),
            config,
            rng,
        )
        .wait()
        .expect("alice");
        block_on(scenario::publish_and_send(
            &mut bob, &mut alice, MESSAGES, rng, NOW,
        ));
        Backlog { bob }
    }

    /// The timed part: `receive` until all [`MESSAGES`] are in Bob's inbox
    /// (the inbox is checked after the timing).
    pub fn receive_all(&mut self) -> Duration {
        block_on(scenario::receive_all(&mut self.bob, MESSAGES, NOW))
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
                drop(backlog);
                drop(guard);
            }
            total
        })
    });
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
