//! Crash test of the relay server: the real `cubbyhole-relay` binary is
//! killed with SIGKILL over and over while depositors and a mailbox owner
//! load it, and restarted on the same storage (a SQLite file; PostgreSQL
//! when `CUBBYHOLE_TEST_POSTGRES` is set and the `postgres` feature is on)
//! and the same port.
//!
//! Depositors send envelopes with unique ids to a few published mailboxes
//! and record every answer: `201`/`200` is *accepted*; no answer (the
//! connection broke, the server was gone) is *unknown*. After each restart
//! they retry their unknown deposits with the same id (all but one in
//! [`ABANDON_ONE_IN`], abandoned until the end), probe an accepted one (a
//! repeat must answer `200`), and go on with new ones. Meanwhile the owners
//! fetch and acknowledge, so kills also land between a fetch and its
//! acknowledgement.
//!
//! "Delivered" at the relay level: the relay serves an envelope until its
//! owner acknowledges it (by design: an unacknowledged envelope, say one
//! whose fetch answer was lost, is served again). So an envelope is
//! delivered when the owner fetched it and an acknowledgement of it was
//! answered `204`, and it is duplicated when it is served again after that.
//! The test checks, at the end:
//!
//! - every accepted deposit is delivered, and none is duplicated (exactly
//!   once);
//! - no envelope at all is served after its acknowledgement, nothing is
//!   served that was never deposited, and payloads and mailboxes match;
//! - a deposit whose answer was lost and that was never retried is
//!   delivered at most once; retried with the same id at the very end, it
//!   answers `200` if it had landed (and was delivered) and `201` if not
//!   (and is then delivered once);
//! - a kill between a fetch and its acknowledgement leaves the envelopes
//!   pending: the same ones are served again after the restart;
//! - after everything, depositing every accepted id again answers `200`
//!   and stores nothing: acknowledged ids survive the kills.
//!
//! The figures are printed (run with `--nocapture` to see them).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::transport::{
    encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth,
    MailboxId, MailboxOp, PrekeyDirectory, TransportError,
};
use cubbyhole::{IdentityKeyPair, OsRng, PrekeyStore};
use cubbyhole_http::{HttpRelay, HttpRelayConfig};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tokio::sync::watch;

/// The server binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_cubbyhole-relay");
/// SIGKILLs of the server under load (one more lands between a fetch and
/// its acknowledgement at the end).
const KILLS: usize = 60;
/// How long the server runs between its start and its kill, in ms (drawn
/// uniformly).
const UP_MS: (u64, u64) = (50, 300);
/// Concurrent depositors, each with one deposit in flight.
const DEPOSITORS: u8 = 6;
/// Published mailboxes the envelopes go to.
const MAILBOXES: u8 = 3;
/// One in this many deposits whose answer was lost is not retried until
/// the end (checked "at most once"); the others are retried after the
/// restart.
const ABANDON_ONE_IN: u32 = 4;
/// Envelopes per fetch of the owners during the load.
const FETCH_LIMIT: u32 = 40;
/// The longest a (re)start may take to answer `/v1/health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The first byte of every envelope id of this test.
const ID_MARK: u8 = 0xC5;
/// The depositor number of the deposits made by the checks at the end.
const CHECKER: u8 = 0xFF;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn uniform(rng: &mut ChaCha20Rng, (low, high): (u64, u64)) -> u64 {
    low + rng.next_u64() % (high - low + 1)
}

// ---------------------------------------------------------------------------
// The server process

/// A free loopback port for the server (bound, read and released: the
/// server binds it next, again at every restart). It is taken below the
/// ephemeral port range where possible: while the server is down, no
/// outgoing connection may take the port as its own (a health probe could
/// even connect to itself), or the restart could not bind it.
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

