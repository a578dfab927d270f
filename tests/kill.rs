//! Guaranteed delivery under SIGKILL: a sender and a receiver run in child
//! processes against SQLite stores and a SQLite relay, and are killed at
//! random points, over and over (at least 220 kills, 110 of each role).
//! Afterwards every message the sender committed must be in the receiver's
//! inbox exactly once, in the chain's order.
//!
//! The children are this test binary itself, run with `--ignored --exact
//! worker` and a role in the environment. A child reports its progress on
//! its standard output (`committed n` after each send, `received n` after
//! each receive that took envelopes); the parent kills it only after it
//! has seen a random number of those reports, at a random point of the work
//! that follows. So every kill counted landed after the child did work
//! (never in its start-up), whatever the machine's load: a child that
//! finishes first is not counted, and the run goes on until the required
//! number of kills landed.

#![cfg(all(feature = "sqlite", unix))]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
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
/// Kills required of each role (each landing after the child reported
/// work).
const KILLS_PER_ROLE: usize = 110;
/// Runs allowed to get them: a run kills each role at most once, and most
/// runs kill both.
const MAX_RUNS: usize = 3 * KILLS_PER_ROLE;
/// Messages a sender child tries to send before it exits on its own.
const SENDS_PER_RUN: u32 = 30;
/// The prefix of a child's progress reports on its standard output.
const PROGRESS: &str = "cubbyhole-kill-progress ";

