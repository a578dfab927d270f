//! What an operator relies on: JSON logs with a request id and without
//! secrets (the real binary, its standard output captured), the latency
//! histograms and process metrics of `/metrics`, the lock that keeps a
//! second relay off a SQLite database, and the after-restore step on
//! SQLite (PostgreSQL: `tests/postgres_restore.rs`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::relay::{Relay, RelayConfig, SqliteRelayStorage};
use cubbyhole::storage::MemoryStore;
use cubbyhole::transport::stamp::Stamp;
use cubbyhole::transport::{
    encode_envelope, AccessKey, BundleSetUpload, DepositPass, DeviceAddress, Envelope, EnvelopeId,
    Mailbox, MailboxAuth, MailboxId, MailboxOp, PrekeyDirectory, TransportError,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, PrekeyBundle, PrekeyStore};
use cubbyhole_http::HttpRelay;
use cubbyhole_relay::restore::after_restore;
use cubbyhole_relay::{serve, ServerConfig, ServerError, StorageConfig};

const BIN: &str = env!("CARGO_BIN_EXE_cubbyhole-relay");

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "cubbyhole-ops-{name}-{}-{nanos}",
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

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        request.push_str("Content-Type: application/octet-stream\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("read");
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = std::str::from_utf8(&bytes[..head_end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers.iter().any(|(k, _)| k == "transfer-encoding"),
        "this helper reads sized bodies only"
    );
    Answer {
        status,
        headers,
        body: bytes[head_end + 4..].to_vec(),
    }
}

struct Device {
    identity: IdentityKeyPair,
    store: PrekeyStore,
    device_id: u32,
    /// Its mailbox's deposit access key (registered by every upload).
    access: AccessKey,
}

impl Device {
    fn new(device_id: u32, one_time: u32) -> Device {
        let identity = IdentityKeyPair::generate(&mut OsRng);
        let mut store =
            PrekeyStore::new(&mut OsRng, &identity, 1_700_000_000).expect("time in unix seconds");
        store.generate_one_time_prekeys(&mut OsRng, one_time);
        Device {
            identity,
            store,
            device_id,
            access: AccessKey::generate(&mut OsRng),
        }
    }

    /// An upload of the current pool, replacing the relay's, registering
    /// its access key, with an identity stamp of difficulty
    /// [`STAMP_DIFFICULTY`] at the system's time.
    fn upload(&self, counter: u64) -> Vec<u8> {
        let one_time: Vec<&OneTimePrekey> = self.store.one_time_prekeys().collect();
        let mut upload = BundleSetUpload::new(
            self.device_id,
            &self.identity,
            counter,
            self.store.current_signed_prekey(),
            &one_time,
            true,
        );
        upload.access_verifier = Some(self.access.verifier(&self.address().mailbox()));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        upload.identity_stamp =
            Stamp::mint_identity(&self.address(), STAMP_DIFFICULTY, now, 0, u64::MAX)
                .unwrap()
                .ok();
        upload.sign(&self.identity)
    }

    fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.identity.public(), self.device_id)
    }
}

/// A relay process, killed on drop; its standard output and error lines
/// arrive on `lines`, as the bytes written (not necessarily UTF-8).
struct RelayProcess {
    child: Child,
    lines: mpsc::Receiver<Vec<u8>>,
    seen: Vec<Vec<u8>>,
}

/// The stamp difficulties of the relays these tests start (low: the
/// tests mint in microseconds; the stamp paths still run).
const STAMP_DIFFICULTY: u8 = 8;