/// The relay binary on a fixed port and storage, (re)started and killed at
/// will. Its output goes to a log file, shown when a start fails.
struct RelayProcess {
    addr: SocketAddr,
    storage: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

impl RelayProcess {
    /// Starts the server and waits until it is healthy.
    async fn start(storage: Vec<String>, log: PathBuf) -> RelayProcess {
        let mut relay = RelayProcess {
            addr: free_addr(),
            storage,
            log,
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        };
        relay.restart().await;
        relay
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.storage)
            // One client address sends everything: no rate limits.
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
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Settings of the environment must not leak in (an unknown one is
        // even an error).
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CUBBYHOLE_RELAY_") {
                command.env_remove(name);
            }
        }
        self.child = Some(command.spawn().expect("cannot start cubbyhole-relay"));
    }

    /// The end of the server's log.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map_or(0, |m| m.len());
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(4000)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// Starts the server and waits until `/v1/health` answers `200`.
    async fn restart(&mut self) {
        self.spawn();
        let url = format!("{}/v1/health", self.base());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "the relay exited at start ({status}); its log ends with:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(answer) = self.http.get(&url).send().await {
                if answer.status() == reqwest::StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the relay is not healthy {START_TIMEOUT:?} after its start; its log ends \
                 with:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL, and reaps the process.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Envelopes

/// An envelope id: mark, depositor, sequence number, mailbox, random.
fn envelope_id(depositor: u8, seq: u32, mailbox: u8, rng: &mut ChaCha20Rng) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = ID_MARK;
    id[1] = depositor;
    id[2..6].copy_from_slice(&seq.to_be_bytes());
    id[6] = mailbox;
    rng.fill_bytes(&mut id[7..]);
    id
}

/// The mailbox an id was deposited to.
fn mailbox_of(id: &[u8; 16]) -> u8 {
    id[6]
}

/// The payload of an id: determined by it, 16 to 1039 bytes.
fn payload_of(id: &[u8; 16]) -> Vec<u8> {
    let len = 16 + usize::from(u16::from_be_bytes([id[14], id[15]]) % 1024);
    let mut payload = id.to_vec();
    payload.extend((0..len - 16).map(|i| id[i % 16] ^ (i as u8)));
    payload
}

/// How a deposit request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// `201`: stored now.
    Stored,
    /// `200`: that id was already there.
    Repeat,
    /// No answer, or a `5xx` (which may or may not have been applied).
    Lost,
}

/// Deposits the envelope of `id` into `mailbox`; panics on a refusal (a
/// `4xx`: none is expected).
async fn deposit(http: &reqwest::Client, base: &str, mailbox: &MailboxId, id: [u8; 16]) -> Answer {
    let envelope = Envelope {
        id: EnvelopeId(id),
        payload: payload_of(&id),
    };
    let url = format!("{base}/v1/mailboxes/{}/envelopes", hex::encode(mailbox.0));
    let sent = http
        .post(url)
        .header("content-type", "application/octet-stream")
        .body(encode_envelope(&envelope))
        .send()
        .await;
    let Ok(answer) = sent else {
        return Answer::Lost;
    };
    let status = answer.status().as_u16();
    // Read the (empty or error) body, so the connection can be reused.
    let body = answer.bytes().await;
    match status {
        201 => Answer::Stored,
        200 => Answer::Repeat,
        500..=599 => Answer::Lost,
        _ => panic!(
            "deposit refused with {status}: {}",
            body.map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        ),
    }
}

// ---------------------------------------------------------------------------
// Depositors

/// One envelope a depositor tried to deposit.
#[derive(Clone, Debug)]
struct Deposit {
    id: [u8; 16],
    /// Requests sent for it.
    attempts: u32,
    /// Requests that got no answer.
    lost: u32,
    /// The first answer, if any ([`Answer::Stored`] or [`Answer::Repeat`]).
    answer: Option<Answer>,
    /// Its answer was lost and the depositor gave up (until the end).
    abandoned: bool,
    /// When the request that got the first answer was sent.
    answered_sent: Option<Instant>,
}

