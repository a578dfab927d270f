//! Push across relay processes: two `cubbyhole-relay` processes (the real
//! binary) share one PostgreSQL database; a fetch waiting on one of them
//! (a long poll) is woken by a deposit made through the other, through
//! PostgreSQL `LISTEN/NOTIFY`. Once with raw
//! [`HttpRelay`] calls, once with [`cubbyhole::client::Client`]s (Bob
//! publishes through one process and waits on the other with
//! `receive_waiting`, Alice sends through the first).
//!
//! Needs `CUBBYHOLE_TEST_POSTGRES` (see `support/pg.rs`): each test runs
//! on a scratch database of its own. Without it (at build time) the tests
//! are ignored, and reported as such; under `CI` that fails.
//!
//! No clock is asserted on: each deposit is made once the waiting fetch is
//! parked on the other process (its `cubbyhole_relay_long_polls` gauge
//! reads 1: the fetch found the mailbox empty and waits), and the fetch
//! waits far longer than a wake-up takes ([`WAIT_MS`]), so an answer that
//! holds the envelope was woken by the deposit (a wait that runs out
//! answers empty). The latencies are measured and printed (run with
//! `--nocapture` to see them), not asserted.

#![cfg(feature = "postgres")]

use cubbyhole::transport::DepositPass;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::storage::MemoryStore;
use cubbyhole::transport::{
    BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxOp,
    PrekeyDirectory,
};
use cubbyhole::{IdentityKeyPair, OsRng, PrekeyStore};
use cubbyhole_http::HttpRelay;
use rand_chacha::rand_core::RngCore;

/// The server binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_cubbyhole-relay");
/// How long the waiting fetches may wait, in ms: far longer than a wake-up
/// takes, even on a loaded machine (the relays run with this
/// `--max-wait-ms`).
const WAIT_MS: u32 = 60_000;
/// Deposits (messages) per test, alternating between the processes.
const ROUNDS: usize = 6;
/// The longest a start may take to answer `/v1/health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// Scratch databases (`support/pg.rs`)

#[path = "support/pg.rs"]
mod pg;
use pg::TestDb;

