//! `loadgen`: a load generator for the relay's HTTP API, over loopback
//! only, bounded in count and time.
//!
//! ```sh
//! cargo run --release -p cubbyhole-relay --bin loadgen -- \
//!     --clients 500 --mailboxes 50 --deposits 100000 --seconds 30
//! ```
//!
//! It publishes `--mailboxes` devices (real signed uploads), then runs
//! `--clients` concurrent depositors, each with its own keep-alive HTTP/1.1
//! connection, depositing envelopes (random ids and payloads) to the
//! mailboxes in turn, one request at a time, and one fetcher per mailbox
//! owner that loops: challenge, fetch (with an owner proof), challenge,
//! acknowledge. Depositing stops after `--deposits` deposits or
//! `--seconds` seconds, whichever comes first; the fetchers then get at
//! most `--drain-seconds` to empty the mailboxes. It prints the throughput
//! of accepted deposits and the latency percentiles of each kind of
//! request.
//!
//! By default every depositor sends its next deposit as soon as the last
//! one is answered (a closed loop: the throughput is the most the relay
//! and this machine sustain, and the latency follows from it, about
//! clients / throughput). With `--rate R` the depositors together send `R`
//! deposits per second on a fixed schedule (an open loop), and a deposit's
//! latency counts from when it was due, so a relay that falls behind shows
//! it (no coordinated omission).
//!
//! Requests are raw HTTP/1.1 requests written and parsed here (no client
//! library, no retries), so the latencies are those of single requests as
//! this process sees them, its own scheduling included.
//!
//! Without `--relay` it starts the relay in this process on `127.0.0.1:0`,
//! on a SQLite file in a new temporary directory (or `--db FILE`, or
//! `--postgres URL` with the `postgres` feature), with the per-address rate
//! limits and the relay-wide storage bound off. With `--relay URL` it loads
//! a relay started separately on loopback, which must have those limits off
//! too (see `--help`).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::relay::RelayConfig;
use cubbyhole::transport::{AccessKey, BundleSetUpload, DeviceAddress, MailboxAuth, MailboxOp};
use cubbyhole::{IdentityKeyPair, OsRng, SignedPrekey};
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use rand_core::RngCore;
use reqwest::Url;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

const HELP: &str = "\
loadgen: loads a cubbyhole relay over loopback; prints throughput and latency

USAGE:
    loadgen [OPTIONS]

OPTIONS:
    --clients N          concurrent depositors, one connection each
                         (default 500, 1 to 10000)
    --mailboxes M        mailboxes (published devices), one fetcher each
                         (default 50, 1 to 5000)
    --deposits N         stop after this many deposits (default 100000,
                         1 to 10000000)
    --seconds S          stop depositing after S seconds (default 30, 1 to 600)
    --rate R             send R deposits per second in all, on a fixed
                         schedule; latency counts from when a deposit was due
                         (default 0: each depositor sends as soon as its last
                         deposit is answered)
    --payload BYTES      envelope payload size (default 200, 0 to 65536)
    --fetch-limit N      envelopes per fetch (default 500, as the client's
                         receive batch; 1 to 1000)
    --idle-ms MS         a fetcher's pause after an empty fetch (default 20,
                         1 to 10000)
    --drain-seconds S    time the fetchers get after the deposits to empty the
                         mailboxes (default 10, 0 to 600)
    --no-fetch           no fetchers: deposits only (the mailboxes fill up)
    --no-access          deposits without access keys, to mailboxes without
                         one, as before issue 16 (the in-process relay then
                         asks no stamps); by default every owner registers
                         an access key and every deposit carries it
    --threads N          tokio worker threads (default: the number of CPUs)
    --relay URL          load the relay at URL (http, loopback only) instead of
                         starting one in this process
    --db FILE            in-process relay on this SQLite file (default: a file
                         in a new temporary directory, deleted afterwards)
    --postgres URL       in-process relay on this PostgreSQL database (loopback
                         only; build with `--features postgres`)
    -h, --help           this text