impl Deposit {
    fn accepted(&self) -> bool {
        self.answer.is_some()
    }
}

/// What a depositor did.
#[derive(Default)]
struct DepositorLog {
    deposits: Vec<Deposit>,
    /// Repeats of accepted deposits, and how many got no answer.
    probes: u32,
    probes_lost: u32,
}

struct Depositor {
    number: u8,
    base: String,
    http: reqwest::Client,
    mailboxes: Arc<Vec<MailboxId>>,
    rng: ChaCha20Rng,
    log: DepositorLog,
    /// Indices of deposits with a lost answer, to retry after a restart.
    retry: Vec<usize>,
}

impl Depositor {
    /// One request for deposit `index`; true if it was answered.
    async fn attempt(&mut self, index: usize) -> bool {
        let id = self.log.deposits[index].id;
        let mailbox = self.mailboxes[usize::from(mailbox_of(&id))];
        let sent = Instant::now();
        let answer = deposit(&self.http, &self.base, &mailbox, id).await;
        let record = &mut self.log.deposits[index];
        record.attempts += 1;
        match answer {
            Answer::Lost => {
                record.lost += 1;
                false
            }
            answer => {
                if record.answer.is_none() {
                    record.answer = Some(answer);
                    record.answered_sent = Some(sent);
                } else {
                    assert_eq!(
                        answer,
                        Answer::Repeat,
                        "an accepted deposit was stored again: {}",
                        hex::encode(id)
                    );
                }
                true
            }
        }
    }

    /// Retries the deposits whose answer was lost, with their ids, until
    /// one gets no answer again (the server is gone: wait for the next
    /// restart).
    async fn retry_lost(&mut self) {
        while let Some(&index) = self.retry.first() {
            if !self.attempt(index).await {
                return;
            }
            self.retry.remove(0);
        }
    }

    /// Repeats a random accepted deposit: it must answer `200`.
    async fn probe(&mut self) {
        let accepted: Vec<usize> = (0..self.log.deposits.len())
            .filter(|&i| self.log.deposits[i].accepted())
            .collect();
        if accepted.is_empty() {
            return;
        }
        let index = accepted[self.rng.next_u32() as usize % accepted.len()];
        let id = self.log.deposits[index].id;
        let mailbox = self.mailboxes[usize::from(mailbox_of(&id))];
        self.log.probes += 1;
        match deposit(&self.http, &self.base, &mailbox, id).await {
            Answer::Repeat => {}
            Answer::Lost => self.log.probes_lost += 1,
            Answer::Stored => panic!("an accepted deposit was stored again: {}", hex::encode(id)),
        }
    }

    async fn run(
        mut self,
        mut generation: watch::Receiver<u64>,
        stop: Arc<AtomicBool>,
    ) -> DepositorLog {
        let mut seen = *generation.borrow_and_update();
        let mut seq = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let current = *generation.borrow_and_update();
            if current != seen {
                // The server was restarted: retry what got no answer, check
                // that repeating an accepted deposit stores nothing.
                seen = current;
                self.retry_lost().await;
                if self.rng.next_u32().is_multiple_of(3) {
                    self.probe().await;
                }
            }
            let mailbox = (self.rng.next_u32() % u32::from(MAILBOXES)) as u8;
            let id = envelope_id(self.number, seq, mailbox, &mut self.rng);
            seq += 1;
            self.log.deposits.push(Deposit {
                id,
                attempts: 0,
                lost: 0,
                answer: None,
                abandoned: false,
                answered_sent: None,
            });
            let index = self.log.deposits.len() - 1;
            let sent_in = *generation.borrow();
            if !self.attempt(index).await {
                if self.rng.next_u32().is_multiple_of(ABANDON_ONE_IN) {
                    self.log.deposits[index].abandoned = true;
                } else {
                    self.retry.push(index);
                }
                // Wait for the restart (unless it already happened).
                if *generation.borrow() == sent_in {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), generation.changed()).await;
                }
            }
        }
        // The server stays up now: settle the retries.
        for _ in 0..20 {
            self.retry_lost().await;
            if self.retry.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            self.retry.is_empty(),
            "depositor {}: retries still unanswered with the server up",
            self.number
        );
        self.log
    }
}

