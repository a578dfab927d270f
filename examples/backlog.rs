//! Receives a backlog of offline messages and reports the rate:
//!
//! ```text
//! cargo run --release --example backlog --features sqlite [-- MESSAGES]
//! ```
//!
//! Alice deposits MESSAGES (default 10,000) messages of 64 bytes for Bob
//! through an in-process relay while Bob is offline; then Bob receives and
//! commits them all, once with the in-memory store and once with the SQLite
//! store (a file, WAL, synchronous=FULL). Prints messages per second for
//! each. (The scenario is the `backlog` benches', with batches of 1000.)

use std::time::Duration;

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, SqliteStore, Store};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[path = "../benches/support/scenario.rs"]
mod scenario;

const NOW: u64 = 1_900_000_000;

fn run<S: Store>(bob_store: S, messages: usize, rng: &mut ChaCha20Rng) -> (Duration, usize) {
    let relay_config = RelayConfig {
        max_pending_envelopes: messages as u32 + 10,
        // The backlog is a first contact's (Alice holds no access key
        // of Bob's: he never wrote to her), so it lands in Bob's
        // strangers' share, made as large as the contacts' here.
        max_stranger_envelopes: messages as u32 + 10,
        max_stranger_bytes: RelayConfig::DEFAULT_MAX_PENDING_BYTES,
        max_fetch_envelopes: 1000,
        ..RelayConfig::unpriced()
    };
    let relay = InProcessRelay::with_clock(
        Relay::new(MemoryRelayStorage::new(), relay_config),
        std::sync::Arc::new(|| NOW),
    );
    let config = ClientConfig {
        receive_batch: 1000,
        ..ClientConfig::default()
    };
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
        &mut bob, &mut alice, messages, rng, NOW,
    ));
    let elapsed = block_on(scenario::receive_all(&mut bob, messages, NOW));
    (elapsed, bob.inbox().wait().expect("inbox").len())
}

fn main() {
    let messages: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let (t, n) = run(MemoryStore::new(), messages, &mut rng);
    assert_eq!(n, messages, "the memory store's inbox");
    println!(
        "memory store: {n} messages in {:.3} s = {:.0} msg/s",
        t.as_secs_f64(),
        n as f64 / t.as_secs_f64()
    );
    let dir = scenario::TempDir::new("cubbyhole-backlog");
    let store = SqliteStore::open(dir.0.join("bob.db"), &[7; 32]).expect("store");
    let (t, n) = run(store, messages, &mut rng);
    assert_eq!(n, messages, "the SQLite store's inbox");
    println!(
        "sqlite store: {n} messages in {:.3} s = {:.0} msg/s",
        t.as_secs_f64(),
        n as f64 / t.as_secs_f64()
    );
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