#[test]
fn postgres_tests_are_not_ignored_in_ci() {
    pg::assert_not_ignored_in_ci();
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "cubbyhole-relay-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Relay processes

/// A free loopback port for a server (bound, read and released: the server
/// binds it next), below the ephemeral port range where possible, so that
/// no outgoing connection takes it before the server binds it.
fn free_addr() -> SocketAddr {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        let span = low - 10_000;
        let start = (OsRng.next_u32() % u32::from(span)) as u16;
        for k in 0..500 {
            let port = 10_000 + (start + k) % span;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                return listener.local_addr().unwrap();
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A relay process on a loopback port of its own, killed on drop. Its
/// output goes to a log file, shown when the start fails.
struct RelayProcess {
    name: &'static str,
    base: String,
    child: Child,
    http: reqwest::Client,
}

impl RelayProcess {
    /// Starts `cubbyhole-relay --postgres url` and waits until it is
    /// healthy.
    async fn start(name: &'static str, url: &str, dir: &TempDir) -> RelayProcess {
        let addr = free_addr();
        let log_path = dir.0.join(format!("relay-{name}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--postgres", url])
            // No stamps: the devices here are raw uploads and anonymous
            // deposits (mailboxes without an access key, SPEC.md 16.3).
            .args(["--identity-stamp-difficulty", "0"])
            .args(["--deposit-stamp-difficulty", "0"])
            .args(["--log", "warn"])
            .args(["--max-wait-ms", &WAIT_MS.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("CUBBYHOLE_RELAY_") {
                command.env_remove(var);
            }
        }
        let mut relay = RelayProcess {
            name,
            base: format!("http://{addr}"),
            child: command.spawn().expect("cannot start cubbyhole-relay"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        };
        let log_tail = || {
            let mut text = String::new();
            if let Ok(mut file) = File::open(&log_path) {
                let _ = file.read_to_string(&mut text);
            }
            text
        };
        let health = format!("{}/v1/health", relay.base);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = relay.child.try_wait().unwrap() {
                panic!(
                    "relay {name} exited at start ({status}); its log:\n{}",
                    log_tail()
                );
            }
            if let Ok(answer) = relay.http.get(&health).send().await {
                if answer.status() == reqwest::StatusCode::OK {
                    return relay;
                }
            }
            assert!(
                Instant::now() < deadline,
                "relay {name} is not healthy {START_TIMEOUT:?} after its start; its log:\n{}",
                log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn client(&self) -> HttpRelay {
        HttpRelay::new(&self.base).unwrap()
    }

    /// The `cubbyhole_relay_long_polls` gauge: fetches parked on this
    /// process (their mailbox was empty; a deposit wakes them).
    async fn long_polls(&self) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("cubbyhole_relay_long_polls "))
            .and_then(|n| n.trim().parse().ok())
            .expect("the long_polls gauge")
    }

    /// Waits until `n` fetches are parked on this process: a deposit made
    /// next must wake them. (The 60 s guard only turns a hang into a
    /// failure.)
    async fn until_parked(&self, n: u64) {
        let guard = Instant::now() + Duration::from_secs(60);
        while self.long_polls().await < n {
            assert!(
                Instant::now() < guard,
                "no fetch is parked on relay {}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two relay processes on a fresh database, and a runtime to drive them.
/// The database outlives the runtime.
fn two_relays<F, Fut>(test: F)
where
    F: FnOnce(RelayProcess, RelayProcess) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let db = TestDb::create("push");
    let dir = TempDir::new("push");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let a = RelayProcess::start("A", &db.url, &dir).await;
        let b = RelayProcess::start("B", &db.url, &dir).await;
        test(a, b).await;
    });
    drop(runtime);
    drop(db);
}

/// A device published with a real signed upload (through `relay`).
async fn publish(relay: &HttpRelay) -> (IdentityKeyPair, DeviceAddress) {
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let mut prekeys = PrekeyStore::new(&mut OsRng, &keys, now()).expect("time in unix seconds");
    prekeys.generate_one_time_prekeys(&mut OsRng, 3);
    let one_time: Vec<_> = prekeys.one_time_prekeys().collect();
    let upload = BundleSetUpload::new(
        1,
        &keys,
        1,
        prekeys.current_signed_prekey(),
        &one_time,
        true,
    )
    .sign(&keys);
    relay.publish(&upload).await.expect("publish");
    let address = DeviceAddress::new(keys.public(), 1);
    (keys, address)
}

async fn auth(
    relay: &HttpRelay,
    keys: &IdentityKeyPair,
    address: &DeviceAddress,
    op: MailboxOp,
) -> MailboxAuth {
    let challenge = relay.challenge(&address.mailbox()).await.unwrap();
    MailboxAuth::sign(keys, address.device_id, op, challenge)
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------
// Tests

/// Bob publishes through A; his fetch waits on one process while an
/// envelope is deposited through the other (B then A, alternately): the
/// fetch answers with it.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn a_deposit_through_one_process_wakes_a_fetch_waiting_on_another() {
    two_relays(|a, b| async move {
        let (relay_a, relay_b) = (a.client(), b.client());
        let (bob_keys, bob) = publish(&relay_a).await;
        // Carol's deposits must not wake Bob's fetch.
        let (_, carol) = publish(&relay_a).await;

        let mut latencies = Vec::new();
        for round in 0..ROUNDS {
            let (waiting, waiting_on, depositing) = if round % 2 == 0 {
                (&relay_b, &b, &relay_a)
            } else {
                (&relay_a, &a, &relay_b)
            };
            let fetch = auth(waiting, &bob_keys, &bob, MailboxOp::Fetch).await;
            let poller = waiting.clone();
            let waiter = tokio::spawn(async move {
                let started = Instant::now();
                let got = poller.fetch_waiting(&fetch, 100, WAIT_MS).await;
                (got, started, Instant::now())
            });
            waiting_on.until_parked(1).await;

            let envelope = Envelope {
                id: EnvelopeId([round as u8 + 1; 16]),
                payload: format!("envelope {round}").into_bytes(),
            };
            let sent = Instant::now();
            depositing
                .deposit(&bob.mailbox(), &envelope, &DepositPass::NONE)
                .await
                .unwrap();
            let deposited = Instant::now();
            let (got, started, answered) = waiter.await.unwrap();
            assert_eq!(got.unwrap(), vec![envelope.clone()]);
            let latency = answered.saturating_duration_since(sent);
            println!(
                "round {round}: deposit through {} answered in {}, fetch waiting on {} \
                 answered {} after the deposit started ({} after its answer; it waited {})",
                if round % 2 == 0 { "A" } else { "B" },
                millis(deposited - sent),
                waiting_on.name,
                millis(latency),
                millis(answered.saturating_duration_since(deposited)),
                millis(answered - started),
            );
            let ack = auth(depositing, &bob_keys, &bob, MailboxOp::Acknowledge).await;
            depositing.acknowledge(&ack, &[envelope.id]).await.unwrap();
            latencies.push(latency);
        }
        latencies.sort();
        println!(
            "cross-process push latency over {ROUNDS} deposits: min {}, median {}, max {}",
            millis(latencies[0]),
            millis(latencies[latencies.len() / 2]),
            millis(latencies[latencies.len() - 1])
        );

        // A deposit to another mailbox does not answer Bob's fetch: it
        // waits its time out and answers empty.
        let fetch = auth(&relay_b, &bob_keys, &bob, MailboxOp::Fetch).await;
        let poller = relay_b.clone();
        let waiter = tokio::spawn(async move {
            let started = Instant::now();
            let got = poller.fetch_waiting(&fetch, 100, 1_500).await;
            (got, started.elapsed())
        });
        b.until_parked(1).await;
        let other = Envelope {
            id: EnvelopeId([0xCC; 16]),
            payload: b"for Carol".to_vec(),
        };
        relay_a
            .deposit(&carol.mailbox(), &other, &DepositPass::NONE)
            .await
            .unwrap();
        let (got, waited) = waiter.await.unwrap();
        assert_eq!(got.unwrap(), Vec::new());
        assert!(waited >= Duration::from_millis(1_400), "{waited:?}");
    });
}

/// The same with clients: Bob publishes through A and waits on B
/// (`receive_waiting`); Alice fetches his bundle from A and sends through
/// A; the waiting receive gets the message.
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn a_client_waiting_on_one_process_receives_a_message_sent_through_another() {
    two_relays(|a, b| async move {
        let (relay_a, relay_b) = (a.client(), b.client());
        let mut bob = Client::open(
            MemoryStore::new(),
            relay_a.clone(),
            relay_b.clone(),
            ClientConfig::default(),
            &mut OsRng,
        )
        .await
        .unwrap();
        assert!(bob.maintain_prekeys(&mut OsRng, now()).await.unwrap());
        let bob_address = bob.address();
        let mut alice = Client::open(
            MemoryStore::new(),
            relay_a.clone(),
            relay_a.clone(),
            ClientConfig::default(),
            &mut OsRng,
        )
        .await
        .unwrap();
        assert!(alice.maintain_prekeys(&mut OsRng, now()).await.unwrap());

        let mut latencies = Vec::new();
        for round in 0..ROUNDS / 2 {
            let waiting = tokio::spawn(async move {
                let started = Instant::now();
                let report = bob
                    .receive_waiting(&mut cubbyhole::OsRng, now(), WAIT_MS)
                    .await
                    .unwrap();
                (bob, report, started, Instant::now())
            });
            b.until_parked(1).await;
            let text = format!("through A, to Bob waiting on B: {round}");
            let sent_at = Instant::now();
            let sent = alice
                .send(&mut OsRng, &bob_address, text.as_bytes(), now())
                .await
                .unwrap();
            assert!(sent.deposited);
            let deposited = Instant::now();
            let (back, report, started, done) = waiting.await.unwrap();
            bob = back;
            assert_eq!(report.received, 1);
            let inbox = bob.inbox().await.unwrap();
            assert_eq!(inbox.len(), 1);
            assert_eq!(inbox[0].from, alice.address());
            assert_eq!(inbox[0].body, text.as_bytes());
            bob.remove_from_inbox(&inbox[0].envelope_id).await.unwrap();
            let latency = done.saturating_duration_since(sent_at);
            println!(
                "client round {round}: send through A took {}, Bob's receive_waiting on B \
                 returned {} after the send started ({} after the deposit's answer; it waited {})",
                millis(deposited - sent_at),
                millis(latency),
                millis(done.saturating_duration_since(deposited)),
                millis(done - started)
            );
            latencies.push(latency);
        }
        println!("client push latencies (send start to Bob's inbox): {latencies:?}");
    });
}