// ---------------------------------------------------------------------------
// Owners

/// A published mailbox owner.
struct Owner {
    keys: IdentityKeyPair,
    address: DeviceAddress,
}

impl Owner {
    /// A fresh device, published with a real signed upload.
    async fn publish(relay: &HttpRelay) -> Owner {
        let keys = IdentityKeyPair::generate(&mut OsRng);
        let mut prekeys = PrekeyStore::new(&mut OsRng, &keys, now()).expect("time in unix seconds");
        prekeys.generate_one_time_prekeys(&mut OsRng, 5);
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

    async fn auth(&self, relay: &HttpRelay, op: MailboxOp) -> Result<MailboxAuth, TransportError> {
        let challenge = relay.challenge(&self.address.mailbox()).await?;
        Ok(MailboxAuth::sign(&self.keys, 1, op, challenge))
    }

    async fn fetch(&self, relay: &HttpRelay, limit: u32) -> Result<Vec<Envelope>, TransportError> {
        let auth = self.auth(relay, MailboxOp::Fetch).await?;
        relay.fetch(&auth, limit).await
    }

    async fn acknowledge(
        &self,
        relay: &HttpRelay,
        ids: &[EnvelopeId],
    ) -> Result<(), TransportError> {
        let auth = self.auth(relay, MailboxOp::Acknowledge).await?;
        relay.acknowledge(&auth, ids).await
    }
}

/// The owners' transport: no retries inside, so every failure shows.
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

/// An owner-side call that may meet a killed server: only
/// [`TransportError::Unavailable`] is expected.
fn expect_unavailable(what: &str, error: &TransportError) {
    assert!(
        matches!(error, TransportError::Unavailable(_)),
        "{what} failed with {error:?}"
    );
}

/// What the owners got.
#[derive(Default)]
struct Receipts {
    /// Times each id was served.
    served: HashMap<[u8; 16], u32>,
    /// When each id was first served (its fetch answered).
    first_served: HashMap<[u8; 16], Instant>,
    /// Ids whose acknowledgement was answered `204`.
    acknowledged: HashSet<[u8; 16]>,
    /// Ids served after their acknowledgement was answered.
    served_after_ack: Vec<[u8; 16]>,
    /// Serves of an id already served before (its acknowledgement lost or
    /// never sent).
    served_again: u32,
    /// Served envelopes whose payload or mailbox is not the deposited one.
    wrong: Vec<String>,
    fetches: u32,
    fetches_lost: u32,
    acks: u32,
    acks_lost: u32,
}

impl Receipts {
    fn take(&mut self, mailbox: u8, envelopes: &[Envelope]) {
        for envelope in envelopes {
            let id = envelope.id.0;
            if mailbox_of(&id) != mailbox {
                self.wrong
                    .push(format!("{} served from mailbox {mailbox}", hex::encode(id)));
            }
            if envelope.payload != payload_of(&id) {
                self.wrong
                    .push(format!("{} served with another payload", hex::encode(id)));
            }
            if self.acknowledged.contains(&id) {
                self.served_after_ack.push(id);
            }
            self.first_served.entry(id).or_insert_with(Instant::now);
            let times = self.served.entry(id).or_insert(0);
            if *times > 0 {
                self.served_again += 1;
            }
            *times += 1;
        }
    }

