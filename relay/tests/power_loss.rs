//! Power-loss test of the relay server: an answered deposit survives a
//! power loss, and a deposit whose flush failed is not answered as stored.
//!
//! The crash test (crash.rs) kills the server with SIGKILL, which keeps
//! every written page in the OS cache: it cannot see a missing flush. Here
//! the real `cubbyhole-relay` binary runs on a power-loss disk
//! (tests/support/powerloss: an `LD_PRELOAD` shim keeps a *durable image*
//! of the data directory, updated with a file's content at each successful
//! `fsync`/`fdatasync` of it; each sync takes 15 ms, as on a slow disk). Depositors load it concurrently and record every
//! deposit it answered as stored (`201`, or `200` for a repeat). At a
//! random moment under load the server is SIGKILLed and the power "goes":
//! the data directory is replaced by its durable image. Every other round
//! (the first, the third...) the power goes in the middle of a flush
//! instead: the shim kills the server inside its next sync that has
//! something to flush, after the sync's snapshot and a long delay, before
//! it ends. A copy of the
//! image passes SQLite's integrity check, then a relay started on it
//! (without the shim) must serve every deposit answered so far, with its
//! payload, and nothing never deposited. The next round runs on the
//! recovered data. Several rounds.
//!
//! The second test turns the flush into a failure (`EIO`): that deposit
//! must be answered `503`, and as on Linux a failed `fdatasync` may drop
//! the unwritten pages (so a later flush that succeeds proves nothing),
//! the relay must fail-stop: with the disk working again, neither a retry
//! of that deposit nor a new one is answered as stored, no sync succeeds
//! any more, and the relay exits by itself with status 1. A relay restarted
//! on the durable image serves every deposit answered before the failure.
//!
//! Broken on purpose (see the report of issue 14), both tests fail when
//! `WalSync::sync` returns `Ok(())` without flushing, the first when the
//! sync thread answers a turn before its flush, and the second when the
//! relay goes on after a failed flush (a retry is then answered `200`).

#![cfg(unix)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::transport::Mailbox;
use cubbyhole::transport::{
    encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxAuth, MailboxId,
    MailboxOp, PrekeyDirectory,
};
use cubbyhole::{IdentityKeyPair, OsRng, PrekeyStore};
use cubbyhole_http::{HttpRelay, HttpRelayConfig};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[path = "../../tests/support/powerloss/mod.rs"]
mod powerloss;
use powerloss::Disk;

/// The server binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_cubbyhole-relay");
/// Power losses of the load test.
const ROUNDS: usize = 6;
/// How long the load runs before the power goes, in ms (drawn uniformly).
const LOAD_MS: (u64, u64) = (150, 400);
/// Concurrent depositors.
const DEPOSITORS: u8 = 8;
/// Mailboxes the envelopes go to.
const MAILBOXES: usize = 3;
/// How long each sync of the power-loss disk takes (a slow disk).
const SYNC_MICROS: u32 = 15_000;
/// The longest a start may take to answer `/v1/health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh root directory for a test's disk.
fn root(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "cubbyhole-relay-power-loss-{name}-{}",
        std::process::id()
    ))
}

/// A free loopback port.
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------
// The server

