//! What the relay receives and stores, byte for byte, over HTTP (issue 17:
//! "no byte sequence of either identity key, ratchet key or counter appears
//! in anything the relay stores or receives (payloads, paths, queries,
//! headers)"; SPEC.md 26.11 to 26.13).
//!
//! The real server (SQLite in a file) behind a recording TCP proxy; two
//! real clients (`Client` over [`HttpRelay`], profile v2 by default) play a
//! conversation through it. The proxy keeps every byte a client sends;
//! the test parses them into HTTP/1.1 requests and searches each whole
//! request (request line with path and query, every header, the body) for
//! the secrets, each as raw bytes, lowercase and uppercase hex, and
//! standard and URL-safe base64 with and without padding:
//!
//! - both identity keys;
//! - every ratchet public key either side used, and every initiator
//!   ephemeral key (read from both sides' stored sessions after every
//!   step, never from what the relay saw);
//! - every 40-byte plaintext header (ratchet key || pn || n), and in the
//!   deposits every non-zero pn || n.
//!
//! Then the relay's SQLite files (database and WAL, while it runs, after a
//! checkpoint, after it stops) are searched the same way, and its envelope
//! rows one by one. `tests/privacy.rs` records the same at the API level.
//!
//! The same conversation with `sealed: false` (profile v1) shows that the
//! detectors find identity keys in deposits and ratchet keys in deposit
//! bodies and in the stored envelopes, i.e. that the checks can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::storage::{MemoryStore, Store};
use cubbyhole::transport::{DeviceAddress, MailboxId};
use cubbyhole::OneTimePrekey;
use cubbyhole_http::HttpRelay;
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Device = Client<MemoryStore, HttpRelay, HttpRelay>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// The server, its files, the proxy

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

/// The real relay server on a loopback port over a SQLite file.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(db: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            storage: StorageConfig::Sqlite(db.to_owned()),
            // Rate limits off: both clients come from one address.
            limits: Limits {
                deposits_per_minute: 0,
                requests_per_minute: 0,
                ..Limits::default()
            },
            ..ServerConfig::unpriced()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, config, async move {
                let _ = stopped.await;
            })
            .await
            .expect("the server failed");
        });
        Server {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server gracefully and waits for it.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What one party's connections sent: per connection, every byte from the
/// client to the server, in order.
type Recording = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP proxy on a loopback port in front of `server`, recording the
/// client-to-server bytes of every connection.
async fn recording_proxy(server: SocketAddr) -> (String, Recording) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let recording = Recording::default();
    let log = recording.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let index = {
                let mut log = log.lock().unwrap();
                log.push(Vec::new());
                log.len() - 1
            };
            let log = log.clone();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(server).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut up_read, mut up_write) = upstream.into_split();
                let upward = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                log.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                                if up_write.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = up_write.shutdown().await;
                };
                let downward = async move {
                    let _ = tokio::io::copy(&mut up_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(upward, downward);
            });
        }
    });
    (url, recording)
}

// ---------------------------------------------------------------------------
// Requests

