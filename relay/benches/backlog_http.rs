//! The client layer receiving a backlog of 10,000 offline messages through
//! the real HTTP relay on loopback: the relay server runs in this process
//! ([`serve`] on `127.0.0.1:0`, rate limits and the relay-wide storage bound
//! off), and the timed part is the receiving client's `Client::receive`,
//! called until all 10,000 messages (64-byte bodies) are received, decrypted
//! and committed to its store.
//!
//! ```text
//! cargo bench -p cubbyhole-relay --bench backlog_http
//! ```
//!
//! Three benches, each a new server, database and pair of devices per run:
//!
//! - `backlog_http/memory` and `backlog_http/sqlite` (the receiver's store in
//!   memory, or a SQLite file): the relay's SQLite database is in memory
//!   (`StorageConfig::SqliteMemory`, as in `tests/http.rs`). Bob publishes
//!   over HTTP and goes offline; Alice (in-memory store) sends him the 10,000
//!   messages over HTTP, one deposit request each (about 3 s per run here).
//! - `backlog_http/sqlite_relay_file`: the production setup, the relay on a
//!   SQLite file (WAL, `synchronous = FULL`, its checkpointer running), and
//!   the receiver on a SQLite file. Depositing 10,000 messages one request at
//!   a time would wait for 10,000 fsyncs (about 20 s per run on this machine),
//!   so this set-up fills the relay's database before the server starts:
//!   Bob publishes and Alice sends through an in-process `Relay` on the same
//!   file, Alice's envelopes are collected and stored with
//!   `Relay::deposit_batch` (the relay's own rules, in batches of 1000), then
//!   the server opens the file and Bob's client (the same store) receives
//!   over HTTP. The relay code and the database are the server's; only the
//!   way the envelopes got there differs.
//!
//! With the default `ClientConfig` a receive fetches batches of 500: per
//! batch, a challenge, a fetch, the decryption, one store transaction, a
//! challenge and an acknowledgement. Everything but the receives (the server,
//! the clients, the deposits, stopping the server, removing the files) is
//! outside the timing: `iter_custom` adds up only the receives.
//!
//! The client runs on the bench's own thread (a current-thread runtime); the
//! server on a two-worker tokio runtime beside it, so they share the
//! machine's cores as a client and a relay on one host would.
//!
//! Criterion reports the median time for 10,000 messages and the rate
//! (`thrpt`, messages per second). `BACKLOG_VERBOSE=1` also prints each
//! run's set-up and receive times.

use cubbyhole::transport::DepositPass;
use std::future::{ready, Future};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, Relay, RelayConfig, SqliteRelayStorage};
use cubbyhole::storage::{MemoryStore, SqliteStore, Store};
use cubbyhole::transport::{Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, TransportError};
use cubbyhole_http::HttpRelay;
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[path = "../../benches/support/scenario.rs"]
mod scenario;

use scenario::{publish_and_send, TempDir};

/// Messages in the backlog.
const MESSAGES: usize = 10_000;
/// Envelopes per `Relay::deposit_batch` when filling the relay's file.
const PREFILL_BATCH: usize = 1000;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn verbose() -> bool {
    std::env::var_os("BACKLOG_VERBOSE").is_some()
}

/// The relay's bounds: room for the whole backlog in one mailbox.
fn relay_config() -> RelayConfig {
    RelayConfig {
        max_pending_envelopes: 2 * MESSAGES as u32,
        // The backlog is a first contact's (Alice holds no access key
        // of Bob's: he never wrote to her), so it lands in Bob's
        // strangers' share, made as large as the contacts' here.
        max_stranger_envelopes: 2 * MESSAGES as u32,
        max_stranger_bytes: RelayConfig::DEFAULT_MAX_PENDING_BYTES,
        ..RelayConfig::unpriced()
    }
}

/// The relay server, running on the server runtime.
struct Server {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    fn start(server_rt: &Runtime, storage: StorageConfig) -> Server {
        let config = ServerConfig {
            storage,
            relay: relay_config(),
            limits: Limits {
                deposits_per_minute: 0,
                claims_per_minute: 0,
                requests_per_minute: 0,
                total_storage_bytes: 0,
                ..Limits::default()
            },
            ..ServerConfig::unpriced()
        };
        let listener = server_rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = server_rt.spawn(async move {
            serve(listener, config, async move {
                let _ = stopped.await;
            })
            .await
            .expect("the relay server failed");
        });
        Server { url, stop, task }
    }

    fn stop(self, server_rt: &Runtime) {
        let _ = self.stop.send(());
        server_rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), self.task).await })
            .expect("the relay server did not stop")
            .expect("the relay server panicked");
    }
}

/// The brief's set-up over HTTP: Bob (on `bob_store`) publishes, Alice
/// sends him the backlog, one deposit request per message.
async fn prepare_over_http<S: Store>(
    relay: &HttpRelay,
    bob_store: S,
    rng: &mut ChaCha20Rng,
    now: u64,
) -> S {
    let config = ClientConfig::default();
    let mut bob = Client::open(bob_store, relay.clone(), relay.clone(), config, rng)
        .await
        .expect("bob");
    let mut alice = Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        config,
        rng,
    )
    .await
    .expect("alice");
    publish_and_send(&mut bob, &mut alice, MESSAGES, rng, now).await;
    bob.into_store()
}

type FileRelay = InProcessRelay<SqliteRelayStorage>;

/// Alice's mailbox while the relay's file is filled: deposits are collected
/// (and stored afterwards with `Relay::deposit_batch`), the rest goes to the
/// in-process relay.
#[derive(Clone)]
struct Collector {
    relay: FileRelay,
    deposits: Arc<Mutex<Vec<(MailboxId, Envelope, DepositPass)>>>,
}

