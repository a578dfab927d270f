//! Starts the real server on a loopback port and talks raw HTTP/1.1 to it
//! (no client library): health, publish, bundle, deposit, challenge, fetch,
//! long poll, acknowledge, and the error answers (unknown route, wrong
//! method, oversized and malformed requests, rate limits), then a graceful
//! shutdown and a restart on the same SQLite file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use cubbyhole::transport::{
    encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxAuth, MailboxOp,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, PrekeyStore};
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON (status {}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` reason of an error answer (checking its form).
    fn reason(&self) -> String {
        assert_eq!(
            self.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        let json = self.json();
        assert!(json["message"].is_string(), "{json}");
        json["error"].as_str().expect("error field").to_owned()
    }
}

fn decode_chunked(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size_text = std::str::from_utf8(&body[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        body = &body[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Sends raw bytes, reads the answer until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&bytes)));
    let head = std::str::from_utf8(&bytes[..head_end]).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = bytes[head_end + 4..].to_vec();
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        body = decode_chunked(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Answer {
    call_with(addr, method, path, &[], body).await
}

async fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
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
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).await
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), cubbyhole_relay::ServerError>>,
}

impl Server {
    async fn start(config: ServerConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("shut down in time")
            .expect("no panic")
            .expect("clean shutdown");
    }
}

struct Device {
    identity: IdentityKeyPair,
    store: PrekeyStore,
    device_id: u32,
}

impl Device {
    fn new(device_id: u32) -> Device {
        let identity = IdentityKeyPair::generate(&mut OsRng);
        let mut store =
            PrekeyStore::new(&mut OsRng, &identity, 1_700_000_000).expect("time in unix seconds");
        store.generate_one_time_prekeys(&mut OsRng, 2);
        Device {
            identity,
            store,
            device_id,
        }
    }

    fn upload(&self, counter: u64) -> Vec<u8> {
        let one_time: Vec<&OneTimePrekey> = self.store.one_time_prekeys().collect();
        BundleSetUpload::new(
            self.device_id,
            &self.identity,
            counter,
            self.store.current_signed_prekey(),
            &one_time,
            true,
        )
        .sign(&self.identity)
    }

    fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.identity.public(), self.device_id)
    }

    fn mailbox_hex(&self) -> String {
        hex::encode(self.address().mailbox().0)
    }

    fn device_path(&self) -> String {
        format!(
            "/v1/directory/{}/{}",
            hex::encode(self.address().identity),
            self.device_id
        )
    }

    async fn proof(&self, addr: SocketAddr, op: MailboxOp) -> MailboxAuth {
        let answer = call(
            addr,
            "POST",
            &format!("/v1/mailboxes/{}/challenge", self.mailbox_hex()),
            b"",
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.headers.get("content-type").map(String::as_str),
            Some("application/octet-stream")
        );
        let challenge: [u8; 32] = answer.body.as_slice().try_into().expect("32 bytes");
        MailboxAuth::sign(&self.identity, self.device_id, op, challenge)
    }
}

fn envelope(id: u8, payload: &[u8]) -> Envelope {
    Envelope {
        id: EnvelopeId([id; 16]),
        payload: payload.to_vec(),
    }
}

/// Splits a fetch answer: `length (4) || 0x01 || id (16) || payload`, ...
fn envelopes(mut body: &[u8]) -> Vec<Envelope> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let length = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
        let encoded = &body[4..4 + length];
        out.push(cubbyhole::transport::decode_envelope(encoded).unwrap());
        body = &body[4 + length..];
    }
    out
}

/// Far longer than a wake-up takes, even on a loaded machine: a long poll
/// that answers with an envelope was woken (or found it at once); it did
/// not run out (a wait that runs out answers empty).
const LONG_WAIT_MS: u32 = 60_000;

/// The `cubbyhole_relay_long_polls` gauge of `/metrics`: fetches parked on
/// an empty mailbox, which a deposit (or a shutdown) made now must wake.
async fn parked_long_polls(addr: SocketAddr) -> u64 {
    let metrics = call(addr, "GET", "/metrics", b"").await;
    assert_eq!(metrics.status, 200);
    String::from_utf8(metrics.body)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("cubbyhole_relay_long_polls "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the long_polls gauge")
}

/// Waits until `n` fetches are parked (polling `/metrics`; the 60 s guard
/// only turns a hang into a failure).
async fn until_parked(addr: SocketAddr, n: u64) {
    let guard = std::time::Instant::now() + Duration::from_secs(60);
    while parked_long_polls(addr).await < n {
        assert!(
            std::time::Instant::now() < guard,
            "no fetch parked on the relay"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn small_limits() -> Limits {
    Limits {
        max_body_bytes: 4096,
        max_wait_ms: LONG_WAIT_MS,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_api() {
    let server = Server::start(ServerConfig {
        limits: small_limits(),
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;

    // Health.
    let health = call(addr, "GET", "/v1/health", b"").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), serde_json::json!({ "status": "ok" }));

    // Publish, then the same upload again is a replay.
    let bob = Device::new(1);
    let upload = bob.upload(1);
    assert_eq!(
        call(addr, "POST", "/v1/directory", &upload).await.status,
        204
    );
    let replay = call(addr, "POST", "/v1/directory", &upload).await;
    assert_eq!((replay.status, replay.reason().as_str()), (409, "replayed"));
    let mut forged = bob.upload(2);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let forged = call(addr, "POST", "/v1/directory", &forged).await;
    assert_eq!(
        (forged.status, forged.reason().as_str()),
        (401, "unauthorized")
    );

    // The directory.
    let count = call(
        addr,
        "GET",
        &format!("{}/one-time-prekeys", bob.device_path()),
        b"",
    )
    .await;
    assert_eq!(count.status, 200);
    assert_eq!(count.json(), serde_json::json!({ "count": 2 }));
    let bundle = call(addr, "GET", &format!("{}/bundle", bob.device_path()), b"").await;
    assert_eq!(bundle.status, 200);
    assert_eq!(bundle.body[1..33], bob.address().identity);
    let stranger = Device::new(9);
    let missing = call(
        addr,
        "GET",
        &format!("{}/bundle", stranger.device_path()),
        b"",
    )
    .await;
    assert_eq!(
        (missing.status, missing.reason().as_str()),
        (404, "not_found")
    );

    // Deposits: stored, then an idempotent repeat; none for a stranger.
    let deposit_path = format!("/v1/mailboxes/{}/envelopes", bob.mailbox_hex());
    let first = encode_envelope(&envelope(1, b"hello bob"));
    assert_eq!(call(addr, "POST", &deposit_path, &first).await.status, 201);
    assert_eq!(call(addr, "POST", &deposit_path, &first).await.status, 200);
    let nobody = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{}/envelopes", stranger.mailbox_hex()),
        &first,
    )
    .await;
    assert_eq!(
        (nobody.status, nobody.reason().as_str()),
        (404, "not_found")
    );
    let garbage = call(addr, "POST", &deposit_path, &[2, 0, 0]).await;
    assert_eq!(
        (garbage.status, garbage.reason().as_str()),
        (400, "bad_request")
    );

    // Fetch with a proof; the proof's challenge is single-use.
    let auth = bob.proof(addr, MailboxOp::Fetch).await;
    let fetch_path = format!("/v1/mailboxes/{}/fetch", bob.mailbox_hex());
    let fetched = call(addr, "POST", &fetch_path, &auth.encode()).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(envelopes(&fetched.body), vec![envelope(1, b"hello bob")]);
    let again = call(addr, "POST", &fetch_path, &auth.encode()).await;
    assert_eq!(
        (again.status, again.reason().as_str()),
        (401, "unauthorized")
    );
    // A proof for another mailbox.
    let other = bob.proof(addr, MailboxOp::Fetch).await;
    let elsewhere = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{}/fetch", stranger.mailbox_hex()),
        &other.encode(),
    )
    .await;
    assert_eq!(
        (elsewhere.status, elsewhere.reason().as_str()),
        (401, "unauthorized")
    );

    // Acknowledge.
    let ack = bob.proof(addr, MailboxOp::Acknowledge).await;
    let mut body = ack.encode();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&[1; 16]);
    let ack_path = format!("/v1/mailboxes/{}/acknowledge", bob.mailbox_hex());
    assert_eq!(call(addr, "POST", &ack_path, &body).await.status, 204);
    let short = call(addr, "POST", &ack_path, &body[..body.len() - 1]).await;
    assert_eq!(
        (short.status, short.reason().as_str()),
        (400, "bad_request")
    );

    // Long poll: nothing pending, a deposit arrives while waiting.
    let auth = bob.proof(addr, MailboxOp::Fetch).await;
    let waiting = tokio::spawn({
        let path = format!("{fetch_path}?limit=10&wait_ms={LONG_WAIT_MS}");
        async move { call(addr, "POST", &path, &auth.encode()).await }
    });
    // Parked (its first look found the mailbox empty): only the deposit's
    // wake-up can answer it with an envelope before the wait runs out.
    until_parked(addr, 1).await;
    let second = encode_envelope(&envelope(2, b"are you there?"));
    assert_eq!(call(addr, "POST", &deposit_path, &second).await.status, 201);
    let woken = waiting.await.unwrap();
    assert_eq!(woken.status, 200);
    assert_eq!(envelopes(&woken.body), vec![envelope(2, b"are you there?")]);
    assert_eq!(parked_long_polls(addr).await, 0);

    // A long poll that times out answers an empty list.
    let ack = bob.proof(addr, MailboxOp::Acknowledge).await;
    let mut body = ack.encode();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&[2; 16]);
    assert_eq!(call(addr, "POST", &ack_path, &body).await.status, 204);
    let auth = bob.proof(addr, MailboxOp::Fetch).await;
    let started = std::time::Instant::now();
    let empty = call(
        addr,
        "POST",
        &format!("{fetch_path}?wait_ms=300"),
        &auth.encode(),
    )
    .await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Errors: unknown route, wrong method, malformed paths and queries.
    let unknown = call(addr, "GET", "/v1/nothing-here", b"").await;
    assert_eq!(
        (unknown.status, unknown.reason().as_str()),
        (404, "no_route")
    );
    let method = call(addr, "GET", &deposit_path, b"").await;
    assert_eq!(
        (method.status, method.reason().as_str()),
        (405, "method_not_allowed")
    );
    assert!(method.headers.contains_key("allow"));
    for path in [
        "/v1/mailboxes/zz/envelopes".to_owned(),
        format!(
            "/v1/mailboxes/{}/envelopes",
            bob.mailbox_hex().to_uppercase()
        ),
        format!(
            "/v1/directory/{}/notanumber/bundle",
            hex::encode(bob.address().identity)
        ),
        format!(
            "/v1/directory/{}/99999999999/one-time-prekeys",
            hex::encode(bob.address().identity)
        ),
        "/v1/directory/%FF%FE/1/bundle".to_owned(),
    ] {
        let method = if path.contains("mailboxes") {
            "POST"
        } else {
            "GET"
        };
        let answer = call(addr, method, &path, &first).await;
        assert_eq!(
            (answer.status, answer.reason().as_str()),
            (400, "bad_request"),
            "{path}"
        );
    }
    let auth = bob.proof(addr, MailboxOp::Fetch).await;
    let query = call(
        addr,
        "POST",
        &format!("{fetch_path}?limit=-3"),
        &auth.encode(),
    )
    .await;
    assert_eq!(
        (query.status, query.reason().as_str()),
        (400, "bad_request")
    );

    // Oversized bodies: announced, and streamed without a length.
    let big = vec![7u8; 5000];
    let oversized = call(addr, "POST", &deposit_path, &big).await;
    assert_eq!(
        (oversized.status, oversized.reason().as_str()),
        (413, "body_size")
    );
    let mut chunked = format!(
        "POST {deposit_path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..5 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[1u8; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = raw(addr, &chunked).await;
    assert_eq!(
        (streamed.status, streamed.reason().as_str()),
        (413, "body_size")
    );

    // Not HTTP at all: the connection is dropped, the server lives on.
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"\x00\x01\x02 garbage\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink).await;
    assert_eq!(call(addr, "GET", "/v1/health", b"").await.status, 200);

    // Metrics.
    let metrics = call(addr, "GET", "/metrics", b"").await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.body).unwrap();
    for needle in [
        "cubbyhole_relay_envelopes ",
        "cubbyhole_relay_mailboxes ",
        "cubbyhole_relay_devices 1\n",
        "cubbyhole_relay_deposits_total 2\n",
        "cubbyhole_relay_envelopes_expired_total 0\n",
        "cubbyhole_relay_requests_total{route=\"deposit\"}",
        "cubbyhole_relay_rejections_total{reason=\"body_size\"} 2\n",
        "cubbyhole_relay_rejections_total{reason=\"no_route\"} 1\n",
    ] {
        assert!(text.contains(needle), "{needle} in\n{text}");
    }

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforces_the_relay_bounds_and_rate_limits() {
    let mut config = ServerConfig {
        limits: Limits {
            requests_per_minute: 12,
            deposits_per_minute: 3,
            claims_per_minute: 1,
            total_storage_bytes: 20,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    };
    config.relay.max_envelope_bytes = 16;
    let server = Server::start(config).await;
    let addr = server.addr;
    let alice = Device::new(3);
    assert_eq!(
        call(addr, "POST", "/v1/directory", &alice.upload(1))
            .await
            .status,
        204
    );
    let path = format!("/v1/mailboxes/{}/envelopes", alice.mailbox_hex());
    let too_big = call(
        addr,
        "POST",
        &path,
        &encode_envelope(&envelope(1, &[0; 17])),
    )
    .await;
    assert_eq!(
        (too_big.status, too_big.reason().as_str()),
        (413, "envelope_size")
    );
    let fits = call(
        addr,
        "POST",
        &path,
        &encode_envelope(&envelope(2, &[0; 16])),
    )
    .await;
    assert_eq!(fits.status, 201);
    let full = call(
        addr,
        "POST",
        &path,
        &encode_envelope(&envelope(3, &[0; 16])),
    )
    .await;
    assert_eq!(
        (full.status, full.reason().as_str()),
        (507, "total_storage")
    );
    let deposits = call(addr, "POST", &path, &encode_envelope(&envelope(4, &[0; 1]))).await;
    assert_eq!(
        (deposits.status, deposits.reason().as_str()),
        (429, "rate_deposits")
    );
    assert!(deposits.headers.contains_key("retry-after"));

    let bundle_path = format!("{}/bundle", alice.device_path());
    assert_eq!(call(addr, "GET", &bundle_path, b"").await.status, 200);
    let claims = call(addr, "GET", &bundle_path, b"").await;
    assert_eq!(
        (claims.status, claims.reason().as_str()),
        (429, "rate_claims")
    );

    // 7 requests so far; the 13th of the minute is refused.
    for _ in 7..12 {
        assert_eq!(call(addr, "GET", "/v1/health", b"").await.status, 200);
    }
    let limited = call(addr, "GET", "/v1/health", b"").await;
    assert_eq!(
        (limited.status, limited.reason().as_str()),
        (429, "rate_requests")
    );
    server.stop().await;

    // Behind a trusted proxy, another client address has its own budget.

    let server = Server::start(ServerConfig {
        limits: Limits {
            requests_per_minute: 1,
            trust_forwarded_for: true,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    let addr = server.addr;
    assert_eq!(
        call_with(addr, "GET", "/v1/health", &from("198.51.100.1"), b"")
            .await
            .status,
        200
    );
    assert_eq!(
        call_with(
            addr,
            "GET",
            "/v1/health",
            &from("198.51.100.1, 10.0.0.1"),
            b""
        )
        .await
        .status,
        429
    );
    assert_eq!(
        call_with(addr, "GET", "/v1/health", &from("198.51.100.2"), b"")
            .await
            .status,
        200
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_restart_on_sqlite_and_shuts_down_gracefully() {
    let dir = std::env::temp_dir().join(format!(
        "cubbyhole-relay-smoke-{}-{}",
        std::process::id(),
        rand_core::RngCore::next_u64(&mut OsRng)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("relay.db");
    let config = ServerConfig {
        storage: StorageConfig::Sqlite(db.clone()),
        limits: Limits {
            max_wait_ms: LONG_WAIT_MS,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    };
    let carol = Device::new(5);
    let path = format!("/v1/mailboxes/{}/envelopes", carol.mailbox_hex());

    let server = Server::start(config.clone()).await;
    let addr = server.addr;
    assert_eq!(
        call(addr, "POST", "/v1/directory", &carol.upload(1))
            .await
            .status,
        204
    );
    assert_eq!(
        call(addr, "POST", &path, &encode_envelope(&envelope(1, b"kept")))
            .await
            .status,
        201
    );
    // A long poll in flight when the shutdown starts still gets an answer.
    let auth = carol.proof(addr, MailboxOp::Fetch).await;
    let waiting = tokio::spawn({
        let path = format!(
            "/v1/mailboxes/{}/fetch?wait_ms={LONG_WAIT_MS}",
            carol.mailbox_hex()
        );
        async move { call(addr, "POST", &path, &auth.encode()).await }
    });
    // An envelope is pending: answered at once (an answer after the wait
    // would be empty), and never parked.
    let answered = waiting.await.unwrap();
    assert_eq!(envelopes(&answered.body), vec![envelope(1, b"kept")]);
    assert_eq!(parked_long_polls(addr).await, 0);
    server.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "stopped listening");

    // Same file, new process state: the envelope is still there.
    let server = Server::start(config.clone()).await;
    let addr = server.addr;
    let auth = carol.proof(addr, MailboxOp::Fetch).await;
    let fetched = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{}/fetch", carol.mailbox_hex()),
        &auth.encode(),
    )
    .await;
    assert_eq!(envelopes(&fetched.body), vec![envelope(1, b"kept")]);

    // Shutdown while a long poll waits on an empty mailbox: it answers.
    let ack = carol.proof(addr, MailboxOp::Acknowledge).await;
    let mut body = ack.encode();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&[1; 16]);
    assert_eq!(
        call(
            addr,
            "POST",
            &format!("/v1/mailboxes/{}/acknowledge", carol.mailbox_hex()),
            &body
        )
        .await
        .status,
        204
    );
    let auth = carol.proof(addr, MailboxOp::Fetch).await;
    let waiting = tokio::spawn({
        let path = format!(
            "/v1/mailboxes/{}/fetch?wait_ms={LONG_WAIT_MS}",
            carol.mailbox_hex()
        );
        async move { call(addr, "POST", &path, &auth.encode()).await }
    });
    // Parked before the shutdown starts; the shutdown answers it rather
    // than waiting LONG_WAIT_MS (`stop` fails after 30 s).
    until_parked(addr, 1).await;
    server.stop().await;
    let answered = waiting.await.unwrap();
    assert_eq!((answered.status, answered.body.len()), (200, 0));

    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
#[cfg_attr(
    feature = "postgres",
    ignore = "checks a relay built without the postgres feature (CI: cargo test -p cubbyhole-relay --test server_smoke)"
)]
async fn postgres_without_the_feature_is_a_clear_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ServerConfig {
        storage: StorageConfig::Postgres("postgres://localhost/none".into()),
        ..ServerConfig::unpriced()
    };
    let error = serve(listener, config, async {}).await.unwrap_err();
    assert!(error.to_string().contains("postgres"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_out_slow_clients() {
    let server = Server::start(ServerConfig {
        limits: Limits {
            header_timeout_ms: 300,
            request_timeout_ms: 300,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;

    // Headers that never end: the connection is closed without an answer.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: relay.test\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "closed by the header timeout");

    // A body that never arrives: 408 timeout.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /v1/directory HTTP/1.1\r\nHost: relay.test\r\n\
          Content-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\nshort",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"timeout\""), "{answer}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deposits_are_each_stored_once() {
    let dir = std::env::temp_dir().join(format!(
        "cubbyhole-relay-batch-{}-{}",
        std::process::id(),
        rand_core::RngCore::next_u64(&mut OsRng)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::start(ServerConfig {
        storage: StorageConfig::Sqlite(dir.join("relay.db")),
        limits: Limits {
            // 120 connections at once, all from loopback.
            max_connections_per_address: 0,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;
    let dave = Device::new(6);
    assert_eq!(
        call(addr, "POST", "/v1/directory", &dave.upload(1))
            .await
            .status,
        204
    );
    let path = format!("/v1/mailboxes/{}/envelopes", dave.mailbox_hex());
    // 60 distinct envelopes, each deposited twice, all at once.
    let tasks: Vec<_> = (0..120u8)
        .map(|i| {
            let path = path.clone();
            tokio::spawn(async move {
                let id = i % 60;
                let body = encode_envelope(&envelope(id, &[id; 100]));
                call(addr, "POST", &path, &body).await.status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 60);
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 60);

    let auth = dave.proof(addr, MailboxOp::Fetch).await;
    let fetched = call(
        addr,
        "POST",
        &format!("/v1/mailboxes/{}/fetch?limit=1000", dave.mailbox_hex()),
        &auth.encode(),
    )
    .await;
    let mut ids: Vec<u8> = envelopes(&fetched.body).iter().map(|e| e.id.0[0]).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..60).collect::<Vec<u8>>());
    let metrics = call(addr, "GET", "/metrics", b"").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("cubbyhole_relay_envelopes 60\n"), "{text}");
    assert!(
        text.contains("cubbyhole_relay_pending_bytes 6000\n"),
        "{text}"
    );
    assert!(text.contains("cubbyhole_relay_mailboxes 1\n"), "{text}");
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
