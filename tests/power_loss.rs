//! Power-loss test of `SqliteStore`: a message committed to the inbox, and
//! a message committed to be sent, survive a power loss.
//!
//! The kill test (kill.rs) uses SIGKILL, which keeps every written page in
//! the OS cache: it cannot see a missing flush. Here a sender and a
//! receiver run in child processes (this test binary, run with `--ignored
//! --exact worker` and a role in the environment) on a power-loss disk
//! (tests/support/powerloss: an `LD_PRELOAD` shim keeps a *durable image*
//! of the data directory, updated with a file's content at each successful
//! `fsync`/`fdatasync` of it). Their SQLite stores are on that disk; the
//! relay's database (another machine) is not. The sender prints each
//! message's index once `send` returned (the message and the session's
//! step are committed); the receiver prints the index of each message in
//! its inbox once `receive` returned (committed, then acknowledged to the
//! relay). Then the power goes: at a random moment after both did work, or
//! (every other round) in the middle of a sync that had something to flush
//! (the shim kills the process inside it). The data directory is replaced
//! by its durable image and a copy of it is checked: every message the
//! receiver reported is in its inbox, once, and the sender's session has
//! sent at least every message it reported. The next round goes on from
//! the recovered stores (the receiver asserts that nothing is rejected, so
//! the sessions still decrypt). At the end, the sender flushes its outbox
//! and the receiver drains the relay, and the receiver's inbox must hold
//! every message the sender's session sent, exactly once, in order.
//!
//! Broken on purpose (see the report of issue 14): with `synchronous =
//! NORMAL` in `SqliteStore` (commits not flushed), this test fails.

#![cfg(all(feature = "sqlite", unix))]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, Relay, RelayConfig, SqliteRelayStorage};
use cubbyhole::storage::{BlockingStore, SqliteStore};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::OsRng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[path = "support/powerloss/mod.rs"]
mod powerloss;
use powerloss::Disk;

const ROLE: &str = "CUBBYHOLE_POWER_LOSS_ROLE";
/// The power-loss disk's data directory (the stores).
const DATA: &str = "CUBBYHOLE_POWER_LOSS_DATA";
/// A directory off that disk (the relay's database, Bob's address).
const OFF: &str = "CUBBYHOLE_POWER_LOSS_OFF";
const ALICE_KEY: [u8; 32] = [0xA1; 32];
const BOB_KEY: [u8; 32] = [0xB0; 32];
/// Power losses.
const ROUNDS: usize = 10;
/// How long the children run after both did work, before the power goes
/// (or before the next sync is made to crash), in ms (drawn uniformly).
const RUN_MS: (u64, u64) = (0, 300);
/// How long each sync of the power-loss disk takes (a slow disk).
const SYNC_MICROS: u32 = 2_000;

type Relayed = InProcessRelay<SqliteRelayStorage>;
type Device = Client<SqliteStore, Relayed, Relayed>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open(data: &Path, off: &Path, name: &str, key: &[u8; 32]) -> Device {
    let config = ClientConfig {
        receive_batch: 3,
        ..ClientConfig::default()
    };
    let relay = InProcessRelay::new(Relay::new(
        SqliteRelayStorage::open(off.join("relay.db")).expect("relay"),
        RelayConfig::unpriced(),
    ));
    let store = SqliteStore::open(data.join(format!("{name}.db")), key).expect("store");
    Client::open(store, relay.clone(), relay, config, &mut OsRng)
        .wait()
        .expect("client")
}

