//! A device catching up on a backlog sent to its account by many devices
//! (issue 15), beside today's backlog (one peer device), in one sitting:
//!
//! ```text
//! cargo run --release --example catch_up --features sqlite [-- MESSAGES [PASSES]]
//! ```
//!
//! Catch-up: 10 people with 2 devices each (every device its own identity
//! key, each person an account of two) send MESSAGES (default 10,000) messages
//! of 64 bytes, round robin over their 20 devices, to the account of a
//! device that is offline (`Client::send_to_account`: one copy to it, one
//! "sent" copy to the sender's other device). The device comes back: timed,
//! `Client::receive` until every message is in its store, then
//! `Client::account_inbox` once (which attributes each message to the
//! account listing its sender device).
//!
//! Backlog: today's figure, the scenario of the `backlog` benches (one peer
//! device sends MESSAGES messages with `Client::send`, `Client::receive`
//! timed), run in the same process right before each catch-up.
//!
//! Each pass runs backlog and catch-up with the in-memory store, then with
//! the SQLite store (a file, WAL, `synchronous = FULL`); PASSES (default 3)
//! passes, then the medians. Both use the default `ClientConfig` (batches
//! of 500, as the benches). Checked every pass, and the example fails if
//! not: every message shown exactly once, attributed to its sender's
//! account, not as a sent copy, addressed to the receiver's account, and in
//! each sender device's order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, SqliteStore, Store};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::AccountId;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[path = "../benches/support/scenario.rs"]
mod scenario;

const NOW: u64 = 1_900_000_000;
/// People sending, and devices per person.
const PEOPLE: usize = 10;
const DEVICES_PER_PERSON: u32 = 2;

type Relayed = InProcessRelay<MemoryRelayStorage>;

fn relay(messages: usize) -> Relayed {
    InProcessRelay::with_clock(
        Relay::new(
            MemoryRelayStorage::new(),
            RelayConfig {
                max_pending_envelopes: 2 * messages as u32 + 10,
                // The backlog is a first contact's (Alice holds no access key
                // of Bob's: he never wrote to her), so it lands in Bob's
                // strangers' share, made as large as the contacts' here.
                max_stranger_envelopes: 2 * messages as u32 + 10,
                max_stranger_bytes: RelayConfig::DEFAULT_MAX_PENDING_BYTES,
                ..RelayConfig::unpriced()
            },
        ),
        Arc::new(|| NOW),
    )
}

fn open<S: Store>(
    store: S,
    relay: &Relayed,
    device_id: u32,
    rng: &mut ChaCha20Rng,
) -> Client<S, Relayed, Relayed> {
    let config = ClientConfig {
        device_id,
        ..ClientConfig::default()
    };
    let mut c = block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        config,
        rng,
    ))
    .expect("open");
    block_on(c.maintain_prekeys(rng, NOW)).expect("publish");
    c
}

/// Times of one catch-up: the receives, and the account inbox after them.
struct CatchUp {
    receive: Duration,
    inbox: Duration,
}