/// One HTTP/1.1 request as the relay received it.
struct Request {
    /// 0 for Alice, 1 for Bob.
    party: usize,
    method: String,
    /// The request target: path and query.
    target: String,
    /// The whole request: request line, headers, body.
    raw: Vec<u8>,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits one connection's bytes into requests (keep-alive: several per
/// connection; bodies by `Content-Length`). Chunked bodies and leftovers
/// fail the test: they would hide bytes from the parse.
fn parse_requests(party: usize, mut bytes: &[u8], out: &mut Vec<Request>) {
    while !bytes.is_empty() {
        let head_end = find(bytes, b"\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "an incomplete request head: {:?}",
                String::from_utf8_lossy(bytes)
            )
        });
        let head = std::str::from_utf8(&bytes[..head_end]).expect("a UTF-8 head");
        let mut lines = head.split("\r\n");
        let mut line = lines.next().unwrap().split(' ');
        let method = line.next().unwrap().to_owned();
        let target = line.next().expect("a request target").to_owned();
        assert_eq!(line.next(), Some("HTTP/1.1"), "{head}");
        let mut length = 0;
        for header in lines {
            let (name, value) = header.split_once(':').expect("a header");
            let name = name.trim().to_ascii_lowercase();
            assert_ne!(name, "transfer-encoding", "a chunked body: {head}");
            if name == "content-length" {
                length = value.trim().parse().unwrap();
            }
        }
        let end = head_end + 4 + length;
        assert!(end <= bytes.len(), "a truncated body: {head}");
        out.push(Request {
            party,
            method,
            target,
            raw: bytes[..end].to_vec(),
            body: bytes[head_end + 4..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
}

/// What a request is, by method and path (relay/API.md); for a mailbox
/// route, whether the mailbox is the caller's published one (else its
/// private inbox, or the peer's inbox for a deposit).
fn kind(request: &Request, published: &[MailboxId; 2]) -> String {
    let path = request.target.split('?').next().unwrap();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let which = |mailbox: &str| {
        if published.iter().any(|m| hex::encode(m.0) == mailbox) {
            "published mailbox"
        } else {
            "inbox"
        }
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "directory"]) => "publish".into(),
        ("GET", ["v1", "directory", _, _, "bundle"]) => "bundle".into(),
        ("GET", ["v1", "directory", _, _, "one-time-prekeys"]) => "one-time prekeys".into(),
        ("POST", ["v1", "mailboxes", m, "envelopes"]) => format!("deposit ({})", which(m)),
        ("POST", ["v1", "mailboxes", m, op @ ("challenge" | "fetch" | "acknowledge")]) => {
            format!("{op} ({})", which(m))
        }
        _ => format!("other: {} {}", request.method, request.target),
    }
}

fn is_deposit(kind: &str) -> bool {
    kind.starts_with("deposit")
}

// ---------------------------------------------------------------------------
// Secrets and their encodings

fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(alphabet[(n >> (18 - 6 * i)) as usize & 63]);
            } else if pad {
                out.push(b'=');
            }
        }
    }
    out
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A secret as raw bytes, lowercase and uppercase hex, and standard and
/// URL-safe base64 with and without padding.
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        base64(secret, STANDARD, true),
        base64(secret, STANDARD, false),
        base64(secret, URL_SAFE, true),
        base64(secret, URL_SAFE, false),
    ]
}

/// Whether `hay` shows `secret` in any of its encodings.
fn shows(hay: &[u8], secret: &[u8]) -> bool {
    encodings(secret)
        .iter()
        .any(|needle| find(hay, needle).is_some())
}

/// What the two parties' own sessions say they used, read from their
/// stored states (SPEC.md 10 and 26.9), never from what the relay saw
/// (the parse of `tests/privacy.rs`).
#[derive(Default)]
struct Secrets {
    /// (sender's ratchet public key, pn) -> messages sent in that chain
    /// (the largest `ns` sampled).
    chains: BTreeMap<([u8; 32], u32), u32>,
    /// Every ratchet public key either side held, and every initiator
    /// ephemeral key (EK_A).
    keys: BTreeSet<[u8; 32]>,
    /// The peer's ratchet keys each side knows
    /// ([`cubbyhole::Session::receiving_ratchet_keys`]): a cross-check of
    /// `keys`, plus the responder's signed prekey, the initiator's first
    /// remote ratchet key (X3DH), which is public: the directory serves it.
    peer_keys: BTreeSet<[u8; 32]>,
}

impl Secrets {
    async fn sample(&mut self, device: &Device, peer: &DeviceAddress) {
        let Some(record) = device.store().session(peer).await.unwrap() else {
            return;
        };
        for entry in record.entries() {
            self.read_state(&entry.session.to_bytes());
            // The peer's keys, as this side knows them.
            self.peer_keys
                .extend(entry.session.receiving_ratchet_keys().copied());
        }
    }