The in-process relay runs with its rate limits, total storage bound and
per-address connection cap off (Limits: deposits_per_minute,
claims_per_minute, requests_per_minute, total_storage_bytes and
max_connections_per_address 0). A relay given with --relay must be started
with them off too, and preferably without the access log, for example:
    cubbyhole-relay --db relay.db --listen 127.0.0.1:8080 \\
        --deposits-per-minute 0 --requests-per-minute 0 \\
        --total-storage-bytes 0 --max-connections-per-address 0 --log warn
";

/// Where the relay under load is.
#[derive(Debug)]
enum Target {
    /// A relay already running at this (loopback) URL.
    Remote(Url),
    /// An in-process relay on a SQLite file (`None`: a temporary one).
    Sqlite(Option<PathBuf>),
    /// An in-process relay on PostgreSQL.
    Postgres(String),
}

#[derive(Debug)]
struct Options {
    clients: usize,
    mailboxes: usize,
    deposits: u64,
    seconds: u64,
    rate: u64,
    payload: usize,
    fetch_limit: u32,
    idle_ms: u64,
    drain_seconds: u64,
    fetch: bool,
    /// Owners register an access key and deposits carry it.
    access: bool,
    threads: usize,
    target: Target,
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    flag: &str,
    value: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    let cleaned: String = value.chars().filter(|c| *c != '_').collect();
    let v: T = cleaned
        .parse()
        .map_err(|_| format!("{flag}: expected a number, got {value:?}"))?;
    if v < min || v > max {
        return Err(format!("{flag}: must be between {min} and {max}"));
    }
    Ok(v)
}

/// Whether a URL's host is a loopback address or `localhost`.
fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        clients: 500,
        mailboxes: 50,
        deposits: 100_000,
        seconds: 30,
        rate: 0,
        payload: 200,
        fetch_limit: 500,
        idle_ms: 20,
        drain_seconds: 10,
        fetch: true,
        access: true,
        threads: cpus(),
        target: Target::Sqlite(None),
    };
    let mut targets = 0;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--no-fetch" => {
                options.fetch = false;
                continue;
            }
            "--no-access" => {
                options.access = false;
                continue;
            }
            _ => {}
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| format!("{flag}: expects a value"))?,
        };
        let f = flag.as_str();
        match f {
            "--clients" => options.clients = number(f, &value, 1, 10_000)?,
            "--mailboxes" => options.mailboxes = number(f, &value, 1, 5_000)?,
            "--deposits" => options.deposits = number(f, &value, 1, 10_000_000)?,
            "--seconds" => options.seconds = number(f, &value, 1, 600)?,
            "--rate" => options.rate = number(f, &value, 0, 10_000_000)?,
            "--payload" => options.payload = number(f, &value, 0, 65_536)?,
            "--fetch-limit" => options.fetch_limit = number(f, &value, 1, 1_000)?,
            "--idle-ms" => options.idle_ms = number(f, &value, 1, 10_000)?,
            "--drain-seconds" => options.drain_seconds = number(f, &value, 0, 600)?,
            "--threads" => options.threads = number(f, &value, 1, 256)?,
            "--relay" => {
                let url = Url::parse(&value).map_err(|e| format!("--relay: {e}"))?;
                if url.scheme() != "http" || !is_loopback(&url) {
                    return Err(format!(
                        "--relay: only http:// URLs on loopback are allowed, not {value:?}"
                    ));
                }
                options.target = Target::Remote(url);
                targets += 1;
            }
            "--db" => {
                options.target = Target::Sqlite(Some(PathBuf::from(value)));
                targets += 1;
            }
            "--postgres" => {
                let url = Url::parse(&value)
                    .map_err(|_| "--postgres: expected a postgres:// URL".to_owned())?;
                if !matches!(url.scheme(), "postgres" | "postgresql") || !is_loopback(&url) {
                    return Err(
                        "--postgres: only a postgres:// URL on loopback is allowed".to_owned()
                    );
                }
                options.target = Target::Postgres(value);
                targets += 1;
            }
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    if targets > 1 {
        return Err("give at most one of --relay, --db and --postgres".to_owned());
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client
// ---------------------------------------------------------------------------

/// One keep-alive HTTP/1.1 connection, for the relay's answers (which
/// always carry `Content-Length`). Reconnects on the next request after a
/// failure.
struct Conn {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// Why a request got no answer.
type Failure = &'static str;

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Conn {
            addr,
            host: addr.to_string(),
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// `POST path` with `body` (`application/octet-stream`), or `GET path`
    /// when `body` is `None`: the status and the answer's body.
    async fn request(
        &mut self,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), Failure> {
        self.request_with(path, body, "").await
    }

    /// [`Conn::request`] with extra header lines (each ending in CRLF).
    async fn request_with(
        &mut self,
        path: &str,
        body: Option<&[u8]>,
        headers: &str,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let result = self.exchange(path, body, headers).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    /// Opens the connection if it is not open.
    async fn connect(&mut self) -> Result<(), Failure> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await.map_err(|_| "connect")?;
            stream.set_nodelay(true).map_err(|_| "connect")?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    async fn exchange(
        &mut self,
        path: &str,
        body: Option<&[u8]>,
        headers: &str,
    ) -> Result<(u16, Vec<u8>), Failure> {
        self.connect().await?;
        let Some(stream) = self.stream.as_ref() else {
            return Err("connect");
        };
        let mut request = Vec::with_capacity(160 + body.map_or(0, <[u8]>::len));
        match body {
            Some(body) => {
                let _ = write!(
                    Writer(&mut request),
                    "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
                     {headers}Content-Length: {}\r\n\r\n",
                    self.host,
                    body.len()
                );
                request.extend_from_slice(body);
            }
            None => {
                let _ = write!(
                    Writer(&mut request),
                    "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
                    self.host
                );
            }
        }
        write_all(stream, &request).await.map_err(|_| "write")?;

        // Headers, then the body by Content-Length.
        self.buf.clear();
        let header_end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err("malformed answer");
            }
            read_some(stream, &mut self.buf).await?;
        };
        let head = std::str::from_utf8(&self.buf[..header_end]).map_err(|_| "malformed answer")?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or("malformed answer")?;
        let mut length = None;
        let mut close = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("unsupported answer (chunked)");
            }
        }
        let length = match (status, length) {
            (204 | 304, _) => 0,
            (_, Some(length)) => length,
            (_, None) => return Err("answer without Content-Length"),
        };
        while self.buf.len() < header_end + length {
            read_some(stream, &mut self.buf).await?;
        }
        let answer = self.buf[header_end..header_end + length].to_vec();
        if close {
            self.stream = None;
        }
        Ok((status, answer))
    }
}

