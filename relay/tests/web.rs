//! What a browser sees, over raw TCP (no client library): static files from
//! the web root (`ServerConfig::web_root`: content types, security headers,
//! no way out of the root, `HEAD`, revalidation, the request rate limit
//! and the connection caps), CORS on success and error answers and on
//! preflights, and requests of the sizes a browser client sends fitting the
//! default body limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cubbyhole::relay::RelayConfig;
use cubbyhole::transport::{encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, PrekeyStore};
use cubbyhole_relay::{serve, Limits, ServerConfig, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lower-case names; repeated headers joined with `, `.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The `error` reason, checking that the answer is the API's JSON error.
    fn reason(&self) -> String {
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/json"),
            "{self:?}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {self:?}"));
        json["error"].as_str().expect("error field").to_owned()
    }

    fn is(&self, status: u16, reason: &str) {
        assert_eq!((self.status, self.reason().as_str()), (status, reason));
    }

    /// The comma-separated values of a header, in lower case.
    fn list(&self, name: &str) -> Vec<String> {
        self.header(name)
            .unwrap_or_default()
            .split(',')
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

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

async fn get(addr: SocketAddr, path: &str) -> Answer {
    call(addr, "GET", path, &[], b"").await
}

const OCTETS: (&str, &str) = ("Content-Type", "application/octet-stream");
const APP: &str = "https://app.example";

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
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
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("shut down in time")
            .expect("no panic")
            .expect("clean shutdown");
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let mut random = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut random);
        let dir = std::env::temp_dir().join(format!(
            "cubbyhole-relay-web-{name}-{}-{}",
            std::process::id(),
            hex::encode(random)
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

const SECRET: &[u8] = b"SECRET-OUTSIDE-THE-WEB-ROOT";
const INDEX: &[u8] =
    b"<!doctype html><title>cubbyhole</title><script type=module src=app.js></script>";
const WASM: &[u8] = b"\0asm\x01\0\0\0";
const CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   frame-ancestors 'none'";

/// `base/` holding `Cargo.toml` and `x` (secrets), `outside/secret.txt`,
/// and the web root `base/www/` with files of every type, a directory
/// without an index, a hidden file and symbolic links in and out.
fn layout(base: &Path) -> PathBuf {
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write(base.join("Cargo.toml"), SECRET);
    write(base.join("x"), SECRET);
    write(base.join("outside/secret.txt"), SECRET);
    let root = base.join("www");
    write(root.join("index.html"), INDEX);
    write(root.join("app.js"), b"export const v = 1;");
    write(root.join("app.mjs"), b"export const m = 1;");
    write(root.join("style.css"), b"body { margin: 0 }");
    write(root.join("pkg/app_bg.wasm"), WASM);
    write(root.join("data.json"), b"{}");
    write(root.join("icon.svg"), b"<svg/>");
    write(root.join("logo.png"), b"\x89PNG");
    write(root.join("favicon.ico"), b"\0\0\x01\0");
    write(root.join("robots.txt"), b"User-agent: *");
    write(root.join("blob.bin"), b"\x01\x02");
    write(root.join("docs/index.html"), b"<p>docs</p>");
    write(root.join("empty/readme.txt"), b"no index here");
    write(root.join(".hidden"), SECRET);
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(base.join("outside/secret.txt"), root.join("leak.txt")).unwrap();
        symlink(base.join("outside"), root.join("outdir")).unwrap();
        symlink("../Cargo.toml", root.join("relative-leak.toml")).unwrap();
        symlink("robots.txt", root.join("inner.txt")).unwrap();
    }
    root
}

fn web_config(root: PathBuf) -> ServerConfig {
    ServerConfig {
        web_root: Some(root),
        ..ServerConfig::unpriced()
    }
}

/// The headers every file answer carries.
fn assert_file_headers(answer: &Answer) {
    assert_eq!(
        answer.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(answer.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(
        answer.header("referrer-policy").as_deref(),
        Some("no-referrer")
    );
    assert_eq!(
        answer.header("content-security-policy").as_deref(),
        Some(CSP)
    );
}

/// Never the content of a file outside the root.
fn assert_refused(answer: &Answer, path: &str) {
    assert!(
        answer.status == 400 || answer.status == 404,
        "{path}: {answer:?}"
    );
    assert!(
        !answer.body.windows(SECRET.len()).any(|w| w == SECRET),
        "{path}: leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_are_served_with_their_types_and_headers() {
    let base = TempDir::new("types");
    let root = layout(&base.0);
    let server = Server::start(web_config(root.clone())).await;
    let addr = server.addr;

    let index = get(addr, "/").await;
    assert_eq!(index.status, 200, "{index:?}");
    assert_eq!(index.body, INDEX);
    assert_eq!(
        index.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        index.header("content-length").as_deref(),
        Some(INDEX.len().to_string().as_str())
    );
    assert_file_headers(&index);
    assert_eq!(get(addr, "/index.html").await.body, INDEX);
    assert_eq!(get(addr, "/docs/").await.body, b"<p>docs</p>");

    for (path, kind, body) in [
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            &b"export const v = 1;"[..],
        ),
        (
            "/app.mjs",
            "text/javascript; charset=utf-8",
            b"export const m = 1;",
        ),
        (
            "/style.css",
            "text/css; charset=utf-8",
            b"body { margin: 0 }",
        ),
        ("/pkg/app_bg.wasm", "application/wasm", WASM),
        ("/data.json", "application/json", b"{}"),
        ("/icon.svg", "image/svg+xml", b"<svg/>"),
        ("/logo.png", "image/png", b"\x89PNG"),
        ("/favicon.ico", "image/x-icon", b"\0\0\x01\0"),
        ("/robots.txt", "text/plain; charset=utf-8", b"User-agent: *"),
        ("/blob.bin", "application/octet-stream", b"\x01\x02"),
    ] {
        let answer = get(addr, path).await;
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some(kind),
            "{path}"
        );
        assert_eq!(answer.body, body, "{path}");
        assert_file_headers(&answer);
    }

    // HEAD: the length and type, no body.
    let head = call(addr, "HEAD", "/pkg/app_bg.wasm", &[], b"").await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(
        head.header("content-type").as_deref(),
        Some("application/wasm")
    );
    assert_eq!(
        head.header("content-length").as_deref(),
        Some(WASM.len().to_string().as_str())
    );
    assert!(head.body.is_empty(), "{head:?}");
    assert_file_headers(&head);

    // Read per request: a rebuilt file is served at once; its validator
    // answers 304 until it changes.
    let first = get(addr, "/app.js").await;
    let etag = first.header("etag").expect("an ETag");
    let unchanged = call(addr, "GET", "/app.js", &[("If-None-Match", &etag)], b"").await;
    assert_eq!(unchanged.status, 304, "{unchanged:?}");
    assert!(unchanged.body.is_empty());
    std::fs::write(root.join("app.js"), b"export const v = 22;").unwrap();
    let rebuilt = call(addr, "GET", "/app.js", &[("If-None-Match", &etag)], b"").await;
    assert_eq!(rebuilt.status, 200, "{rebuilt:?}");
    assert_eq!(rebuilt.body, b"export const v = 22;");

    // The API is as it was.
    assert_eq!(get(addr, "/v1/health").await.status, 200);
    get(addr, "/v1/nothing").await.is(404, "no_route");
    get(addr, "/v1").await.is(404, "no_route");
    get(addr, "/v1/index.html").await.is(404, "no_route");
    call(addr, "POST", "/index.html", &[OCTETS], b"x")
        .await
        .is(404, "no_route");
    // Static files have their own metrics label.
    let metrics = get(addr, "/metrics").await;
    let text = String::from_utf8(metrics.body).unwrap();
    let web = text
        .lines()
        .find(|l| l.starts_with("cubbyhole_relay_requests_total{route=\"web\"}"))
        .unwrap_or_else(|| panic!("no web label in {text}"));
    let served: u64 = web.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(served >= 10, "{web}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outside_the_web_root_is_served() {
    let base = TempDir::new("traversal");
    let root = layout(&base.0);
    let server = Server::start(web_config(root.clone())).await;
    let addr = server.addr;
    for path in [
        "/../Cargo.toml",
        "/..",
        "/%2e%2e/x",
        "/%2e%2e/Cargo.toml",
        "/..%2fCargo.toml",
        "/%2E%2E%2FCargo.toml",
        "/a/../../x",
        "/docs/../../x",
        "/./../x",
        "//../x",
        "/..\\Cargo.toml",
        "/docs/..\\..\\x",
        "/%00",
        "/.hidden",
        "/docs/.hidden",
        "/leak.txt",
        "/outdir/secret.txt",
        "/relative-leak.toml",
        "/outside/secret.txt",
        "/empty",
        "/empty/",
        "/docs",
        "/pkg",
        "/missing.js",
    ] {
        let answer = get(addr, path).await;
        assert_refused(&answer, path);
        // Every refusal is the API's JSON error.
        let reason = answer.reason();
        assert!(
            reason == "bad_request" || reason == "no_route",
            "{path}: {reason}"
        );
        let head = call(addr, "HEAD", path, &[], b"").await;
        assert_refused(&head, path);
    }
    // The traversal forms are malformed requests, a missing file no route.
    get(addr, "/../Cargo.toml").await.is(400, "bad_request");
    get(addr, "/%2e%2e/x").await.is(400, "bad_request");
    get(addr, "/a/../../x").await.is(400, "bad_request");
    get(addr, "/leak.txt").await.is(404, "no_route");
    get(addr, "/empty").await.is(404, "no_route");
    // A link that stays inside the root is followed.
    #[cfg(unix)]
    assert_eq!(get(addr, "/inner.txt").await.body, b"User-agent: *");

    // Over the size cap: refused (a sparse file, nothing written).
    let big = std::fs::File::create(root.join("big.wasm")).unwrap();
    big.set_len(cubbyhole_relay::server::MAX_WEB_FILE_BYTES + 1)
        .unwrap();
    drop(big);
    get(addr, "/big.wasm").await.is(404, "no_route");
    // The server still serves.
    assert_eq!(get(addr, "/").await.status, 200);
    server.stop().await;
}

/// Only regular files: a FIFO would block whoever opens it. Built where
/// `mkfifo` runs (`relay/build.rs` sets `cubbyhole_test_mkfifo`), else
/// reported as ignored; built with it, a failing `mkfifo` fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cubbyhole_test_mkfifo),
    ignore = "needs mkfifo (coreutils) when the tests are built"
)]
async fn a_fifo_in_the_web_root_is_not_served() {
    let base = TempDir::new("fifo");
    let root = layout(&base.0);
    let fifo = root.join("pipe.js");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap_or_else(|e| panic!("mkfifo: {e}"));
    assert!(made.success(), "mkfifo {}: {made}", fifo.display());
    let server = Server::start(web_config(root)).await;
    get(server.addr, "/pipe.js").await.is(404, "no_route");
    // The server still serves.
    assert_eq!(get(server.addr, "/").await.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_web_root_nothing_is_served() {
    let base = TempDir::new("none");
    let _root = layout(&base.0);
    let server = Server::start(ServerConfig::unpriced()).await;
    let addr = server.addr;
    for path in ["/", "/index.html", "/app.js"] {
        get(addr, path).await.is(404, "no_route");
    }
    let metrics = String::from_utf8(get(addr, "/metrics").await.body).unwrap();
    assert!(!metrics.contains("route=\"web\""), "{metrics}");
    server.stop().await;

    // A web root that is not a directory does not start.
    for bad in [base.0.join("Cargo.toml"), base.0.join("missing")] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = serve(listener, web_config(bad), async {})
            .await
            .unwrap_err();
        assert!(matches!(error, ServerError::Config(_)), "{error}");
        assert!(error.to_string().contains("web root"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_count_against_the_request_rate_and_connection_caps() {
    let base = TempDir::new("limits");
    let root = layout(&base.0);
    let server = Server::start(ServerConfig {
        limits: Limits {
            requests_per_minute: 3,
            max_connections_per_address: 1,
            ..Limits::default()
        },
        ..web_config(root)
    })
    .await;
    let addr = server.addr;
    for _ in 0..3 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    let limited = get(addr, "/app.js").await;
    limited.is(429, "rate_requests");
    assert!(limited.header("retry-after").is_some());
    // One connection held open: the next one from this address is refused
    // before any request is read.
    let held = TcpStream::connect(addr).await.unwrap();
    let refused = get(addr, "/").await;
    refused.is(503, "connections");
    drop(held);
    server.stop().await;
}

/// A device published with `one_time` one-time prekeys; its signed upload.
struct Device {
    identity: IdentityKeyPair,
    device_id: u32,
}

impl Device {
    fn upload(one_time: u32) -> (Device, Vec<u8>) {
        let identity = IdentityKeyPair::generate(&mut OsRng);
        let mut store =
            PrekeyStore::new(&mut OsRng, &identity, 1_700_000_000).expect("time in unix seconds");
        store.generate_one_time_prekeys(&mut OsRng, one_time);
        let keys: Vec<&OneTimePrekey> = store.one_time_prekeys().collect();
        let upload =
            BundleSetUpload::new(1, &identity, 1, store.current_signed_prekey(), &keys, true)
                .sign(&identity);
        (
            Device {
                identity,
                device_id: 1,
            },
            upload,
        )
    }

    fn deposit_path(&self) -> String {
        let address = DeviceAddress::new(self.identity.public(), self.device_id);
        format!(
            "/v1/mailboxes/{}/envelopes",
            hex::encode(address.mailbox().0)
        )
    }
}

fn envelope(id: u8, payload: &[u8]) -> Vec<u8> {
    encode_envelope(&Envelope {
        id: EnvelopeId([id; 16]),
        payload: payload.to_vec(),
    })
}

/// The CORS headers of an answer to an allowed origin: that origin, `Vary:
/// Origin`, the exposed headers, no credentials.
fn assert_cors(answer: &Answer, origin: &str) {
    assert_eq!(
        answer.header("access-control-allow-origin").as_deref(),
        Some(origin),
        "{answer:?}"
    );
    assert!(
        answer.list("vary").contains(&"origin".to_owned()),
        "{answer:?}"
    );
    let exposed = answer.list("access-control-expose-headers");
    assert!(exposed.contains(&"retry-after".to_owned()), "{answer:?}");
    assert!(exposed.contains(&"x-request-id".to_owned()), "{answer:?}");
    assert!(answer.header("access-control-allow-credentials").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_are_on_error_answers_too() {
    let server = Server::start(ServerConfig {
        cors_origins: vec![APP.into(), "https://other.example".into()],
        limits: Limits {
            max_body_bytes: 4096,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;
    let origin = ("Origin", APP);
    let ok = call(addr, "GET", "/v1/health", &[origin], b"").await;
    assert_eq!(ok.status, 200);
    assert_cors(&ok, APP);
    let other = call(
        addr,
        "GET",
        "/v1/health",
        &[("Origin", "https://other.example")],
        b"",
    )
    .await;
    assert_cors(&other, "https://other.example");

    // 413, 415, 404, 401: the page can read the error.
    let big = call(addr, "POST", "/v1/directory", &[origin, OCTETS], &[0; 5000]).await;
    big.is(413, "body_size");
    assert_cors(&big, APP);
    let (bob, upload) = Device::upload(2);
    let typed = call(
        addr,
        "POST",
        "/v1/directory",
        &[origin, ("Content-Type", "text/plain")],
        &upload,
    )
    .await;
    typed.is(415, "content_type");
    assert_cors(&typed, APP);
    let missing = call(addr, "GET", "/v1/nothing", &[origin], b"").await;
    missing.is(404, "no_route");
    assert_cors(&missing, APP);
    let mut forged = upload.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let forged = call(addr, "POST", "/v1/directory", &[origin, OCTETS], &forged).await;
    forged.is(401, "unauthorized");
    assert_cors(&forged, APP);
    assert_eq!(
        call(addr, "POST", "/v1/directory", &[origin, OCTETS], &upload)
            .await
            .status,
        204
    );

    // A disallowed origin gets no allow-origin header, on an answer or a
    // preflight.
    let evil = ("Origin", "https://evil.example");
    let answer = call(addr, "GET", "/v1/health", &[evil], b"").await;
    assert_eq!(answer.status, 200);
    assert!(answer.header("access-control-allow-origin").is_none());
    let preflight = call(
        addr,
        "OPTIONS",
        &bob.deposit_path(),
        &[
            evil,
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        b"",
    )
    .await;
    assert!(
        preflight.header("access-control-allow-origin").is_none(),
        "{preflight:?}"
    );

    // The preflight of a deposit as the page sends it.
    let preflight = call(
        addr,
        "OPTIONS",
        &bob.deposit_path(),
        &[
            origin,
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type,cubbyhole-access,cubbyhole-stamp",
            ),
        ],
        b"",
    )
    .await;
    assert!((200..300).contains(&preflight.status), "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin").as_deref(),
        Some(APP)
    );
    assert!(preflight
        .list("access-control-allow-methods")
        .contains(&"post".to_owned()));
    let allowed = preflight.list("access-control-allow-headers");
    for name in ["content-type", "cubbyhole-access", "cubbyhole-stamp"] {
        assert!(allowed.contains(&name.to_owned()), "{name}: {preflight:?}");
    }
    assert_eq!(
        preflight.header("access-control-max-age").as_deref(),
        Some("7200")
    );
    assert!(preflight.list("vary").contains(&"origin".to_owned()));
    assert!(preflight
        .header("access-control-allow-credentials")
        .is_none());
    // The deposit itself, with the type the page sends.
    let stored = call(
        addr,
        "POST",
        &bob.deposit_path(),
        &[origin, OCTETS],
        &envelope(1, b"hi"),
    )
    .await;
    assert_eq!(stored.status, 201);
    assert_cors(&stored, APP);
    server.stop().await;

    // 429, and any origin (`*`): no credentials.
    let server = Server::start(ServerConfig {
        cors_origins: vec!["*".into()],
        limits: Limits {
            requests_per_minute: 1,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    })
    .await;
    let addr = server.addr;
    assert_eq!(
        call(addr, "GET", "/v1/health", &[origin], b"").await.status,
        200
    );
    let limited = call(addr, "GET", "/v1/health", &[origin], b"").await;
    limited.is(429, "rate_requests");
    assert_eq!(
        limited.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    assert!(limited.header("retry-after").is_some());
    assert!(limited
        .list("access-control-expose-headers")
        .contains(&"retry-after".to_owned()));
    assert!(limited.header("access-control-allow-credentials").is_none());
    server.stop().await;
}

/// The largest requests a browser client sends fit the default body limit:
/// a bundle-set upload with 100 one-time prekeys, an envelope of the
/// relay's largest payload and the largest device list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sized_requests_fit_the_default_body_limit() {
    let server = Server::start(ServerConfig::unpriced()).await;
    let addr = server.addr;
    let (bob, upload) = Device::upload(100);
    assert_eq!(
        call(addr, "POST", "/v1/directory", &[OCTETS], &upload)
            .await
            .status,
        204
    );
    let largest = vec![7u8; RelayConfig::DEFAULT_MAX_ENVELOPE_BYTES as usize];
    let stored = call(
        addr,
        "POST",
        &bob.deposit_path(),
        &[OCTETS],
        &envelope(1, &largest),
    )
    .await;
    assert_eq!(stored.status, 201, "{stored:?}");
    // One byte more is the relay's envelope bound, not the body limit.
    let mut over = largest;
    over.push(7);
    call(
        addr,
        "POST",
        &bob.deposit_path(),
        &[OCTETS],
        &envelope(2, &over),
    )
    .await
    .is(413, "envelope_size");
    // The largest device list (1691 bytes) reaches the parser; one byte
    // more does not.
    let account = format!("/v1/accounts/{}/devices", "ab".repeat(32));
    call(addr, "PUT", &account, &[OCTETS], &[0u8; 1691])
        .await
        .is(400, "bad_request");
    call(addr, "PUT", &account, &[OCTETS], &[0u8; 1692])
        .await
        .is(413, "body_size");
    server.stop().await;
}