fn bob_address(off: &Path) -> DeviceAddress {
    let bytes = std::fs::read(off.join("bob.address")).expect("bob.address");
    DeviceAddress {
        identity: bytes[..32].try_into().expect("32"),
        device_id: u32::from_be_bytes(bytes[32..36].try_into().expect("4")),
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

/// The message indices in an inbox, in its order.
fn inbox_seqs(store: &SqliteStore) -> Vec<u32> {
    store
        .inbox()
        .expect("inbox")
        .iter()
        .map(|m| u32::from_be_bytes(m.body[..4].try_into().expect("4")))
        .collect()
}

/// The child's side.
#[test]
#[ignore = "run by committed_messages_survive_power_losses in a child process"]
fn worker() {
    let (Ok(role), Ok(data), Ok(off)) =
        (std::env::var(ROLE), std::env::var(DATA), std::env::var(OFF))
    else {
        return;
    };
    let (data, off) = (PathBuf::from(data), PathBuf::from(off));
    match role.as_str() {
        "setup" => {
            let mut bob = open(&data, &off, "bob", &BOB_KEY);
            block_on(bob.maintain_prekeys(&mut OsRng, now())).expect("bob publishes");
            let mut address = bob.address().identity.to_vec();
            address.extend_from_slice(&bob.address().device_id.to_be_bytes());
            std::fs::write(off.join("bob.address"), address).expect("write");
            let mut alice = open(&data, &off, "alice", &ALICE_KEY);
            block_on(alice.maintain_prekeys(&mut OsRng, now())).expect("alice publishes");
        }
        "sender" | "flush" => {
            let bob = bob_address(&off);
            let mut alice = open(&data, &off, "alice", &ALICE_KEY);
            block_on(alice.flush_outbox()).expect("flush");
            if role == "sender" {
                // Until the power goes.
                loop {
                    // The body is the message's index in the chain.
                    let seq = alice
                        .store()
                        .session(&bob)
                        .expect("session")
                        .map_or(0, chain_length);
                    block_on(alice.send(&mut OsRng, &bob, &seq.to_be_bytes(), now()))
                        .expect("send");
                    println!("sent {seq}");
                }
            }
        }
        "receiver" | "drain" => {
            let mut bob = open(&data, &off, "bob", &BOB_KEY);
            let mut reported: HashSet<u32> = HashSet::new();
            loop {
                let report = block_on(bob.receive(&mut OsRng, now())).expect("receive");
                assert!(report.rejected.is_empty(), "{report:?}");
                let nothing = report.received == 0 && report.redelivered == 0;
                // Committed (receive commits before it acknowledges).
                for seq in inbox_seqs(bob.store()) {
                    if reported.insert(seq) {
                        println!("received {seq}");
                    }
                }
                if nothing {
                    if role == "drain" {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// A child on the power-loss disk, and what it printed.
struct Worker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(disk: &Disk, off: &Path, role: &str) -> Worker {
        let mut command = Command::new(std::env::current_exe().expect("test binary"));
        command
            .args([
                "--ignored",
                "--exact",
                "worker",
                "--test-threads",
                "1",
                "-q",
                "--nocapture",
            ])
            .env(ROLE, role)
            .env(DATA, disk.data())
            .env(OFF, off)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        disk.preload_slow(&mut command, SYNC_MICROS);
        let mut child = command.spawn().expect("spawn worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let reader = {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            })
        };
        Worker {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Whether it reported a commit.
    fn worked(&self) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("sent ") || l.starts_with("received "))
    }

    /// Whether it is gone.
    fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// SIGKILL (if still running: else it must have died of a SIGKILL,
    /// in a sync); the indices it reported with `prefix`.
    fn kill(mut self, prefix: &str) -> Vec<u32> {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            assert_eq!(
                status.signal(),
                Some(9),
                "a worker ended otherwise than by a power loss: {status}"
            );
        }
        let _ = self.child.kill();
        self.child.wait().expect("reap");
        self.reader.take().unwrap().join().expect("reader");
        self.reported(prefix)
    }

    /// Waits for its end, which must be a success; the indices it reported.
    fn finish(mut self, prefix: &str) -> Vec<u32> {
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "a worker failed: {status}");
        self.reader.take().unwrap().join().expect("reader");
        self.reported(prefix)
    }

    fn reported(&self, prefix: &str) -> Vec<u32> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix)?.parse().ok())
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks a copy of the durable image: Bob's inbox holds every message
/// `received` and no message twice, Alice's session sent at least every
/// message in `sent`. Returns (inbox length, messages Alice's session sent).
fn check_image(
    disk: &Disk,
    name: &str,
    sent: &HashSet<u32>,
    received: &HashSet<u32>,
) -> (usize, u32) {
    let copy = disk.root().join("check");
    disk.copy_image(&copy);
    let alice = SqliteStore::open(copy.join("alice.db"), &ALICE_KEY).expect("alice's image");
    let bob = SqliteStore::open(copy.join("bob.db"), &BOB_KEY).expect("bob's image");
    let bob_addr = bob_address(&disk.root().join("off"));
    let chain = alice
        .session(&bob_addr)
        .expect("session")
        .map_or(0, chain_length);
    let seqs = inbox_seqs(&bob);
    let unique: HashSet<u32> = seqs.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seqs.len(),
        "{name}: a message twice in the inbox"
    );
    let mut lost: Vec<u32> = received.difference(&unique).copied().collect();
    lost.sort_unstable();
    assert!(
        lost.is_empty(),
        "{name}: {} of {} messages committed to the inbox are not in the durable image: {:?}",
        lost.len(),
        received.len(),
        &lost[..lost.len().min(10)]
    );
    if let Some(max) = sent.iter().max() {
        assert!(
            chain > *max,
            "{name}: message {max} was committed to be sent, but the durable image's session \
             has sent only {chain}"
        );
    }
    drop((alice, bob));
    let _ = std::fs::remove_dir_all(&copy);
    (seqs.len(), chain)
}

#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "the power-loss shim needs Linux (LD_PRELOAD, /proc/self/fd)"
)]
fn committed_messages_survive_power_losses() {
    let started = Instant::now();
    let seed = OsRng.next_u64();
    println!("power loss: seed {seed}");
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let disk = Disk::new(
        std::env::temp_dir().join(format!("cubbyhole-power-loss-{}", std::process::id())),
    );
    let off = disk.root().join("off");
    std::fs::create_dir_all(&off).expect("off dir");

    Worker::spawn(&disk, &off, "setup").finish("");
    disk.power_loss();

    let (mut sent, mut received) = (HashSet::new(), HashSet::new());
    for round in 0..ROUNDS {
        let mid_flush = round % 2 == 1;
        let mut sender = Worker::spawn(&disk, &off, "sender");
        let mut receiver = Worker::spawn(&disk, &off, "receiver");
        // Both did work (the receiver once there is something to receive).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(sender.worked() && receiver.worked()) {
            assert!(
                !sender.exited() && !receiver.exited(),
                "a worker ended on its own"
            );
            assert!(Instant::now() < deadline, "the workers do no work");
            std::thread::sleep(Duration::from_millis(1));
        }
        let crashed = disk.syncs().crashed;
        let wait = RUN_MS.0 + rng.next_u64() % (RUN_MS.1 - RUN_MS.0 + 1);
        std::thread::sleep(Duration::from_millis(wait));
        if mid_flush {
            disk.crash_in_next_sync();
            while !(sender.exited() || receiver.exited()) {
                // (The flag makes the next sync of either crash.)
                assert!(Instant::now() < deadline, "no worker crashed in a sync");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The power goes (for the one still running, if one crashed).
        sent.extend(sender.kill("sent "));
        received.extend(receiver.kill("received "));
        assert_eq!(
            disk.syncs().crashed > crashed,
            mid_flush,
            "a worker crashed in a sync in this round"
        );
        disk.power_loss();
        let (inbox, chain) = check_image(&disk, &format!("round {round}"), &sent, &received);
        println!(
            "power loss: round {round}{}: sent {} (the session: {chain}), received {} (the \
             inbox: {inbox})",
            if mid_flush { " (mid-flush)" } else { "" },
            sent.len(),
            received.len()
        );
    }

    // The sender flushes its outbox, the receiver drains the relay.
    Worker::spawn(&disk, &off, "flush").finish("");
    received.extend(Worker::spawn(&disk, &off, "drain").finish("received "));
    disk.power_loss();
    let (_, chain) = check_image(&disk, "the end", &sent, &received);
    let alice = SqliteStore::open(disk.data().join("alice.db"), &ALICE_KEY).expect("alice");
    let bob = SqliteStore::open(disk.data().join("bob.db"), &BOB_KEY).expect("bob");
    assert!(alice.outbox().expect("outbox").is_empty());
    let seqs = inbox_seqs(&bob);
    let syncs = disk.syncs();
    println!(
        "power loss: {ROUNDS} power losses ({} in a sync); {} sends and {} receipts reported \
         committed, all in the durable images; {chain} messages sent, {} in the inbox; {} syncs \
         seen by the shim; {:.1} s",
        syncs.crashed,
        sent.len(),
        received.len(),
        seqs.len(),
        syncs.ok,
        started.elapsed().as_secs_f64()
    );
    assert!(
        syncs.ok > 0,
        "the shim saw no sync: LD_PRELOAD did not work"
    );
    assert!(!sent.is_empty() && !received.is_empty());
    assert_eq!(
        seqs,
        (0..chain).collect::<Vec<_>>(),
        "every message sent, once, in order"
    );
}

/// Drives a future to completion on this thread.
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
