//! The HTTP layer's hygiene, over raw TCP (no client library): `HEAD` on
//! the bundle route claims nothing; every error answer, including those of
//! requests hyper cannot parse, is the API's JSON error body; bodies need
//! their `Content-Type`; only canonical paths are served; connections are
//! capped per address and in total; a body sent too slowly is cut off.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cubbyhole::transport::{encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, PrekeyStore};
use cubbyhole_relay::{serve, Limits, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    /// The `error` reason, checking that the answer is the API's JSON
    /// error body.
    fn reason(&self) -> String {
        assert_eq!(
            self.headers.get("content-type").map(String::as_str),
            Some("application/json"),
            "{self:?}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {self:?}"));
        assert!(json["message"].is_string(), "{json}");
        assert_eq!(json.as_object().unwrap().len(), 2, "{json}");
        json["error"].as_str().expect("error field").to_owned()
    }

    fn is(&self, status: u16, reason: &str) {
        assert_eq!((self.status, self.reason().as_str()), (status, reason));
    }
}

/// Parses one answer (the connection closed after it).
fn parse(bytes: &[u8]) -> Answer {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(bytes)));
    let head = std::str::from_utf8(&bytes[..head_end]).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: bytes[head_end + 4..].to_vec(),
    }
}

/// Reads until the server closes (at most 30 s: a hang is a failure, not a
/// timing assertion).
async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut bytes))
        .await
        .expect("the server answered and closed")
        .expect("read");
    bytes
}

/// Sends raw bytes, reads the answer until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    parse(&read_all(&mut stream).await)
}

async fn call(
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
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).await
}

const OCTETS: (&str, &str) = ("Content-Type", "application/octet-stream");

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

    async fn default() -> Server {
        Self::start(ServerConfig::unpriced()).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("shut down in time")
            .expect("no panic")
            .expect("clean shutdown");
    }
}

/// A device with `one_time` one-time prekeys, published on the server.
struct Device {
    identity: IdentityKeyPair,
    device_id: u32,
}

impl Device {
    async fn published(addr: SocketAddr, device_id: u32, one_time: u32) -> Device {
        let identity = IdentityKeyPair::generate(&mut OsRng);
        let mut store =
            PrekeyStore::new(&mut OsRng, &identity, 1_700_000_000).expect("time in unix seconds");
        store.generate_one_time_prekeys(&mut OsRng, one_time);
        let keys: Vec<&OneTimePrekey> = store.one_time_prekeys().collect();
        let upload = BundleSetUpload::new(
            device_id,
            &identity,
            1,
            store.current_signed_prekey(),
            &keys,
            true,
        )
        .sign(&identity);
        let published = call(addr, "POST", "/v1/directory", &[OCTETS], &upload).await;
        assert_eq!(published.status, 204);
        Device {
            identity,
            device_id,
        }
    }

    fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.identity.public(), self.device_id)
    }

    fn identity_hex(&self) -> String {
        hex::encode(self.address().identity)
    }

    fn device_path(&self) -> String {
        format!("/v1/directory/{}/{}", self.identity_hex(), self.device_id)
    }

    fn deposit_path(&self) -> String {
        format!(
            "/v1/mailboxes/{}/envelopes",
            hex::encode(self.address().mailbox().0)
        )
    }

    async fn one_time_prekeys(&self, addr: SocketAddr) -> u64 {
        let answer = call(
            addr,
            "GET",
            &format!("{}/one-time-prekeys", self.device_path()),
            &[],
            b"",
        )
        .await;
        assert_eq!(answer.status, 200);
        let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        json["count"].as_u64().expect("count")
    }
}