fn catch_up<S: Store>(store: S, messages: usize, rng: &mut ChaCha20Rng) -> CatchUp {
    let relay = relay(messages);
    let mut me = open(store, &relay, 1, rng);
    let mine = block_on(me.create_account(NOW)).expect("account");
    // The senders: PEOPLE accounts of DEVICES_PER_PERSON devices.
    let mut senders = Vec::new();
    let mut account_of: HashMap<DeviceAddress, AccountId> = HashMap::new();
    for _ in 0..PEOPLE {
        let mut first = open(MemoryStore::new(), &relay, 1, rng);
        let account = block_on(first.create_account(NOW)).expect("account");
        let mut devices = vec![first];
        for id in 2..=DEVICES_PER_PERSON {
            let mut d = open(MemoryStore::new(), &relay, id, rng);
            let next = block_on(devices[0].add_device(&d.address())).expect("add");
            block_on(d.join_account(&next, NOW)).expect("join");
            block_on(devices[0].refresh_own_account(NOW)).expect("refresh own");
            devices.push(d);
        }
        block_on(me.refresh_account(&account, NOW)).expect("refresh");
        for d in &mut devices {
            block_on(d.refresh_own_account(NOW)).expect("refresh own");
            block_on(d.refresh_account(&mine, NOW)).expect("refresh");
            account_of.insert(d.address(), account);
        }
        senders.extend(devices);
    }
    for i in 0..messages {
        let n = senders.len();
        let from = &mut senders[i % n];
        let sent = block_on(from.send_to_account(rng, &mine, &scenario::body(i), NOW))
            .expect("send_to_account");
        assert_eq!(sent.copies.len(), DEVICES_PER_PERSON as usize);
        assert_eq!(sent.deposited, sent.copies.len(), "message {i} deposited");
    }
    drop(senders);
    // Timed: the receives, then the account inbox.
    let receive = block_on(scenario::receive_all(&mut me, messages, NOW));
    let start = Instant::now();
    let inbox = block_on(me.account_inbox(NOW)).expect("account inbox");
    let inbox_time = start.elapsed();
    // Checks.
    assert_eq!(inbox.len(), messages, "every message shown");
    let mut seen = vec![false; messages];
    let mut last: HashMap<DeviceAddress, usize> = HashMap::new();
    for m in &inbox {
        let i = u32::from_be_bytes(m.body[..4].try_into().unwrap()) as usize;
        assert_eq!(m.body, scenario::body(i), "the body sent");
        assert!(!std::mem::replace(&mut seen[i], true), "message {i} twice");
        assert_eq!(m.account, account_of.get(&m.from).copied(), "attributed");
        assert!(!m.sent_copy && !m.header.sent_copy, "not a sent copy");
        assert_eq!(m.header.to, mine, "addressed to the account");
        if let Some(prev) = last.insert(m.from, i) {
            assert!(prev < i, "sender order: {prev} then {i}");
        }
    }
    assert_eq!(
        last.len(),
        PEOPLE * DEVICES_PER_PERSON as usize,
        "20 senders"
    );
    CatchUp {
        receive,
        inbox: inbox_time,
    }
}

/// Today's backlog: one peer device, `send`, `receive` timed.
fn backlog<S: Store>(store: S, messages: usize, rng: &mut ChaCha20Rng) -> Duration {
    let relay = relay(messages);
    let config = ClientConfig::default();
    let mut bob = block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        config,
        rng,
    ))
    .expect("bob");
    let mut alice = block_on(Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        config,
        rng,
    ))
    .expect("alice");
    block_on(scenario::publish_and_send(
        &mut bob, &mut alice, messages, rng, NOW,
    ));
    block_on(scenario::receive_all(&mut bob, messages, NOW))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn sqlite(dir: &scenario::TempDir, name: &str) -> SqliteStore {
    SqliteStore::open(dir.0.join(name), &[7; 32]).expect("SQLite store")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let passes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let mut rng = ChaCha20Rng::seed_from_u64(15);
    let rate = |t: Duration| messages as f64 / t.as_secs_f64();
    // Per store: backlog, catch-up receive, catch-up receive + inbox (msg/s),
    // and the inbox alone (ms).
    let mut results: Vec<[Vec<f64>; 4]> = vec![Default::default(), Default::default()];
    for pass in 1..=passes {
        for (s, store) in ["memory", "sqlite"].iter().enumerate() {
            let dir = scenario::TempDir::new("cubbyhole-catch-up");
            let b = if s == 0 {
                backlog(MemoryStore::new(), messages, &mut rng)
            } else {
                backlog(sqlite(&dir, "backlog.db"), messages, &mut rng)
            };
            let c = if s == 0 {
                catch_up(MemoryStore::new(), messages, &mut rng)
            } else {
                catch_up(sqlite(&dir, "catch_up.db"), messages, &mut rng)
            };
            println!(
                "pass {pass} {store:<6}: backlog (1 sender) {:>7.0} msg/s | catch-up (20 senders) receive {:>7.0} msg/s, account_inbox {:>8.2} ms, both {:>7.0} msg/s",
                rate(b),
                rate(c.receive),
                c.inbox.as_secs_f64() * 1e3,
                rate(c.receive + c.inbox)
            );
            results[s][0].push(rate(b));
            results[s][1].push(rate(c.receive));
            results[s][2].push(rate(c.receive + c.inbox));
            results[s][3].push(c.inbox.as_secs_f64() * 1e3);
        }
    }
    println!("medians of {passes} passes, {messages} messages:");
    for (s, store) in ["memory", "sqlite"].iter().enumerate() {
        let [b, r, both, inbox] = results[s].clone();
        let (b, r, both, inbox) = (median(b), median(r), median(both), median(inbox));
        println!(
            "{store:<6}: backlog {b:.0} msg/s | catch-up receive {r:.0} msg/s ({:.2}x), with account_inbox ({inbox:.2} ms) {both:.0} msg/s ({:.2}x)",
            r / b,
            both / b
        );
    }
}
