//! What an operator relies on: JSON logs with a request id and without
//! secrets (the real binary, its standard output captured), the latency
//! histograms and process metrics of `/metrics`, the lock that keeps a
//! second relay off a SQLite database, and the after-restore step on
//! SQLite (PostgreSQL: `tests/postgres_restore.rs`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::relay::{Relay, RelayConfig, SqliteRelayStorage};
use cubbyhole::transport::{
    encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxAuth, MailboxOp,
    TransportError,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, OsRng, PrekeyBundle, PrekeyStore};
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
        }
    }

    /// An upload of the current pool, replacing the relay's.
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
}

/// A relay process, killed on drop; its standard output and error lines
/// arrive on `lines`.
struct RelayProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl RelayProcess {
    fn spawn(args: &[&str]) -> RelayProcess {
        let mut child = Command::new(BIN)
            .args(args)
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
                for line in BufReader::new(stream).lines() {
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
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; got:\n{}", self.seen.join("\n")),
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

    /// Kills it and returns every line it wrote.
    fn kill(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut lines = std::mem::take(&mut self.seen);
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            lines.push(line);
        }
        lines
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
    let mut relay = RelayProcess::spawn(&[
        "--memory",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log",
        "debug",
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
        &[("x-request-id", "client-chosen-42")],
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

    let lines = relay.kill();
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

    let all = lines.join("\n");
    let mut secrets = vec![
        ("the payload (hex)", hex::encode(&payload)),
        ("the payload (as a Debug list)", {
            let shown = format!("{:?}", &payload[..8]);
            shown.trim_end_matches(']').to_owned()
        }),
        ("the identity key", identity_hex.clone()),
        ("the mailbox id", mailbox_hex.clone()),
        ("the mailbox proof", hex::encode(&proof)),
        ("the challenge", hex::encode(&challenge.body)),
        ("the upload", hex::encode(&upload)),
        (
            "the signed prekey",
            hex::encode(device.store.current_signed_prekey().public()),
        ),
    ];
    for key in device.store.one_time_prekeys() {
        secrets.push(("a one-time prekey", hex::encode(key.public())));
    }
    for (what, value) in secrets {
        for window in [value.as_str(), value.get(..16).unwrap_or(&value)] {
            assert!(!all.contains(window), "the logs contain {what}");
        }
    }
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
    let server = tokio::spawn(serve(listener, ServerConfig::default(), async {
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
        ..ServerConfig::default()
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
        RelayConfig::default(),
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
    backup(&db, &saved);
    // After the backup: a prekey is claimed, and an upload (which someone
    // may keep) raises the counter.
    assert!(has_one_time_prekey(&relay.fetch_bundle(&address).unwrap()));
    let later = device.upload(NOW - 500);
    relay.publish(NOW - 500, &later).unwrap();
    drop(relay);

    // Control: restored without the step, the claimed prekey is back and
    // the later upload is accepted again.
    let unsafe_copy = dir.0.join("unsafe.db");
    restore(&saved, &unsafe_copy);
    let mut relay = relay_on(&unsafe_copy);
    assert_eq!(relay.one_time_prekeys_left(&address).unwrap(), 3);
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
    assert!(!has_one_time_prekey(&relay.fetch_bundle(&address).unwrap()));
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