impl RelayProcess {
    fn spawn(args: &[&str]) -> RelayProcess {
        let difficulty = STAMP_DIFFICULTY.to_string();
        let mut child = Command::new(BIN)
            .args(args)
            .args([
                "--identity-stamp-difficulty",
                &difficulty,
                "--deposit-stamp-difficulty",
                &difficulty,
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the relay");
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        RelayProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 60 s) for a line containing `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(bytes) => {
                    let line = String::from_utf8_lossy(&bytes).into_owned();
                    self.seen.push(bytes);
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?}; got:\n{}",
                    String::from_utf8_lossy(&self.seen.join(&b'\n'))
                ),
            }
        }
    }

    /// The address it listens on, from its `relay listening` line.
    fn addr(&mut self) -> SocketAddr {
        let line = self.wait_for("relay listening");
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
            return json["addr"].as_str().expect("addr field").parse().unwrap();
        }
        let start = line.find("addr=").expect("addr= in the line") + 5;
        line[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Kills it and returns every line it wrote, as written.
    fn kill_raw(mut self) -> Vec<Vec<u8>> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut lines = std::mem::take(&mut self.seen);
        // Until both pipes are closed (the process is dead: no more lines).
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(60)) {
            lines.push(line);
        }
        lines
    }

    /// Kills it and returns every line it wrote.
    fn kill(self) -> Vec<String> {
        self.kill_raw()
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

#[test]
fn json_logs_carry_the_request_id_and_never_the_secrets() {
    logs_never_carry_the_secrets("json");
}

#[test]
fn text_logs_never_carry_the_secrets() {
    logs_never_carry_the_secrets("text");
}

/// The real binary at its most verbose (`--log trace`) in `format`: raw
/// requests (whose request ids the JSON lines must carry), then a full
/// exchange between two clients. No key, payload, owner proof, challenge,
/// deposit body or plaintext that crossed the wire may be in its output,
/// in any of the [`forms`] a log line could give it.
fn logs_never_carry_the_secrets(format: &str) {
    let mut relay = RelayProcess::spawn(&[
        "--memory",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        format,
        "--log",
        "trace",
        // The test polls /metrics while a fetch parks.
        "--requests-per-minute",
        "0",
    ]);
    let addr = relay.addr();
    let device = Device::new(1, 3);
    let identity_hex = hex::encode(device.address().identity);
    let mailbox_hex = hex::encode(device.address().mailbox().0);

    let upload = device.upload(10);
    let published = call(addr, "POST", "/v1/directory", &[], &upload);
    assert_eq!(published.status, 204);
    let generated = published
        .header("x-request-id")
        .expect("an id on every answer")
        .to_owned();
    assert!(
        generated.len() == 32 && generated.bytes().all(|b| b.is_ascii_hexdigit()),
        "{generated}"
    );

    let bundle_path = format!("/v1/directory/{identity_hex}/1/bundle");
    let bundle = call(addr, "GET", &bundle_path, &[], b"");
    assert_eq!(bundle.status, 200);

    let payload: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    let envelope = Envelope {
        id: EnvelopeId([0x5c; 16]),
        payload: payload.clone(),
    };
    let deposited = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{mailbox_hex}/envelopes"),
        &[
            ("x-request-id", "client-chosen-42"),
            ("cubbyhole-access", &hex::encode(device.access.as_bytes())),
        ],
        &encode_envelope(&envelope),
    );
    assert_eq!(deposited.status, 201);
    assert_eq!(deposited.header("x-request-id"), Some("client-chosen-42"));

    // Ids that are too long or could forge log content are replaced.
    for bad in ["a".repeat(65), "two words".to_owned(), "q\"uote".to_owned()] {
        let answer = call(addr, "GET", "/v1/health", &[("x-request-id", &bad)], b"");
        let id = answer.header("x-request-id").unwrap();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 32);
    }

    let challenge = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{mailbox_hex}/challenge"),
        &[],
        b"",
    );
    assert_eq!(challenge.status, 200);
    let proof = MailboxAuth::sign(
        &device.identity,
        1,
        MailboxOp::Fetch,
        challenge.body.as_slice().try_into().unwrap(),
    )
    .encode();
    let fetched = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{mailbox_hex}/fetch"),
        &[("x-request-id", "fetch-7")],
        &proof,
    );
    assert_eq!(fetched.status, 200);
    assert!(
        fetched.body.windows(payload.len()).any(|w| w == payload),
        "the fetch returns the envelope"
    );
    let fetch_id = fetched.header("x-request-id").unwrap().to_owned();

    let mut secrets: Secrets = vec![
        ("the payload".into(), payload.clone()),
        ("the deposit body".into(), encode_envelope(&envelope)),
        (
            "the identity key".into(),
            device.address().identity.to_vec(),
        ),
        (
            "the mailbox id".into(),
            device.address().mailbox().0.to_vec(),
        ),
        ("the mailbox proof".into(), proof.clone()),
        ("the challenge".into(), challenge.body.clone()),
        ("the upload".into(), upload.clone()),
        ("the access key".into(), device.access.as_bytes().to_vec()),
        (
            "the signed prekey".into(),
            device.store.current_signed_prekey().public().to_vec(),
        ),
    ];
    for key in device.store.one_time_prekeys() {
        secrets.push(("a one-time prekey".into(), key.public().to_vec()));
    }
    full_exchange(addr, &mut secrets);

    let raw = relay.kill_raw();
    assert_no_secrets(&raw, &secrets);
    if format != "json" {
        return;
    }
    let lines: Vec<String> = raw
        .iter()
        .map(|l| String::from_utf8(l.clone()).expect("UTF-8 JSON lines"))
        .collect();
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let access = |id: &str| -> Vec<&serde_json::Value> {
        entries
            .iter()
            .filter(|e| e["span"]["request_id"] == id)
            .collect()
    };
    for (id, route, status) in [
        (generated.as_str(), "publish", 204),
        ("client-chosen-42", "deposit", 201),
        (fetch_id.as_str(), "fetch", 200),
    ] {
        let lines = access(id);
        let line = lines
            .iter()
            .find(|e| e["target"] == "cubbyhole_relay::access")
            .unwrap_or_else(|| panic!("no access line for {id}: {lines:?}"));
        assert_eq!(line["route"], route);
        assert_eq!(line["status"], status);
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
    }
    assert_eq!(fetch_id, "fetch-7");
}

/// Base64 of `bytes` (written here, from RFC 4648, not taken from the code
/// under test): the standard or the URL-safe alphabet, padded or not.
fn base64(bytes: &[u8], url_safe: bool, padded: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if padded {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// The log test's base64 is right: RFC 4648's test vectors, and the
/// URL-safe alphabet.
#[test]
fn base64_matches_rfc_4648() {
    for (input, output) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes(), false, true), output);
        assert_eq!(
            base64(input.as_bytes(), true, false),
            output.trim_end_matches('=')
        );
    }
    assert_eq!(base64(&[0xfb, 0xff], false, true), "+/8=");
    assert_eq!(base64(&[0xfb, 0xff], true, true), "-_8=");
}

/// The forms a byte string could take in a log line: raw, hex (lower and
/// upper case), base64 (standard and URL-safe, padded and not) and a Debug
/// list of numbers, of the whole value; and, so that a part of it (any 15
/// bytes or more) or the value inside a larger logged blob is caught too,
/// the same of 12-byte windows starting every 4 bytes (for base64, the
/// complete groups of each of the three alignments a window can have in a
/// larger blob).
fn forms(value: &[u8]) -> Vec<(String, Vec<u8>)> {
    let decimal = |b: &[u8]| b.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
    let mut out = vec![
        ("raw".to_owned(), value.to_vec()),
        ("hex".to_owned(), hex::encode(value).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(value).into_bytes()),
        ("Debug list".to_owned(), decimal(value).into_bytes()),
    ];
    for (name, url, pad) in [
        ("base64", false, true),
        ("base64 unpadded", false, false),
        ("base64url", true, true),
        ("base64url unpadded", true, false),
    ] {
        out.push((name.to_owned(), base64(value, url, pad).into_bytes()));
    }
    const W: usize = 12;
    if value.len() > W {
        let starts = (0..=value.len() - W).step_by(4).chain([value.len() - W]);
        for start in starts {
            let window = &value[start..start + W];
            let at = format!("of bytes {start}..{}", start + W);
            out.push((format!("raw {at}"), window.to_vec()));
            out.push((format!("hex {at}"), hex::encode(window).into_bytes()));
            out.push((format!("HEX {at}"), hex::encode_upper(window).into_bytes()));
            out.push((format!("Debug list {at}"), decimal(window).into_bytes()));
            for skip in 0..3 {
                let groups = &window[skip..skip + (W - skip) / 3 * 3];
                for url in [false, true] {
                    out.push((
                        format!("base64 (url-safe: {url}) {at}, aligned +{skip}"),
                        base64(groups, url, false).into_bytes(),
                    ));
                }
            }
        }
    }
    out
}

/// Fails if any form of any secret is in the output `lines`.
fn assert_no_secrets(lines: &[Vec<u8>], secrets: &Secrets) {
    assert!(secrets.len() > 20, "{} secrets", secrets.len());
    assert!(!lines.is_empty());
    // Every needle is at least 12 bytes long: only those whose first 8
    // bytes occur somewhere are searched for in full.
    let grams: std::collections::HashSet<&[u8]> =
        lines.iter().flat_map(|line| line.windows(8)).collect();
    for (what, value) in secrets {
        for (form, needle) in forms(value) {
            assert!(
                needle.len() >= 12,
                "{what} ({form}) is too short to look for"
            );
            if !grams.contains(&needle[..8]) {
                continue;
            }
            if let Some(line) = lines
                .iter()
                .find(|l| l.windows(needle.len()).any(|w| w == needle.as_slice()))
            {
                panic!(
                    "the logs contain {what} ({form}):\n{}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
}

/// A transport that passes every call to the relay and keeps every secret
/// that crosses the wire: envelope payloads and deposit bodies, challenges,
/// owner proofs and their signatures (the challenge answers), uploads and
/// bundles.
#[derive(Clone)]
struct Recorder {
    relay: HttpRelay,
    seen: Arc<Mutex<Secrets>>,
}

/// Byte strings that must not be logged, each with what it is.
type Secrets = Vec<(String, Vec<u8>)>;

impl Recorder {
    fn keep(&self, what: &str, bytes: &[u8]) {
        self.seen
            .lock()
            .unwrap()
            .push((what.to_owned(), bytes.to_vec()));
    }

    fn keep_auth(&self, auth: &MailboxAuth) {
        self.keep("an owner proof", &auth.encode());
        self.keep("a challenge answer (signature)", &auth.signature);
    }

    fn keep_envelopes(&self, envelopes: &[Envelope]) {
        for envelope in envelopes {
            self.keep("a fetched payload", &envelope.payload);
        }
    }
}

impl PrekeyDirectory for Recorder {
    async fn publish(&self, upload: &[u8]) -> Result<(), TransportError> {
        self.keep("an upload", upload);
        self.relay.publish(upload).await
    }

    async fn fetch_bundle(&self, device: &DeviceAddress) -> Result<Vec<u8>, TransportError> {
        let bundle = self.relay.fetch_bundle(device).await?;
        self.keep("a bundle", &bundle);
        Ok(bundle)
    }

    async fn one_time_prekeys_left(&self, device: &DeviceAddress) -> Result<u32, TransportError> {
        self.relay.one_time_prekeys_left(device).await
    }
}

impl Mailbox for Recorder {
    async fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> Result<(), TransportError> {
        self.keep("an envelope payload", &envelope.payload);
        self.keep("a deposit body", &encode_envelope(envelope));
        self.relay.deposit(to, envelope, pass).await
    }

    async fn challenge(&self, mailbox: &MailboxId) -> Result<[u8; 32], TransportError> {
        let challenge = self.relay.challenge(mailbox).await?;
        self.keep("a challenge", &challenge);
        Ok(challenge)
    }

    async fn fetch(&self, auth: &MailboxAuth, limit: u32) -> Result<Vec<Envelope>, TransportError> {
        self.keep_auth(auth);
        let envelopes = self.relay.fetch(auth, limit).await?;
        self.keep_envelopes(&envelopes);
        Ok(envelopes)
    }

    async fn fetch_waiting(
        &self,
        auth: &MailboxAuth,
        limit: u32,
        wait_ms: u32,
    ) -> Result<Vec<Envelope>, TransportError> {
        self.keep_auth(auth);
        let envelopes = self.relay.fetch_waiting(auth, limit, wait_ms).await?;
        self.keep_envelopes(&envelopes);
        Ok(envelopes)
    }

    async fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> Result<(), TransportError> {
        self.keep_auth(auth);
        self.relay.acknowledge(auth, ids).await
    }
}

/// The `cubbyhole_relay_long_polls` gauge reads at least `n` (polled; the
/// 60 s guard only turns a hang into a failure).
fn until_parked(addr: SocketAddr, n: u64) {
    let guard = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = call(addr, "GET", "/metrics", &[], b"");
        let text = String::from_utf8(metrics.body).unwrap();
        assert_eq!(metrics.status, 200, "{text}");
        let parked: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("cubbyhole_relay_long_polls "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the long_polls gauge");
        if parked >= n {
            return;
        }
        assert!(Instant::now() < guard, "no fetch parked");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Alice and Bob, clients over HTTP through [`Recorder`]s, publish, send
/// each other messages (one into Bob's parked long poll), receive,
/// acknowledge and answer each other's receipts. Adds to `secrets` what
/// crossed the wire, the plaintexts, and the devices' public keys and
/// mailbox ids.
fn full_exchange(addr: SocketAddr, secrets: &mut Secrets) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        relay: HttpRelay::new(&format!("http://{addr}")).unwrap(),
        seen: Arc::clone(&seen),
    };
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let plaintext = |n: usize| {
        let mut random = [0u8; 20];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut random);
        format!("secret message {n}: {}", hex::encode(random)).into_bytes()
    };
    let mut sent = Vec::new();
    let mut keys = Vec::new();
    let devices = runtime.block_on(async {
        let mut devices = Vec::new();
        for _ in 0..2 {
            let device = Client::open(
                MemoryStore::new(),
                recorder.clone(),
                recorder.clone(),
                ClientConfig::default(),
                &mut OsRng,
            )
            .await
            .unwrap();
            devices.push(device);
        }
        let (mut bob, mut alice) = (devices.pop().unwrap(), devices.pop().unwrap());
        assert!(alice.maintain_prekeys(&mut OsRng, now()).await.unwrap());
        assert!(bob.maintain_prekeys(&mut OsRng, now()).await.unwrap());
        let (a, b) = (alice.address(), bob.address());
        for round in 0..3 {
            let to_bob = plaintext(2 * round);
            assert!(
                alice
                    .send(&mut OsRng, &b, &to_bob, now())
                    .await
                    .unwrap()
                    .deposited
            );
            assert_eq!(bob.receive(&mut OsRng, now()).await.unwrap().received, 1);
            let to_alice = plaintext(2 * round + 1);
            assert!(
                bob.send(&mut OsRng, &a, &to_alice, now())
                    .await
                    .unwrap()
                    .deposited
            );
            assert_eq!(alice.receive(&mut OsRng, now()).await.unwrap().received, 1);
            sent.extend([to_bob, to_alice]);
        }
        // Receipts (answered after each receive) are taken first, so that
        // Bob's mailbox is empty and his next fetch parks.
        for _ in 0..2 {
            alice.receive(&mut OsRng, now()).await.unwrap();
            bob.receive(&mut OsRng, now()).await.unwrap();
        }
        // Into a parked long poll.
        let waiting = tokio::spawn(async move {
            let report = bob
                .receive_waiting(&mut OsRng, now(), 60_000)
                .await
                .unwrap();
            (bob, report)
        });
        tokio::task::spawn_blocking(move || until_parked(addr, 1))
            .await
            .unwrap();
        let last = plaintext(6);
        assert!(
            alice
                .send(&mut OsRng, &b, &last, now())
                .await
                .unwrap()
                .deposited
        );
        let (mut bob, report) = waiting.await.unwrap();
        assert_eq!(report.received, 1);
        sent.push(last);
        // Receipts and anything left.
        alice.receive(&mut OsRng, now()).await.unwrap();
        bob.receive(&mut OsRng, now()).await.unwrap();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for device in [&alice, &bob] {
            got.extend(device.inbox().await.unwrap().into_iter().map(|m| m.body));
        }
        got.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(got, want, "every message arrived");
        // Their access keys crossed the wire in deposit headers.
        for device in [&alice, &bob] {
            let key = device.access_key().await.unwrap().expect("an access key");
            keys.push(key.key.as_bytes().to_vec());
        }
        [a, b]
    });
    for key in keys {
        secrets.push(("a client's access key".into(), key));
    }
    for device in devices {
        secrets.push(("a client's identity key".into(), device.identity.to_vec()));
        secrets.push(("a client's mailbox id".into(), device.mailbox().0.to_vec()));
    }
    for text in sent {
        secrets.push(("a message plaintext".into(), text));
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        [
            "a deposit body",
            "an owner proof",
            "a challenge answer (signature)",
            "a fetched payload"
        ]
        .iter()
        .all(|what| seen.iter().any(|(w, _)| w == what)),
        "the exchange crossed the wire"
    );
    secrets.extend(seen);
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// The samples of one histogram series (`labels` as rendered): the
/// `(le, cumulative count)` buckets, the count and the sum.
fn histogram(text: &str, labels: &str) -> (Vec<(f64, u64)>, u64, f64) {
    let name = "cubbyhole_relay_request_duration_seconds";
    let mut buckets = Vec::new();
    let (mut count, mut sum) = (None, None);
    for line in text.lines() {
        let (series, value) = line.rsplit_once(' ').unwrap();
        if let Some(rest) = series.strip_prefix(&format!("{name}_bucket{{{labels},le=\"")) {
            let le = rest.strip_suffix("\"}").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            buckets.push((le, value.parse().unwrap()));
        } else if series == format!("{name}_count{{{labels}}}") {
            count = Some(value.parse().unwrap());
        } else if series == format!("{name}_sum{{{labels}}}") {
            sum = Some(value.parse().unwrap());
        }
    }
    (
        buckets,
        count.unwrap_or_else(|| panic!("no series {labels}")),
        sum.unwrap(),
    )
}

fn check_consistent(buckets: &[(f64, u64)], count: u64) {
    assert!(buckets.len() > 5, "{buckets:?}");
    for pair in buckets.windows(2) {
        assert!(pair[0].0 < pair[1].0, "bounds increase: {buckets:?}");
        assert!(pair[0].1 <= pair[1].1, "counts are cumulative: {buckets:?}");
    }
    let last = buckets.last().unwrap();
    assert!(last.0.is_infinite());
    assert_eq!(last.1, count, "+Inf is the count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_latency_histograms_and_process_metrics() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, ServerConfig::unpriced(), async {
        let _ = stopped.await;
    }));
    let text = tokio::task::spawn_blocking(move || {
        for _ in 0..7 {
            assert_eq!(call(addr, "GET", "/v1/health", &[], b"").status, 200);
        }
        for path in ["/nope", "/v1/directory/secret-looking-path", "/x/y/z"] {
            assert_eq!(call(addr, "GET", path, &[], b"").status, 404);
        }
        assert_eq!(call(addr, "DELETE", "/v1/health", &[], b"").status, 405);
        assert_eq!(call(addr, "GET", "/metrics", &[], b"").status, 200);
        let answer = call(addr, "GET", "/metrics", &[], b"");
        assert_eq!(answer.status, 200);
        String::from_utf8(answer.body).unwrap()
    })
    .await
    .unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();

    let (buckets, count, sum) = histogram(&text, "route=\"health\",method=\"GET\",status=\"2xx\"");
    assert_eq!(count, 7);
    assert!(sum > 0.0);
    check_consistent(&buckets, count);
    let (buckets, count, _) = histogram(&text, "route=\"no_route\",method=\"GET\",status=\"4xx\"");
    assert_eq!(count, 3, "unknown paths share the no_route series");
    check_consistent(&buckets, count);
    let (_, count, _) = histogram(&text, "route=\"health\",method=\"DELETE\",status=\"4xx\"");
    assert_eq!(count, 1);
    // The scrape being answered is not counted yet; the one before is.
    let (_, count, _) = histogram(&text, "route=\"metrics\",method=\"GET\",status=\"2xx\"");
    assert_eq!(count, 1);
    assert!(!text.contains("secret-looking-path") && !text.contains("/nope"));
    assert!(text.contains("# TYPE cubbyhole_relay_request_duration_seconds histogram\n"));

    if cfg!(target_os = "linux") {
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_cpu_seconds_total") >= 0.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
    }
}

// ---------------------------------------------------------------------------
// The database lock
// ---------------------------------------------------------------------------

#[test]
fn a_second_relay_on_the_same_database_is_refused() {
    let dir = TempDir::new("lock");
    let db = dir.0.join("relay.db");
    let db_arg = db.to_str().unwrap();
    let mut first = RelayProcess::spawn(&["--db", db_arg, "--listen", "127.0.0.1:0"]);
    let addr = first.addr();

    let second = Command::new(BIN)
        .args(["--db", db_arg, "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run a second relay");
    assert!(!second.status.success(), "the second relay must fail");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(db_arg) && stderr.contains("in use by another relay"),
        "{stderr}"
    );

    // after-restore refuses too while a relay serves the file.
    let restore = Command::new(BIN)
        .args(["after-restore", "--db", db_arg])
        .output()
        .unwrap();
    assert!(!restore.status.success());
    assert!(String::from_utf8_lossy(&restore.stderr).contains("in use"));

    // The first one still serves.
    assert_eq!(call(addr, "GET", "/v1/health", &[], b"").status, 200);
    // A kill releases the lock: the next relay starts.
    first.kill();
    let mut third = RelayProcess::spawn(&["--db", db_arg, "--listen", "127.0.0.1:0"]);
    let addr = third.addr();
    assert_eq!(call(addr, "GET", "/v1/health", &[], b"").status, 200);
    third.kill();
    assert!(cubbyhole_relay::server::lock_path(&db).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_database_it_already_serves() {
    let dir = TempDir::new("lock-lib");
    let db = dir.0.join("relay.db");
    let config = ServerConfig {
        storage: StorageConfig::Sqlite(db.clone()),
        ..ServerConfig::unpriced()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, config.clone(), async {
        let _ = stopped.await;
    }));
    let healthy = tokio::task::spawn_blocking(move || {
        // Wait until the first server serves (it has the lock then).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(addr).is_ok() {
                return call(addr, "GET", "/v1/health", &[], b"").status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        0
    })
    .await
    .unwrap();
    assert_eq!(healthy, 200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = serve(listener, config.clone(), async {})
        .await
        .expect_err("the database is held");
    match &error {
        ServerError::DatabaseInUse { database, .. } => assert_eq!(database, &db),
        other => panic!("{other:?}"),
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    // Released when the server stopped.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(listener, config, async {}).await.unwrap();
}

// ---------------------------------------------------------------------------
// After a restore
// ---------------------------------------------------------------------------

const NOW: u64 = 1_800_000_000;
const MARGIN: u64 = 3_600;

fn relay_on(path: &Path) -> Relay<SqliteRelayStorage> {
    Relay::new(
        SqliteRelayStorage::open(path).unwrap(),
        RelayConfig::unpriced(),
    )
}

/// The documented online backup: `VACUUM INTO` on a second connection
/// while the relay's is open.
fn backup(db: &Path, to: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute("VACUUM INTO ?1", [to.to_str().unwrap()])
        .unwrap();
}

/// Restores `backup` over `db` (the relay stopped).
fn restore(backup: &Path, db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
    std::fs::copy(backup, db).unwrap();
}

fn has_one_time_prekey(bundle: &[u8]) -> bool {
    PrekeyBundle::decode(bundle)
        .expect("a bundle")
        .one_time_prekey()
        .is_some()
}

#[test]
fn after_restore_forgets_claimed_prekeys_and_refuses_replayed_uploads() {
    let dir = TempDir::new("restore");
    let db = dir.0.join("relay.db");
    let saved = dir.0.join("backup.db");
    let device = Device::new(1, 3);
    let address = device.address();
    // A device with a counter at or above 2^63 keeps it.
    let high = Device::new(2, 0);

    let mut relay = relay_on(&db);
    relay.publish(NOW - 1000, &device.upload(100)).unwrap();
    relay
        .publish(NOW - 1000, &high.upload(u64::MAX - 5))
        .unwrap();
    let challenge = relay
        .challenge(NOW - 900, &mut OsRng, &address.mailbox())
        .unwrap();
    let proof = MailboxAuth::sign(&device.identity, 1, MailboxOp::Fetch, challenge);
    backup(&db, &saved);
    // After the backup: a prekey is claimed, the owner uses its challenge
    // (someone may keep the proof), and an upload (which someone may keep
    // too) raises the counter.
    assert!(has_one_time_prekey(
        &relay.fetch_bundle(NOW, &address).unwrap()
    ));
    relay.fetch(NOW - 800, &proof, 10).unwrap();
    let later = device.upload(NOW - 500);
    relay.publish(NOW - 500, &later).unwrap();
    drop(relay);

    // Control: restored without the step, the claimed prekey is back and
    // the later upload is accepted again.
    let unsafe_copy = dir.0.join("unsafe.db");
    restore(&saved, &unsafe_copy);
    let mut relay = relay_on(&unsafe_copy);
    assert_eq!(relay.one_time_prekeys_left(&address).unwrap(), 3);
    relay.fetch(NOW - 800, &proof, 10).unwrap();
    relay.publish(NOW, &later).unwrap();
    drop(relay);

    restore(&saved, &db);
    let report = after_restore(&StorageConfig::Sqlite(db.clone()), NOW, MARGIN).unwrap();
    assert_eq!(report.one_time_prekeys_deleted, 3);
    assert_eq!(report.devices, 2);
    assert_eq!(report.counters_raised, 1);
    assert_eq!(report.counter_floor, NOW + MARGIN);

    let mut relay = relay_on(&db);
    assert_eq!(relay.one_time_prekeys_left(&address).unwrap(), 0);
    assert!(!has_one_time_prekey(
        &relay.fetch_bundle(NOW, &address).unwrap()
    ));
    // The relay key was replaced: the used challenge's proof is refused.
    assert!(matches!(
        relay.fetch(NOW - 800, &proof, 10),
        Err(TransportError::Unauthorized)
    ));
    assert!(matches!(
        relay.publish(NOW, &later),
        Err(TransportError::Replayed)
    ));
    assert!(matches!(
        relay.publish(NOW, &device.upload(NOW + MARGIN)),
        Err(TransportError::Replayed)
    ));
    relay
        .publish(NOW, &device.upload(NOW + MARGIN + 1))
        .unwrap();
    assert_eq!(relay.one_time_prekeys_left(&address).unwrap(), 3);
    assert!(matches!(
        relay.publish(NOW, &high.upload(u64::MAX - 5)),
        Err(TransportError::Replayed)
    ));
    relay.publish(NOW, &high.upload(u64::MAX - 4)).unwrap();
    drop(relay);

    // The binary runs the same step.
    let out = Command::new(BIN)
        .args(["after-restore", "--db", db.to_str().unwrap()])
        .args(["--counter-margin-secs", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("deleted 3 one-time prekeys"), "{said}");

    assert!(matches!(
        after_restore(&StorageConfig::SqliteMemory, NOW, MARGIN),
        Err(ServerError::Config(_))
    ));
    assert!(after_restore(
        &StorageConfig::Sqlite(dir.0.join("missing.db")),
        NOW,
        MARGIN
    )
    .is_err());
    assert!(!dir.0.join("missing.db").exists());
}

// ---------------------------------------------------------------------------
// The README's options
// ---------------------------------------------------------------------------

/// The `CUBBYHOLE_RELAY_*` names and `--flags` in `text`.
fn option_names(
    text: &str,
) -> (
    std::collections::BTreeSet<String>,
    std::collections::BTreeSet<String>,
) {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut vars = std::collections::BTreeSet::new();
    let mut flags = std::collections::BTreeSet::new();
    for token in text.split(|c: char| !word(c)) {
        if let Some(rest) = token.strip_prefix("CUBBYHOLE_RELAY_") {
            if !rest.is_empty() {
                vars.insert(token.to_owned());
            }
        } else if token.starts_with("--") && token.len() > 2 {
            flags.insert(token.to_owned());
        }
    }
    (vars, flags)
}

#[test]
fn the_readme_lists_every_option_of_help() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (help_vars, help_flags) = option_names(&help);
    let (readme_vars, readme_flags) = option_names(&readme);
    assert!(
        help_vars.contains("CUBBYHOLE_RELAY_LOG_FORMAT"),
        "{help_vars:?}"
    );
    assert_eq!(
        help_vars, readme_vars,
        "environment variables: --help vs README"
    );
    let missing: Vec<_> = help_flags.difference(&readme_flags).collect();
    assert!(
        missing.is_empty(),
        "flags of --help missing from the README: {missing:?}"
    );
}
