//! Guaranteed delivery under SIGKILL: a sender and a receiver run in child
//! processes against SQLite stores and a SQLite relay, and are killed at
//! random points, over and over (at least 200 kills, spread over both).
//! Afterwards every message the sender committed must be in the receiver's
//! inbox exactly once, in the chain's order.
//!
//! The children are this test binary itself, run with `--ignored --exact
//! worker` and a role in the environment.

#![cfg(all(feature = "sqlite", unix))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, Relay, RelayConfig, SqliteRelayStorage};
use cubbyhole::storage::{BlockingStore, SqliteStore};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::OsRng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const ROLE: &str = "CUBBYHOLE_KILL_ROLE";
const DIR: &str = "CUBBYHOLE_KILL_DIR";
const ALICE_KEY: [u8; 32] = [0xA1; 32];
const BOB_KEY: [u8; 32] = [0xB0; 32];
/// Kills required of each role.
const KILLS_PER_ROLE: usize = 110;
/// Messages a sender child tries to send before it exits on its own.
const SENDS_PER_RUN: u32 = 30;

type Relayed = InProcessRelay<SqliteRelayStorage>;
type Device = Client<SqliteStore, Relayed, Relayed>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open(dir: &Path, name: &str, key: &[u8; 32]) -> Device {
    // Small receive batches: many fetch-commit-acknowledge cycles per run,
    // so that kills land in every part of the cycle.
    let config = ClientConfig {
        receive_batch: 3,
        ..ClientConfig::default()
    };
    let relay = InProcessRelay::new(Relay::new(
        SqliteRelayStorage::open(dir.join("relay.db")).expect("relay"),
        RelayConfig::default(),
    ));
    let store = SqliteStore::open(dir.join(format!("{name}.db")), key).expect("store");
    Client::open(store, relay.clone(), relay, config, &mut OsRng)
        .wait()
        .expect("client")
}

fn bob_address(dir: &Path) -> DeviceAddress {
    let bytes = std::fs::read(dir.join("bob.address")).expect("bob.address");
    DeviceAddress {
        identity: bytes[..32].try_into().expect("32"),
        device_id: u32::from_be_bytes(bytes[32..36].try_into().expect("4")),
    }
}

