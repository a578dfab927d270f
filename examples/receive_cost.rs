//! What one receive costs with many sessions in the store: Bob (SQLite
//! store in a temporary file) holds `N` sessions, one per peer device; then
//! a peer he already talks to sends one message at a time and Bob's
//! `Client::receive` is timed (fetch, route, decrypt, commit, acknowledge,
//! the receipt back). Three cases:
//!
//! - `known`: the message continues a chain Bob knows (its ratchet key is
//!   in Bob's record): the common case;
//! - `new chain`: the peer read Bob's last receipt first, so each message
//!   starts a new chain (a new ratchet key) that only a record awaiting one
//!   can own (every record does: Bob acknowledged every peer's first
//!   message); the peer's record is the most recently written;
//! - `new chain, oldest peer`: the same from the peers whose records were
//!   written longest ago, each once (the worst case of profile v1's clear
//!   headers: every record awaiting a new chain is tried first).
//!
//! ```text
//! cargo run --release --example receive_cost --features sqlite -- 10 10000
//! ```
//!
//! Prints the median and quartiles of `ROUNDS` receives per case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{BlockingStore, MemoryStore, SqliteStore};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_900_000_000;
const ROUNDS: usize = 31;

type Relayed = InProcessRelay<MemoryRelayStorage>;
type Peer = Client<MemoryStore, Relayed, Relayed>;

fn quartiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: usize| v[(v.len() - 1) * q / 4].as_secs_f64() * 1e3;
    format!(
        "median {:7.3} ms  (q1 {:.3}, q3 {:.3})",
        at(2),
        at(1),
        at(3)
    )
}

fn run(n: usize) {
    let mut rng = ChaCha20Rng::seed_from_u64(n as u64);
    let relay = InProcessRelay::with_clock(
        Relay::new(
            MemoryRelayStorage::new(),
            RelayConfig {
                max_pending_envelopes: 4 * n as u32 + 1000,
                // The backlog is a first contact's (Alice holds no access key
                // of Bob's: he never wrote to her), so it lands in Bob's
                // strangers' share, made as large as the contacts' here.
                max_stranger_envelopes: 4 * n as u32 + 1000,
                max_stranger_bytes: RelayConfig::DEFAULT_MAX_PENDING_BYTES,
                ..RelayConfig::unpriced()
            },
        ),
        Arc::new(|| NOW),
    );
    let dir =
        std::env::temp_dir().join(format!("cubbyhole-receive-cost-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = ClientConfig::default();
    let store = SqliteStore::open(dir.join("bob.db"), &[7; 32]).unwrap();
    let mut bob = block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        config,
        &mut rng,
    ))
    .unwrap();
    block_on(bob.maintain_prekeys(&mut rng, NOW)).unwrap();
    let bob_address = bob.address();

    // N peers, each one message: N sessions in Bob's store.
    let mut first: Option<Peer> = None;
    let mut old_peers = Vec::new();
    for i in 0..n {
        let device = ClientConfig {
            device_id: 1 + i as u32,
            one_time_prekeys: 1,
            refill_below: 0,
            ..config
        };
        let mut p = block_on(Client::open(
            MemoryStore::new(),
            relay.clone(),
            relay.clone(),
            device,
            &mut rng,
        ))
        .unwrap();
        // A mailbox (Bob writes to everyone in the last case).
        block_on(p.maintain_prekeys(&mut rng, NOW)).unwrap();
        block_on(p.send(&mut rng, &bob_address, b"hello", NOW)).unwrap();
        if i == 0 {
            first = Some(p);
        } else if i <= ROUNDS.min(n - 1) {
            old_peers.push(p);
        }
        if i % 400 == 399 {
            block_on(bob.receive(&mut rng, NOW)).unwrap();
        }
    }
    block_on(bob.receive(&mut rng, NOW)).unwrap();
    let mut alice = first.unwrap();
    // Alice hears back once (Bob's receipt): her messages stop being prekey
    // messages.
    block_on(alice.receive(&mut rng, NOW)).unwrap();
    let timed = |bob: &mut Client<SqliteStore, Relayed, Relayed>, rng: &mut ChaCha20Rng| {
        let t = Instant::now();
        let report = block_on(bob.receive(rng, NOW)).unwrap();
        let d = t.elapsed();
        assert_eq!(report.received, 1, "{report:?}");
        d
    };

    let mut known = Vec::new();
    for _ in 0..ROUNDS {
        block_on(alice.send(&mut rng, &bob_address, b"more", NOW)).unwrap();
        known.push(timed(&mut bob, &mut rng));
    }
    let mut new_chain = Vec::new();
    for _ in 0..ROUNDS {
        block_on(alice.receive(&mut rng, NOW)).unwrap();
        block_on(alice.send(&mut rng, &bob_address, b"turn", NOW)).unwrap();
        new_chain.push(timed(&mut bob, &mut rng));
    }
    // The worst case: a new chain from the peer whose record was written
    // longest ago (every record awaits a new chain: Bob acknowledged every
    // peer's first message), so Bob tries every record before it.
    let mut oldest = Vec::new();
    for mut p in old_peers.drain(..) {
        block_on(p.receive(&mut rng, NOW)).unwrap();
        block_on(p.send(&mut rng, &bob_address, b"at last", NOW)).unwrap();
        oldest.push(timed(&mut bob, &mut rng));
    }
    // Where SqliteStore blocks: a read, and a commit (one transaction and
    // its fdatasync).
    let alice_address = alice.address();
    let record = bob.store().session(&alice_address).unwrap().unwrap();
    let mut reads = Vec::new();
    let mut commits = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let _ = bob.store().session(&alice_address).unwrap();
        reads.push(t.elapsed());
        let t = Instant::now();
        bob.store_mut()
            .set_session(&alice_address, &record)
            .unwrap();
        commits.push(t.elapsed());
    }
    println!(
        "{n:>6} sessions  store read (session)   {}",
        quartiles(reads)
    );
    println!(
        "{n:>6} sessions  store commit           {}",
        quartiles(commits)
    );
    println!(
        "{n:>6} sessions  known chain            {}",
        quartiles(known)
    );
    println!(
        "{n:>6} sessions  new chain              {}",
        quartiles(new_chain)
    );
    println!(
        "{n:>6} sessions  new chain, oldest peer {}",
        quartiles(oldest)
    );
    drop(bob);
    std::fs::remove_dir_all(&dir).ok();
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number of sessions"))
        .collect();
    for n in if sizes.is_empty() {
        vec![10, 1000]
    } else {
        sizes
    } {
        run(n);
    }
}
