//! `attack`: the relay under attack, over loopback only, bounded in count
//! and time (issue 16). Each attack runs against a fresh relay with default
//! settings (SQLite in a temporary file) while an honest pair exchanges
//! messages through it with the real client (`Client` over `HttpRelay`),
//! and a stranger sends the recipient a first message half-way through.
//!
//! ```sh
//! cargo run --release -p cubbyhole-relay --bin attack              # short: 3 s each
//! cargo run --release -p cubbyhole-relay --bin attack -- --full    # 30 s each
//! cargo run --release -p cubbyhole-relay --bin attack -- --only prekey_drain
//! ```
//!
//! The attacker's source addresses are loopback addresses 127.0.1.1,
//! 127.0.1.2, ... (Linux routes all of 127.0.0.0/8 to the loopback
//! interface), at most `--addresses` (default 64) of them; the honest
//! devices connect from 127.0.0.1. For each attack it prints what the
//! attacker spent (addresses, requests, how they were answered) and what
//! the honest pair saw while it lasted: messages sent one every 200 ms
//! from Alice to Bob, how many Bob received (within a drain of 2 s after
//! the attack, 5 s with `--full`), their latency from send to Bob's inbox
//! (p50, p99, max), how long Alice's `send` calls took (p99), and how long
//! the stranger's first message took (or that it did not arrive).
//!
//! Nothing here asserts a figure: the output is the measurement. It exits
//! non-zero only if the harness itself fails (the relay does not start,
//! the honest pair cannot set up before the attack).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::storage::MemoryStore;
use cubbyhole::transport::stamp::Stamp;
use cubbyhole::transport::{
    encode_envelope, AccessKey, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxId,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, SignedPrekey};
use cubbyhole_http::{HttpRelay, HttpRelayConfig};
use cubbyhole_relay::{serve, ServerConfig, StorageConfig};
use rand_core::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

type Device = Client<MemoryStore, HttpRelay, HttpRelay>;

/// The content type of every request body (the relay refuses others).
const OCTETS: &str = "application/octet-stream";
type Failure = Box<dyn std::error::Error + Send + Sync>;

const ATTACKS: [&str; 8] = [
    "none",
    "mailbox_fill",
    "tiny_flood",
    "identity_flood",
    "prekey_drain",
    "head_claims",
    "challenge_flood",
    "slow_connections",
];