    /// One fetch and the acknowledgement of what it got; how many it got.
    async fn round(
        &mut self,
        owner: &Owner,
        mailbox: u8,
        relay: &HttpRelay,
        limit: u32,
    ) -> Result<usize, TransportError> {
        self.fetches += 1;
        let envelopes = match owner.fetch(relay, limit).await {
            Ok(envelopes) => envelopes,
            Err(e) => {
                self.fetches_lost += 1;
                return Err(e);
            }
        };
        self.take(mailbox, &envelopes);
        if envelopes.is_empty() {
            return Ok(0);
        }
        let ids: Vec<EnvelopeId> = envelopes.iter().map(|e| e.id).collect();
        self.acks += 1;
        match owner.acknowledge(relay, &ids).await {
            Ok(()) => {
                self.acknowledged.extend(ids.iter().map(|id| id.0));
                Ok(ids.len())
            }
            Err(e) => {
                self.acks_lost += 1;
                Err(e)
            }
        }
    }

    /// Fetches and acknowledges every mailbox until all are empty (the
    /// server must stay up).
    async fn drain(&mut self, owners: &[Owner], relay: &HttpRelay) {
        for (mailbox, owner) in owners.iter().enumerate() {
            loop {
                let got = self
                    .round(owner, mailbox as u8, relay, 500)
                    .await
                    .expect("drain with the server up");
                if got == 0 {
                    break;
                }
            }
        }
    }
}

/// The owners' loop during the load: round after round over the mailboxes.
async fn receive_under_load(
    owners: Arc<Vec<Owner>>,
    relay: HttpRelay,
    stop: Arc<AtomicBool>,
) -> Receipts {
    let mut receipts = Receipts::default();
    let mut turn = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let mailbox = turn % owners.len();
        turn += 1;
        match receipts
            .round(&owners[mailbox], mailbox as u8, &relay, FETCH_LIMIT)
            .await
        {
            Ok(0) => tokio::time::sleep(Duration::from_millis(5)).await,
            Ok(_) => {}
            Err(e) => {
                expect_unavailable("an owner's fetch or acknowledgement", &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    receipts
}

// ---------------------------------------------------------------------------
// The test

/// The figures of one run.
#[derive(Debug, Default)]
struct Figures {
    kills: usize,
    attempted: usize,
    requests: u32,
    accepted: usize,
    /// Deposits with at least one lost answer.
    unknown: usize,
    /// Of those, retried and answered `200` (had landed) or `201` (had
    /// not).
    retried_had_landed: usize,
    retried_had_not: usize,
    /// Lost answers never retried during the load.
    abandoned: usize,
    abandoned_delivered: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    served_again: u32,
    probes: u32,
    restart_ms_max: u128,
    restart_ms_mean: u128,
}

async fn crash_test(name: &str, storage: Vec<String>, log: PathBuf) -> Figures {
    let started = Instant::now();
    let seed = OsRng.next_u64();
    println!("{name}: seed {seed}");
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server = RelayProcess::start(storage, log).await;
    let base = server.base();
    let relay = owner_relay(&base);
    let mut owners = Vec::new();
    for _ in 0..MAILBOXES {
        owners.push(Owner::publish(&relay).await);
    }
    let owners = Arc::new(owners);
    let mailboxes: Arc<Vec<MailboxId>> =
        Arc::new(owners.iter().map(|o| o.address.mailbox()).collect());

    // The load.
    let stop = Arc::new(AtomicBool::new(false));
    let (generation, generation_rx) = watch::channel(0u64);
    let depositors: Vec<_> = (0..DEPOSITORS)
        .map(|number| {
            let depositor = Depositor {
                number,
                base: base.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap(),
                mailboxes: Arc::clone(&mailboxes),
                rng: ChaCha20Rng::seed_from_u64(seed ^ (u64::from(number) << 56)),
                log: DepositorLog::default(),
                retry: Vec::new(),
            };
            tokio::spawn(depositor.run(generation_rx.clone(), Arc::clone(&stop)))
        })
        .collect();
    let receiver = tokio::spawn(receive_under_load(
        Arc::clone(&owners),
        relay.clone(),
        Arc::clone(&stop),
    ));

    // The kills.
    let mut restarts = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(uniform(&mut rng, UP_MS))).await;
        server.kill();
        let down = Instant::now();
        server.restart().await;
        restarts.push(down.elapsed());
        generation.send_modify(|g| *g += 1);
    }
    tokio::time::sleep(Duration::from_millis(uniform(&mut rng, UP_MS))).await;
    stop.store(true, Ordering::SeqCst);
    generation.send_modify(|g| *g += 1);
    let mut deposits: Vec<Deposit> = Vec::new();
    let mut probes = 0;
    for depositor in depositors {
        let log = depositor.await.expect("a depositor failed");
        deposits.extend(log.deposits);
        probes += log.probes - log.probes_lost;
    }
    let mut receipts = receiver.await.expect("the owners' loop failed");
    let mut kills = KILLS;
    let load_time = started.elapsed();

    // A kill between a fetch and its acknowledgement: the envelopes stay
    // pending and are served again after the restart.
    let checker = reqwest::Client::new();
    for seq in 0..5 {
        let id = envelope_id(CHECKER, seq, 0, &mut rng);
        let sent = Instant::now();
        assert_eq!(
            deposit(&checker, &base, &mailboxes[0], id).await,
            Answer::Stored
        );
        deposits.push(Deposit {
            id,
            attempts: 1,
            lost: 0,
            answer: Some(Answer::Stored),
            abandoned: false,
            answered_sent: Some(sent),
        });
    }
    let first = owners[0].fetch(&relay, 1000).await.unwrap();
    assert!(first.len() >= 5);
    receipts.take(0, &first);
    server.kill();
    kills += 1;
    server.restart().await;
    // Fresh connections from here on (none to the killed process).
    let relay = owner_relay(&base);
    let checker = reqwest::Client::new();
    let again = owners[0].fetch(&relay, 1000).await.unwrap();
    receipts.take(0, &again);
    let ids = |envelopes: &[Envelope]| envelopes.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        ids(&again),
        ids(&first),
        "unacknowledged envelopes must be served again, the same ones"
    );
    owners[0].acknowledge(&relay, &ids(&again)).await.unwrap();
    receipts.acknowledged.extend(again.iter().map(|e| e.id.0));
    let served_again_after_kill = again.len();

    // Everything left, and the acknowledgements whose answer was lost
    // (those that landed leave nothing to serve: acknowledge them again,
    // now with an answer).
    receipts.drain(&owners, &relay).await;
    let mut unconfirmed: Vec<Vec<EnvelopeId>> = vec![Vec::new(); usize::from(MAILBOXES)];
    for id in receipts.served.keys() {
        if !receipts.acknowledged.contains(id) {
            unconfirmed[usize::from(mailbox_of(id))].push(EnvelopeId(*id));
        }
    }
    let acks_landed_unanswered: usize = unconfirmed.iter().map(Vec::len).sum();
    for (owner, ids) in owners.iter().zip(&unconfirmed) {
        for chunk in ids.chunks(1000) {
            owner.acknowledge(&relay, chunk).await.unwrap();
            receipts.acknowledged.extend(chunk.iter().map(|id| id.0));
        }
    }

    // The checks.
    let attempted: HashSet<[u8; 16]> = deposits.iter().map(|d| d.id).collect();
    assert_eq!(attempted.len(), deposits.len(), "ids are unique");
    assert!(receipts.wrong.is_empty(), "{:?}", receipts.wrong);
    let phantoms: Vec<String> = receipts
        .served
        .keys()
        .filter(|id| !attempted.contains(*id))
        .map(hex::encode)
        .collect();
    assert!(
        phantoms.is_empty(),
        "served but never deposited: {phantoms:?}"
    );
    let delivered = |id: &[u8; 16]| receipts.served.contains_key(id);
    let lost: Vec<String> = deposits
        .iter()
        .filter(|d| d.accepted() && !delivered(&d.id))
        .map(|d| hex::encode(d.id))
        .collect();
    // Duplicated: served again after its acknowledgement, or stored again
    // (answered `201`) although it had been served before that request
    // was even sent.
    let stored_again = deposits.iter().filter(|d| {
        d.answer == Some(Answer::Stored)
            && receipts.first_served.get(&d.id).is_some_and(|served| {
                *served < d.answered_sent.expect("the answered request's time")
            })
    });
    let duplicated: BTreeSet<String> = receipts
        .served_after_ack
        .iter()
        .chain(stored_again.map(|d| &d.id))
        .map(hex::encode)
        .collect();
    let figures = Figures {
        kills,
        attempted: deposits.len(),
        requests: deposits.iter().map(|d| d.attempts).sum(),
        accepted: deposits.iter().filter(|d| d.accepted()).count(),
        unknown: deposits.iter().filter(|d| d.lost > 0).count(),
        retried_had_landed: deposits
            .iter()
            .filter(|d| d.lost > 0 && d.answer == Some(Answer::Repeat))
            .count(),
        retried_had_not: deposits
            .iter()
            .filter(|d| d.lost > 0 && d.answer == Some(Answer::Stored))
            .count(),
        abandoned: deposits.iter().filter(|d| d.abandoned).count(),
        abandoned_delivered: deposits
            .iter()
            .filter(|d| d.abandoned && delivered(&d.id))
            .count(),
        delivered: receipts.served.len(),
        lost: lost.len(),
        duplicated: duplicated.len(),
        served_again: receipts.served_again,
        probes,
        restart_ms_max: restarts.iter().max().map_or(0, Duration::as_millis),
        restart_ms_mean: restarts.iter().sum::<Duration>().as_millis() / restarts.len() as u128,
    };
    assert!(lost.is_empty(), "accepted but never delivered: {lost:?}");
    assert!(
        duplicated.is_empty(),
        "served again after their acknowledgement, or stored again after being served: \
         {duplicated:?}"
    );
    for d in &deposits {
        // After the load, every deposit has an answer but the abandoned.
        assert!(d.accepted() || d.abandoned, "{d:?}");
    }
    assert_eq!(
        receipts.acknowledged.len(),
        receipts.served.len(),
        "every delivered envelope is acknowledged"
    );

    // The abandoned deposits, retried at last with their ids: `200` if the
    // lost attempt had landed (then it was delivered), `201` if not (then
    // it is delivered now, once).
    let mut late_stored = HashSet::new();
    for d in deposits.iter_mut().filter(|d| d.abandoned) {
        let mailbox = mailboxes[usize::from(mailbox_of(&d.id))];
        let answer = deposit(&checker, &base, &mailbox, d.id).await;
        d.attempts += 1;
        match answer {
            Answer::Repeat => assert!(
                delivered(&d.id),
                "{}: landed but never delivered",
                hex::encode(d.id)
            ),
            Answer::Stored => {
                assert!(
                    !delivered(&d.id),
                    "{}: delivered, then stored again",
                    hex::encode(d.id)
                );
                late_stored.insert(d.id);
            }
            Answer::Lost => panic!("no answer with the server up"),
        }
        d.answer = Some(answer);
    }
    let before = receipts.served.clone();
    receipts.drain(&owners, &relay).await;
    let newly: HashSet<[u8; 16]> = receipts
        .served
        .iter()
        .filter(|(id, n)| before.get(*id) != Some(*n))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        newly, late_stored,
        "the late retries, and only they, are delivered now"
    );
    assert!(late_stored.iter().all(|id| receipts.served[id] == 1));
    assert!(receipts.served_after_ack.is_empty());