    /// Reads the fields of a state encoding (version 2 or 3) up to `pn`.
    fn read_state(&mut self, s: &[u8]) {
        let sealed = match s[0] {
            2 => false,
            3 => true,
            v => panic!("state version {v}"),
        };
        let flags = s[1];
        let bit = |i: u8| flags & (1 << i) != 0;
        let mut at = 2;
        if bit(3) {
            self.keys.insert(s[at..at + 32].try_into().unwrap());
            at += 36 + if bit(4) { 4 } else { 0 };
        }
        if bit(0) {
            at += 16;
        }
        at += 32; // root key
        let mut ours = None;
        if bit(5) {
            let secret: [u8; 32] = s[at..at + 32].try_into().unwrap();
            // The X25519 public key of the ratchet secret.
            ours = Some(*OneTimePrekey::from_secret(0, secret).public());
            at += 32;
        }
        at += 32; // remote ratchet key
        if bit(1) {
            at += if sealed { 64 } else { 32 };
        }
        let ns = u32::from_be_bytes(s[at..at + 4].try_into().unwrap());
        let pn = u32::from_be_bytes(s[at + 4..at + 8].try_into().unwrap());
        if let Some(key) = ours {
            self.keys.insert(key);
            if bit(1) {
                let sent = self.chains.entry((key, pn)).or_default();
                *sent = (*sent).max(ns);
            }
        }
    }

    /// The 40-byte plaintext header of every message sent.
    fn headers(&self) -> BTreeSet<[u8; 40]> {
        let mut out = BTreeSet::new();
        for ((key, pn), &sent) in &self.chains {
            for n in 0..sent {
                let mut header = [0u8; 40];
                header[..32].copy_from_slice(key);
                header[32..36].copy_from_slice(&pn.to_be_bytes());
                header[36..].copy_from_slice(&n.to_be_bytes());
                out.insert(header);
            }
        }
        out
    }

    /// Every non-zero pn || n of a message sent.
    fn counters(&self) -> BTreeSet<[u8; 8]> {
        self.headers()
            .iter()
            .map(|h| h[32..].try_into().unwrap())
            .filter(|c| c != &[0u8; 8])
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The conversation

/// The relay's files as raw bytes: (name, bytes) for the database, its WAL
/// and its shared-memory index, whichever exist.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            std::fs::read(entry.path()).unwrap(),
        ));
    }
    out.sort();
    out
}

/// One stored envelope row: its id, payload and mailbox id.
struct Row {
    bytes: Vec<u8>,
    pending: bool,
}