/// `fmt::Write` into a byte vector.
struct Writer<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what is available (at least one byte) onto the end of `buf`.
async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> Result<(), Failure> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream.readable().await.map_err(|_| "read")?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err("connection closed"),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err("read"),
        }
    }
}

// ---------------------------------------------------------------------------
// The relay under load
// ---------------------------------------------------------------------------

/// An in-process relay, stopped (and its temporary directory deleted) by
/// [`Local::stop`].
struct Local {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), cubbyhole_relay::ServerError>>,
    temp_dir: Option<PathBuf>,
}

impl Local {
    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        let served = self.task.await;
        if let Some(dir) = &self.temp_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("relay: {e}")),
            Err(e) => Err(format!("relay task: {e}")),
        }
    }
}

/// Starts the relay in this process on `127.0.0.1:0`, with the rate limits
/// and the total storage bound off.
async fn start_local(target: &Target, access: bool) -> Result<(SocketAddr, Local, String), String> {
    let mut temp_dir = None;
    let (storage, described) = match target {
        Target::Sqlite(Some(path)) => (
            StorageConfig::Sqlite(path.clone()),
            format!("SQLite file {}", path.display()),
        ),
        Target::Sqlite(None) => {
            let dir = std::env::temp_dir().join(format!(
                "cubbyhole-loadgen-{}-{:016x}",
                std::process::id(),
                OsRng.next_u64()
            ));
            std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let path = dir.join("relay.db");
            let described = format!("SQLite file {} (temporary)", path.display());
            temp_dir = Some(dir);
            (StorageConfig::Sqlite(path), described)
        }
        Target::Postgres(url) => (
            StorageConfig::Postgres(url.clone()),
            "PostgreSQL".to_owned(),
        ),
        Target::Remote(_) => return Err("a remote relay is not started here".to_owned()),
    };
    let config = ServerConfig {
        storage,
        limits: Limits {
            deposits_per_minute: 0,
            claims_per_minute: 0,
            requests_per_minute: 0,
            total_storage_bytes: 0,
            // Every client is on loopback.
            max_connections_per_address: 0,
            ..Limits::default()
        },
        // With access keys, the default relay rules (deposits that show the
        // key need no stamp); the owners' identity stamps are setup, not
        // load, and are off. Without, a relay that asks no stamps (the
        // mailboxes have no key: every deposit would need one).
        relay: if access {
            RelayConfig {
                identity_stamp_difficulty: 0,
                ..RelayConfig::default()
            }
        } else {
            RelayConfig::unpriced()
        },
        ..ServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, config, async {
        let _ = stopped.await;
    }));
    Ok((
        addr,
        Local {
            stop,
            task,
            temp_dir,
        },
        described,
    ))
}