type Relayed = InProcessRelay<SqliteRelayStorage>;
type Device = Client<SqliteStore, Relayed, Relayed>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open(dir: &Path, name: &str, key: &[u8; 32]) -> Device {
    // Small receive batches, one per receive call: many
    // fetch-commit-acknowledge cycles per run, each reported, so that kills
    // land in every part of the cycle.
    let config = ClientConfig {
        receive_batch: 3,
        max_receive_rounds: 1,
        ..ClientConfig::default()
    };
    let relay = InProcessRelay::new(Relay::new(
        SqliteRelayStorage::open(dir.join("relay.db")).expect("relay"),
        RelayConfig::unpriced(),
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
                    report(&format!("committed {seq}"));
                }
            }
        }
        "receiver" | "drain" => {
            let mut bob = open(&dir, "bob", &BOB_KEY);
            // Receive in a tight loop, so that kills land inside receive
            // (fetch, decrypt, commit, acknowledge) rather than in a sleep.
            // One receive call makes one fetch of `receive_batch`. The
            // drain receives until nothing is left; the receiver gives up
            // after 20 empty receives in a row (a sender running alongside
            // has deposited by then, if it will).
            let give_up = if role == "drain" { 1 } else { 20 };
            let mut empty = 0;
            while empty < give_up {
                let got = block_on(bob.receive(&mut cubbyhole::OsRng, now())).expect("receive");
                assert!(got.rejected.is_empty(), "{got:?}");
                if got.received > 0 {
                    report(&format!("received {}", got.received));
                }
                if got.received == 0 && got.redelivered == 0 {
                    empty += 1;
                } else {
                    empty = 0;
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// A progress report to the parent: one line on the standard output,
/// written directly (the test harness captures only `print!`).
fn report(what: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{PROGRESS}{what}").expect("report");
    out.flush().expect("report");
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

/// A child process and its progress reports.
struct Worker {
    child: Child,
    reports: mpsc::Receiver<String>,
}

fn spawn(dir: &Path, role: &str) -> Worker {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
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
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker");
    let (send, reports) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(report) = line.strip_prefix(PROGRESS) {
                if send.send(report.to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    Worker { child, reports }
}

/// What [`kill_after_progress`] saw.
#[derive(Default)]
struct Kills {
    /// Kills that landed (the child died of SIGKILL), each after at least
    /// one progress report.
    landed: usize,
    /// Progress reports seen before those kills.
    reports_before: usize,
}

/// Waits for `1..=max_reports` (at random) progress reports of the child,
/// then kills it with SIGKILL at a random point of the next `window`
/// (unless it finished first). Counts the kill if it landed.
fn kill_after_progress(
    worker: &mut Worker,
    rng: &mut ChaCha20Rng,
    max_reports: u32,
    window: Duration,
    kills: &mut Kills,
) {
    let wanted = 1 + rng.next_u32() % max_reports;
    let delay = Duration::from_micros(u64::from(rng.next_u32()) % window.as_micros() as u64);
    let mut seen = 0;
    while seen < wanted {
        // Closed: the child exited (on its own) before reporting enough.
        if worker.reports.recv().is_err() {
            break;
        }
        seen += 1;
    }
    if seen == wanted {
        std::thread::sleep(delay);
        // Whether it is still running or just exited, SIGKILL: the exit
        // status says which happened.
        worker.child.kill().expect("SIGKILL");
    }
    let status = worker.child.wait().expect("reap");
    if status.signal() == Some(9) {
        assert_eq!(seen, wanted, "killed before any report");
        kills.landed += 1;
        kills.reports_before += seen as usize;
    } else {
        assert!(status.success(), "a worker failed on its own: {status}");
    }
}

fn run_to_end(dir: &Path, role: &str) {
    let status = spawn(dir, role).child.wait().expect("wait");
    assert!(status.success(), "{role} failed");
}

#[test]
fn kill_the_sender_and_the_receiver_many_times() {
    let dir = std::env::temp_dir().join(format!("cubbyhole-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let started = Instant::now();
    run_to_end(&dir, "setup");

    let mut rng = ChaCha20Rng::seed_from_u64(0x6b696c6c);
    let (mut sender, mut receiver) = (Kills::default(), Kills::default());
    let mut runs = 0usize;
    // The sender is killed after 1..=6 of its SENDS_PER_RUN commits (so
    // most runs die before they finish), within the next SEND_WINDOW; the
    // receiver after 1..=2 receives that took envelopes (each a fetch of
    // up to 3, decrypt, commit, acknowledge), within the next
    // RECEIVE_WINDOW. The windows are about one send's and one receive's
    // time here: the kill lands anywhere in the next step or two.
    const SEND_WINDOW: Duration = Duration::from_millis(4);
    const RECEIVE_WINDOW: Duration = Duration::from_millis(20);
    while sender.landed < KILLS_PER_ROLE || receiver.landed < KILLS_PER_ROLE {
        assert!(
            runs < MAX_RUNS,
            "only {} sender and {} receiver kills landed after the child reported work, \
             in {runs} runs",
            sender.landed,
            receiver.landed
        );
        runs += 1;
        // The sender and the receiver take turns, so that the receiver finds
        // a backlog and dies inside its fetch-decrypt-commit-acknowledge
        // cycles, and every few runs they also overlap.
        let mut s = spawn(&dir, "sender");
        if runs % 4 == 0 {
            let mut r = spawn(&dir, "receiver");
            kill_after_progress(&mut s, &mut rng, 6, SEND_WINDOW, &mut sender);
            kill_after_progress(&mut r, &mut rng, 2, RECEIVE_WINDOW, &mut receiver);
        } else {
            kill_after_progress(&mut s, &mut rng, 6, SEND_WINDOW, &mut sender);
            let mut r = spawn(&dir, "receiver");
            kill_after_progress(&mut r, &mut rng, 2, RECEIVE_WINDOW, &mut receiver);
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
        "kill test: {runs} runs, {} kills that landed after the child reported work \
         ({} sender kills after {} commits reported, {} receiver kills after {} receives \
         reported), {sent} messages sent, {} received, {losses} lost, {duplicates} duplicated, \
         {:.1} s",
        sender.landed + receiver.landed,
        sender.landed,
        sender.reports_before,
        receiver.landed,
        receiver.reports_before,
        seqs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(sender.landed >= KILLS_PER_ROLE && receiver.landed >= KILLS_PER_ROLE);
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