/// The child's side.
#[test]
#[ignore = "run by kill_the_sender_and_the_receiver_many_times in a child process"]
fn worker() {
    let (Ok(role), Ok(dir)) = (std::env::var(ROLE), std::env::var(DIR)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    match role.as_str() {
        "setup" => {
            let mut bob = open(&dir, "bob", &BOB_KEY);
            block_on(bob.maintain_prekeys(&mut OsRng, now())).expect("bob publishes");
            let mut address = bob.address().identity.to_vec();
            address.extend_from_slice(&bob.address().device_id.to_be_bytes());
            std::fs::write(dir.join("bob.address"), address).expect("write");
            let mut alice = open(&dir, "alice", &ALICE_KEY);
            block_on(alice.maintain_prekeys(&mut OsRng, now())).expect("alice publishes");
        }
        "sender" | "flush" => {
            let bob = bob_address(&dir);
            let mut alice = open(&dir, "alice", &ALICE_KEY);
            // Deposits a crash left in the outbox go first, keeping the order.
            block_on(alice.flush_outbox()).expect("flush");
            if role == "sender" {
                for _ in 0..SENDS_PER_RUN {
                    // The body is the message's index in the chain: every
                    // message committed to the outbox advanced the session.
                    let seq = alice
                        .store()
                        .session(&bob)
                        .expect("session")
                        .map_or(0, chain_length);
                    let body = seq.to_be_bytes();
                    block_on(alice.send(&mut OsRng, &bob, &body, now())).expect("send");
                }
            }
        }
        "receiver" | "drain" => {
            let mut bob = open(&dir, "bob", &BOB_KEY);
            // Receive in a tight loop, so that kills land inside receive
            // (fetch, decrypt, commit, acknowledge) rather than in a sleep.
            // The drain receives until nothing is left: one receive call
            // makes at most `max_receive_rounds` fetches of `receive_batch`.
            let rounds = if role == "drain" { usize::MAX } else { 100 };
            for _ in 0..rounds {
                let report = block_on(bob.receive(&mut cubbyhole::OsRng, now())).expect("receive");
                assert!(report.rejected.is_empty(), "{report:?}");
                if role == "drain" && report.received == 0 && report.redelivered == 0 {
                    break;
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// Messages sent in the sending chain of Alice's (only) session with Bob.
fn chain_length(record: cubbyhole::storage::SessionRecord) -> u32 {
    record
        .entries()
        .iter()
        .map(|e| e.session.sending_chain_length())
        .max()
        .unwrap_or(0)
}

fn spawn(dir: &Path, role: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "worker",
            "--test-threads",
            "1",
            "-q",
        ])
        .env(ROLE, role)
        .env(DIR, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker")
}

/// Kills the child with SIGKILL at a random moment within its first 40 ms
/// (unless it finished first); returns 1 if it was killed.
fn kill_at_random(child: &mut Child, rng: &mut ChaCha20Rng) -> usize {
    let at = Duration::from_micros(2_000 + u64::from(rng.next_u32() % 38_000));
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "a worker failed on its own: {status}");
            return 0;
        }
        if t0.elapsed() >= at {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            return 1;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn run_to_end(dir: &Path, role: &str) {
    let status = spawn(dir, role).wait().expect("wait");
    assert!(status.success(), "{role} failed");
}

#[test]
fn kill_the_sender_and_the_receiver_many_times() {
    let dir = std::env::temp_dir().join(format!("cubbyhole-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let started = Instant::now();
    run_to_end(&dir, "setup");

    let mut rng = ChaCha20Rng::seed_from_u64(0x6b696c6c);
    let (mut sender_kills, mut receiver_kills, mut runs) = (0usize, 0usize, 0usize);
    while sender_kills < KILLS_PER_ROLE || receiver_kills < KILLS_PER_ROLE {
        runs += 1;
        // The sender and the receiver take turns, so that the receiver finds
        // a backlog and dies inside its fetch-decrypt-commit-acknowledge
        // cycles, and every few runs they also overlap.
        let mut sender = spawn(&dir, "sender");
        if runs % 4 == 0 {
            let mut receiver = spawn(&dir, "receiver");
            sender_kills += kill_at_random(&mut sender, &mut rng);
            receiver_kills += kill_at_random(&mut receiver, &mut rng);
        } else {
            sender_kills += kill_at_random(&mut sender, &mut rng);
            let mut receiver = spawn(&dir, "receiver");
            receiver_kills += kill_at_random(&mut receiver, &mut rng);
        }
    }
    // Let both finish: the sender flushes its outbox, the receiver drains.
    run_to_end(&dir, "flush");
    run_to_end(&dir, "drain");

    let alice = SqliteStore::open(dir.join("alice.db"), &ALICE_KEY).expect("alice store");
    let bob = SqliteStore::open(dir.join("bob.db"), &BOB_KEY).expect("bob store");
    let bob_addr = bob_address(&dir);
    let sent = alice
        .session(&bob_addr)
        .expect("session")
        .map_or(0, chain_length);
    assert!(alice.outbox().expect("outbox").is_empty());
    let seqs: Vec<u32> = bob
        .inbox()
        .expect("inbox")
        .iter()
        .map(|m| u32::from_be_bytes(m.body[..4].try_into().expect("4")))
        .collect();
    let mut unique = seqs.clone();
    unique.sort_unstable();
    unique.dedup();
    let duplicates = seqs.len() - unique.len();
    let losses = (0..sent)
        .filter(|s| unique.binary_search(s).is_err())
        .count();
    eprintln!(
        "kill test: {runs} runs, {} kills ({sender_kills} sender, {receiver_kills} receiver), \
         {sent} messages sent, {} received, {losses} lost, {duplicates} duplicated, {:.1} s",
        sender_kills + receiver_kills,
        seqs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(sent > 0);
    assert_eq!(losses, 0, "lost messages");
    assert_eq!(duplicates, 0, "duplicated messages");
    assert_eq!(seqs, (0..sent).collect::<Vec<_>>(), "in the chain's order");
    drop((alice, bob));
    std::fs::remove_dir_all(&dir).ok();
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