fn envelope(id: u8, payload: &[u8]) -> Vec<u8> {
    encode_envelope(&Envelope {
        id: EnvelopeId([id; 16]),
        payload: payload.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_the_bundle_route_claims_no_one_time_prekey() {
    let server = Server::default().await;
    let addr = server.addr;
    let bob = Device::published(addr, 1, 3).await;
    assert_eq!(bob.one_time_prekeys(addr).await, 3);
    let bundle = format!("{}/bundle", bob.device_path());
    for _ in 0..5 {
        let head = raw(
            addr,
            format!("HEAD {bundle} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(head.status, 405);
        assert_eq!(head.headers.get("allow").map(String::as_str), Some("GET"));
        assert_eq!(
            head.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert!(head.body.is_empty(), "a HEAD answer has no body");
    }
    assert_eq!(bob.one_time_prekeys(addr).await, 3, "HEAD claimed a key");
    // The count does see claims: a GET takes one.
    assert_eq!(call(addr, "GET", &bundle, &[], b"").await.status, 200);
    assert_eq!(bob.one_time_prekeys(addr).await, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_the_http_layer_is_a_json_error() {
    let server = Server::start(ServerConfig {
        limits: Limits {
            max_body_bytes: 4096,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;

    // Requests hyper cannot parse: it answers them itself.
    for request in [
        &b"GET /v1/health HTP/1.1\r\nHost: relay.test\r\n\r\n"[..],
        b"\x01\x02 / HTTP/1.1\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    ] {
        raw(addr, request).await.is(400, "bad_request");
    }
    // A 20 KiB request target.
    let long = format!(
        "GET /v1/health?{} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n",
        "x".repeat(20 * 1024)
    );
    raw(addr, long.as_bytes()).await.is(414, "uri_size");
    // 100 KiB of headers: in one header, and in many.
    let big = format!(
        "GET /v1/health HTTP/1.1\r\nHost: relay.test\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(100 * 1024)
    );
    raw(addr, big.as_bytes()).await.is(431, "header_size");
    let mut many = String::from("GET /v1/health HTTP/1.1\r\nHost: relay.test\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-Pad-{i}: {}\r\n", "p".repeat(1000)));
    }
    many.push_str("\r\n");
    raw(addr, many.as_bytes()).await.is(431, "header_size");
    // Unknown routes and methods, oversized bodies.
    call(addr, "GET", "/v1/nothing", &[], b"")
        .await
        .is(404, "no_route");
    let method = call(addr, "DELETE", "/v1/health", &[], b"").await;
    method.is(405, "method_not_allowed");
    assert!(method.headers.contains_key("allow"));
    call(addr, "POST", "/v1/directory", &[OCTETS], &[0u8; 5000])
        .await
        .is(413, "body_size");
    // The server still serves.
    assert_eq!(call(addr, "GET", "/v1/health", &[], b"").await.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_need_the_octet_stream_content_type() {
    let server = Server::start(ServerConfig {
        cors_origins: vec!["https://app.example".into()],
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;
    let bob = Device::published(addr, 1, 0).await;
    let path = bob.deposit_path();
    let body = envelope(1, b"hello");
    for headers in [
        &[][..],
        &[("Content-Type", "text/plain")],
        &[("Content-Type", "application/json")],
        &[("Content-Type", "application/octet-streamx")],
    ] {
        call(addr, "POST", &path, headers, &body)
            .await
            .is(415, "content_type");
    }
    // Chunked bodies too.
    let chunked = format!(
        "POST {path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\
         Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n{:x}\r\n",
        body.len()
    );
    let mut request = chunked.into_bytes();
    request.extend_from_slice(&body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    raw(addr, &request).await.is(415, "content_type");
    // Any case, with parameters.
    let stored = call(
        addr,
        "POST",
        &path,
        &[("Content-Type", "Application/Octet-Stream; charset=binary")],
        &body,
    )
    .await;
    assert_eq!(stored.status, 201);
    // No body, no type needed (a challenge).
    let challenge = format!(
        "/v1/mailboxes/{}/challenge",
        hex::encode(bob.address().mailbox().0)
    );
    assert_eq!(call(addr, "POST", &challenge, &[], b"").await.status, 200);
    // A browser's preflight for a PUT with that type is allowed.
    let preflight = call(
        addr,
        "OPTIONS",
        "/v1/accounts/00/devices",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        b"",
    )
    .await;
    assert_eq!(preflight.status, 200);
    let allowed = |name: &str| {
        preflight
            .headers
            .get(name)
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default()
    };
    assert!(
        allowed("access-control-allow-methods").contains("put"),
        "{preflight:?}"
    );
    assert!(allowed("access-control-allow-headers").contains("content-type"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_canonical_paths_are_served() {
    let server = Server::default().await;
    let addr = server.addr;
    let bob = Device::published(addr, 1, 0).await;
    let identity = bob.identity_hex();
    let count = |path: String| async move { call(addr, "GET", &path, &[], b"").await };
    // The canonical form.
    assert_eq!(
        count(format!("/v1/directory/{identity}/1/one-time-prekeys"))
            .await
            .status,
        200
    );
    // Percent-encoded hex or digits, leading zeros, signs, uppercase hex.
    let encoded_identity = format!("%{:02X}{}", identity.as_bytes()[0], &identity[1..]);
    for bad in [
        format!("/v1/directory/{encoded_identity}/1/one-time-prekeys"),
        format!("/v1/directory/{identity}/%31/one-time-prekeys"),
        format!("/v1/directory/{identity}/01/one-time-prekeys"),
        format!("/v1/directory/{identity}/001/one-time-prekeys"),
        format!("/v1/directory/{identity}/+1/one-time-prekeys"),
        format!(
            "/v1/directory/{}/1/one-time-prekeys",
            identity.to_uppercase()
        ),
    ] {
        count(bad.clone()).await.is(400, "bad_request");
    }
    // An encoded slash is no separator.
    let deposit = bob.deposit_path().replace("/envelopes", "%2Fenvelopes");
    call(addr, "POST", &deposit, &[OCTETS], &envelope(1, b"x"))
        .await
        .is(404, "no_route");
    let encoded_mailbox = bob
        .deposit_path()
        .replacen("/mailboxes/", "/mailboxes/%", 1);
    let encoded_mailbox = {
        // `%` followed by the hex of the first character, which it replaces.
        let at = encoded_mailbox.find('%').unwrap();
        let first = encoded_mailbox.as_bytes()[at + 1];
        format!(
            "{}%{:02x}{}",
            &encoded_mailbox[..at],
            first,
            &encoded_mailbox[at + 2..]
        )
    };
    call(
        addr,
        "POST",
        &encoded_mailbox,
        &[OCTETS],
        &envelope(1, b"x"),
    )
    .await
    .is(400, "bad_request");
    // Trailing slashes and empty segments are other paths: no such route.
    for other in [
        "/v1/health/".to_owned(),
        "//v1/health".to_owned(),
        format!("/v1/directory/{identity}/1/one-time-prekeys/"),
        format!("/v1/directory/{identity}//1/one-time-prekeys"),
    ] {
        count(other).await.is(404, "no_route");
    }
    // Nothing was deposited by the refused requests.
    server.stop().await;
}

/// A connection from `source` (a loopback address) to `addr`.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.expect("connect")
}

/// A health check on `stream`: its answer.
async fn health_on(mut stream: TcpStream) -> Answer {
    let _ = stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
        .await;
    parse(&read_all(&mut stream).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_address_and_in_total() {
    let server = Server::start(ServerConfig {
        limits: Limits {
            max_connections: 3,
            max_connections_per_address: 2,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;
    // Two idle connections from one address, then a third: refused.
    let a1 = connect_from("127.0.0.1", addr).await;
    let a2 = connect_from("127.0.0.1", addr).await;
    let over = health_on(connect_from("127.0.0.1", addr).await).await;
    over.is(503, "connections");
    assert_eq!(
        over.headers.get("retry-after").map(String::as_str),
        Some("1")
    );
    // Another address gets the last one of the total, then a third
    // address is refused.
    let b1 = connect_from("127.0.0.2", addr).await;
    // The accept loop takes connections in order: once this one is
    // answered, `b1` was admitted before it.
    health_on(connect_from("127.0.0.3", addr).await)
        .await
        .is(503, "connections");
    // The admitted ones are served.
    assert_eq!(health_on(a1).await.status, 200);
    // Once `a1` is closed (which the server sees soon after), the third
    // address gets in.
    let guard = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = health_on(connect_from("127.0.0.3", addr).await).await;
        if answer.status == 200 {
            break;
        }
        answer.is(503, "connections");
        assert!(std::time::Instant::now() < guard, "a1 never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((a2, b1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_is_cut_off() {
    let server = Server::start(ServerConfig {
        limits: Limits {
            // Only the body deadline can answer 408 here.
            request_timeout_ms: 0,
            body_timeout_ms: 1_000,
            min_body_bytes_per_sec: 100,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;
    // 10 bytes of 4000, then nothing: cut off at the deadline.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /v1/directory HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/octet-stream\r\n\
          Content-Length: 4000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let answer = parse(&read_all(&mut slow).await);
    answer.is(408, "timeout");
    // A body sent steadily (1000 bytes every 50 ms, far above 100 B/s,
    // each chunk earning 10 s) gets through to the handler however long it
    // takes in all: a junk upload, answered 400.
    let mut steady = TcpStream::connect(addr).await.unwrap();
    steady
        .write_all(
            b"POST /v1/directory HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\
              Content-Type: application/octet-stream\r\nContent-Length: 4000\r\n\r\n",
        )
        .await
        .unwrap();
    for _ in 0..4 {
        steady.write_all(&[0u8; 1000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    parse(&read_all(&mut steady).await).is(400, "bad_request");
    server.stop().await;
}

/// The relay core refuses empty payloads (`Relay::deposit`, SPEC 16.3 step
/// 0): through the server, `400 bad_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_envelope_payload_is_refused() {
    let server = Server::default().await;
    let addr = server.addr;
    let bob = Device::published(addr, 1, 0).await;
    call(
        addr,
        "POST",
        &bob.deposit_path(),
        &[OCTETS],
        &envelope(1, b""),
    )
    .await
    .is(400, "bad_request");
    server.stop().await;
}