struct Conversation {
    requests: Vec<Request>,
    identities: [[u8; 32]; 2],
    published: [MailboxId; 2],
    secrets: Secrets,
    /// Both sides' signed prekeys (public: in the directory).
    signed_prekeys: BTreeSet<[u8; 32]>,
    /// Snapshots of the relay's files: (moment, file, bytes).
    stored: Vec<(&'static str, String, Vec<u8>)>,
    /// The `envelopes` table, after the conversation.
    rows: Vec<Row>,
}

const MESSAGES: usize = 20;

async fn conversation(sealed: bool) -> Conversation {
    let dir = TempDir::new("wire-privacy");
    let db = dir.0.join("relay.db");
    let server = Server::start(&db).await;
    let mut rng = ChaCha20Rng::seed_from_u64(17);
    let mut parties = Vec::new();
    let mut recordings = Vec::new();
    for _ in 0..2 {
        let (url, recording) = recording_proxy(server.addr).await;
        let relay = HttpRelay::new(&url).unwrap();
        let config = ClientConfig {
            sealed,
            ..ClientConfig::default()
        };
        let mut device = Client::open(MemoryStore::new(), relay.clone(), relay, config, &mut rng)
            .await
            .unwrap();
        assert!(device.maintain_prekeys(&mut rng, now()).await.unwrap());
        parties.push(device);
        recordings.push(recording);
    }
    let addresses = [parties[0].address(), parties[1].address()];
    let mut secrets = Secrets::default();
    async fn sample(s: &mut Secrets, parties: &[Device], addresses: &[DeviceAddress; 2]) {
        s.sample(&parties[0], &addresses[1]).await;
        s.sample(&parties[1], &addresses[0]).await;
    }
    async fn receive(device: &mut Device, rng: &mut ChaCha20Rng) -> Vec<String> {
        let report = device.receive(rng, now()).await.unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        let mut out = Vec::new();
        for m in device.inbox().await.unwrap() {
            out.push(String::from_utf8(m.body.clone()).unwrap());
            device.remove_from_inbox(&m.envelope_id).await.unwrap();
        }
        out
    }
    let mut script = ChaCha20Rng::seed_from_u64(20);
    let mut received = Vec::new();
    let mut sent = 0;
    let mut speaker = 0;
    while sent < MESSAGES {
        // A run of one to three messages one way: several messages per
        // chain; Alice's first run is all prekey messages.
        let run = 1 + script.next_u32() % 3;
        let listener = 1 - speaker;
        for _ in 0..run {
            let body = format!("message {sent}");
            let to = addresses[listener];
            let report = parties[speaker]
                .send(&mut rng, &to, body.as_bytes(), now())
                .await
                .unwrap();
            assert!(report.deposited, "{body} was not deposited");
            sample(&mut secrets, &parties, &addresses).await;
            sent += 1;
        }
        // The recipient receives; a receipt goes back at once.
        received.extend(receive(&mut parties[listener], &mut rng).await);
        sample(&mut secrets, &parties, &addresses).await;
        // Sometimes the sender fetches its receipts before the next run.
        if script.next_u32() % 2 == 0 {
            received.extend(receive(&mut parties[speaker], &mut rng).await);
            sample(&mut secrets, &parties, &addresses).await;
        }
        speaker = listener;
    }
    for party in [0, 1] {
        received.extend(receive(&mut parties[party], &mut rng).await);
        sample(&mut secrets, &parties, &addresses).await;
    }
    received.sort_by_key(|b| b[8..].parse::<usize>().unwrap());
    let expected: Vec<String> = (0..sent).map(|i| format!("message {i}")).collect();
    assert_eq!(received, expected, "every message arrives once");
    // Two last messages stay pending at the relay (stored payloads).
    for text in ["pending 1", "pending 2"] {
        let to = addresses[1];
        let report = parties[0]
            .send(&mut rng, &to, text.as_bytes(), now())
            .await
            .unwrap();
        assert!(report.deposited);
        sample(&mut secrets, &parties, &addresses).await;
    }

    // What the relay stores: its files while it runs, after a checkpoint,
    // and after it stops; its envelope rows.
    let mut stored = Vec::new();
    for (name, bytes) in files(&dir.0) {
        stored.push(("running", name, bytes));
    }
    let sql = rusqlite::Connection::open(&db).unwrap();
    let mut rows = Vec::new();
    {
        let mut query = sql
            .prepare(
                "SELECT e.id, e.payload, e.acknowledged, m.mailbox \
                 FROM envelopes e JOIN mailboxes m ON m.mid = e.mid",
            )
            .unwrap();
        let mut result = query.query([]).unwrap();
        while let Some(row) = result.next().unwrap() {
            let id: Vec<u8> = row.get(0).unwrap();
            let payload: Vec<u8> = row.get(1).unwrap();
            let acknowledged: i64 = row.get(2).unwrap();
            let mailbox: Vec<u8> = row.get(3).unwrap();
            rows.push(Row {
                bytes: [id, payload, mailbox].concat(),
                pending: acknowledged == 0,
            });
        }
    }
    let _: (i64, i64, i64) = sql
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    drop(sql);
    for (name, bytes) in files(&dir.0) {
        stored.push(("checkpointed", name, bytes));
    }
    // The signed prekeys each side published (read from its own store).
    let mut signed_prekeys = BTreeSet::new();
    for device in &parties {
        let state = device.store().prekeys().await.unwrap().unwrap();
        signed_prekeys.extend(state.prekeys.signed_prekeys().map(|spk| *spk.public()));
    }
    drop(parties);
    server.stop().await;
    for (name, bytes) in files(&dir.0) {
        stored.push(("stopped", name, bytes));
    }

    let mut requests = Vec::new();
    for (party, recording) in recordings.iter().enumerate() {
        for connection in recording.lock().unwrap().iter() {
            parse_requests(party, connection, &mut requests);
        }
    }
    let identities = [addresses[0].identity, addresses[1].identity];
    Conversation {
        requests,
        identities,
        published: [addresses[0].mailbox(), addresses[1].mailbox()],
        secrets,
        signed_prekeys,
        stored,
        rows,
    }
}

/// The envelope ids deposited (body: `0x01 || id (16) || payload`).
fn deposited_ids(c: &Conversation) -> BTreeSet<[u8; 16]> {
    c.requests
        .iter()
        .filter(|r| is_deposit(&kind(r, &c.published)))
        .map(|r| r.body[1..17].try_into().unwrap())
        .collect()
}

/// The sampling misses no chain: one header per envelope deposited
/// (messages and receipts), each side stepped the ratchet, and every key a
/// side knows of its peer is one the peer's own states showed, or the
/// peer's signed prekey (the initiator's first remote ratchet key, which
/// the directory serves and is not searched for).
fn check_sampling(c: &Conversation) {
    assert_eq!(c.secrets.headers().len(), deposited_ids(c).len());
    assert!(c.secrets.keys.len() >= 6, "{}", c.secrets.keys.len());
    for key in &c.secrets.peer_keys {
        assert!(
            c.secrets.keys.contains(key) || c.signed_prekeys.contains(key),
            "a peer ratchet key the sampling missed"
        );
    }
    assert!(
        c.secrets.peer_keys.len() > c.secrets.keys.len() / 2,
        "{} peer keys",
        c.secrets.peer_keys.len()
    );
}

/// What the detectors find.
#[derive(Debug, Default)]
struct Findings {
    /// (request kind, caller, owner of the identity key shown), 0 = Alice.
    identity_carriers: BTreeSet<(String, usize, usize)>,
    /// Deposit requests that show an identity key.
    identity_in_deposits: usize,
    /// Requests of any kind that show a ratchet or ephemeral key.
    keys_in_requests: usize,
    /// Deposit requests that show a ratchet or ephemeral key.
    keys_in_deposits: usize,
    /// Requests that show a whole 40-byte header.
    headers_in_requests: usize,
    /// Deposit requests that show a non-zero pn || n (raw).
    counters_in_deposits: usize,
    /// Stored files (snapshot, name) that show a ratchet or ephemeral key,
    /// or a header.
    keys_in_files: BTreeSet<(&'static str, String)>,
    /// Stored files that show an identity key (the directory does).
    identity_in_files: BTreeSet<(&'static str, String)>,
    /// Envelope rows that show an identity key.
    identity_in_rows: usize,
    /// Envelope rows that show a ratchet or ephemeral key or a header.
    keys_in_rows: usize,
    /// Envelope rows still pending (with their payload).
    pending_rows: usize,
}

fn findings(c: &Conversation) -> Findings {
    let keys = &c.secrets.keys;
    let headers = c.secrets.headers();
    let counters = c.secrets.counters();
    let mut f = Findings::default();
    for r in &c.requests {
        let kind = kind(r, &c.published);
        let deposit = is_deposit(&kind);
        for (owner, identity) in c.identities.iter().enumerate() {
            if shows(&r.raw, identity) {
                f.identity_carriers.insert((kind.clone(), r.party, owner));
            }
        }
        if deposit && c.identities.iter().any(|i| shows(&r.raw, i)) {
            f.identity_in_deposits += 1;
        }
        if keys.iter().any(|k| shows(&r.raw, k)) {
            f.keys_in_requests += 1;
            f.keys_in_deposits += usize::from(deposit);
        }
        if headers.iter().any(|h| shows(&r.raw, h)) {
            f.headers_in_requests += 1;
        }
        if deposit && counters.iter().any(|n| find(&r.raw, n).is_some()) {
            f.counters_in_deposits += 1;
        }
    }
    for (moment, name, bytes) in &c.stored {
        if keys.iter().any(|k| shows(bytes, k)) || headers.iter().any(|h| shows(bytes, h)) {
            f.keys_in_files.insert((moment, name.clone()));
        }
        if c.identities.iter().any(|i| shows(bytes, i)) {
            f.identity_in_files.insert((moment, name.clone()));
        }
    }
    for row in &c.rows {
        f.pending_rows += usize::from(row.pending);
        f.identity_in_rows += usize::from(c.identities.iter().any(|i| shows(&row.bytes, i)));
        f.keys_in_rows += usize::from(
            keys.iter().any(|k| shows(&row.bytes, k))
                || headers.iter().any(|h| shows(&row.bytes, h)),
        );
    }
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_receives_and_stores_no_identity_ratchet_key_or_counter() {
    let c = conversation(true).await;
    check_sampling(&c);

    // The traffic, for the report.
    let mut per_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &c.requests {
        let entry = per_kind.entry(kind(r, &c.published)).or_default();
        entry.0 += 1;
        entry.1 += r.raw.len();
    }
    let total: usize = c.requests.iter().map(|r| r.raw.len()).sum();
    println!(
        "v2: {} requests, {total} bytes client to relay; {} keys, {} headers searched",
        c.requests.len(),
        c.secrets.keys.len(),
        c.secrets.headers().len()
    );
    for (kind, (n, bytes)) in &per_kind {
        println!("  {kind}: {n} requests, {bytes} bytes");
    }
    let f = findings(&c);
    println!("v2 findings: {f:?}");

    // (a) No deposit (path, query, headers, body) names either party.
    assert_eq!(f.identity_in_deposits, 0, "{f:?}");
    // (b) The only requests that carry an identity key, each the caller's
    // own or the one it starts a session with:
    // - `POST /v1/directory`: the device's own upload (its inbox's upload
    //   names only the inbox identity);
    // - `GET /v1/directory/{identity}/{device}/bundle`: Alice asks for
    //   Bob's bundle, by his identity, to start the session;
    // - `POST /v1/mailboxes/{mailbox}/fetch` and `.../acknowledge` for the
    //   device's own published mailbox: the proof names its owner (Bob
    //   acknowledges Alice's sealed prekey messages there; nothing arrives
    //   in Alice's, so she only fetches it).
    // Never a challenge (the path has the mailbox id), a deposit, or any
    // request for an inbox (its proofs name the inbox identity).
    let expected: BTreeSet<(String, usize, usize)> = [
        ("publish", 0, 0),
        ("publish", 1, 1),
        ("bundle", 0, 1),
        ("fetch (published mailbox)", 0, 0),
        ("fetch (published mailbox)", 1, 1),
        ("acknowledge (published mailbox)", 1, 1),
    ]
    .into_iter()
    .map(|(k, p, o)| (k.to_owned(), p, o))
    .collect();
    assert_eq!(f.identity_carriers, expected);
    // (c) No ratchet key or EK_A in any request; no header; no counter.
    assert_eq!(f.keys_in_requests, 0, "{f:?}");
    assert_eq!(f.headers_in_requests, 0, "{f:?}");
    assert_eq!(f.counters_in_deposits, 0, "{f:?}");
    // Chain messages (and receipts) went to the inboxes.
    assert!(per_kind.contains_key("deposit (inbox)"), "{per_kind:?}");

    // (d) Nothing the relay stores shows a ratchet key or a header, in
    // any file at any moment; its envelope rows name neither party.
    assert!(f.keys_in_files.is_empty(), "{f:?}");
    assert_eq!(f.identity_in_rows, 0, "{f:?}");
    assert_eq!(f.keys_in_rows, 0, "{f:?}");
    assert!(f.pending_rows >= 2, "{f:?}");
    // The directory does store both identity keys: the file scan sees
    // them (so it would see the others).
    assert!(
        f.identity_in_files
            .iter()
            .any(|(moment, name)| *moment == "stopped" && name == "relay.db"),
        "{f:?}"
    );
}

/// The same conversation under profile v1: the detectors find what v1
/// shows, so the checks above can fail.
#[tokio::test(flavor = "multi_thread")]
async fn the_detectors_find_what_profile_v1_shows() {
    let c = conversation(false).await;
    check_sampling(&c);
    let f = findings(&c);
    println!("v1 findings: {f:?}");
    // Alice's prekey messages carry IK_A: her identity in a deposit.
    assert!(f.identity_in_deposits > 0, "{f:?}");
    assert!(
        f.identity_carriers
            .iter()
            .any(|(kind, party, owner)| is_deposit(kind) && *party == 0 && *owner == 0),
        "{f:?}"
    );
    // Every message's header is in clear in its deposit body.
    assert!(f.keys_in_deposits > 0, "{f:?}");
    assert_eq!(f.headers_in_requests, deposited_ids(&c).len(), "{f:?}");
    assert!(f.counters_in_deposits > 0, "{f:?}");
    // And the relay stores them: the pending rows show ratchet keys.
    assert!(f.keys_in_rows > 0, "{f:?}");
    assert!(!f.keys_in_files.is_empty(), "{f:?}");
}