    // Every id again: all answer `200`, nothing is stored.
    let all: Vec<[u8; 16]> = deposits.iter().map(|d| d.id).collect();
    let repeats: Vec<_> = all
        .chunks(all.len().div_ceil(8))
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let base = base.clone();
            let mailboxes = Arc::clone(&mailboxes);
            let http = checker.clone();
            tokio::spawn(async move {
                for id in chunk {
                    let mailbox = mailboxes[usize::from(mailbox_of(&id))];
                    let answer = deposit(&http, &base, &mailbox, id).await;
                    assert_eq!(answer, Answer::Repeat, "{}", hex::encode(id));
                }
            })
        })
        .collect();
    for repeat in repeats {
        repeat.await.unwrap();
    }
    for owner in owners.iter() {
        assert_eq!(owner.fetch(&relay, 1000).await.unwrap(), Vec::new());
    }

    println!(
        "{name}: {} kills ({} under load over {:.1} s, 1 between a fetch and its \
         acknowledgement); restart to healthy: mean {} ms, max {} ms",
        figures.kills,
        KILLS,
        load_time.as_secs_f64(),
        figures.restart_ms_mean,
        figures.restart_ms_max
    );
    println!(
        "{name}: deposits attempted {} ({} requests), accepted {}, unknown (an answer lost) {}: \
         retried and found stored (200) {}, retried and stored then (201) {}, abandoned {} \
         (delivered {}, then retried: {} stored late); repeats of accepted ones answered 200: {}",
        figures.attempted,
        figures.requests,
        figures.accepted,
        figures.unknown,
        figures.retried_had_landed,
        figures.retried_had_not,
        figures.abandoned,
        figures.abandoned_delivered,
        late_stored.len(),
        figures.probes
    );
    println!(
        "{name}: delivered {}, lost {}, duplicated {}; served again before an answered \
         acknowledgement {} ({} after the kill between fetch and acknowledgement); owner fetches \
         {} ({} unanswered), acknowledgements {} ({} unanswered, {} of them had landed); total \
         {:.1} s",
        figures.delivered,
        figures.lost,
        figures.duplicated,
        figures.served_again,
        served_again_after_kill,
        receipts.fetches,
        receipts.fetches_lost,
        receipts.acks,
        receipts.acks_lost,
        acks_landed_unanswered,
        started.elapsed().as_secs_f64()
    );
    server.kill();
    figures
}