impl Mailbox for Collector {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.deposits
            .lock()
            .expect("collector lock")
            .push((*to, envelope.clone(), pass.clone()));
        ready(Ok(()))
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

/// The production set-up, filled before the server starts: Bob (on
/// `bob_store`) publishes and Alice sends through an in-process relay on the
/// database file `db`; her envelopes are stored in batches. The in-process
/// relay is closed when this returns.
async fn prefill_relay_file<S: Store>(
    db: &Path,
    bob_store: S,
    rng: &mut ChaCha20Rng,
    now: u64,
) -> S {
    let storage = SqliteRelayStorage::open(db).expect("relay database");
    let relay: FileRelay = InProcessRelay::new(Relay::new(storage, relay_config()));
    let config = ClientConfig::default();
    let mut bob = Client::open(bob_store, relay.clone(), relay.clone(), config, rng)
        .await
        .expect("bob");
    let collector = Collector {
        relay: relay.clone(),
        deposits: Arc::new(Mutex::new(Vec::with_capacity(MESSAGES))),
    };
    let mut alice = Client::open(
        MemoryStore::new(),
        relay.clone(),
        collector.clone(),
        config,
        rng,
    )
    .await
    .expect("alice");
    // "Deposited" here means collected.
    publish_and_send(&mut bob, &mut alice, MESSAGES, rng, now).await;
    drop(alice);
    let deposits = std::mem::take(&mut *collector.deposits.lock().expect("collector lock"));
    assert_eq!(deposits.len(), MESSAGES);
    relay
        .with_relay(|r| {
            for batch in deposits.chunks(PREFILL_BATCH) {
                for result in r.deposit_batch(now, batch) {
                    assert_eq!(result, Ok(true), "deposit refused");
                }
            }
        })
        .expect("relay lock");
    bob.into_store()
}

/// The timed part: `receive` over HTTP until all [`MESSAGES`] are in the
/// inbox of the device on `bob_store`.
async fn receive_all<S: Store>(
    relay: &HttpRelay,
    bob_store: S,
    rng: &mut ChaCha20Rng,
    now: u64,
) -> Duration {
    let mut bob = Client::open(
        bob_store,
        relay.clone(),
        relay.clone(),
        ClientConfig::default(),
        rng,
    )
    .await
    .expect("bob");
    scenario::receive_all(&mut bob, MESSAGES, now).await
}

/// Where the relay keeps its state, and so how the backlog gets there.
#[derive(Clone, Copy)]
enum Setup {
    /// SQLite in memory; Alice deposits over HTTP.
    RelayInMemory,
    /// A SQLite file, filled before the server starts.
    RelayFile,
}

/// One run: a new database and server, the set-up, the timed receive and
/// the clean-up.
fn run<S: Store>(
    setup: Setup,
    server_rt: &Runtime,
    client_rt: &Runtime,
    store: &mut impl FnMut(&TempDir) -> S,
    rng: &mut ChaCha20Rng,
) -> Duration {
    let dir = TempDir::new("cubbyhole-bench-backlog-http");
    let now = now();
    let started = Instant::now();
    let (server, bob_store) = match setup {
        Setup::RelayInMemory => {
            let server = Server::start(server_rt, StorageConfig::SqliteMemory);
            let relay = HttpRelay::new(&server.url).expect("relay URL");
            let bob_store = client_rt.block_on(prepare_over_http(&relay, store(&dir), rng, now));
            (server, bob_store)
        }
        Setup::RelayFile => {
            let db = dir.0.join("relay.db");
            let bob_store = client_rt.block_on(prefill_relay_file(&db, store(&dir), rng, now));
            (
                Server::start(server_rt, StorageConfig::Sqlite(db)),
                bob_store,
            )
        }
    };
    let set_up = started.elapsed();
    let relay = HttpRelay::new(&server.url).expect("relay URL");
    let elapsed = client_rt.block_on(receive_all(&relay, bob_store, rng, now));
    if verbose() {
        eprintln!("set-up {set_up:.2?}, receive {elapsed:.2?}");
    }
    server.stop(server_rt);
    drop(dir);
    elapsed
}

fn bench_one<S: Store>(
    c: &mut Criterion,
    name: &str,
    setup: Setup,
    measurement: Duration,
    mut store: impl FnMut(&TempDir) -> S,
) {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut rng = ChaCha20Rng::seed_from_u64(0x6874_7470);
    let mut group = c.benchmark_group("backlog_http");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(measurement)
        .throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| run(setup, &server_rt, &client_rt, &mut store, &mut rng))
                .sum()
        })
    });
    group.finish();
}

fn sqlite_store(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(dir.0.join("bob.db"), &[7; 32]).expect("SQLite store")
}

fn backlog_http(c: &mut Criterion) {
    // Measurement times of about ten times one receive (0.5 to 1.5 s here):
    // one run per sample, each with its set-up.
    bench_one(
        c,
        "memory",
        Setup::RelayInMemory,
        Duration::from_secs(6),
        |_| MemoryStore::new(),
    );
    bench_one(
        c,
        "sqlite",
        Setup::RelayInMemory,
        Duration::from_secs(8),
        sqlite_store,
    );
    bench_one(
        c,
        "sqlite_relay_file",
        Setup::RelayFile,
        Duration::from_secs(10),
        sqlite_store,
    );
}

criterion_group!(benches, backlog_http);
criterion_main!(benches);