/// A relay process on `db`, killed with SIGKILL on drop.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    /// Starts the relay on `db` (on the power-loss disk if `disk` is given)
    /// and waits until it is healthy.
    async fn start(db: &Path, disk: Option<&Disk>, log: PathBuf) -> Server {
        let addr = free_addr();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--db")
            .arg(db)
            .args(["--deposits-per-minute", "0"])
            .args(["--requests-per-minute", "0"])
            .args(["--claims-per-minute", "0"])
            // No stamps: what is under test is durability, and the
            // depositors are anonymous (a mailbox without an access key
            // has one share; SPEC.md 16.3).
            .args(["--identity-stamp-difficulty", "0"])
            .args(["--deposit-stamp-difficulty", "0"])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CUBBYHOLE_RELAY_") {
                command.env_remove(name);
            }
        }
        if let Some(disk) = disk {
            disk.preload_slow(&mut command, SYNC_MICROS);
        }
        let mut server = Server {
            child: command.spawn().expect("cannot start cubbyhole-relay"),
            base: format!("http://{addr}"),
            log,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "the relay exited at start ({status}); its log:\n{}",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            if let Ok(answer) = http.get(format!("{}/v1/health", server.base)).send().await {
                if answer.status() == reqwest::StatusCode::OK {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "the relay is not healthy");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the process is gone (it killed itself in a sync).
    async fn wait_for_crash(mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the relay did not crash in a sync under load"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits until the process exits by itself (at most `guard`, a bound
    /// against a hang, not a timing requirement), and its status.
    async fn wait_for_exit(mut self, guard: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + guard;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not stop by itself within {guard:?}; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, and reaps the process.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Envelopes and owners

/// The payload of an id: determined by it, 16 to 527 bytes.
fn payload_of(id: &[u8; 16]) -> Vec<u8> {
    let len = 16 + usize::from(u16::from_be_bytes([id[14], id[15]]) % 512);
    let mut payload = id.to_vec();
    payload.extend((0..len - 16).map(|i| id[i % 16] ^ (i as u8)));
    payload
}

/// How a deposit was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// `201`.
    Stored,
    /// `200`: already there.
    Repeat,
    /// `503`: not stored.
    Unavailable,
    /// No answer (the server is gone), or another `5xx`.
    Lost,
}

async fn deposit(http: &reqwest::Client, base: &str, mailbox: &MailboxId, id: [u8; 16]) -> Answer {
    let envelope = Envelope {
        id: EnvelopeId(id),
        payload: payload_of(&id),
    };
    let url = format!("{base}/v1/mailboxes/{}/envelopes", hex::encode(mailbox.0));
    let Ok(answer) = http
        .post(url)
        .header("content-type", "application/octet-stream")
        .body(encode_envelope(&envelope))
        .send()
        .await
    else {
        return Answer::Lost;
    };
    let status = answer.status().as_u16();
    let body = answer.bytes().await;
    match status {
        201 => Answer::Stored,
        200 => Answer::Repeat,
        503 => Answer::Unavailable,
        500..=599 => Answer::Lost,
        _ => panic!(
            "deposit refused with {status}: {}",
            body.map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        ),
    }
}

/// A published mailbox owner.
struct Owner {
    keys: IdentityKeyPair,
    address: DeviceAddress,
}

impl Owner {
    async fn publish(relay: &HttpRelay) -> Owner {
        let keys = IdentityKeyPair::generate(&mut OsRng);
        let mut prekeys = PrekeyStore::new(&mut OsRng, &keys, now()).expect("time");
        prekeys.generate_one_time_prekeys(&mut OsRng, 2);
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
        Owner { keys, address }
    }

    async fn auth(&self, relay: &HttpRelay, op: MailboxOp) -> MailboxAuth {
        let challenge = relay
            .challenge(&self.address.mailbox())
            .await
            .expect("challenge");
        MailboxAuth::sign(&self.keys, 1, op, challenge)
    }

    /// Fetches and acknowledges until the mailbox is empty; every envelope
    /// served.
    async fn take_all(&self, relay: &HttpRelay) -> Vec<Envelope> {
        let mut all = Vec::new();
        loop {
            let auth = self.auth(relay, MailboxOp::Fetch).await;
            let batch = relay.fetch(&auth, 1000).await.expect("fetch");
            if batch.is_empty() {
                return all;
            }
            let ids: Vec<EnvelopeId> = batch.iter().map(|e| e.id).collect();
            let auth = self.auth(relay, MailboxOp::Acknowledge).await;
            relay.acknowledge(&auth, &ids).await.expect("acknowledge");
            all.extend(batch);
        }
    }
}

fn owner_relay(base: &str) -> HttpRelay {
    HttpRelay::with_config(
        base,
        HttpRelayConfig {
            retries: 0,
            request_timeout: Duration::from_secs(10),
            ..HttpRelayConfig::default()
        },
    )
    .unwrap()
}

/// Deposits answered as stored (`201` or `200`), by id, with their mailbox.
type Answered = Arc<Mutex<HashMap<[u8; 16], usize>>>;

/// The check after a power loss: SQLite's integrity check on a copy of the
/// durable image, then a relay (without the shim) on that copy must serve
/// every deposit in `answered`, with its payload, and nothing that was not
/// `attempted`. Returns how many envelopes it served.
async fn check_image(
    disk: &Disk,
    name: &str,
    owners: &[Owner],
    answered: &HashMap<[u8; 16], usize>,
    attempted: &HashSet<[u8; 16]>,
) -> usize {
    let copy = disk.root().join(format!("check-{name}"));
    disk.copy_image(&copy);
    let db = copy.join("relay.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open the image");
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok", "{name}: the durable image is corrupt");
    }
    let server = Server::start(&db, None, disk.root().join(format!("check-{name}.log"))).await;
    let relay = owner_relay(&server.base);
    let mut served: HashMap<[u8; 16], usize> = HashMap::new();
    for (mailbox, owner) in owners.iter().enumerate() {
        for envelope in owner.take_all(&relay).await {
            let id = envelope.id.0;
            assert!(
                attempted.contains(&id),
                "{name}: served but never deposited: {}",
                hex::encode(id)
            );
            assert_eq!(envelope.payload, payload_of(&id), "{name}: payload changed");
            assert!(
                served.insert(id, mailbox).is_none(),
                "{name}: served twice: {}",
                hex::encode(id)
            );
        }
    }
    server.kill();
    let lost: BTreeMap<String, usize> = answered
        .iter()
        .filter(|(id, mailbox)| served.get(*id) != Some(mailbox))
        .map(|(id, mailbox)| (hex::encode(id), *mailbox))
        .collect();
    assert!(
        lost.is_empty(),
        "{name}: {} of {} deposits answered as stored are not in the durable image (or in \
         another mailbox), for example {:?}",
        lost.len(),
        answered.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&copy);
    served.len()
}

// ---------------------------------------------------------------------------
// The tests

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// One depositor: deposits new envelopes until `stop` or until the server
/// is gone, recording what was answered as stored.
async fn depositor(
    base: String,
    mailboxes: Arc<Vec<MailboxId>>,
    mut rng: ChaCha20Rng,
    attempted: Arc<Mutex<HashSet<[u8; 16]>>>,
    answered: Answered,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    while !stop.load(Ordering::SeqCst) {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let mailbox = rng.next_u32() as usize % MAILBOXES;
        attempted.lock().unwrap().insert(id);
        match deposit(&http, &base, &mailboxes[mailbox], id).await {
            Answer::Stored | Answer::Repeat => {
                answered.lock().unwrap().insert(id, mailbox);
            }
            Answer::Lost => return,
            Answer::Unavailable => panic!("503 while the disk works"),
        }
    }
}

#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "the power-loss shim needs Linux (LD_PRELOAD, /proc/self/fd)"
)]
fn every_answered_deposit_survives_a_power_loss() {
    runtime().block_on(async {
        let seed = OsRng.next_u64();
        println!("power loss: seed {seed}");
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let disk = Disk::new(root("load"));
        let db = disk.data().join("relay.db");
        let log = disk.root().join("relay.log");

        // The owners publish on the power-loss disk: their uploads must
        // survive too (the checks fetch with them).
        let server = Server::start(&db, Some(&disk), log.clone()).await;
        let relay = owner_relay(&server.base);
        let mut owners = Vec::new();
        for _ in 0..MAILBOXES {
            owners.push(Owner::publish(&relay).await);
        }
        let mailboxes: Arc<Vec<MailboxId>> =
            Arc::new(owners.iter().map(|o| o.address.mailbox()).collect());
        let mut server = Some(server);

        let attempted = Arc::new(Mutex::new(HashSet::new()));
        let answered: Answered = Arc::new(Mutex::new(HashMap::new()));
        let mut in_image = 0;
        for round in 0..ROUNDS {
            let running = match server.take() {
                Some(s) => s,
                None => Server::start(&db, Some(&disk), log.clone()).await,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let tasks: Vec<_> = (0..DEPOSITORS)
                .map(|n| {
                    tokio::spawn(depositor(
                        running.base.clone(),
                        Arc::clone(&mailboxes),
                        ChaCha20Rng::seed_from_u64(seed ^ ((round as u64) << 40) ^ u64::from(n)),
                        Arc::clone(&attempted),
                        Arc::clone(&answered),
                        Arc::clone(&stop),
                    ))
                })
                .collect();
            let load = LOAD_MS.0 + rng.next_u64() % (LOAD_MS.1 - LOAD_MS.0 + 1);
            tokio::time::sleep(Duration::from_millis(load)).await;
            // The power goes while deposits are in flight: at a random
            // moment, or (every other round) in the middle of a flush.
            let mid_flush = round % 2 == 0;
            if mid_flush {
                disk.crash_in_next_sync();
                running.wait_for_crash().await;
            } else {
                running.kill();
            }
            stop.store(true, Ordering::SeqCst);
            for task in tasks {
                task.await.expect("a depositor failed");
            }
            disk.power_loss();
            let answered_now = answered.lock().unwrap().clone();
            let attempted_now = attempted.lock().unwrap().clone();
            in_image = check_image(
                &disk,
                &format!("round {round}"),
                &owners,
                &answered_now,
                &attempted_now,
            )
            .await;
            println!(
                "power loss: round {round}{}: load {load} ms; deposits attempted {}, answered \
                 as stored {}, in the durable image {in_image}",
                if mid_flush { " (mid-flush)" } else { "" },
                attempted_now.len(),
                answered_now.len()
            );
        }
        let syncs = disk.syncs();
        let answered = answered.lock().unwrap().len();
        println!(
            "power loss: {ROUNDS} power losses; {answered} deposits answered as stored, all \
             in the durable image ({in_image} with the unanswered that landed); syncs seen by \
             the shim: {}",
            syncs.ok
        );
        assert!(
            syncs.ok > 0,
            "the shim saw no sync: LD_PRELOAD did not work"
        );
        assert_eq!(syncs.crashed, ROUNDS.div_ceil(2), "power losses in a flush");
        assert!(answered > 0, "no deposit was answered");
    });
}

#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "the power-loss shim needs Linux (LD_PRELOAD, /proc/self/fd)"
)]
fn a_deposit_whose_flush_fails_is_not_answered_as_stored() {
    runtime().block_on(async {
        let mut rng = ChaCha20Rng::seed_from_u64(OsRng.next_u64());
        let disk = Disk::new(root("eio"));
        let db = disk.data().join("relay.db");
        let log = disk.root().join("relay.log");
        let server = Server::start(&db, Some(&disk), log.clone()).await;
        let relay = owner_relay(&server.base);
        let owner = Owner::publish(&relay).await;
        let mailbox = owner.address.mailbox();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut ids = |n: usize| -> Vec<[u8; 16]> {
            (0..n)
                .map(|_| {
                    let mut id = [0u8; 16];
                    rng.fill_bytes(&mut id);
                    id
                })
                .collect()
        };
        let (before, during) = (ids(10), ids(10));
        let mut attempted: HashSet<[u8; 16]> = HashSet::new();
        let mut answered: HashMap<[u8; 16], usize> = HashMap::new();

        for &id in &before {
            attempted.insert(id);
            assert_eq!(
                deposit(&http, &server.base, &mailbox, id).await,
                Answer::Stored
            );
            answered.insert(id, 0);
        }

        // The disk fails the next flush: that deposit is not answered as
        // stored.
        disk.fail_syncs(true);
        let failed = during[0];
        attempted.insert(failed);
        let answer = deposit(&http, &server.base, &mailbox, failed).await;
        assert_eq!(
            answer,
            Answer::Unavailable,
            "a deposit whose flush failed was answered {answer:?}"
        );
        assert!(
            disk.syncs().failed > 0,
            "no sync failed: the shim's failure mode did not reach the relay"
        );
        // Once the failure is answered, nothing touches the storage any
        // more (an in-flight checkpoint ended before it): no sync succeeds
        // from now on, until the process is gone.
        let synced = disk.syncs().ok;

        // Then the disk "works" again. On Linux a failed fdatasync may
        // have dropped the unwritten pages and marked them clean, so a
        // later flush that succeeds proves nothing: the relay must not take
        // it as proof. No deposit is answered as stored by this process
        // any more, neither the failed one retried (already in SQLite's
        // cache: the old relay answered it 200) nor new ones.
        disk.fail_syncs(false);
        let mut refused = (0, 0);
        for &id in &during {
            attempted.insert(id);
            let answer = deposit(&http, &server.base, &mailbox, id).await;
            assert!(
                matches!(answer, Answer::Unavailable | Answer::Lost),
                "after a failed flush, {} was answered {answer:?}",
                if id == failed {
                    "the failed deposit, retried,"
                } else {
                    "a new deposit"
                }
            );
            if answer == Answer::Unavailable {
                refused.0 += 1;
            } else {
                refused.1 += 1;
            }
        }
        // A request that uses the storage, if still answered, is answered
        // `503 storage_failed`.
        if let Ok(health) = http.get(format!("{}/v1/health", server.base)).send().await {
            let status = health.status().as_u16();
            let body = health.text().await.unwrap_or_default();
            assert!(
                status == 503 && body.contains(r#""error":"storage_failed""#),
                "health after a failed flush: {status} {body}"
            );
        }

        // The relay stops by itself, with a failure status (systemd's
        // Restart=on-failure restarts it), saying why.
        let status = server.wait_for_exit(Duration::from_secs(30)).await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            status.code(),
            Some(1),
            "the relay's exit after a failed flush: {status}; its log:\n{text}"
        );
        // Logged once (at `error`), and said on exit.
        assert_eq!(
            text.matches("could not flush the write-ahead log").count(),
            1,
            "the error line, once; the log:\n{text}"
        );
        assert!(
            text.contains("cubbyhole-relay: the write-ahead log could not be flushed")
                && text.contains("Restart it: it recovers from what is on the disk"),
            "the exit message; the log:\n{text}"
        );
        assert_eq!(
            disk.syncs().ok,
            synced,
            "a sync succeeded after the failed flush was answered; the shim's log:\n{}",
            std::fs::read_to_string(disk.root().join("syncs.log")).unwrap_or_default()
        );

        // The power goes; a relay restarted on what the disk holds serves
        // every deposit answered as stored before the failure.
        disk.power_loss();
        let served = check_image(&disk, "eio", &[owner], &answered, &attempted).await;
        println!(
            "power loss (EIO): {} deposits stored, then a failed flush: that deposit answered \
             503; after it {} answered 503 and {} not answered (the relay gone); the relay \
             exited with {status}; {served} envelopes in the durable image (all {} answered \
             as stored)",
            before.len(),
            refused.0,
            refused.1,
            answered.len()
        );
    });
}