/// The loopback address of a `--relay` URL.
async fn resolve(url: &Url) -> Result<SocketAddr, String> {
    let host = url.host_str().ok_or("--relay: no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(80);
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("--relay: {e}"))?
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| "--relay: the host is not a loopback address".to_owned())
}

/// Waits until `/v1/health` answers `200` (at most 30 s).
async fn wait_healthy(addr: SocketAddr) -> Result<(), String> {
    let mut conn = Conn::new(addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match conn.request("/v1/health", None).await {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => format!("health answered {}", reason_of(status, &body)),
            Err(why) => format!("health: {why}"),
        };
        if Instant::now() > deadline {
            return Err(format!("the relay is not healthy: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

/// A fast generator for ids and payloads (seeded from the OS).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A published mailbox and its owner.
struct Owner {
    keys: IdentityKeyPair,
    /// The `Cubbyhole-Access` header line of deposits (empty without).
    access_header: String,
    deposit_path: String,
    challenge_path: String,
    fetch_path: String,
    acknowledge_path: String,
}

/// What the tasks share.
struct Shared {
    owners: Vec<Owner>,
    payload: usize,
    deposits: u64,
    clients: usize,
    /// Between two deposits of one depositor, with `--rate`.
    interval: Option<Duration>,
    idle: Duration,
    /// When the load starts.
    started: Instant,
    /// Deposits handed out so far (a depositor takes the next number).
    next: AtomicU64,
    /// When depositing stops.
    deadline: Instant,
    /// Set when every depositor has finished.
    deposits_done: AtomicBool,
    /// Accepted deposits, final once `deposits_done`.
    accepted: AtomicU64,
    /// Envelopes fetched and acknowledged.
    fetched: AtomicU64,
    /// When the fetchers stop, once `deposits_done` (unix ms).
    drain_deadline_ms: AtomicU64,
}

/// Latencies (microseconds) and outcomes of one task.
#[derive(Default)]
struct Tally {
    deposit: Vec<u32>,
    fetch: Vec<u32>,
    fetch_drain: Vec<u32>,
    challenge: Vec<u32>,
    acknowledge: Vec<u32>,
    accepted: u64,
    repeated: u64,
    refused: u64,
    failed: u64,
    fetches: u64,
    fetched_under_load: u64,
    fetched_after: u64,
    /// Failures and refusals by request kind and reason.
    errors: HashMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.deposit.extend(other.deposit);
        self.fetch.extend(other.fetch);
        self.fetch_drain.extend(other.fetch_drain);
        self.challenge.extend(other.challenge);
        self.acknowledge.extend(other.acknowledge);
        self.accepted += other.accepted;
        self.repeated += other.repeated;
        self.refused += other.refused;
        self.failed += other.failed;
        self.fetches += other.fetches;
        self.fetched_under_load += other.fetched_under_load;
        self.fetched_after += other.fetched_after;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn error(&mut self, what: &str, why: &str) {
        *self.errors.entry(format!("{what}: {why}")).or_default() += 1;
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The reason of an error answer: its JSON `error` field, else the status.
fn reason_of(status: u16, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .map_or_else(|| format!("HTTP {status}"), |r| format!("{status} {r}"))
}

async fn depositor(shared: Arc<Shared>, mut conn: Conn, index: usize, seed: u64) -> Tally {
    let mut tally = Tally::default();
    let mut rng = SplitMix(seed);
    let mailboxes = shared.owners.len() as u64;
    // With a rate, the depositors' schedules are spread over one interval.
    let mut due = shared.interval.map(|interval| {
        shared.started + interval.mul_f64(index as f64 / shared.clients.max(1) as f64)
    });
    let mut body = vec![0u8; 17 + shared.payload];
    loop {
        if let Some(at) = due {
            if at >= shared.deadline {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= shared.deposits || Instant::now() >= shared.deadline {
            break;
        }
        let owner = &shared.owners[usize::try_from(n % mailboxes).unwrap_or(0)];
        // 0x01 || id (16) || payload
        body[0] = 0x01;
        rng.fill(&mut body[1..]);
        let started = due.unwrap_or_else(Instant::now);
        match conn
            .request_with(&owner.deposit_path, Some(&body), &owner.access_header)
            .await
        {
            Ok((201, _)) => {
                tally.deposit.push(micros(started.elapsed()));
                tally.accepted += 1;
            }
            Ok((200, _)) => tally.repeated += 1,
            Ok((status, answer)) => {
                tally.refused += 1;
                tally.error("deposit", &reason_of(status, &answer));
            }
            Err(why) => {
                tally.failed += 1;
                tally.error("deposit", why);
            }
        }
        if let (Some(at), Some(interval)) = (due.as_mut(), shared.interval) {
            *at += interval;
        }
    }
    tally
}

/// A fresh challenge for the owner's mailbox.
async fn challenge(conn: &mut Conn, owner: &Owner, tally: &mut Tally) -> Option<[u8; 32]> {
    let started = Instant::now();
    match conn.request(&owner.challenge_path, Some(&[])).await {
        Ok((200, answer)) => {
            tally.challenge.push(micros(started.elapsed()));
            match <[u8; 32]>::try_from(&answer[..]) {
                Ok(c) => Some(c),
                Err(_) => {
                    tally.error("challenge", "malformed answer");
                    None
                }
            }
        }
        Ok((status, answer)) => {
            tally.error("challenge", &reason_of(status, &answer));
            None
        }
        Err(why) => {
            tally.error("challenge", why);
            None
        }
    }
}

/// The envelope ids of a fetch answer (`length (4) || 0x01 || id (16) ||
/// payload`, repeated).
fn envelope_ids(mut body: &[u8]) -> Option<Vec<[u8; 16]>> {
    let mut ids = Vec::new();
    while !body.is_empty() {
        let length = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
        let envelope = body.get(4..4 + length)?;
        if envelope.first() != Some(&0x01) {
            return None;
        }
        ids.push(envelope.get(1..17)?.try_into().ok()?);
        body = &body[4 + length..];
    }
    Some(ids)
}

fn fetchers_should_stop(shared: &Shared) -> bool {
    if !shared.deposits_done.load(Ordering::Acquire) {
        return false;
    }
    shared.fetched.load(Ordering::Acquire) >= shared.accepted.load(Ordering::Acquire)
        || unix_ms() >= shared.drain_deadline_ms.load(Ordering::Acquire)
}

async fn fetcher(shared: Arc<Shared>, mut conn: Conn, index: usize) -> Tally {
    let mut tally = Tally::default();
    let owner = &shared.owners[index];
    while !fetchers_should_stop(&shared) {
        let Some(c) = challenge(&mut conn, owner, &mut tally).await else {
            tokio::time::sleep(shared.idle).await;
            continue;
        };
        let auth = MailboxAuth::sign(&owner.keys, 1, MailboxOp::Fetch, c).encode();
        let under_load = !shared.deposits_done.load(Ordering::Acquire);
        let started = Instant::now();
        let ids = match conn.request(&owner.fetch_path, Some(&auth)).await {
            Ok((200, answer)) => {
                let elapsed = micros(started.elapsed());
                if under_load {
                    tally.fetch.push(elapsed);
                } else {
                    tally.fetch_drain.push(elapsed);
                }
                tally.fetches += 1;
                envelope_ids(&answer).unwrap_or_else(|| {
                    tally.error("fetch", "malformed answer");
                    Vec::new()
                })
            }
            Ok((status, answer)) => {
                tally.error("fetch", &reason_of(status, &answer));
                Vec::new()
            }
            Err(why) => {
                tally.error("fetch", why);
                Vec::new()
            }
        };
        if ids.is_empty() {
            tokio::time::sleep(shared.idle).await;
            continue;
        }
        let Some(c) = challenge(&mut conn, owner, &mut tally).await else {
            continue;
        };
        // proof (133) || count (2) || ids
        let mut body = MailboxAuth::sign(&owner.keys, 1, MailboxOp::Acknowledge, c).encode();
        let count = u16::try_from(ids.len()).unwrap_or(u16::MAX);
        body.extend_from_slice(&count.to_be_bytes());
        for id in ids.iter().take(usize::from(count)) {
            body.extend_from_slice(id);
        }
        let started = Instant::now();
        match conn.request(&owner.acknowledge_path, Some(&body)).await {
            Ok((204, _)) => {
                tally.acknowledge.push(micros(started.elapsed()));
                let n = u64::from(count);
                if under_load {
                    tally.fetched_under_load += n;
                } else {
                    tally.fetched_after += n;
                }
                shared.fetched.fetch_add(n, Ordering::AcqRel);
            }
            Ok((status, answer)) => tally.error("acknowledge", &reason_of(status, &answer)),
            Err(why) => tally.error("acknowledge", why),
        }
    }
    tally
}

/// Publishes a device (a real signed upload, no one-time prekeys) and
/// returns its owner.
async fn publish(
    conn: &mut Conn,
    counter: u64,
    fetch_limit: u32,
    access: bool,
) -> Result<Owner, String> {
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let signed_prekey = SignedPrekey::generate(&mut OsRng, &keys, 1, counter / 1000)
        .map_err(|e| format!("signed prekey: {e}"))?;
    let mut upload = BundleSetUpload::new(1, &keys, counter, &signed_prekey, &[], true);
    let mailbox_id = DeviceAddress::new(keys.public(), 1).mailbox();
    let mut access_header = String::new();
    if access {
        let key = AccessKey::generate(&mut OsRng);
        upload.access_verifier = Some(key.verifier(&mailbox_id));
        access_header = format!("Cubbyhole-Access: {}\r\n", hex::encode(key.as_bytes()));
    }
    let upload = upload.sign(&keys);
    match conn.request("/v1/directory", Some(&upload)).await {
        Ok((204, _)) => {}
        Ok((status, answer)) => return Err(format!("publish: {}", reason_of(status, &answer))),
        Err(why) => return Err(format!("publish: {why}")),
    }
    let mailbox = hex::encode(DeviceAddress::new(keys.public(), 1).mailbox().0);
    let path = |what: &str| format!("/v1/mailboxes/{mailbox}/{what}");
    Ok(Owner {
        access_header,
        deposit_path: path("envelopes"),
        challenge_path: path("challenge"),
        fetch_path: format!("{}?limit={fetch_limit}&wait_ms=0", path("fetch")),
        acknowledge_path: path("acknowledge"),
        keys,
    })
}

/// Percentiles of latencies in microseconds, as milliseconds.
fn percentiles(samples: &mut [u32]) -> String {
    if samples.is_empty() {
        return "no samples".to_owned();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = ((samples.len() as f64) * q).ceil() as usize;
        f64::from(samples[rank.clamp(1, samples.len()) - 1]) / 1000.0
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} requests)",
        at(0.50),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

async fn run(options: Options) -> Result<String, String> {
    let (addr, local, storage) = match &options.target {
        Target::Remote(url) => (resolve(url).await?, None, format!("the relay at {url}")),
        target => {
            let (addr, local, storage) = start_local(target, options.access).await?;
            (addr, Some(local), format!("in-process relay on {storage}"))
        }
    };
    let outcome = load(&options, addr, &storage).await;
    let stopped = match local {
        Some(local) => local.stop().await,
        None => Ok(()),
    };
    let report = outcome?;
    stopped?;
    Ok(report)
}

async fn load(options: &Options, addr: SocketAddr, storage: &str) -> Result<String, String> {
    wait_healthy(addr).await?;
    // Upload counters: a fresh identity has no earlier upload.
    let counter = unix_ms();
    let mut conn = Conn::new(addr);
    let mut owners = Vec::with_capacity(options.mailboxes);
    for i in 0..options.mailboxes {
        owners.push(
            publish(
                &mut conn,
                counter + i as u64,
                options.fetch_limit,
                options.access,
            )
            .await?,
        );
    }
    drop(conn);
    // Every client connects before the clock starts: the figures are those
    // of a steady state, not of a connection storm.
    let fetchers = if options.fetch { options.mailboxes } else { 0 };
    let mut conns = Vec::with_capacity(options.clients + fetchers);
    for _ in 0..options.clients + fetchers {
        let mut conn = Conn::new(addr);
        conn.connect()
            .await
            .map_err(|why| format!("connecting to the relay: {why}"))?;
        conns.push(conn);
    }

    let interval = (options.rate > 0)
        .then(|| Duration::from_secs_f64(options.clients as f64 / options.rate as f64));
    let started = Instant::now();
    let shared = Arc::new(Shared {
        owners,
        payload: options.payload,
        deposits: options.deposits,
        clients: options.clients,
        interval,
        idle: Duration::from_millis(options.idle_ms),
        started,
        next: AtomicU64::new(0),
        deadline: started + Duration::from_secs(options.seconds),
        deposits_done: AtomicBool::new(false),
        accepted: AtomicU64::new(0),
        fetched: AtomicU64::new(0),
        drain_deadline_ms: AtomicU64::new(0),
    });
    let mut fetchers = JoinSet::new();
    for i in (0..options.mailboxes).filter(|_| options.fetch) {
        let conn = conns.pop().ok_or("too few connections")?;
        fetchers.spawn(fetcher(Arc::clone(&shared), conn, i));
    }
    let mut depositors = JoinSet::new();
    for i in 0..options.clients {
        let conn = conns.pop().ok_or("too few connections")?;
        depositors.spawn(depositor(Arc::clone(&shared), conn, i, OsRng.next_u64()));
    }
    let mut tally = Tally::default();
    while let Some(joined) = depositors.join_next().await {
        tally.merge(joined.map_err(|e| format!("a depositor failed: {e}"))?);
    }
    let deposit_time = started.elapsed();
    shared.accepted.store(tally.accepted, Ordering::Release);
    shared
        .drain_deadline_ms
        .store(unix_ms() + options.drain_seconds * 1000, Ordering::Release);
    shared.deposits_done.store(true, Ordering::Release);
    while let Some(joined) = fetchers.join_next().await {
        tally.merge(joined.map_err(|e| format!("a fetcher failed: {e}"))?);
    }
    let total_time = started.elapsed();
    Ok(report(
        options,
        storage,
        &mut tally,
        deposit_time,
        total_time,
    ))
}

fn report(
    options: &Options,
    storage: &str,
    tally: &mut Tally,
    deposit_time: Duration,
    total_time: Duration,
) -> String {
    let sent = tally.accepted + tally.repeated + tally.refused + tally.failed;
    let seconds = deposit_time.as_secs_f64();
    let mut out = String::new();
    let schedule = match options.rate {
        0 => "closed loop".to_owned(),
        rate => format!("{rate} deposits/s scheduled"),
    };
    let _ = writeln!(
        out,
        "loadgen: {} depositors ({schedule}), {} mailboxes ({}), {}-byte payloads, \
         {} tokio worker threads, {} CPUs",
        options.clients,
        options.mailboxes,
        if options.fetch {
            "one fetcher each"
        } else {
            "no fetchers"
        },
        options.payload,
        options.threads,
        cpus()
    );
    let _ = writeln!(
        out,
        "relay: {storage}; {}",
        if options.access {
            "deposits carry the mailbox's access key (contacts' share)"
        } else {
            "no access keys (one share per mailbox, no stamps)"
        }
    );
    let _ = writeln!(
        out,
        "deposits: {sent} sent in {seconds:.2} s: {} accepted (201), {} repeats (200), \
         {} refused, {} failed",
        tally.accepted, tally.repeated, tally.refused, tally.failed
    );
    let _ = writeln!(
        out,
        "throughput: {:.0} accepted deposits/s",
        tally.accepted as f64 / seconds.max(1e-9)
    );
    let _ = writeln!(
        out,
        "deposit latency (accepted): {}",
        percentiles(&mut tally.deposit)
    );
    if options.fetch {
        let _ = writeln!(
            out,
            "fetch latency (during deposits): {}",
            percentiles(&mut tally.fetch)
        );
        let _ = writeln!(
            out,
            "fetch latency (drain): {}",
            percentiles(&mut tally.fetch_drain)
        );
        let _ = writeln!(
            out,
            "challenge latency: {}",
            percentiles(&mut tally.challenge)
        );
        let _ = writeln!(
            out,
            "acknowledge latency: {}",
            percentiles(&mut tally.acknowledge)
        );
        let _ = writeln!(
            out,
            "fetched and acknowledged: {} during deposits, {} after, {} left pending \
             ({} fetches, {:.2} s in all)",
            tally.fetched_under_load,
            tally.fetched_after,
            tally
                .accepted
                .saturating_sub(tally.fetched_under_load + tally.fetched_after),
            tally.fetches,
            total_time.as_secs_f64()
        );
    }
    if tally.errors.is_empty() {
        let _ = writeln!(out, "errors: none");
    } else {
        let mut errors: Vec<_> = std::mem::take(&mut tally.errors).into_iter().collect();
        errors.sort();
        let _ = writeln!(out, "errors:");
        for (why, n) in errors {
            let _ = writeln!(out, "  {why}: {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>, String> {
        parse_args(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn only_loopback_targets() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:8080",
            "http://127.1.2.3",
        ] {
            assert!(
                matches!(
                    parse(&["--relay", ok]),
                    Ok(Some(Options {
                        target: Target::Remote(_),
                        ..
                    }))
                ),
                "{ok}"
            );
        }
        for refused in [
            "http://192.0.2.1:8080",
            "http://example.org",
            "https://127.0.0.1",
            "http://[2001:db8::1]",
            "http://0.0.0.0:8080",
        ] {
            assert!(parse(&["--relay", refused]).is_err(), "{refused}");
        }
        assert!(parse(&["--postgres", "postgres://u:p@127.0.0.1/db"]).is_ok());
        assert!(parse(&["--postgres", "postgres://u:p@db.example/db"]).is_err());
        assert!(parse(&["--postgres", "host=127.0.0.1"]).is_err());
    }

    #[test]
    fn parses_bounded_options() {
        let options = parse(&[
            "--clients=600",
            "--mailboxes",
            "7",
            "--rate",
            "1_000",
            "--no-fetch",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                options.clients,
                options.mailboxes,
                options.rate,
                options.fetch
            ),
            (600, 7, 1000, false)
        );
        assert!(matches!(options.target, Target::Sqlite(None)));
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--seconds", "601"]).is_err());
        assert!(parse(&["--deposits"]).is_err());
        assert!(parse(&["--frobnicate", "1"]).is_err());
        assert!(parse(&["--db", "a.db", "--relay", "http://127.0.0.1"]).is_err());
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn reads_fetch_answers() {
        let mut body = Vec::new();
        for (id, payload) in [([1u8; 16], &b"abc"[..]), ([2u8; 16], &b""[..])] {
            body.extend_from_slice(&(17 + payload.len() as u32).to_be_bytes());
            body.push(0x01);
            body.extend_from_slice(&id);
            body.extend_from_slice(payload);
        }
        assert_eq!(envelope_ids(&body), Some(vec![[1; 16], [2; 16]]));
        assert_eq!(envelope_ids(&[]), Some(vec![]));
        assert_eq!(envelope_ids(&body[..body.len() - 1]), None);
        assert_eq!(
            reason_of(429, br#"{"error":"rate_deposits","message":"x"}"#),
            "429 rate_deposits"
        );
        assert_eq!(reason_of(502, b"<html>"), "HTTP 502");
    }

    #[test]
    fn percentiles_by_rank() {
        let mut samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(
            percentiles(&mut samples),
            "p50 50.0 ms, p99 99.0 ms, max 100.0 ms (100 requests)"
        );
        assert_eq!(percentiles(&mut []), "no samples");
    }
}