/// Runs the test on a runtime of its own (the PostgreSQL set-up uses the
/// blocking client, which must not run inside one).
fn run(name: &str, storage: Vec<String>, log: PathBuf) -> Figures {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(crash_test(name, storage, log))
}

fn assert_figures(figures: &Figures) {
    assert!(figures.kills > KILLS);
    assert!(figures.accepted > 0 && figures.delivered >= figures.accepted);
    assert_eq!((figures.lost, figures.duplicated), (0, 0));
}

#[test]
fn sqlite_relay_killed_under_load_loses_and_duplicates_nothing() {
    let dir = TempDir::new("crash-sqlite");
    let db = dir.0.join("relay.db");
    let figures = run(
        "SQLite",
        vec!["--db".into(), db.to_string_lossy().into_owned()],
        dir.0.join("relay.log"),
    );
    assert_figures(&figures);
}

#[cfg(feature = "postgres")]
#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn postgres_relay_killed_under_load_loses_and_duplicates_nothing() {
    let db = pg::TestDb::create("crash");
    let dir = TempDir::new("crash-postgres");
    let figures = run(
        "PostgreSQL",
        vec!["--postgres".into(), db.url.clone()],
        dir.0.join("relay.log"),
    );
    assert_figures(&figures);
    drop(db);
}

/// Scratch PostgreSQL databases.
#[cfg(feature = "postgres")]
#[path = "support/pg.rs"]
mod pg;

#[cfg(feature = "postgres")]
#[test]
fn postgres_tests_are_not_ignored_in_ci() {
    pg::assert_not_ignored_in_ci();
}