struct Options {
    /// Attacks whose defence is checked (the run fails if it does not
    /// hold): properties that do not depend on timing, see [`check`].
    check: Vec<String>,
    seconds: u64,
    /// How long Bob keeps receiving after the attack.
    drain: u64,
    addresses: u8,
    only: Option<String>,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        check: Vec::new(),
        seconds: 3,
        drain: 2,
        addresses: 64,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--full" => {
                o.seconds = 30;
                o.drain = 5;
            }
            "--seconds" => {
                o.seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| (1..=600).contains(s))
                    .ok_or("--seconds takes 1..=600")?;
            }
            "--addresses" => {
                o.addresses = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| (1..=250).contains(n))
                    .ok_or("--addresses takes 1..=250")?;
            }
            "--check" => {
                let list = args.next().ok_or("--check takes attack names, comma-separated")?;
                for name in list.split(',') {
                    if !ATTACKS.contains(&name) {
                        return Err(format!("unknown attack {name}: one of {ATTACKS:?}"));
                    }
                    o.check.push(name.to_owned());
                }
            }
            "--only" => {
                let name = args.next().ok_or("--only takes an attack name")?;
                if !ATTACKS.contains(&name.as_str()) {
                    return Err(format!("unknown attack {name}: one of {ATTACKS:?}"));
                }
                o.only = Some(name);
            }
            "--help" | "-h" => {
                return Err(format!(
                "attack [--full | --seconds S] [--addresses N] [--only NAME] [--check NAME,...]\nattacks: {ATTACKS:?}"
            ))
            }
            other => return Err(format!("unknown argument {other} (--help)")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = 0;
    println!(
        "relay attack suite: {} s per attack, up to {} attacker addresses, default relay settings",
        options.seconds, options.addresses
    );
    for name in ATTACKS {
        if options.only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        match runtime.block_on(run(name, &options)) {
            Ok((report, problems)) => {
                println!("{report}");
                if options.check.iter().any(|c| c == name) {
                    if problems.is_empty() {
                        println!("   check: the defence held");
                    } else {
                        for p in &problems {
                            println!("   check FAILED: {p}");
                        }
                        failed += 1;
                    }
                }
            }
            Err(e) => {
                eprintln!("{name}: harness failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} checked attack(s) were not defended");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A relay with default settings on 127.0.0.1, SQLite in a temporary file.
struct Relay {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), cubbyhole_relay::ServerError>>,
    dir: std::path::PathBuf,
}

async fn start_relay(name: &str) -> Result<Relay, Failure> {
    let dir = std::env::temp_dir().join(format!(
        "cubbyhole-attack-{name}-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let config = ServerConfig {
        storage: StorageConfig::Sqlite(dir.join("relay.db")),
        ..ServerConfig::default()
    };
    let task = tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    // Wait until it answers.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/v1/health")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err("the relay did not become healthy".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Relay {
        addr,
        stop,
        task,
        dir,
    })
}

impl Relay {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn device(relay: &HttpRelay, device_id: u32) -> Result<Device, Failure> {
    let mut d = Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        ClientConfig {
            device_id,
            ..ClientConfig::default()
        },
        &mut OsRng,
    )
    .await?;
    d.maintain_prekeys(&mut OsRng, now()).await?;
    Ok(d)
}

/// What the honest side saw.
#[derive(Default)]
struct Honest {
    /// Alice's messages sent during the attack (by number) and when.
    sent: BTreeMap<u64, u64>,
    /// Latency (ms) of each received message, by number.
    received: BTreeMap<u64, u64>,
    /// How long each `send` call took (ms): the relay's answer to a deposit.
    send_ms: Vec<u64>,
    send_errors: u64,
    receive_errors: u64,
    /// The kinds of errors seen, counted.
    error_kinds: BTreeMap<String, u64>,
    /// How long the stranger's first message took (ms), if it arrived.
    stranger: Option<u64>,
    stranger_sent_at: Option<u64>,
    stranger_error: Option<String>,
}

/// What the attacker did.
#[derive(Default)]
struct Spent {
    requests: AtomicU64,
    connections: AtomicU64,
    /// Slow connections still open when the attack ended.
    still_open: AtomicU64,
    /// Bob's one-time prekeys on the relay before and after the attack.
    prekeys: Mutex<(Option<u64>, Option<u64>)>,
    /// The relay's open connections (its `/metrics` gauge) at the end of
    /// the attack, before the attacker lets go.
    relay_connections: Mutex<Option<u64>>,
    answers: Mutex<BTreeMap<String, u64>>,
    notes: Mutex<Vec<String>>,
    /// Time the attacker's one stamp-minting core was busy, in ms.
    stamp_ms: AtomicU64,
    /// Stamps minted (deposit stamps, identity stamps).
    stamps: AtomicU64,
    identity_stamps: AtomicU64,
    /// Payload bytes of the attacker's deposits the relay accepted.
    stored_bytes: AtomicU64,
}

impl Spent {
    fn answer(&self, what: impl Into<String>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what.into())
            .or_default() += 1;
    }
    fn note(&self, note: String) {
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(note);
    }
}

/// What the attacker's minting core is asked for.
enum MintJob {
    /// A stamp for a deposit of `len` bytes with this id to this mailbox.
    Deposit(MailboxId, EnvelopeId, u32),
    /// An identity stamp for this device's first upload.
    Identity(DeviceAddress),
}

/// The attacker's stamp minting: ONE thread (one core), whatever the
/// number of addresses, at the relay's default difficulties.
#[derive(Clone)]
struct Minter {
    jobs: std::sync::mpsc::Sender<(MintJob, oneshot::Sender<Stamp>)>,
}

impl Minter {
    fn start(spent: Arc<Spent>, deadline: Instant) -> Minter {
        let (jobs, queue) = std::sync::mpsc::channel::<(MintJob, oneshot::Sender<Stamp>)>();
        std::thread::spawn(move || {
            let deposit = cubbyhole::relay::RelayConfig::DEFAULT_DEPOSIT_STAMP_DIFFICULTY;
            let identity = cubbyhole::relay::RelayConfig::DEFAULT_IDENTITY_STAMP_DIFFICULTY;
            while let Ok((job, reply)) = queue.recv() {
                if Instant::now() >= deadline {
                    continue;
                }
                let started = Instant::now();
                let start = OsRng.next_u64();
                // In slices, so that the attack ends on time.
                let mut next = start;
                let stamp = loop {
                    let slice = match &job {
                        MintJob::Deposit(mailbox, id, len) => {
                            Stamp::mint(mailbox, id, *len, deposit, now(), next, 1 << 16)
                        }
                        MintJob::Identity(device) => {
                            Stamp::mint_identity(device, identity, now(), next, 1 << 16)
                        }
                    };
                    match slice {
                        Ok(Ok(stamp)) => break Some(stamp),
                        Ok(Err(unfinished)) if Instant::now() < deadline => {
                            next = unfinished.next_nonce;
                        }
                        _ => break None,
                    }
                };
                spent.stamp_ms.fetch_add(
                    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if let Some(stamp) = stamp {
                    match job {
                        MintJob::Deposit(..) => spent.stamps.fetch_add(1, Ordering::Relaxed),
                        MintJob::Identity(_) => {
                            spent.identity_stamps.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    let _ = reply.send(stamp);
                }
            }
        });
        Minter { jobs }
    }

    async fn mint(&self, job: MintJob) -> Option<Stamp> {
        let (reply, stamp) = oneshot::channel();
        self.jobs.send((job, reply)).ok()?;
        stamp.await.ok()
    }
}

fn attacker_ip(k: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, k.saturating_add(1)))
}

fn http_client(ip: IpAddr) -> Result<reqwest::Client, Failure> {
    Ok(reqwest::Client::builder()
        .local_address(ip)
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(4)
        .build()?)
}

async fn classify(r: Result<reqwest::Response, reqwest::Error>) -> String {
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.bytes().await.unwrap_or_default();
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_default();
            format!("{status} {reason}").trim().to_owned()
        }
        Err(e) if e.is_timeout() => "timeout".into(),
        Err(e) if e.is_connect() => "connect failed".into(),
        Err(_) => "failed".into(),
    }
}

async fn run(name: &str, options: &Options) -> Result<(String, Vec<String>), Failure> {
    let relay = start_relay(name).await?;
    let url = relay.url();
    // Each honest device connects from its own address (as different
    // people do), none of them an attacker's.
    let from = |last: u8| {
        HttpRelay::with_config(
            &url,
            HttpRelayConfig {
                local_address: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))),
                ..HttpRelayConfig::default()
            },
        )
    };
    // The honest pair, set up before the attack: both publish, Alice writes
    // first, Bob answers, so they have a session and receipts flow.
    let mut alice = device(&from(2)?, 1).await?;
    let mut bob = device(&from(3)?, 1).await?;
    let bob_address = bob.address();
    alice
        .send(&mut OsRng, &bob_address, b"hello", now())
        .await?;
    bob.receive(&mut OsRng, now()).await?;
    for m in bob.inbox().await? {
        bob.remove_from_inbox(&m.envelope_id).await?;
    }
    bob.send(&mut OsRng, &alice.address(), b"hi", now()).await?;
    alice.receive(&mut OsRng, now()).await?;
    let stranger = device(&from(4)?, 7).await?;
    let stranger_address = stranger.address();

    let seconds = options.seconds;
    let honest = Arc::new(Mutex::new(Honest::default()));
    let spent = Arc::new(Spent::default());
    let attacking = Arc::new(AtomicBool::new(true));
    let receiving = Arc::new(AtomicBool::new(true));

    // Bob: long polls; records each message's latency.
    let bob_task = {
        let honest = honest.clone();
        let receiving = receiving.clone();
        tokio::spawn(async move {
            while receiving.load(Ordering::Relaxed) {
                if let Err(e) = bob.receive_waiting(&mut OsRng, now(), 5_000).await {
                    {
                        let mut h = honest.lock().unwrap_or_else(|e| e.into_inner());
                        h.receive_errors += 1;
                        *h.error_kinds.entry(format!("receive: {e:?}")).or_default() += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let Ok(inbox) = bob.inbox().await else {
                    continue;
                };
                for m in inbox {
                    let at = now_ms();
                    {
                        let mut h = honest.lock().unwrap_or_else(|e| e.into_inner());
                        if m.from == stranger_address {
                            if let Some(sent) = h.stranger_sent_at {
                                h.stranger.get_or_insert(at.saturating_sub(sent));
                            }
                        } else if m.body.len() == 16 {
                            let n = u64::from_be_bytes(m.body[..8].try_into().unwrap_or_default());
                            let sent =
                                u64::from_be_bytes(m.body[8..].try_into().unwrap_or_default());
                            h.received.entry(n).or_insert(at.saturating_sub(sent));
                        }
                    }
                    let _ = bob.remove_from_inbox(&m.envelope_id).await;
                }
            }
        })
    };
    // Alice: one message every 200 ms while the attack lasts; she also
    // receives (receipts) every second.
    let alice_task = {
        let honest = honest.clone();
        let attacking = attacking.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while attacking.load(Ordering::Relaxed) {
                let sent = now_ms();
                let mut body = n.to_be_bytes().to_vec();
                body.extend_from_slice(&sent.to_be_bytes());
                let r = alice.send(&mut OsRng, &bob_address, &body, now()).await;
                {
                    let mut h = honest.lock().unwrap_or_else(|e| e.into_inner());
                    h.sent.insert(n, sent);
                    h.send_ms.push(now_ms().saturating_sub(sent));
                    if let Err(e) = &r {
                        h.send_errors += 1;
                        *h.error_kinds.entry(format!("send: {e:?}")).or_default() += 1;
                    }
                }
                if n % 10 == 9 {
                    let _ = alice.receive(&mut OsRng, now()).await;
                    let _ = alice.flush_outbox().await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Re-send what is left in the outbox (the client's own retry).
            for _ in 0..5 {
                let _ = alice.flush_outbox().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // The stranger's first message, half-way through.
    let stranger_waiting = Arc::new(AtomicBool::new(true));
    let stranger_task = {
        let honest = honest.clone();
        let stranger_waiting = stranger_waiting.clone();
        let mut stranger = stranger;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(seconds * 500)).await;
            honest
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stranger_sent_at = Some(now_ms());
            if let Err(e) = stranger
                .send(&mut OsRng, &bob_address, b"hello, we have not met", now())
                .await
            {
                honest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stranger_error = Some(e.to_string());
            }
            // What was not deposited (a full strangers' share) is re-sent,
            // as an application's client does, until Bob has it.
            while stranger_waiting.load(Ordering::Relaxed) {
                let arrived = honest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stranger
                    .is_some();
                if arrived {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                let _ = stranger.flush_outbox().await;
            }
        })
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let attack = attack(
        name,
        options.addresses,
        &url,
        relay.addr,
        &bob_address,
        deadline,
        spent.clone(),
    );
    attack.await;
    attacking.store(false, Ordering::Relaxed);
    let attack_wall = started.elapsed();
    let _ = alice_task.await;
    // Drain: Bob keeps receiving a little after the attack.
    tokio::time::sleep(Duration::from_secs(options.drain)).await;
    stranger_waiting.store(false, Ordering::Relaxed);
    let _ = stranger_task.await;
    receiving.store(false, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), bob_task).await;
    relay.stop().await;

    let h = honest.lock().unwrap_or_else(|e| e.into_inner());
    let mut latencies: Vec<u64> = h.received.values().copied().collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> String {
        if latencies.is_empty() {
            return "-".into();
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        format!("{} ms", latencies[i])
    };
    let delivered = h.sent.keys().filter(|n| h.received.contains_key(n)).count();
    let mut send_ms = h.send_ms.clone();
    send_ms.sort_unstable();
    let send_p99 = send_ms
        .get((send_ms.len() * 99).div_ceil(100).saturating_sub(1))
        .map_or("-".to_owned(), |ms| format!("{ms} ms"));
    let answers = spent.answers.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = format!(
        "\n== {name}: {:.1} s, attacker: {} addresses, {} requests, {} connections",
        attack_wall.as_secs_f64(),
        if name == "none" { 0 } else { options.addresses },
        spent.requests.load(Ordering::Relaxed),
        spent.connections.load(Ordering::Relaxed),
    );
    if !answers.is_empty() {
        let list: Vec<String> = answers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push_str(&format!("\n   answers: {}", list.join(", ")));
    }
    let still_open = spent.still_open.load(Ordering::Relaxed);
    if still_open > 0 {
        let held = *spent
            .relay_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        out.push_str(&format!(
            "\n   slow connections the attacker still wrote to at the end: {still_open}; open at the relay (its gauge): {}",
            held.map_or("-".to_owned(), |n| n.to_string())
        ));
    }
    let stamp_ms = spent.stamp_ms.load(Ordering::Relaxed);
    if stamp_ms > 0 {
        let stored = spent.stored_bytes.load(Ordering::Relaxed);
        out.push_str(&format!(
            "\n   attacker's minting core: {:.1} CPU-s for {} deposit stamps and {} identity stamps; {} payload bytes stored ({})",
            stamp_ms as f64 / 1000.0,
            spent.stamps.load(Ordering::Relaxed),
            spent.identity_stamps.load(Ordering::Relaxed),
            stored,
            if stored == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{:.1} CPU-s per MiB",
                    stamp_ms as f64 / 1000.0 / (stored as f64 / 1_048_576.0)
                )
            },
        ));
    }
    for note in spent.notes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        out.push_str(&format!("\n   {note}"));
    }
    out.push_str(&format!(
        "\n   honest: {delivered}/{} delivered ({:.1} %), latency p50 {} p99 {} max {}, send call p99 {send_p99}, {} send errors, {} receive errors",
        h.sent.len(),
        if h.sent.is_empty() { 0.0 } else { delivered as f64 * 100.0 / h.sent.len() as f64 },
        pct(0.5),
        pct(0.99),
        pct(1.0),
        h.send_errors,
        h.receive_errors,
    ));
    for (kind, n) in &h.error_kinds {
        out.push_str(&format!("\n   honest error {kind}: {n}"));
    }
    out.push_str(&match (h.stranger, &h.stranger_error) {
        (Some(ms), _) => format!("\n   stranger's first message: arrived after {ms} ms"),
        (None, Some(e)) => format!("\n   stranger's first message: send failed: {e}"),
        (None, None) => "\n   stranger's first message: not arrived".to_owned(),
    });
    let problems = check(name, &h, &spent);
    Ok((out, problems))
}

/// The properties of a defended attack that do not depend on timing (no
/// latency is asserted: the machine's load decides those): nothing the
/// honest pair did failed, no one-time prekey was lost to `HEAD`, the
/// drain left Bob's pool not empty, the attacker's slow connections were
/// capped.
fn check(name: &str, h: &Honest, spent: &Spent) -> Vec<String> {
    let mut problems = Vec::new();
    if h.send_errors > 0 || h.receive_errors > 0 {
        problems.push(format!(
            "honest errors: {} sends, {} receives",
            h.send_errors, h.receive_errors
        ));
    }
    if h.stranger_error.is_some() {
        problems.push("the stranger could not send its first message".into());
    }
    let (before, after) = *spent.prekeys.lock().unwrap_or_else(|e| e.into_inner());
    if matches!(name, "mailbox_fill" | "tiny_flood" | "identity_flood") && h.stranger.is_none() {
        problems.push("the stranger's first message did not arrive".into());
    }
    if matches!(name, "mailbox_fill" | "tiny_flood" | "identity_flood") {
        let delivered = h.sent.keys().filter(|n| h.received.contains_key(n)).count();
        if delivered < h.sent.len() {
            problems.push(format!(
                "honest delivery {delivered}/{} during the attack",
                h.sent.len()
            ));
        }
    }
    match name {
        // The stranger's first message claims one, legitimately.
        "head_claims"
            if before
                .zip(after)
                .is_none_or(|(b, a)| b.saturating_sub(a) > 1) =>
        {
            problems.push(format!(
                "HEAD took one-time prekeys: {before:?} -> {after:?}"
            ));
        }
        "prekey_drain" if after.is_none_or(|n| n == 0) => {
            problems.push(format!("the pool was drained: {before:?} -> {after:?}"));
        }
        "slow_connections" => {
            // The default caps: 64 per address, 8,192 in all; the honest
            // devices add a few.
            let held = *spent
                .relay_connections
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let cap = 64 * 64 + 16;
            if held.is_none_or(|n| n > cap) {
                problems.push(format!("the relay held {held:?} connections, over {cap}"));
            }
        }
        _ => {}
    }
    problems
}

/// Runs one attack until `deadline`.
async fn attack(
    name: &str,
    addresses: u8,
    url: &str,
    relay: SocketAddr,
    bob: &DeviceAddress,
    deadline: Instant,
    spent: Arc<Spent>,
) {
    let mailbox = hex::encode(bob.mailbox().0);
    let identity = hex::encode(bob.identity);
    let bundle = format!("{url}/v1/directory/{identity}/{}/bundle", bob.device_id);
    let count = format!(
        "{url}/v1/directory/{identity}/{}/one-time-prekeys",
        bob.device_id
    );
    let before = one_time_prekeys(&count).await;
    let minter = Minter::start(spent.clone(), deadline);
    let bob_mailbox = bob.mailbox();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..addresses {
        let ip = attacker_ip(k);
        let Ok(client) = http_client(ip) else {
            spent.note(format!("could not bind {ip}"));
            continue;
        };
        let spent = spent.clone();
        let (url, mailbox, bundle) = (url.to_owned(), mailbox.clone(), bundle.clone());
        let kind = name.to_owned();
        let minter = minter.clone();
        tasks.spawn(async move {
            let name = kind;
            match name.as_str() {
                "mailbox_fill" => {
                    // Paying strangers: each 64 KiB envelope with a stamp
                    // from the one minting core.
                    let to = format!("{url}/v1/mailboxes/{mailbox}/envelopes");
                    while Instant::now() < deadline {
                        let envelope = junk_envelope(64 * 1024);
                        let job = MintJob::Deposit(bob_mailbox, envelope.id, 64 * 1024);
                        let Some(stamp) = minter.mint(job).await else {
                            break;
                        };
                        let r = client
                            .post(&to)
                            .header("content-type", OCTETS)
                            .header("cubbyhole-stamp", hex::encode(stamp.encode()))
                            .body(encode_envelope(&envelope))
                            .send()
                            .await;
                        let answer = classify(r).await;
                        if answer.starts_with("201") {
                            spent.stored_bytes.fetch_add(64 * 1024, Ordering::Relaxed);
                        }
                        spent.answer(answer);
                    }
                }
                "tiny_flood" => {
                    // Strangers who do not pay: tiny envelopes as fast as
                    // the relay answers, without a key or a stamp.
                    let to = format!("{url}/v1/mailboxes/{mailbox}/envelopes");
                    while Instant::now() < deadline {
                        let r = client
                            .post(&to)
                            .header("content-type", OCTETS)
                            .body(junk(1))
                            .send()
                            .await;
                        spent.answer(classify(r).await);
                    }
                }
                "identity_flood" => {
                    while Instant::now() < deadline {
                        let Some((upload, own, key)) = identity_upload(&minter).await else {
                            break;
                        };
                        let r = client
                            .post(format!("{url}/v1/directory"))
                            .header("content-type", OCTETS)
                            .body(upload)
                            .send()
                            .await;
                        let answer = classify(r).await;
                        let ok = answer.starts_with("204");
                        spent.answer(format!("publish {answer}"));
                        if !ok {
                            continue;
                        }
                        let to = format!("{url}/v1/mailboxes/{own}/envelopes");
                        for _ in 0..16 {
                            if Instant::now() >= deadline {
                                break;
                            }
                            // Into its own mailbox, with its own access key.
                            let r = client
                                .post(&to)
                                .header("content-type", OCTETS)
                                .header("cubbyhole-access", hex::encode(key.as_bytes()))
                                .body(junk(64 * 1024))
                                .send()
                                .await;
                            let answer = classify(r).await;
                            if answer.starts_with("201") {
                                spent.stored_bytes.fetch_add(64 * 1024, Ordering::Relaxed);
                            }
                            spent.answer(format!("deposit {answer}"));
                        }
                    }
                }
                "prekey_drain" => {
                    while Instant::now() < deadline {
                        let r = client.get(&bundle).send().await;
                        spent.answer(classify(r).await);
                    }
                }
                "head_claims" => {
                    while Instant::now() < deadline {
                        let r = client.head(&bundle).send().await;
                        spent.answer(classify(r).await);
                    }
                }
                "challenge_flood" => {
                    let to = format!("{url}/v1/mailboxes/{mailbox}/challenge");
                    while Instant::now() < deadline {
                        let r = client.post(&to).send().await;
                        spent.answer(classify(r).await);
                    }
                }
                "slow_connections" => {
                    slow_connections(ip, relay, deadline, &spent).await;
                }
                _ => {}
            }
        });
        if name == "none" {
            break;
        }
    }
    if name == "none" {
        tokio::time::sleep_until(deadline.into()).await;
    }
    if name == "slow_connections" {
        // Just before the attackers let go: what the relay holds.
        tokio::time::sleep_until((deadline - Duration::from_millis(300)).into()).await;
        *spent
            .relay_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = relay_connections(url).await;
    }
    while tasks.join_next().await.is_some() {}
    if matches!(name, "prekey_drain" | "head_claims") {
        let after = one_time_prekeys(&count).await;
        *spent.prekeys.lock().unwrap_or_else(|e| e.into_inner()) = (before, after);
        spent.note(format!(
            "Bob's one-time prekeys on the relay: {before:?} before, {after:?} after"
        ));
    }
}

/// Opens connections from `ip` (up to 500) and sends each a request line
/// and then one header byte a second, never finishing (slowloris).
async fn slow_connections(ip: IpAddr, relay: SocketAddr, deadline: Instant, spent: &Spent) {
    let mut open = Vec::new();
    while Instant::now() < deadline {
        if open.len() < 500 {
            let Ok(socket) = TcpSocket::new_v4() else {
                break;
            };
            if socket.bind(SocketAddr::new(ip, 0)).is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(2), socket.connect(relay)).await {
                Ok(Ok(mut stream)) => {
                    spent.connections.fetch_add(1, Ordering::Relaxed);
                    let start =
                        b"POST /v1/directory HTTP/1.1\r\nhost: relay\r\ncontent-length: 100000\r\n";
                    if stream.write_all(start).await.is_ok() {
                        open.push(stream);
                    }
                }
                _ => {
                    spent.answer("connect failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        }
        // Keep them alive: one byte each.
        let mut alive = Vec::with_capacity(open.len());
        for mut s in open.drain(..) {
            if s.write_all(b"x").await.is_ok() {
                alive.push(s);
            }
        }
        open = alive;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    spent
        .still_open
        .fetch_add(open.len() as u64, Ordering::Relaxed);
}

fn junk_envelope(size: usize) -> Envelope {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    let mut payload = vec![0u8; size];
    OsRng.fill_bytes(&mut payload);
    Envelope {
        id: EnvelopeId(id),
        payload,
    }
}

fn junk(size: usize) -> Vec<u8> {
    encode_envelope(&junk_envelope(size))
}

/// A new identity with 1,000 one-time prekeys, an access key for its own
/// mailbox and the identity stamp from the minting core: the upload, its
/// mailbox (hex) and its key.
async fn identity_upload(minter: &Minter) -> Option<(Vec<u8>, String, AccessKey)> {
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let signed = SignedPrekey::generate(&mut OsRng, &keys, 1, now()).ok()?;
    let one_time: Vec<OneTimePrekey> = (0..1000)
        .map(|i| OneTimePrekey::generate(&mut OsRng, i))
        .collect();
    let refs: Vec<&OneTimePrekey> = one_time.iter().collect();
    let address = DeviceAddress::new(keys.public(), 1);
    let key = AccessKey::generate(&mut OsRng);
    let mut upload = BundleSetUpload::new(1, &keys, now(), &signed, &refs, true);
    upload.access_verifier = Some(key.verifier(&address.mailbox()));
    upload.identity_stamp = Some(minter.mint(MintJob::Identity(address)).await?);
    let mailbox = hex::encode(address.mailbox().0);
    Some((upload.sign(&keys), mailbox, key))
}

async fn one_time_prekeys(url: &str) -> Option<u64> {
    let r = reqwest::get(url).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
    v.get("count")?.as_u64()
}

/// The relay's `cubbyhole_relay_connections` gauge.
async fn relay_connections(url: &str) -> Option<u64> {
    let client = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)))
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("cubbyhole_relay_connections "))
        .and_then(|n| n.trim().parse().ok())
}
