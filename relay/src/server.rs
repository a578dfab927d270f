//! The HTTP server: `relay/API.md` over axum and hyper, in front of one
//! [`cubbyhole::relay::Relay`].
//!
//! # How a request is handled
//!
//! Every request passes, outermost first: CORS (when origins are
//! configured), the access log and metrics, the per-address request rate
//! limit (`rate_requests`), the request timeout (`timeout`), a panic guard
//! (a bug answers `500 internal` instead of dropping the connection), the
//! router (`no_route`, `method_not_allowed`; with a web root, a `GET` or
//! `HEAD` outside `/v1/` that no route takes is a static file, see
//! [`ServerConfig::web_root`]), the body size limit on routes
//! with a body (`body_size`), and the route's handler. CORS being
//! outermost, every answer of the router, errors included, carries its
//! headers for an allowed origin; a preflight (`OPTIONS`) is answered by
//! the CORS layer alone. Handlers parse the
//! path, query and body (`bad_request`), apply the per-address deposit and
//! bundle-fetch rate limits and the relay-wide storage bound, and call the
//! [`Relay`]: **every rule of the directory and the mailbox (owner proofs,
//! upload signatures and counters, per-mailbox and per-device bounds,
//! retention) is the relay core's**; the server only maps its answers to
//! HTTP ([`REASONS`]).
//!
//! The relay core is synchronous (SQLite and the PostgreSQL client block),
//! so it runs on a thread of its own, which takes the calls from one
//! queue. Each turn it takes every call queued at that moment: the deposits
//! among them are stored together with [`Relay::deposit_batch`], then the
//! other calls (challenges, fetches, acknowledgements, uploads, ...) run,
//! each atomic on its own, in the order they came. So under load a deposit
//! waits for at most one turn of other calls and a call for at most one
//! batch of deposits, however many clients are depositing or polling, and
//! the relay never waits for the async workers between two turns.
//!
//! Each turn is one storage group ([`RelayStorage::begin_group`]): one
//! commit for all its calls (group commit), and no call is answered (a
//! deposit `201`) before it. On a SQLite file the commit does not wait for
//! the disk; a sync thread flushes the write-ahead log (`WalSync`) and
//! only then answers the turn's calls, one flush for every turn committed
//! while the previous flush ran, so the relay thread goes on with the next
//! turn meanwhile. Nothing is answered before it would survive a power
//! loss.
//!
//! # Long polls
//!
//! A fetch with `wait_ms` checks the proof and lists the mailbox as any
//! fetch (consuming the challenge). If nothing is pending it waits on the
//! mailbox's wake-up, which a deposit to that mailbox fires (through this
//! process, or, with PostgreSQL, through any process sharing the database,
//! via the LISTEN/NOTIFY listener), then lists the mailbox again without a
//! proof (the challenge is spent) until it finds
//! envelopes or the time is up.
//!
//! # Relay-wide numbers
//!
//! [`cubbyhole::relay::RelayStorage`] has per-mailbox usage but no
//! relay-wide totals. The server therefore keeps the usage of every mailbox
//! with pending envelopes that it has seen (deposited to or acknowledged
//! from since it started; refreshed from the storage after every retention
//! sweep): the `total_storage` bound and the storage gauges of `/metrics`
//! count those mailboxes. Envelopes left from before a restart are counted
//! once their mailbox is touched again.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;
use cubbyhole::protocol::devices::{AccountId, DeviceList};
use cubbyhole::relay::{
    device_list_error, device_list_reason, reason as core_reason, MailboxUsage, Relay, RelayConfig,
    RelayStorage, RelayStorageError, Share, SqliteRelayStorage,
};
use cubbyhole::transport::stamp::Stamp;
use cubbyhole::transport::{
    decode_acknowledge, decode_envelope, encode_envelope_list, AccessKey, DepositPass,
    DeviceAddress, Envelope, MailboxAuth, MailboxId, TransportError,
};
use cubbyhole_http::wire::{
    encode_device_lists, parse_decimal_u32, DeviceListQuery, FetchQuery, ACCESS_HEADER,
    MAX_SIGNED_DEVICE_LIST_BYTES, STAMP_HEADER,
};
use http_body_util::LengthLimitError;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rand_core::OsRng;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tower::ServiceExt as _;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::{debug, error, info, trace, warn};

use crate::connections::{self, ConnectionCaps, Io, Refused, Rewrite};
use crate::durability::{SqliteCheckpointer, WalSync};
use crate::metrics::{Live, Metrics};
use crate::ratelimit::{Kind, RateLimiter};
use crate::waiters::Waiters;
use crate::web;

/// Where the relay keeps its state.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// SQLite in memory: nothing survives the process (tests, demos).
    SqliteMemory,
    /// A SQLite database file, created if missing
    /// ([`SqliteRelayStorage::open`]).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (crate feature `postgres`), so several
    /// relay processes can share one database. Without the feature,
    /// [`serve`] answers [`ServerError::PostgresNotCompiled`].
    Postgres(String),
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageConfig::SqliteMemory => f.write_str("SqliteMemory"),
            StorageConfig::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            // The URL may hold a password.
            StorageConfig::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// The server's own abuse limits (the relay's bounds are
/// [`RelayConfig`]). [`Default`] gives the values documented on each field
/// (also the `DEFAULT_*` constants). Where a field says so, 0 disables the
/// limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in bytes: larger is `413 body_size` (checked
    /// on `Content-Length` before reading, and while reading). Keep it above
    /// [`RelayConfig::max_envelope_bytes`] + 17 so that oversized envelopes
    /// get `envelope_size`. 0: no limit. Default 512 KiB (524 288).
    pub max_body_bytes: usize,
    /// Deposits per client address per minute (token bucket: bursts of up
    /// to this many, refilled evenly over the minute): more is
    /// `429 rate_deposits`. 0: no limit. Default 600.
    pub deposits_per_minute: u32,
    /// Bundle fetches (each claims a one-time prekey) per client address
    /// per minute: more is `429 rate_claims`. 0: no limit. Default 60.
    pub claims_per_minute: u32,
    /// Requests of any kind per client address per minute: more is
    /// `429 rate_requests`. 0: no limit. Default 1 200.
    pub requests_per_minute: u32,
    /// Most pending envelope payload bytes on the relay: a deposit that
    /// would go over is `507 total_storage` (see the module docs for what
    /// is counted). 0: no limit. Default 4 GiB.
    pub total_storage_bytes: u64,
    /// Longest a request may take, in milliseconds, from its headers to its
    /// answer (a long-polling fetch gets [`Self::max_wait_ms`] more): longer
    /// is `408 timeout`. 0: no limit. Default 30 000.
    pub request_timeout_ms: u64,
    /// Longest a client may take to send a request's headers, in
    /// milliseconds, also the idle time allowed between requests on a
    /// keep-alive connection; then the connection is closed. 0: no limit.
    /// Default 10 000.
    pub header_timeout_ms: u64,
    /// Cap on a fetch's `wait_ms`. 0 disables long polls (fetches answer at
    /// once). Default 30 000.
    pub max_wait_ms: u32,
    /// Take the client address for rate limits from the first entry of
    /// `X-Forwarded-For` (when it parses) instead of the peer address. Only
    /// behind a reverse proxy that sets that header itself; otherwise any
    /// client picks its own address. The per-address connection cap
    /// ([`Self::max_connections_per_address`]) is then not applied (every
    /// connection comes from the proxy). Default `false`.
    pub trust_forwarded_for: bool,
    /// Most connections open at once, in total: a connection over it gets
    /// `503 connections` and is closed at once. Also held below the
    /// process's file-descriptor limit (minus [`RESERVED_FDS`]) where the
    /// platform tells it. 0: only that limit. Default 8 192.
    pub max_connections: usize,
    /// Most connections open at once from one client address (an IPv6
    /// address counts for its /64): more are answered `503 connections`
    /// and closed at once. 0: no limit. Default 64.
    pub max_connections_per_address: usize,
    /// Time allowed for a request body, in milliseconds, counted from the
    /// end of its headers, plus one second for every
    /// [`Self::min_body_bytes_per_sec`] bytes received (a minimum upload
    /// rate): a body that falls behind is `408 timeout` and its connection
    /// closed. 0: no body timeout (the request timeout still applies).
    /// Default 10 000.
    pub body_timeout_ms: u64,
    /// The upload rate, in bytes per second, that keeps extending
    /// [`Self::body_timeout_ms`]. 0: the body timeout is fixed. Default
    /// 1 024.
    pub min_body_bytes_per_sec: u64,
    /// The part of [`Self::total_storage_bytes`] that strangers' deposits
    /// (admitted by a stamp, not an access key: SPEC.md 16.10) may take
    /// together, in percent: a stranger's deposit over it is `507
    /// strangers_total`. Default 25.
    pub strangers_storage_percent: u8,
    /// Above this part of [`Self::total_storage_bytes`] (in percent), only
    /// mailboxes that hold less than [`Self::fair_share_bytes`] accept
    /// deposits (`507 total_storage` for the others), so that the last
    /// part of the relay's storage stays for mailboxes that hold little
    /// (SPEC.md 16.12). Default 75.
    pub fair_share_percent: u8,
    /// See [`Self::fair_share_percent`]. Default 1 MiB.
    pub fair_share_bytes: u64,
}

/// File descriptors kept free for the storage, the listener and the
/// runtime when the connection cap is derived from the file-descriptor
/// limit ([`Limits::max_connections`]).
pub const RESERVED_FDS: u64 = 64;

/// Longest request target (path and query) in bytes: longer is `414
/// uri_size`. The longest target of the API is about 150 bytes.
pub const MAX_URI_BYTES: usize = 2048;

/// Largest request head (request line and headers) in bytes: larger is
/// `431 header_size`, and so are more than [`MAX_HEADERS`] headers.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most headers in a request.
pub const MAX_HEADERS: usize = 64;

/// Largest static file served from [`ServerConfig::web_root`], in bytes
/// (16 MiB): a larger one is `404 no_route` (and logged). Each `GET` holds
/// the file in memory while it is sent.
pub const MAX_WEB_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// How long a browser may keep a CORS preflight answer
/// (`Access-Control-Max-Age`), in seconds: 2 hours, the most Chromium
/// keeps (Firefox keeps up to a day). Every request with a body is a
/// non-simple request (its `Content-Type` is `application/octet-stream`),
/// preflighted once per URL: a long-polling client asks for the same
/// fetch URL all day, and each preflight is one more round trip before
/// its request.
pub const CORS_MAX_AGE_SECS: u64 = 7200;

impl Limits {
    /// Default [`Self::max_body_bytes`]: 512 KiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 512 * 1024;
    /// Default [`Self::deposits_per_minute`]: 600.
    pub const DEFAULT_DEPOSITS_PER_MINUTE: u32 = 600;
    /// Default [`Self::claims_per_minute`]: 60.
    pub const DEFAULT_CLAIMS_PER_MINUTE: u32 = 60;
    /// Default [`Self::requests_per_minute`]: 1 200.
    pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 1_200;
    /// Default [`Self::total_storage_bytes`]: 4 GiB.
    pub const DEFAULT_TOTAL_STORAGE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
    /// Default [`Self::request_timeout_ms`]: 30 s.
    pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
    /// Default [`Self::header_timeout_ms`]: 10 s.
    pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
    /// Default [`Self::max_wait_ms`]: 30 s.
    pub const DEFAULT_MAX_WAIT_MS: u32 = 30_000;
    /// Default [`Self::max_connections`]: 8 192.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 8_192;
    /// Default [`Self::max_connections_per_address`]: 64.
    pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
    /// Default [`Self::body_timeout_ms`]: 10 s.
    pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 10_000;
    /// Default [`Self::min_body_bytes_per_sec`]: 1 KiB/s.
    pub const DEFAULT_MIN_BODY_BYTES_PER_SEC: u64 = 1_024;
    /// Default [`Self::strangers_storage_percent`]: 25.
    pub const DEFAULT_STRANGERS_STORAGE_PERCENT: u8 = 25;
    /// Default [`Self::fair_share_percent`]: 75.
    pub const DEFAULT_FAIR_SHARE_PERCENT: u8 = 75;
    /// Default [`Self::fair_share_bytes`]: 1 MiB.
    pub const DEFAULT_FAIR_SHARE_BYTES: u64 = 1024 * 1024;

    /// The time allowed to a request to `route`.
    fn budget(&self, route: Option<Route>) -> Option<Duration> {
        if self.request_timeout_ms == 0 {
            return None;
        }
        let wait = match route {
            Some(Route::Fetch) => u64::from(self.max_wait_ms),
            _ => 0,
        };
        Some(Duration::from_millis(
            self.request_timeout_ms.saturating_add(wait),
        ))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            deposits_per_minute: Self::DEFAULT_DEPOSITS_PER_MINUTE,
            claims_per_minute: Self::DEFAULT_CLAIMS_PER_MINUTE,
            requests_per_minute: Self::DEFAULT_REQUESTS_PER_MINUTE,
            total_storage_bytes: Self::DEFAULT_TOTAL_STORAGE_BYTES,
            request_timeout_ms: Self::DEFAULT_REQUEST_TIMEOUT_MS,
            header_timeout_ms: Self::DEFAULT_HEADER_TIMEOUT_MS,
            max_wait_ms: Self::DEFAULT_MAX_WAIT_MS,
            trust_forwarded_for: false,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: Self::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            body_timeout_ms: Self::DEFAULT_BODY_TIMEOUT_MS,
            min_body_bytes_per_sec: Self::DEFAULT_MIN_BODY_BYTES_PER_SEC,
            strangers_storage_percent: Self::DEFAULT_STRANGERS_STORAGE_PERCENT,
            fair_share_percent: Self::DEFAULT_FAIR_SHARE_PERCENT,
            fair_share_bytes: Self::DEFAULT_FAIR_SHARE_BYTES,
        }
    }
}

/// Everything [`serve`] needs besides the listener. [`Default`]: SQLite in
/// memory, default relay bounds and limits, no CORS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Where the state lives.
    pub storage: StorageConfig,
    /// The relay's rules' bounds (envelope size, mailbox bounds, retention,
    /// ...).
    pub relay: RelayConfig,
    /// The server's abuse limits.
    pub limits: Limits,
    /// Origins allowed to call the relay from a browser (CORS), such as
    /// `https://app.example`; `*` allows any. Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// A directory whose files the relay serves to browsers: `GET` and
    /// `HEAD` on paths outside `/v1/` (`/` is `index.html`), read from the
    /// disk per request, never outside the directory (symbolic links out
    /// of it are refused), with a `Content-Type` by extension and a
    /// `Content-Security-Policy` that lets the page talk to this relay
    /// only. `None` (the default): no static files, every path outside the
    /// API is `404 no_route`.
    pub web_root: Option<PathBuf>,
}

impl ServerConfig {
    /// The defaults with a relay that asks no stamps
    /// ([`RelayConfig::unpriced`]): for tests and trusted deployments.
    pub fn unpriced() -> Self {
        ServerConfig {
            relay: RelayConfig::unpriced(),
            ..ServerConfig::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            storage: StorageConfig::SqliteMemory,
            relay: RelayConfig::default(),
            limits: Limits::default(),
            cors_origins: Vec::new(),
            web_root: None,
        }
    }
}

/// Why [`serve`] could not start, or why it stopped other than on the
/// shutdown signal ([`ServerError::LogFlushFailed`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// The storage could not be opened.
    Storage(RelayStorageError),
    /// [`StorageConfig::Postgres`] needs the crate feature `postgres`.
    PostgresNotCompiled,
    /// The PostgreSQL storage or its listener could not be set up.
    Postgres(String),
    /// A setting is invalid (the message names it).
    Config(String),
    /// Another relay process (or another [`serve`] in this process) has the
    /// SQLite database open: it holds the lock file beside it.
    DatabaseInUse {
        /// The database file.
        database: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// An I/O failure.
    Io(std::io::Error),
    /// The write-ahead log of the SQLite file could not be flushed to the
    /// disk while serving, so the relay stopped (fail-stop, as PostgreSQL
    /// does on a failed `fsync`): after a failed flush the operating
    /// system may have dropped the unwritten data and a later flush that
    /// succeeds proves nothing, so the relay answers nothing more and
    /// leaves the database as it is on the disk. Restart it: SQLite's
    /// recovery reads only what really reached the disk, which holds every
    /// call answered as stored before the failure.
    LogFlushFailed(std::io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Storage(e) => write!(f, "relay storage: {e}"),
            ServerError::PostgresNotCompiled => f.write_str(
                "PostgreSQL storage is not compiled in: build cubbyhole-relay with the \
                 `postgres` feature",
            ),
            ServerError::Postgres(e) => write!(f, "PostgreSQL: {e}"),
            ServerError::Config(e) => write!(f, "invalid configuration: {e}"),
            ServerError::DatabaseInUse { database, lock } => write!(
                f,
                "the database {} is in use by another relay process (it holds the lock \
                 on {}); stop that relay first, or give this one another database",
                database.display(),
                lock.display()
            ),
            ServerError::Io(e) => write!(f, "I/O: {e}"),
            ServerError::LogFlushFailed(e) => write!(
                f,
                "the write-ahead log could not be flushed to the disk ({e}); the relay \
                 stopped so as not to answer for writes the disk may have lost. Restart it: \
                 it recovers from what is on the disk, which holds every call answered as \
                 stored before the failure"
            ),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Storage(e) => Some(e),
            ServerError::Io(e) | ServerError::LogFlushFailed(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ServerError {
    fn from(e: std::io::Error) -> Self {
        ServerError::Io(e)
    }
}

impl From<RelayStorageError> for ServerError {
    fn from(e: RelayStorageError) -> Self {
        ServerError::Storage(e)
    }
}

// ---------------------------------------------------------------------------
// Routes and reasons
// ---------------------------------------------------------------------------

/// `percent` % of `total` (0 for 0 %, `total` for 100 % or more).
fn percent_of(total: u64, percent: u8) -> u64 {
    let percent = u64::from(percent.min(100));
    // Without overflow for any total: total / 100 * percent + the rest's.
    total / 100 * percent + total % 100 * percent / 100
}

/// The route table: `(method, path template)` for every route of
/// `relay/API.md`, with `{name}` path parameters. The router is built from
/// it and `tests/openapi.rs` checks `openapi.json` against it.
pub const ROUTES: &[(&str, &str)] = &[
    Route::Health.spec(),
    Route::Metrics.spec(),
    Route::Publish.spec(),
    Route::Bundle.spec(),
    Route::OneTimePrekeys.spec(),
    Route::Deposit.spec(),
    Route::Challenge.spec(),
    Route::Fetch.spec(),
    Route::Acknowledge.spec(),
    Route::PublishDevices.spec(),
    Route::Devices.spec(),
];

/// Every error reason the server answers with (the `error` field of an
/// error body) and its HTTP status. `no_route`, `method_not_allowed`,
/// `internal` (a bug), `limit` (a relay bound this server does not know,
/// for a newer relay core), `uri_size`, `header_size`, `bad_request` (a
/// request hyper cannot parse) and `connections` (a connection over a
/// cap, before any request) can come from any request; the others are
/// listed per route by [`route_responses`].
pub const REASONS: &[(&str, u16)] = &[
    Reason::BadRequest.spec(),
    Reason::Unauthorized.spec(),
    Reason::NotFound.spec(),
    Reason::NoRoute.spec(),
    Reason::MethodNotAllowed.spec(),
    Reason::Timeout.spec(),
    Reason::Replayed.spec(),
    Reason::EnvelopeSize.spec(),
    Reason::BodySize.spec(),
    Reason::AcknowledgeIds.spec(),
    Reason::OneTimePrekeys.spec(),
    Reason::Limit.spec(),
    Reason::RateDeposits.spec(),
    Reason::RateClaims.spec(),
    Reason::RateRequests.spec(),
    Reason::Internal.spec(),
    Reason::Unavailable.spec(),
    Reason::PendingEnvelopes.spec(),
    Reason::PendingBytes.spec(),
    Reason::TotalStorage.spec(),
    Reason::StorageFailed.spec(),
    Reason::StaleDeviceList.spec(),
    Reason::DeviceListConflict.spec(),
    Reason::DeviceListGap.spec(),
    Reason::ContentType.spec(),
    Reason::UriSize.spec(),
    Reason::HeaderSize.spec(),
    Reason::Connections.spec(),
    Reason::StampRequired.spec(),
    Reason::StrangerEnvelopes.spec(),
    Reason::StrangerBytes.spec(),
    Reason::StrangersClosed.spec(),
    Reason::StrangersTotal.spec(),
];

/// The answers a route can give: `(status, None)` for a success,
/// `(status, Some(reason))` for an error (besides the reasons any request
/// can get, see [`REASONS`]). `None` for a route not in [`ROUTES`].
pub fn route_responses(method: &str, path: &str) -> Option<Vec<(u16, Option<&'static str>)>> {
    let route = Route::ALL
        .into_iter()
        .find(|r| r.spec() == (method, path))?;
    let mut out: Vec<(u16, Option<&'static str>)> =
        route.successes().iter().map(|s| (*s, None)).collect();
    out.extend(route.reasons().iter().map(|r| {
        let (name, status) = r.spec();
        (status, Some(name))
    }));
    Some(out)
}

/// The routes; [`ROUTES`] lists them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Metrics,
    Publish,
    Bundle,
    OneTimePrekeys,
    Deposit,
    Challenge,
    Fetch,
    Acknowledge,
    PublishDevices,
    Devices,
}

impl Route {
    const ALL: [Route; 11] = [
        Route::Health,
        Route::Metrics,
        Route::Publish,
        Route::Bundle,
        Route::OneTimePrekeys,
        Route::Deposit,
        Route::Challenge,
        Route::Fetch,
        Route::Acknowledge,
        Route::PublishDevices,
        Route::Devices,
    ];

    const fn spec(self) -> (&'static str, &'static str) {
        match self {
            Route::Health => ("GET", "/v1/health"),
            Route::Metrics => ("GET", "/metrics"),
            Route::Publish => ("POST", "/v1/directory"),
            Route::Bundle => ("GET", "/v1/directory/{identity}/{device}/bundle"),
            Route::OneTimePrekeys => ("GET", "/v1/directory/{identity}/{device}/one-time-prekeys"),
            Route::Deposit => ("POST", "/v1/mailboxes/{mailbox}/envelopes"),
            Route::Challenge => ("POST", "/v1/mailboxes/{mailbox}/challenge"),
            Route::Fetch => ("POST", "/v1/mailboxes/{mailbox}/fetch"),
            Route::Acknowledge => ("POST", "/v1/mailboxes/{mailbox}/acknowledge"),
            Route::PublishDevices => ("PUT", "/v1/accounts/{account}/devices"),
            Route::Devices => ("GET", "/v1/accounts/{account}/devices"),
        }
    }

    /// The `route` label of the metrics and the access log.
    const fn name(self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Publish => "publish",
            Route::Bundle => "bundle",
            Route::OneTimePrekeys => "one_time_prekeys",
            Route::Deposit => "deposit",
            Route::Challenge => "challenge",
            Route::Fetch => "fetch",
            Route::Acknowledge => "acknowledge",
            Route::PublishDevices => "publish_devices",
            Route::Devices => "devices",
        }
    }

    const fn successes(self) -> &'static [u16] {
        match self {
            Route::Publish | Route::Acknowledge | Route::PublishDevices => &[204],
            Route::Deposit => &[201, 200],
            _ => &[200],
        }
    }

    /// The route-specific error reasons (what the handler and the layers
    /// in front of it can answer, besides the global ones).
    const fn reasons(self) -> &'static [Reason] {
        use Reason::*;
        match self {
            Route::Health => &[RateRequests, Timeout, Unavailable, StorageFailed],
            Route::Metrics => &[RateRequests, Timeout],
            Route::Publish => &[
                BadRequest,
                Unauthorized,
                StampRequired,
                Replayed,
                OneTimePrekeys,
                BodySize,
                ContentType,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::Bundle => &[
                BadRequest,
                NotFound,
                RateClaims,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::OneTimePrekeys => &[
                BadRequest,
                NotFound,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::Deposit => &[
                BadRequest,
                NotFound,
                EnvelopeSize,
                BodySize,
                ContentType,
                PendingEnvelopes,
                PendingBytes,
                TotalStorage,
                StampRequired,
                StrangerEnvelopes,
                StrangerBytes,
                StrangersClosed,
                StrangersTotal,
                RateDeposits,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::Challenge => &[
                BadRequest,
                NotFound,
                BodySize,
                ContentType,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::Fetch => &[
                BadRequest,
                Unauthorized,
                BodySize,
                ContentType,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::Acknowledge => &[
                BadRequest,
                Unauthorized,
                AcknowledgeIds,
                BodySize,
                ContentType,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::PublishDevices => &[
                BadRequest,
                Unauthorized,
                StaleDeviceList,
                DeviceListConflict,
                DeviceListGap,
                BodySize,
                ContentType,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
            Route::Devices => &[
                BadRequest,
                NotFound,
                RateRequests,
                Timeout,
                Unavailable,
                StorageFailed,
            ],
        }
    }

    /// The path in axum 0.7's syntax (`:name` parameters).
    fn axum_path(self) -> String {
        self.spec()
            .1
            .split('/')
            .map(|segment| match template_param(segment) {
                Some(name) => format!(":{name}"),
                None => segment.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The route whose axum path is `path` (a [`MatchedPath`]) and whose
    /// method is `method`; for a method the path does not serve (`HEAD`
    /// on a `GET` route, or an answer `405`), the first route of the path.
    fn from_axum_path(method: &str, path: &str) -> Option<Route> {
        let mut routes = Route::ALL
            .into_iter()
            .filter(|route| route.matches_axum_path(path));
        let first = routes.next()?;
        Some(
            std::iter::once(first)
                .chain(routes)
                .find(|route| route.spec().0 == method)
                .unwrap_or(first),
        )
    }

    /// Whether `path` (axum syntax) is this route's path.
    fn matches_axum_path(self, path: &str) -> bool {
        let template = self.spec().1;
        template.split('/').count() == path.split('/').count()
            && template
                .split('/')
                .zip(path.split('/'))
                .all(|(t, p)| match template_param(t) {
                    Some(name) => p.strip_prefix(':') == Some(name),
                    None => t == p,
                })
    }

    fn method_router<S: Storage>(self, body_limit: usize) -> MethodRouter<Arc<Shared<S>>> {
        let limited = |router: MethodRouter<Arc<Shared<S>>>| {
            if body_limit == 0 {
                router
            } else {
                router.layer(RequestBodyLimitLayer::new(body_limit))
            }
        };
        match self {
            Route::Health => get(health::<S>),
            Route::Metrics => get(metrics::<S>),
            Route::Publish => limited(post(publish::<S>)),
            // Not `HEAD`: axum would run the `GET` handler, which claims
            // (and so destroys) a one-time prekey, and drop the bundle.
            Route::Bundle => get(bundle::<S>).head(no_head),
            Route::OneTimePrekeys => get(one_time_prekeys::<S>),
            Route::Deposit => limited(post(deposit::<S>)),
            Route::Challenge => limited(post(challenge::<S>)),
            Route::Fetch => limited(post(fetch::<S>)),
            Route::Acknowledge => limited(post(acknowledge::<S>)),
            // At most the largest signed list, whatever the server's limit.
            Route::PublishDevices => {
                let limit = match body_limit {
                    0 => MAX_SIGNED_DEVICE_LIST_BYTES,
                    n => n.min(MAX_SIGNED_DEVICE_LIST_BYTES),
                };
                put(publish_devices::<S>).layer(RequestBodyLimitLayer::new(limit))
            }
            Route::Devices => get(devices::<S>),
        }
    }
}

/// `name` for a `{name}` path segment.
fn template_param(segment: &str) -> Option<&str> {
    segment.strip_prefix('{')?.strip_suffix('}')
}

/// The error reasons; [`REASONS`] lists them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    BadRequest,
    Unauthorized,
    NotFound,
    NoRoute,
    MethodNotAllowed,
    Timeout,
    Replayed,
    EnvelopeSize,
    BodySize,
    AcknowledgeIds,
    OneTimePrekeys,
    Limit,
    RateDeposits,
    RateClaims,
    RateRequests,
    Internal,
    Unavailable,
    PendingEnvelopes,
    PendingBytes,
    TotalStorage,
    StorageFailed,
    StaleDeviceList,
    DeviceListConflict,
    DeviceListGap,
    ContentType,
    UriSize,
    HeaderSize,
    Connections,
    StampRequired,
    StrangerEnvelopes,
    StrangerBytes,
    StrangersClosed,
    StrangersTotal,
}

impl Reason {
    #[cfg(test)]
    const ALL: [Reason; 33] = [
        Reason::BadRequest,
        Reason::Unauthorized,
        Reason::NotFound,
        Reason::NoRoute,
        Reason::MethodNotAllowed,
        Reason::Timeout,
        Reason::Replayed,
        Reason::EnvelopeSize,
        Reason::BodySize,
        Reason::AcknowledgeIds,
        Reason::OneTimePrekeys,
        Reason::Limit,
        Reason::RateDeposits,
        Reason::RateClaims,
        Reason::RateRequests,
        Reason::Internal,
        Reason::Unavailable,
        Reason::PendingEnvelopes,
        Reason::PendingBytes,
        Reason::TotalStorage,
        Reason::StorageFailed,
        Reason::StaleDeviceList,
        Reason::DeviceListConflict,
        Reason::DeviceListGap,
        Reason::ContentType,
        Reason::UriSize,
        Reason::HeaderSize,
        Reason::Connections,
        Reason::StampRequired,
        Reason::StrangerEnvelopes,
        Reason::StrangerBytes,
        Reason::StrangersClosed,
        Reason::StrangersTotal,
    ];

    const fn spec(self) -> (&'static str, u16) {
        match self {
            Reason::BadRequest => ("bad_request", 400),
            Reason::Unauthorized => ("unauthorized", 401),
            Reason::NotFound => ("not_found", 404),
            Reason::NoRoute => ("no_route", 404),
            Reason::MethodNotAllowed => ("method_not_allowed", 405),
            Reason::Timeout => ("timeout", 408),
            Reason::Replayed => ("replayed", 409),
            Reason::EnvelopeSize => ("envelope_size", 413),
            Reason::BodySize => ("body_size", 413),
            Reason::AcknowledgeIds => ("acknowledge_ids", 413),
            Reason::OneTimePrekeys => ("one_time_prekeys", 422),
            Reason::Limit => ("limit", 422),
            Reason::RateDeposits => ("rate_deposits", 429),
            Reason::RateClaims => ("rate_claims", 429),
            Reason::RateRequests => ("rate_requests", 429),
            Reason::Internal => ("internal", 500),
            Reason::Unavailable => ("unavailable", 503),
            Reason::PendingEnvelopes => ("pending_envelopes", 507),
            Reason::PendingBytes => ("pending_bytes", 507),
            Reason::TotalStorage => ("total_storage", 507),
            Reason::StorageFailed => ("storage_failed", 503),
            Reason::StaleDeviceList => ("stale_device_list", 409),
            Reason::DeviceListConflict => ("device_list_conflict", 409),
            Reason::DeviceListGap => ("device_list_gap", 409),
            Reason::ContentType => ("content_type", 415),
            Reason::UriSize => ("uri_size", 414),
            Reason::HeaderSize => ("header_size", 431),
            Reason::Connections => ("connections", 503),
            Reason::StampRequired => ("stamp_required", 403),
            Reason::StrangerEnvelopes => ("stranger_envelopes", 507),
            Reason::StrangerBytes => ("stranger_bytes", 507),
            Reason::StrangersClosed => ("strangers_closed", 403),
            Reason::StrangersTotal => ("strangers_total", 507),
        }
    }

    const fn name(self) -> &'static str {
        self.spec().0
    }

    fn status(self) -> StatusCode {
        StatusCode::from_u16(self.spec().1).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

// ---------------------------------------------------------------------------
// Errors as answers
// ---------------------------------------------------------------------------

/// Marks an error answer with its reason (for the log and the metrics).
#[derive(Clone, Copy, Debug)]
struct Rejected(Reason);

/// An error answer: `{"error": reason, "message": ...}`.
#[derive(Debug)]
struct ApiError {
    reason: Reason,
    message: Cow<'static, str>,
    retry_after: Option<Duration>,
    /// For `403 stamp_required`: the difficulty to mint at.
    difficulty: Option<u8>,
}

impl ApiError {
    fn new(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            reason,
            message: message.into(),
            retry_after: None,
            difficulty: None,
        }
    }

    fn bad(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Reason::BadRequest, message)
    }

    fn rate(reason: Reason, wait: Duration) -> Self {
        let what = match reason {
            Reason::RateDeposits => "deposits",
            Reason::RateClaims => "bundle fetches",
            _ => "requests",
        };
        ApiError {
            reason,
            message: format!("too many {what} from this address; retry later").into(),
            retry_after: Some(wait),
            difficulty: None,
        }
    }

    /// The answer to every call once a flush of the write-ahead log failed
    /// ([`FailStop`]).
    fn storage_failed() -> Self {
        Self::new(
            Reason::StorageFailed,
            "the relay could not flush its storage to the disk and is stopping; retry later \
             (after its restart)",
        )
    }

    fn poisoned() -> Self {
        Self::new(
            Reason::Unavailable,
            "the relay's state is unusable after an internal failure",
        )
    }

    /// The answer for what the relay core refused.
    fn from_transport(error: TransportError) -> Self {
        match error {
            TransportError::BadRequest(why) => Self::bad(why),
            TransportError::Unauthorized => Self::new(
                Reason::Unauthorized,
                "the signature or mailbox proof does not verify, or its challenge is \
                 unknown, expired or used",
            ),
            TransportError::Replayed => Self::new(
                Reason::Replayed,
                "the upload's counter is not above the last accepted one",
            ),
            TransportError::NotFound => Self::new(
                Reason::NotFound,
                "nothing is published for that device or mailbox",
            ),
            TransportError::LimitExceeded(bound) => {
                let reason = match bound {
                    core_reason::ENVELOPE_SIZE => Reason::EnvelopeSize,
                    core_reason::PENDING_ENVELOPES => Reason::PendingEnvelopes,
                    core_reason::PENDING_BYTES => Reason::PendingBytes,
                    core_reason::ONE_TIME_PREKEYS => Reason::OneTimePrekeys,
                    core_reason::ACKNOWLEDGE_IDS => Reason::AcknowledgeIds,
                    core_reason::STRANGER_ENVELOPES => Reason::StrangerEnvelopes,
                    core_reason::STRANGER_BYTES => Reason::StrangerBytes,
                    core_reason::STRANGERS_CLOSED => Reason::StrangersClosed,
                    _ => Reason::Limit,
                };
                Self::new(reason, format!("limit exceeded: {bound}"))
            }
            TransportError::Conflict => Self::new(
                Reason::DeviceListConflict,
                "the relay holds another device list of this version: the account's chain \
                 has two authentic versions (evidence of a compromised device)",
            ),
            TransportError::Unavailable(why) => Self::new(
                Reason::Unavailable,
                format!("{why} unavailable; retry later"),
            ),
            TransportError::StampRequired(difficulty) => ApiError {
                difficulty: Some(difficulty),
                ..Self::new(
                    Reason::StampRequired,
                    format!(
                        "this request needs a stamp of difficulty {difficulty} (a deposit \
                         without the mailbox's access key, or a device's first upload)"
                    ),
                )
            },
            other => Self::new(Reason::Internal, other.to_string()),
        }
    }

    /// The answer for a refused device list (SPEC.md 25.12): `stale` is
    /// `409 stale_device_list`, `gap` `409 device_list_gap`, the other
    /// refusals as [`ApiError::from_transport`] (`conflict` is `409
    /// device_list_conflict`, the bad requests carry their
    /// [`device_list_reason`] as the message).
    fn from_device_list(error: TransportError) -> Self {
        match error {
            TransportError::Replayed => Self::new(
                Reason::StaleDeviceList,
                "the version is not above the newest stored one and is no longer held \
                 (or its predecessor is not)",
            ),
            TransportError::BadRequest(device_list_reason::GAP) => {
                Self::new(Reason::DeviceListGap, device_list_reason::GAP)
            }
            TransportError::Unauthorized => Self::new(
                Reason::Unauthorized,
                "the device list's signatures do not verify or do not authorize it",
            ),
            other => Self::from_transport(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "error": self.reason.name(),
            "message": self.message,
        });
        if let Some(difficulty) = self.difficulty {
            body["difficulty"] = serde_json::json!(difficulty);
        }
        let body = body.to_string();
        let mut response = (
            self.reason.status(),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response.extensions_mut().insert(Rejected(self.reason));
        response
    }
}

/// Gives an error answer not made by [`ApiError`] (axum's own rejections,
/// the body limit layer, `405`) the JSON error form.
fn normalize(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.extensions().get::<Rejected>().is_some()
    {
        return response;
    }
    let (reason, message) = match status.as_u16() {
        400 => (Reason::BadRequest, "malformed request"),
        404 => (Reason::NoRoute, "no such route"),
        405 => (Reason::MethodNotAllowed, "method not allowed on this route"),
        408 => (Reason::Timeout, "the request took too long"),
        413 => (
            Reason::BodySize,
            "the request body is larger than the server's limit",
        ),
        429 => (Reason::RateRequests, "too many requests; retry later"),
        503 => (Reason::Unavailable, "unavailable; retry later"),
        s if s < 500 => (Reason::BadRequest, "malformed request"),
        _ => (Reason::Internal, "internal error"),
    };
    let (parts, _) = response.into_parts();
    let mut answer = ApiError::new(reason, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    error!("a request handler panicked");
    ApiError::new(Reason::Internal, "internal error").into_response()
}

/// A storage failure in a direct storage call: logged, answered `503`.
fn storage_failed(error: RelayStorageError) -> TransportError {
    error!(error = %error, "relay storage failed");
    TransportError::Unavailable("relay storage")
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

/// A storage backend the server can run on.
trait Storage: RelayStorage + Send + 'static {}
impl<S: RelayStorage + Send + 'static> Storage for S {}

/// The relay and what the server keeps about its contents, under one lock.
struct Core<S> {
    relay: Relay<S>,
    /// Usage of the mailboxes with pending envelopes that this process has
    /// seen (see the module docs).
    usage: HashMap<MailboxId, MailboxUsage>,
    envelopes: u64,
    bytes: u64,
    /// Of `bytes`, those in strangers' shares.
    stranger_bytes: u64,
}

impl<S: Storage> Core<S> {
    fn new(relay: Relay<S>) -> Self {
        Core {
            relay,
            usage: HashMap::new(),
            envelopes: 0,
            bytes: 0,
            stranger_bytes: 0,
        }
    }

    fn set_usage(&mut self, mailbox: MailboxId, usage: MailboxUsage, metrics: &Metrics) {
        let old = if usage.envelopes == 0 {
            self.usage.remove(&mailbox)
        } else {
            self.usage.insert(mailbox, usage)
        }
        .unwrap_or_default();
        self.envelopes = self
            .envelopes
            .saturating_sub(old.envelopes)
            .saturating_add(usage.envelopes);
        self.bytes = self
            .bytes
            .saturating_sub(old.bytes)
            .saturating_add(usage.bytes);
        self.stranger_bytes = self
            .stranger_bytes
            .saturating_sub(old.stranger_bytes)
            .saturating_add(usage.stranger_bytes);
        metrics.envelopes.store(self.envelopes, Ordering::Relaxed);
        metrics.pending_bytes.store(self.bytes, Ordering::Relaxed);
        metrics
            .mailboxes
            .store(self.usage.len() as u64, Ordering::Relaxed);
    }

    /// Reads the mailbox's usage from the storage.
    fn refresh_usage(
        &mut self,
        mailbox: MailboxId,
        metrics: &Metrics,
    ) -> Result<(), RelayStorageError> {
        let usage = self.relay.storage().mailbox_usage(&mailbox)?;
        self.set_usage(mailbox, usage, metrics);
        Ok(())
    }

    /// An envelope of `size` payload bytes was stored in the mailbox's
    /// `share`.
    fn stored(
        &mut self,
        mailbox: MailboxId,
        size: u64,
        share: Share,
        metrics: &Metrics,
    ) -> Result<(), RelayStorageError> {
        match self.usage.get(&mailbox).copied() {
            Some(usage) => {
                let stranger = u64::from(share == Share::Strangers);
                let usage = MailboxUsage {
                    envelopes: usage.envelopes.saturating_add(1),
                    bytes: usage.bytes.saturating_add(size),
                    stranger_envelopes: usage.stranger_envelopes.saturating_add(stranger),
                    stranger_bytes: usage.stranger_bytes.saturating_add(stranger * size),
                };
                self.set_usage(mailbox, usage, metrics);
                Ok(())
            }
            None => self.refresh_usage(mailbox, metrics),
        }
    }

    /// The payload bytes the mailbox holds: this process's count, or the
    /// storage's for a mailbox it has not counted (0 if that read fails).
    fn held_bytes(&self, mailbox: &MailboxId) -> u64 {
        match self.usage.get(mailbox) {
            Some(usage) => usage.bytes,
            None => self
                .relay
                .storage()
                .mailbox_usage(mailbox)
                .map_or(0, |usage| usage.bytes),
        }
    }

    /// The mailbox's pending envelopes, as [`Relay::fetch`] lists them but
    /// without a proof: for the second and later listings of a long poll
    /// whose proof (and challenge) the first listing checked and consumed.
    /// Same semantics: at most `limit` capped by `max_fetch_envelopes` and
    /// `max_fetch_bytes`, expired envelopes left out.
    fn list(
        &self,
        now: u64,
        mailbox: &MailboxId,
        limit: u32,
    ) -> Result<Vec<Envelope>, TransportError> {
        let config = self.relay.config();
        let limit = limit.min(config.max_fetch_envelopes);
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.relay
            .storage()
            .list_envelopes(
                mailbox,
                now.saturating_sub(config.retention),
                limit,
                config.max_fetch_bytes,
            )
            .map_err(storage_failed)
    }
}

/// A deposit waiting for the relay thread.
struct DepositJob {
    mailbox: MailboxId,
    envelope: Envelope,
    pass: DepositPass,
    /// `Ok(true)`: stored now; `Ok(false)`: already there.
    reply: oneshot::Sender<Result<bool, ApiError>>,
}

/// A call's answer, held until its turn is committed: sends the call's
/// result if it was (`true`), else an error.
type Answer = Box<dyn FnOnce(bool) + Send>;

/// A relay call other than a deposit, run on the relay thread.
type Call<S> = Box<dyn FnOnce(&mut Core<S>, &Metrics, u64) -> Answer + Send>;

/// `result`, to be sent on `reply` once the turn is committed (an error
/// instead if it is not).
fn held<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, ApiError>>,
    result: Result<T, ApiError>,
) -> Answer {
    Box::new(move |committed| {
        let _ = reply.send(if committed {
            result
        } else {
            Err(ApiError::new(
                Reason::Unavailable,
                "the relay could not store this; retry later",
            ))
        });
    })
}

/// What the relay thread does.
enum Job<S> {
    Deposit(DepositJob),
    Call(Call<S>),
    /// Finish the jobs queued before this one, then stop.
    Stop,
}

/// Most committed turns waiting for the sync thread's flush.
const MAX_TURNS_AWAITING_SYNC: usize = 64;

/// Most other calls run in one turn of the relay thread.
const MAX_CALLS_PER_TURN: usize = 64;

/// Most deposits stored in one commit.
const MAX_DEPOSIT_BATCH: usize = 1024;
/// Payload bytes after which a batch takes no more deposits (it may end
/// one envelope over).
const MAX_DEPOSIT_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Deposits waiting for the worker before new ones wait to be queued.
const JOB_QUEUE: usize = 4096;
/// How often expired envelopes and challenges are deleted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How often the SQLite write-ahead log is checkpointed off the commit path.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);
/// Mailboxes whose usage is re-read per lock hold after a sweep.
const REFRESH_CHUNK: usize = 256;

/// The relay's fail-stop state: set once a flush of the SQLite write-ahead
/// log failed ([`sync_thread`]).
///
/// After a failed `fdatasync` the operating system may have dropped the
/// unwritten pages (Linux marks them clean), so a later flush that
/// succeeds proves nothing, and pages read back from the log may be stale.
/// As PostgreSQL does on a failed `fsync`, the relay then stops touching
/// the storage: the turn of the failed flush and every later one are
/// answered not stored, every request that would use the storage is
/// answered `503 storage_failed`, the server shuts down and [`serve`]
/// returns [`ServerError::LogFlushFailed`], leaving the database files as
/// they are (it does not even close the storage, which would checkpoint
/// the log). A restart recovers from what is on the disk.
#[derive(Debug, Default)]
struct FailStop {
    /// Held shared by whoever uses the storage (a turn of the relay
    /// thread, a checkpoint, a retention sweep), taken exclusively to
    /// declare the failure: once [`fail`](Self::fail) returns, nothing
    /// uses the storage any more.
    gate: std::sync::RwLock<()>,
    /// The failed flush's error.
    failed: std::sync::OnceLock<(std::io::ErrorKind, String)>,
    /// Wakes the accept loop ([`failed`](Self::failed)).
    notify: tokio::sync::Notify,
}

impl FailStop {
    /// A guard to hold while using the storage, or `None` once the failure
    /// is declared.
    fn enter(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        let guard = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.failed.get().is_none().then_some(guard)
    }

    fn has_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Declares the failure (the first call; later ones change nothing),
    /// after the storage work in progress ends.
    fn fail(&self, error: &std::io::Error) {
        let _gate = self
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.failed.set((error.kind(), error.to_string())).is_ok() {
            error!(
                error = %error,
                "could not flush the write-ahead log to the disk: the relay answers nothing \
                 more and stops; restart it, it recovers from what is on the disk"
            );
            self.notify.notify_one();
        }
    }

    /// Resolves once the failure is declared.
    async fn failed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.has_failed() {
                return;
            }
            notified.await;
        }
    }

    /// What [`serve`] returns after the failure.
    fn error(&self) -> Option<ServerError> {
        self.failed.get().map(|(kind, message)| {
            ServerError::LogFlushFailed(std::io::Error::new(*kind, message.clone()))
        })
    }
}

/// The state every request shares.
struct Shared<S> {
    core: Mutex<Core<S>>,
    limits: Limits,
    rates: RateLimiter,
    waiters: Arc<Waiters>,
    metrics: Metrics,
    /// The relay thread's queue (see the module docs).
    jobs: mpsc::Sender<Job<S>>,
    /// Set once a flush of the write-ahead log failed.
    fail_stop: Arc<FailStop>,
    /// The connection caps and the open connections.
    connections: Arc<ConnectionCaps>,
    /// The static files' directory, resolved ([`ServerConfig::web_root`]).
    web_root: Option<PathBuf>,
}

/// The peer address of a connection.
#[derive(Clone, Copy, Debug)]
struct PeerAddr(SocketAddr);

/// The client address used for rate limits.
#[derive(Clone, Copy, Debug)]
struct ClientIp(IpAddr);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<S: Storage> Shared<S> {
    /// Runs `f` on the relay thread, at the current time, and waits for
    /// its answer.
    async fn call<R, F>(self: &Arc<Self>, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Core<S>, &Metrics, u64) -> Result<R, TransportError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        // What the call logs on the relay thread is in the request's span.
        let span = tracing::Span::current();
        let job: Call<S> = Box::new(move |core, metrics, now| {
            let _entered = span.enter();
            let result = f(core, metrics, now);
            if let Some(e) = core.relay.take_storage_error() {
                error!(error = %e, "relay storage failed");
            }
            held(reply, result.map_err(ApiError::from_transport))
        });
        self.jobs
            .send(Job::Call(job))
            .await
            .map_err(|_| ApiError::new(Reason::Unavailable, "the relay is shutting down"))?;
        answer.await.unwrap_or_else(|_| {
            Err(if self.fail_stop.has_failed() {
                ApiError::storage_failed()
            } else {
                ApiError::new(Reason::Unavailable, "the relay failed; retry later")
            })
        })
    }

    /// Checks a rate limit for the request's client.
    fn check_rate(&self, ip: IpAddr, kind: Kind, reason: Reason) -> Result<(), ApiError> {
        self.rates
            .check(ip, kind)
            .map_err(|wait| ApiError::rate(reason, wait))
    }

    /// Stores a batch of deposits (in the turn's group) and adds their
    /// answers to `answers`; returns the mailboxes that got an envelope.
    fn deposit_batch(
        &self,
        core: &mut Core<S>,
        jobs: Vec<DepositJob>,
        answers: &mut Vec<Answer>,
    ) -> Vec<MailboxId> {
        let now = unix_now();
        let limits = &self.limits;
        let total = limits.total_storage_bytes;
        let strangers_cap = percent_of(total, limits.strangers_storage_percent);
        let high_water = percent_of(total, limits.fair_share_percent);
        let mut reserved = core.bytes;
        let mut reserved_strangers = core.stranger_bytes;
        let mut batch = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            let share = match core
                .relay
                .admit(now, &job.mailbox, &job.envelope, &job.pass)
            {
                Ok(share) => share,
                Err(e) => {
                    let _ = job.reply.send(Err(ApiError::from_transport(e)));
                    continue;
                }
            };
            let size = job.envelope.payload.len() as u64;
            if total > 0 {
                let refusal = if reserved.saturating_add(size) > total {
                    Some(ApiError::new(
                        Reason::TotalStorage,
                        "the relay holds its configured total of pending envelopes; retry later",
                    ))
                } else if share == Share::Strangers
                    && reserved_strangers.saturating_add(size) > strangers_cap
                {
                    Some(ApiError::new(
                        Reason::StrangersTotal,
                        "strangers' deposits hold their part of the relay's storage; retry later",
                    ))
                } else if reserved.saturating_add(size) > high_water
                    && core.held_bytes(&job.mailbox).saturating_add(size) > limits.fair_share_bytes
                {
                    Some(ApiError::new(
                        Reason::TotalStorage,
                        "the relay is nearly full: only mailboxes that hold little accept \
                         deposits; retry later",
                    ))
                } else {
                    None
                };
                if let Some(refusal) = refusal {
                    let _ = job.reply.send(Err(refusal));
                    continue;
                }
            }
            reserved = reserved.saturating_add(size);
            if share == Share::Strangers {
                reserved_strangers = reserved_strangers.saturating_add(size);
            }
            batch.push((job.mailbox, job.envelope, share));
            replies.push(job.reply);
        }
        if batch.is_empty() {
            return Vec::new();
        }
        let results = core.relay.deposit_admitted(now, &batch);
        if let Some(e) = core.relay.take_storage_error() {
            error!(error = %e, deposits = batch.len(), "relay storage failed");
        }
        let mut stored = Vec::new();
        // Mailboxes whose usage this batch read from the storage (which
        // has all of the batch's envelopes already): counted.
        let mut counted: HashSet<MailboxId> = HashSet::new();
        for (((mailbox, envelope, share), result), reply) in batch.iter().zip(results).zip(replies)
        {
            let answer = match result {
                Ok(true) => {
                    self.metrics.deposits.fetch_add(1, Ordering::Relaxed);
                    if !counted.contains(mailbox) {
                        if !core.usage.contains_key(mailbox) {
                            counted.insert(*mailbox);
                        }
                        if let Err(e) = core.stored(
                            *mailbox,
                            envelope.payload.len() as u64,
                            *share,
                            &self.metrics,
                        ) {
                            warn!(error = %e, "could not read a mailbox's usage");
                        }
                    }
                    stored.push(*mailbox);
                    Ok(true)
                }
                Ok(false) => Ok(false),
                Err(e) => Err(ApiError::from_transport(e)),
            };
            answers.push(held(reply, answer));
        }
        stored
    }

    /// After a turn whose commit failed: what this process counted for it
    /// is wrong, so count again from the storage.
    fn recount(&self, core: &mut Core<S>, deposited: &[MailboxId]) {
        self.metrics
            .deposits
            .fetch_sub(deposited.len() as u64, Ordering::Relaxed);
        let mut mailboxes: Vec<MailboxId> = core.usage.keys().copied().collect();
        mailboxes.extend_from_slice(deposited);
        mailboxes.sort_unstable_by_key(|m| m.0);
        mailboxes.dedup();
        for mailbox in mailboxes {
            if let Err(e) = core.refresh_usage(mailbox, &self.metrics) {
                warn!(error = %e, "could not read a mailbox's usage");
                return;
            }
        }
    }

    /// Deletes what expired and re-reads the usage of the known mailboxes
    /// (not after a failed flush: [`FailStop`]).
    fn sweep(&self) {
        let Some(_storage) = self.fail_stop.enter() else {
            return;
        };
        let known = {
            let Ok(mut core) = self.core.lock() else {
                error!("relay state poisoned; not sweeping");
                return;
            };
            match core.relay.sweep(unix_now()) {
                Ok(report) => {
                    self.metrics
                        .expired
                        .fetch_add(report.envelopes_expired, Ordering::Relaxed);
                    debug!(
                        envelopes = report.envelopes_expired,
                        challenges = report.challenges_expired,
                        "retention sweep"
                    );
                }
                Err(_) => {
                    if let Some(e) = core.relay.take_storage_error() {
                        error!(error = %e, "retention sweep failed");
                    }
                    return;
                }
            }
            core.usage.keys().copied().collect::<Vec<_>>()
        };
        for chunk in known.chunks(REFRESH_CHUNK) {
            let Ok(mut core) = self.core.lock() else {
                return;
            };
            for mailbox in chunk {
                if let Err(e) = core.refresh_usage(*mailbox, &self.metrics) {
                    warn!(error = %e, "could not read a mailbox's usage");
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------

/// Serves the relay's HTTP API on `listener` until `shutdown` resolves,
/// then stops accepting connections, lets the requests in flight finish
/// (long polls are woken and answer what is pending), and returns.
///
/// The storage is opened first ([`ServerConfig::storage`]); a retention
/// sweeper runs every minute.
///
/// # Errors
/// [`ServerError`] when the storage cannot be opened or a setting is
/// invalid (before serving anything). Failures while serving are answered
/// per request and logged, but one: on a SQLite file, when the write-ahead
/// log cannot be flushed to the disk, the server stops as on the shutdown
/// signal (fail-stop, as PostgreSQL does on a failed `fsync`) and returns
/// [`ServerError::LogFlushFailed`]. It then leaves the database open (it
/// holds its files and lock until the process exits, and closing it would
/// write to it): exit the process, and restart it, which recovers from
/// what is on the disk. With PostgreSQL, its server makes commits durable
/// and handles its own flush failures; nothing changes.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let cors = cors_layer(&config.cors_origins)?;
    let mut config = config;
    config.web_root = match config.web_root.take() {
        None => None,
        Some(root) => Some(web_root(root).await?),
    };
    let waiters = Arc::new(Waiters::default());
    match config.storage.clone() {
        StorageConfig::SqliteMemory => {
            let storage = blocking(SqliteRelayStorage::open_in_memory).await??;
            info!(storage = "sqlite (in memory)", "relay storage opened");
            let file = SqliteFile::default();
            run(listener, config, storage, file, cors, waiters, shutdown).await
        }
        StorageConfig::Sqlite(path) => {
            let shown = path.display().to_string();
            // Held until the server stops.
            let lock = lock_database(&path)?;
            let (storage, file) = blocking(move || {
                let mut storage = SqliteRelayStorage::open(path)?;
                let file = SqliteFile {
                    checkpointer: SqliteCheckpointer::open(&mut storage)?,
                    wal: WalSync::open(&mut storage)?,
                };
                Ok::<_, RelayStorageError>((storage, file))
            })
            .await??;
            info!(storage = "sqlite", path = %shown, "relay storage opened");
            let result = run(listener, config, storage, file, cors, waiters, shutdown).await;
            if let Err(ServerError::LogFlushFailed(_)) = &result {
                // The storage was left open (see `FailStop`): so is the
                // lock, until the process exits.
                std::mem::forget(lock);
            } else {
                drop(lock);
            }
            result
        }
        #[cfg(feature = "postgres")]
        StorageConfig::Postgres(url) => {
            let connect_url = url.clone();
            let storage = blocking(move || {
                crate::postgres::PostgresRelayStorage::connect(&connect_url)
                    .map_err(|e| ServerError::Postgres(e.to_string()))
            })
            .await??;
            let notify = Arc::clone(&waiters);
            blocking(move || {
                crate::postgres::spawn_listener(&url, move |mailbox| notify.notify(&mailbox))
                    .map_err(|e| ServerError::Postgres(e.to_string()))
            })
            .await??;
            info!(
                storage = "postgres",
                "relay storage opened, listening for deposits"
            );
            let file = SqliteFile::default();
            run(listener, config, storage, file, cors, waiters, shutdown).await
        }
        #[cfg(not(feature = "postgres"))]
        StorageConfig::Postgres(_) => Err(ServerError::PostgresNotCompiled),
    }
}

/// The lock file of the SQLite database at `db`: `<db>-relay.lock` beside
/// it.
pub fn lock_path(db: &std::path::Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-relay.lock");
    PathBuf::from(name)
}

/// Takes the exclusive advisory lock of the SQLite database at `db` (on
/// [`lock_path`], created if missing), held as long as the returned file
/// is open: a second relay process on the same database gets
/// [`ServerError::DatabaseInUse`].
///
/// Why a lock file beside the database and not the database itself:
/// SQLite locks the database file with POSIX `fcntl` record locks, which a
/// process loses entirely when it closes *any* descriptor of that file, and
/// on some platforms and network file systems `flock` is emulated with the
/// same record locks (Windows locks are mandatory byte ranges); a second
/// descriptor of our own on the database could release or block SQLite's
/// own locks. The lock file is touched by nothing else. It is never
/// deleted (deleting a lock file races with a process about to lock it).
///
/// # Errors
/// [`ServerError::DatabaseInUse`] when another process (or another
/// [`serve`] in this one) holds it, [`ServerError::Io`] when the lock file
/// cannot be created or locked.
pub(crate) fn lock_database(db: &std::path::Path) -> Result<std::fs::File, ServerError> {
    let path = lock_path(db);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            ServerError::Io(std::io::Error::new(
                e.kind(),
                format!("lock file {}: {e}", path.display()),
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::DatabaseInUse {
            database: db.to_path_buf(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(ServerError::Io(std::io::Error::new(
            e.kind(),
            format!("lock file {}: {e}", path.display()),
        ))),
    }
}

/// Runs blocking set-up work off the async workers.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))
}

/// The web root, resolved (so that each file's resolved path can be checked
/// to lie under it), which must be a directory.
async fn web_root(root: PathBuf) -> Result<PathBuf, ServerError> {
    let shown = root.display().to_string();
    let resolved = blocking(move || {
        let resolved = std::fs::canonicalize(&root)?;
        match std::fs::metadata(&resolved)?.is_dir() {
            true => Ok(resolved),
            false => Err(std::io::Error::other("not a directory")),
        }
    })
    .await?
    .map_err(|e| ServerError::Config(format!("web root {shown:?}: {e}")))?;
    info!(web_root = %resolved.display(), "serving static files");
    Ok(resolved)
}

fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, ServerError> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|origin| {
                HeaderValue::from_str(origin)
                    .map_err(|_| ServerError::Config(format!("CORS origin {origin:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT])
            .allow_headers([
                header::CONTENT_TYPE,
                header::HeaderName::from_static(REQUEST_ID_HEADER),
                header::HeaderName::from_static(ACCESS_HEADER),
                header::HeaderName::from_static(STAMP_HEADER),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::HeaderName::from_static(REQUEST_ID_HEADER),
            ])
            .max_age(Duration::from_secs(CORS_MAX_AGE_SECS)),
    ))
}

/// The connection caps: [`Limits::max_connections`], held below the
/// file-descriptor limit (less [`RESERVED_FDS`]) where the platform tells
/// it, and [`Limits::max_connections_per_address`] (not applied behind a
/// trusted proxy).
fn connection_caps(limits: &Limits) -> Arc<ConnectionCaps> {
    let fds = file_descriptor_limit();
    let room = fds.map(|n| usize::try_from(n.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX));
    let total = match (limits.max_connections, room) {
        (0, Some(room)) => room.max(1),
        (n, Some(room)) if n > room => {
            warn!(
                max_connections = n,
                file_descriptors = fds.unwrap_or(0),
                "max_connections is above the file-descriptor limit: capped at {}",
                room.max(1)
            );
            room.max(1)
        }
        (n, _) => n,
    };
    let per_address = match limits.trust_forwarded_for {
        true => 0,
        false => limits.max_connections_per_address,
    };
    info!(
        max_connections = total,
        max_connections_per_address = per_address,
        file_descriptors = fds.unwrap_or(0),
        "connection caps (0: none)"
    );
    ConnectionCaps::new(total, per_address)
}

/// The process's soft limit on open files, where the platform tells it.
fn file_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft)
            .filter(|n| *n != rlimit::INFINITY)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The message of a JSON answer replacing one of hyper's own.
fn hyper_message(reason: Reason) -> &'static str {
    match reason {
        Reason::UriSize => "the request target is too long",
        Reason::HeaderSize => "the request headers are too large or too many",
        Reason::Timeout => "the request took too long",
        _ => "malformed request",
    }
}

/// A whole HTTP/1.1 answer with the JSON error body of `reason`, closing
/// the connection: for answers written outside the router (a connection
/// over a cap, a request hyper could not parse).
fn canned_answer(reason: Reason, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": reason.name(), "message": message }).to_string();
    let status = reason.status();
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if reason == Reason::Connections {
        answer.push_str("retry-after: 1\r\n");
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    answer.into_bytes()
}

fn router<S: Storage>(shared: Arc<Shared<S>>, cors: Option<CorsLayer>) -> Router {
    let body_limit = shared.limits.max_body_bytes;
    let mut router = Router::new();
    for route in Route::ALL {
        router = router.route(&route.axum_path(), route.method_router::<S>(body_limit));
    }
    let router = router
        .fallback(fallback::<S>)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            frame::<S>,
        ))
        .with_state(shared);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// What a relay on a SQLite file runs beside the relay thread.
#[derive(Debug, Default)]
struct SqliteFile {
    /// Checkpoints the log off the commit path ([`checkpoints`]).
    checkpointer: Option<SqliteCheckpointer>,
    /// Makes the turns' commits durable off the relay thread
    /// ([`sync_thread`]).
    wal: Option<WalSync>,
}

async fn run<S: Storage>(
    listener: TcpListener,
    config: ServerConfig,
    storage: S,
    file: SqliteFile,
    cors: Option<CorsLayer>,
    waiters: Arc<Waiters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let ServerConfig {
        relay,
        limits,
        web_root,
        ..
    } = config;
    let (jobs, queue) = mpsc::channel(JOB_QUEUE);
    let routes: Vec<&'static str> = Route::ALL
        .iter()
        .map(|r| r.name())
        .chain(["no_route"])
        .chain(web_root.as_ref().map(|_| "web"))
        .collect();
    let reasons: Vec<&'static str> = REASONS.iter().map(|(name, _)| *name).collect();
    let shared = Arc::new(Shared {
        core: Mutex::new(Core::new(Relay::new(storage, relay))),
        rates: RateLimiter::new(
            limits.requests_per_minute,
            limits.deposits_per_minute,
            limits.claims_per_minute,
        ),
        connections: connection_caps(&limits),
        limits,
        waiters,
        metrics: Metrics::new(&routes, &reasons),
        jobs,
        fail_stop: Arc::new(FailStop::default()),
        web_root,
    });
    let router = router(Arc::clone(&shared), cors);

    let (stop, stopped) = watch::channel(false);
    let (syncs, syncer) = match file.wal {
        Some(wal) => {
            // Bounded: if the disk stalls, the relay thread waits too.
            let (syncs, turns) = std::sync::mpsc::sync_channel(MAX_TURNS_AWAITING_SYNC);
            let waiters = Arc::clone(&shared.waiters);
            let fail_stop = Arc::clone(&shared.fail_stop);
            let syncer = std::thread::Builder::new()
                .name("cubbyhole-sync".into())
                .spawn(move || sync_thread(&waiters, &wal, &turns, &fail_stop))
                .map_err(ServerError::Io)?;
            (Some(syncs), Some(syncer))
        }
        None => (None, None),
    };
    let worker = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("cubbyhole-relay".into())
            .spawn(move || relay_thread(&shared, queue, syncs))
            .map_err(ServerError::Io)?
    };
    let checkpoints = file.checkpointer.map(|c| {
        tokio::spawn(checkpoints(
            c,
            stopped.clone(),
            Arc::clone(&shared.fail_stop),
        ))
    });
    let sweeper = tokio::spawn(sweeper(Arc::clone(&shared), stopped));

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
    http.header_read_timeout(match shared.limits.header_timeout_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    });
    http.keep_alive(true);
    // Small heads, and a read buffer that stays small (hyper's default
    // grows to 400 KiB per connection).
    http.max_header_size(MAX_HEAD_BYTES);
    http.max_headers(MAX_HEADERS);
    http.max_buf_size(MAX_HEAD_BYTES.max(64 * 1024));
    // One buffer per answer, so that `connections::Io` sees hyper's own
    // error answers whole.
    http.writev(false);
    let caps = Arc::clone(&shared.connections);
    let rewrite: Rewrite = {
        let shared = Arc::clone(&shared);
        Arc::new(move |status| {
            let reason = match status {
                400 => Reason::BadRequest,
                408 => Reason::Timeout,
                414 => Reason::UriSize,
                431 => Reason::HeaderSize,
                _ => return None,
            };
            shared.metrics.record("no_route", Some(reason.name()));
            Some(canned_answer(reason, hyper_message(reason)))
        })
    };
    let refusal_total = canned_answer(
        Reason::Connections,
        "the relay holds as many connections as it serves; retry later",
    );
    let refusal_address = canned_answer(
        Reason::Connections,
        "too many connections from this address; close some or retry later",
    );

    match listener.local_addr() {
        Ok(addr) => info!(%addr, "relay listening"),
        Err(_) => info!("relay listening"),
    }
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let fail_stop = Arc::clone(&shared.fail_stop);
    let mut failed = std::pin::pin!(fail_stop.failed());
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // A flush failed: stop (see `FailStop`).
            () = &mut failed => break,
            // Reaps each connection's task as it ends: a finished task's
            // memory (sized for the whole connection future) is only
            // freed with its handle, so after a flood of connections,
            // with no new connection to trigger a sweep, it would stay.
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The cap counts the peer, not `X-Forwarded-For`: behind a proxy
        // every connection is the proxy's, so only the total applies.
        let ip = match shared.limits.trust_forwarded_for {
            true => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            false => peer.ip(),
        };
        let admitted = match caps.admit(ip) {
            Ok(admitted) => admitted,
            Err(refused) => {
                shared
                    .metrics
                    .record("no_route", Some(Reason::Connections.name()));
                debug!(?refused, "connection refused");
                connections::refuse(
                    stream,
                    match refused {
                        Refused::Total => &refusal_total,
                        Refused::Address => &refusal_address,
                    },
                );
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<_>| {
            request.extensions_mut().insert(PeerAddr(peer));
            app.clone().oneshot(request)
        });
        let stream = Arc::new(stream);
        let (io, errored) = Io::new(Arc::clone(&stream), Arc::clone(&rewrite));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
            if errored.load(Ordering::Relaxed) {
                if let Ok(stream) = Arc::try_unwrap(stream) {
                    connections::linger(stream).await;
                }
            }
            drop(admitted);
        });
    }

    info!("shutting down: finishing the requests in flight");
    drop(listener);
    shared.waiters.close_all();
    let grace = Duration::from_millis(
        match shared.limits.request_timeout_ms {
            0 => 60_000,
            ms => ms,
        }
        .saturating_add(u64::from(shared.limits.max_wait_ms)),
    ) + Duration::from_secs(5);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the grace period; closing them");
    }
    connections.shutdown().await;
    let _ = stop.send(true);
    // The relay thread finishes what is queued, then stops.
    let _ = shared.jobs.send(Job::Stop).await;
    let _ = tokio::task::spawn_blocking(move || {
        let _ = worker.join();
        // The relay thread dropped its end: the sync thread answers the
        // last turns and stops.
        if let Some(syncer) = syncer {
            let _ = syncer.join();
        }
    })
    .await;
    let _ = sweeper.await;
    if let Some(checkpoints) = checkpoints {
        let _ = checkpoints.await;
    }
    drop(router);
    if let Some(failure) = fail_stop.error() {
        // Not closed: closing the last connection checkpoints the log into
        // the database, which must not happen after a failed flush (see
        // `FailStop`). The files stay as they are until the process exits.
        std::mem::forget(shared);
        return Err(failure);
    }
    // The storage may block when closed (PostgreSQL): close it off the
    // async workers.
    let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
    info!("relay stopped");
    Ok(())
}

/// The relay thread: the only one that calls the relay (besides the
/// minutely sweep). Each turn takes every job queued at that moment (up
/// to [`MAX_DEPOSIT_BATCH`] deposits or [`MAX_CALLS_PER_TURN`] other
/// calls) and runs it as one [`Shared::turn`]. So a deposit waits for at
/// most one turn of other calls, and a call for at most one batch of
/// deposits, however many clients there are. Running on a thread of its
/// own, the relay never waits for the async workers between turns.
fn relay_thread<S: Storage>(
    shared: &Shared<S>,
    mut queue: mpsc::Receiver<Job<S>>,
    syncs: Option<std::sync::mpsc::SyncSender<Synced>>,
) {
    let mut stopping = false;
    while !stopping {
        let Some(first) = queue.blocking_recv() else {
            break;
        };
        let mut deposits = Vec::new();
        let mut calls = Vec::new();
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Deposit(job) => {
                    bytes = bytes.saturating_add(job.envelope.payload.len());
                    deposits.push(job);
                }
                Job::Call(call) => calls.push(call),
                Job::Stop => {
                    stopping = true;
                    break;
                }
            }
            if deposits.len() >= MAX_DEPOSIT_BATCH
                || bytes >= MAX_DEPOSIT_BATCH_BYTES
                || calls.len() >= MAX_CALLS_PER_TURN
            {
                break;
            }
            next = queue.try_recv().ok();
        }
        if !deposits.is_empty() || !calls.is_empty() {
            shared.turn(deposits, calls, syncs.as_ref());
        }
    }
}

impl<S: Storage> Shared<S> {
    /// One turn of the relay thread: the deposits as one batch, then the
    /// calls, all in one storage group (one durable commit), then the
    /// answers.
    fn turn(
        &self,
        deposits: Vec<DepositJob>,
        calls: Vec<Call<S>>,
        syncs: Option<&std::sync::mpsc::SyncSender<Synced>>,
    ) {
        // After a failed flush nothing touches the storage any more.
        let Some(storage) = self.fail_stop.enter() else {
            for job in deposits {
                let _ = job.reply.send(Err(ApiError::storage_failed()));
            }
            // Dropping the calls drops their answers: `storage_failed`.
            return;
        };
        let mut core = match self.core.lock() {
            Ok(core) => core,
            Err(_) => {
                error!("relay state poisoned");
                for job in deposits {
                    let _ = job.reply.send(Err(ApiError::poisoned()));
                }
                // Dropping the calls drops their answers: 503.
                return;
            }
        };
        let grouped = match core.relay.storage_mut().begin_group() {
            Ok(()) => true,
            Err(e) => {
                // Then each call commits on its own.
                warn!(error = %e, "could not open a storage group");
                false
            }
        };
        let mut answers: Vec<Answer> = Vec::with_capacity(deposits.len() + calls.len());
        let mut stored = Vec::new();
        if !deposits.is_empty() {
            let count = deposits.len();
            // A panic drops the answers of the batch not yet given: 503.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.deposit_batch(&mut core, deposits, &mut answers)
            })) {
                Ok(batch) => {
                    debug!(deposits = count, stored = batch.len(), "deposit batch");
                    stored = batch;
                }
                Err(_) => error!("a deposit batch failed"),
            }
        }
        let now = unix_now();
        for call in calls {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                call(&mut core, &self.metrics, now)
            })) {
                Ok(answer) => answers.push(answer),
                Err(_) => error!("a relay call failed"),
            }
        }
        let committed = !grouped
            || match core.relay.storage_mut().commit_group() {
                Ok(()) => true,
                Err(e) => {
                    error!(error = %e, calls = answers.len(), "could not commit a turn");
                    self.recount(&mut core, &stored);
                    false
                }
            };
        drop(core);
        // Released before waiting for the sync thread, which may be
        // declaring a failure (and waiting for this guard).
        drop(storage);
        let turn = Synced { answers, stored };
        match syncs {
            // Answered once the log is on the disk, while this thread goes
            // on with the next turn.
            Some(syncs) if committed => {
                if let Err(unsent) = syncs.send(turn) {
                    unsent.0.answer(false, &self.waiters);
                }
            }
            _ => turn.answer(committed, &self.waiters),
        }
    }
}

/// A turn's answers, and the mailboxes it deposited to.
struct Synced {
    answers: Vec<Answer>,
    stored: Vec<MailboxId>,
}

impl Synced {
    /// Answers the turn's calls (with their results if its writes are
    /// durable, else with an error) and wakes the long polls of the
    /// mailboxes it deposited to.
    fn answer(self, durable: bool, waiters: &Waiters) {
        for answer in self.answers {
            answer(durable);
        }
        if durable {
            for mailbox in &self.stored {
                waiters.notify(mailbox);
            }
        }
    }
}

/// The sync thread of a relay on a SQLite file: takes the turns the relay
/// thread committed (every one queued at that moment), makes them durable
/// with one [`WalSync::sync`], then answers them. So the relay thread never
/// waits for the disk, and one flush covers every turn committed while
/// the previous one ran.
///
/// Fail-stop: once a flush fails, the failure is declared ([`FailStop`])
/// before its turns are answered (not stored), and the thread never
/// flushes again: every later turn is answered not stored too.
fn sync_thread(
    waiters: &Waiters,
    wal: &impl Flush,
    turns: &std::sync::mpsc::Receiver<Synced>,
    fail_stop: &FailStop,
) {
    while let Ok(first) = turns.recv() {
        let mut committed = vec![first];
        committed.extend(turns.try_iter());
        let durable = !fail_stop.has_failed()
            && match wal.flush() {
                Ok(()) => true,
                Err(e) => {
                    fail_stop.fail(&e);
                    false
                }
            };
        for turn in committed {
            turn.answer(durable, waiters);
        }
    }
}

/// What [`sync_thread`] flushes: [`WalSync`] (a stand-in in the unit
/// tests).
trait Flush {
    /// Makes every commit before it durable.
    fn flush(&self) -> std::io::Result<()>;
}

impl Flush for WalSync {
    fn flush(&self) -> std::io::Result<()> {
        self.sync()
    }
}

/// Checkpoints the SQLite write-ahead log every [`CHECKPOINT_INTERVAL`] on
/// its own connection, so that commits (deposit batches waiting for their
/// answers) do not (see [`SqliteCheckpointer`]).
///
/// Stops for good after a failed flush ([`FailStop`]): a checkpoint copies
/// the log into the database, and after a failed flush the log's pages may
/// be stale.
async fn checkpoints(
    checkpointer: SqliteCheckpointer,
    mut stop: watch::Receiver<bool>,
    fail_stop: Arc<FailStop>,
) {
    let mut checkpointer = Some(checkpointer);
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let Some(c) = checkpointer.take() else {
            break;
        };
        let fail_stop = Arc::clone(&fail_stop);
        match tokio::task::spawn_blocking(move || {
            let result = fail_stop.enter().map(|_storage| c.checkpoint());
            (c, result)
        })
        .await
        {
            Ok((c, None)) => {
                // Not closed: see `FailStop` (and `run`, which leaves the
                // storage open too).
                std::mem::forget(c);
                break;
            }
            Ok((c, Some(result))) => {
                checkpointer = Some(c);
                match result {
                    Ok(report) => trace!(
                        log_frames = report.log_frames,
                        checkpointed = report.checkpointed_frames,
                        "checkpoint"
                    ),
                    Err(e) => warn!(error = %e, "checkpoint failed"),
                }
            }
            Err(e) => {
                error!(error = %e, "checkpoint failed; the writer checkpoints from now on");
                break;
            }
        }
    }
}

/// Sweeps expired envelopes and challenges every minute (and at start),
/// and forgets idle rate-limit buckets.
async fn sweeper<S: Storage>(shared: Arc<Shared<S>>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        shared.rates.cleanup();
        let sweeping = Arc::clone(&shared);
        if let Err(e) = tokio::task::spawn_blocking(move || sweeping.sweep()).await {
            error!(error = %e, "the retention sweep failed");
        }
    }
}

// ---------------------------------------------------------------------------
// Middleware
// ---------------------------------------------------------------------------

fn client_ip(request: &Request, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for {
        let forwarded = request
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .and_then(|first| {
                first
                    .parse::<IpAddr>()
                    .ok()
                    .or_else(|| first.parse::<SocketAddr>().ok().map(|a| a.ip()))
            });
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    request
        .extensions()
        .get::<PeerAddr>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip())
}

/// Whether the request has a body: a `Content-Length` above 0, or a
/// `Transfer-Encoding`.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// Whether `value` is `application/octet-stream`, in any case, with or
/// without parameters (`; charset=...`).
fn is_octet_stream(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(';').next().is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/octet-stream")
        })
    })
}

/// The checks on a request's form before its route runs: the target's
/// length (`414 uri_size`), canonical path segments (no percent-encoding:
/// `400 bad_request`; the other forms are the parsers'), and the body's
/// `Content-Type` on the routes that take one (`415 content_type`).
fn hygiene(request: &Request, route: Option<Route>) -> Result<(), ApiError> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ApiError::new(
            Reason::UriSize,
            format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        ));
    }
    let Some(route) = route else {
        return Ok(());
    };
    if request.uri().path().contains('%') {
        return Err(ApiError::bad(
            "malformed path: percent-encoded segments are not accepted (every path \
             parameter is lowercase hex or decimal)",
        ));
    }
    let takes_body =
        request.method().as_str() == route.spec().0 && matches!(route.spec().0, "POST" | "PUT");
    if takes_body
        && has_body(request.headers())
        && !request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(is_octet_stream)
    {
        return Err(ApiError::new(
            Reason::ContentType,
            "a request body must be sent as Content-Type: application/octet-stream",
        ));
    }
    Ok(())
}

/// Puts the body of a request that has one under the body deadline
/// ([`Paced`]).
fn pace(request: Request, limits: &Limits) -> Request {
    if limits.body_timeout_ms == 0 || !has_body(request.headers()) {
        return request;
    }
    let (parts, body) = request.into_parts();
    let paced = Paced::new(
        body,
        Duration::from_millis(limits.body_timeout_ms),
        limits.min_body_bytes_per_sec,
    );
    Request::from_parts(parts, Body::new(paced))
}

fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The header carrying a request's id, in both directions.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a client's `X-Request-Id`.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// The request id: the client's `X-Request-Id` if it is 1 to
/// [`MAX_REQUEST_ID_LEN`] bytes of letters, digits and `-_.:;/+=@`
/// (so that it cannot forge log lines or fields), else 128 random bits in
/// hex.
fn request_id(headers: &HeaderMap) -> String {
    let sane = |v: &str| {
        (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:;/+=@".contains(&b))
    };
    if let Some(id) = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane(v))
    {
        return id.to_owned();
    }
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut OsRng, &mut bytes);
    hex::encode(bytes)
}

/// The outer frame of every request: request id, request rate limit,
/// timeout, JSON errors, metrics and the access log (route, status, sizes,
/// latency: never paths, bodies, keys or addresses). Everything logged
/// while the request runs is in its `request` span, which holds the
/// request id (returned in `X-Request-Id`).
async fn frame<S: Storage>(
    State(shared): State<Arc<Shared<S>>>,
    request: Request,
    next: Next,
) -> Response {
    let id = request_id(request.headers());
    let span = tracing::info_span!("request", request_id = %id);
    let mut response =
        tracing::Instrument::instrument(frame_inner(shared, request, next), span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn frame_inner<S: Storage>(
    shared: Arc<Shared<S>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| Route::from_axum_path(request.method().as_str(), p.as_str()));
    let label = match route {
        Some(route) => route.name(),
        None if shared.web_root.is_some()
            && web::is_web_request(request.method(), request.uri().path()) =>
        {
            "web"
        }
        None => "no_route",
    };
    let method = request.method().clone();
    let request_bytes = content_length(request.headers());
    let ip = client_ip(&request, shared.limits.trust_forwarded_for);
    request.extensions_mut().insert(ClientIp(ip));

    // After a failed flush, nothing that uses the storage is served (see
    // `FailStop`); `/metrics` and unknown routes do not use it.
    let uses_storage = route.is_some_and(|r| r != Route::Metrics);
    let response = match shared.check_rate(ip, Kind::Request, Reason::RateRequests) {
        Err(e) => e.into_response(),
        Ok(()) if uses_storage && shared.fail_stop.has_failed() => {
            ApiError::storage_failed().into_response()
        }
        Ok(()) => match hygiene(&request, route) {
            Err(e) => e.into_response(),
            Ok(()) => {
                let request = pace(request, &shared.limits);
                match shared.limits.budget(route) {
                    None => next.run(request).await,
                    Some(budget) => match tokio::time::timeout(budget, next.run(request)).await {
                        Ok(response) => response,
                        Err(_) => ApiError::new(Reason::Timeout, "the request took too long")
                            .into_response(),
                    },
                }
            }
        },
    };
    let response = normalize(response);
    let reason = response.extensions().get::<Rejected>().map(|r| r.0.name());
    shared.metrics.record(label, reason);
    let response_bytes = response.body().size_hint().exact().unwrap_or(0);
    let latency = started.elapsed();
    shared
        .metrics
        .observe(label, method.as_str(), response.status().as_u16(), latency);
    info!(
        target: "cubbyhole_relay::access",
        method = %method,
        route = label,
        status = response.status().as_u16(),
        reason = reason.unwrap_or("-"),
        request_bytes,
        response_bytes,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request"
    );
    response
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

fn client(ip: Option<Extension<ClientIp>>) -> IpAddr {
    ip.map_or(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        |Extension(ClientIp(ip))| ip,
    )
}

fn parse_hex32(value: &str, what: &'static str) -> Result<[u8; 32], ApiError> {
    let mut out = [0u8; 32];
    let lower_hex = value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !lower_hex || hex::decode_to_slice(value, &mut out).is_err() {
        return Err(ApiError::bad(format!(
            "{what}: expected 64 lowercase hex characters"
        )));
    }
    Ok(out)
}

/// A decimal `u32` path segment in its one canonical form: digits only,
/// no leading zero (but `0` itself).
/// A deposit's pass from its headers (relay/API.md): `Cubbyhole-Access`
/// (the mailbox's access key) and `Cubbyhole-Stamp`, each exactly 32
/// lowercase hex digits, at most once each; anything else is `400`.
fn parse_pass(headers: &HeaderMap) -> Result<DepositPass, ApiError> {
    fn one<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(ApiError::bad(format!("{name} given twice")));
        }
        value
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad(format!("{name} is not 32 lowercase hex digits")))
    }
    fn hex16(value: &str, name: &str) -> Result<[u8; 16], ApiError> {
        let mut out = [0u8; 16];
        let valid = value.len() == 32
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && hex::decode_to_slice(value, &mut out).is_ok();
        if valid {
            Ok(out)
        } else {
            Err(ApiError::bad(format!(
                "{name} is not 32 lowercase hex digits"
            )))
        }
    }
    let access = match one(headers, ACCESS_HEADER)? {
        Some(value) => {
            let bytes = zeroize::Zeroizing::new(hex16(value, ACCESS_HEADER)?);
            Some(AccessKey::from_bytes(*bytes))
        }
        None => None,
    };
    let stamp = match one(headers, STAMP_HEADER)? {
        Some(value) => Some(
            Stamp::decode(&hex16(value, STAMP_HEADER)?)
                .map_err(|_| ApiError::bad(format!("{STAMP_HEADER} is not a stamp")))?,
        ),
        None => None,
    };
    Ok(DepositPass { access, stamp })
}

fn parse_u32(value: &str, what: &'static str) -> Result<u32, ApiError> {
    let canonical = value == "0" || !value.starts_with('0');
    parse_decimal_u32(value)
        .filter(|_| canonical)
        .ok_or_else(|| {
            ApiError::bad(format!(
                "{what}: expected a decimal u32 without leading zeros"
            ))
        })
}

fn parse_mailbox(path: Result<Path<String>, PathRejection>) -> Result<MailboxId, ApiError> {
    let Path(mailbox) = path.map_err(|_| ApiError::bad("malformed path"))?;
    parse_hex32(&mailbox, "mailbox").map(MailboxId)
}

fn parse_device(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<DeviceAddress, ApiError> {
    let Path((identity, device)) = path.map_err(|_| ApiError::bad("malformed path"))?;
    Ok(DeviceAddress {
        identity: parse_hex32(&identity, "identity")?,
        device_id: parse_u32(&device, "device")?,
    })
}

/// `limit` (default 100) and `wait_ms` (default 0) of a fetch; other
/// parameters are ignored ([`FetchQuery::decode`]).
fn parse_fetch_query(query: Option<&str>) -> Result<(u32, u32), ApiError> {
    let query = FetchQuery::decode(query.unwrap_or("")).map_err(ApiError::from_transport)?;
    Ok((query.limit, query.wait_ms))
}

fn parse_account(path: Result<Path<String>, PathRejection>) -> Result<AccountId, ApiError> {
    let Path(account) = path.map_err(|_| ApiError::bad("malformed path"))?;
    parse_hex32(&account, "account").map(AccountId)
}

/// `after` (default 0) of a device-lists fetch; other parameters are
/// ignored ([`DeviceListQuery::decode`]).
fn parse_devices_query(query: Option<&str>) -> Result<u64, ApiError> {
    let query = DeviceListQuery::decode(query.unwrap_or("")).map_err(ApiError::from_transport)?;
    Ok(query.after)
}

fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<LengthLimitError>() {
            return true;
        }
        current = e.source();
    }
    false
}

fn is_too_slow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTooSlow>() {
            return true;
        }
        current = e.source();
    }
    false
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    // The size limit is the RequestBodyLimitLayer's, on the body; the time
    // limit the `Paced` wrapper's.
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        if is_length_limit(&e) {
            ApiError::new(
                Reason::BodySize,
                "the request body is larger than the server's limit",
            )
        } else if is_too_slow(&e) {
            ApiError::new(
                Reason::Timeout,
                "the request body arrived too slowly (below the server's minimum upload rate)",
            )
        } else {
            ApiError::bad("the request body could not be read")
        }
    })
}

/// A request body that arrives slower than the server allows
/// ([`Limits::body_timeout_ms`], [`Limits::min_body_bytes_per_sec`]).
#[derive(Debug)]
struct BodyTooSlow;

impl fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body arrived too slowly")
    }
}

impl std::error::Error for BodyTooSlow {}

/// A request body with a deadline: [`Limits::body_timeout_ms`] after the
/// headers, plus one second per [`Limits::min_body_bytes_per_sec`] bytes
/// received. Past it the body ends with [`BodyTooSlow`].
struct Paced {
    inner: Body,
    start: tokio::time::Instant,
    grace: Duration,
    rate: u64,
    received: u64,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    failed: bool,
}

impl Paced {
    fn new(inner: Body, grace: Duration, rate: u64) -> Self {
        let start = tokio::time::Instant::now();
        Paced {
            inner,
            start,
            grace,
            rate,
            received: 0,
            deadline: Box::pin(tokio::time::sleep_until(start + grace)),
            failed: false,
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        let earned = match self.rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(self.received as f64 / rate as f64),
        };
        self.start + self.grace + earned
    }
}

impl HttpBody for Paced {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        if self.failed {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received = self.received.saturating_add(data.len() as u64);
                    let deadline = self.deadline();
                    self.deadline.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.failed = true;
                    return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow))));
                }
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn decode_auth(bytes: &[u8], mailbox: &MailboxId) -> Result<MailboxAuth, ApiError> {
    let auth = MailboxAuth::decode(bytes).map_err(ApiError::from_transport)?;
    for_mailbox(auth, mailbox)
}

/// The proof, if it is for the path's mailbox.
fn for_mailbox(auth: MailboxAuth, mailbox: &MailboxId) -> Result<MailboxAuth, ApiError> {
    if auth.mailbox() != *mailbox {
        return Err(ApiError::new(
            Reason::Unauthorized,
            "the proof is for another mailbox",
        ));
    }
    Ok(auth)
}

/// The device an upload names (`0x01 || identity (32) || device_id (4) ||
/// ...`), read for the `devices` gauge only: the relay core decodes and
/// verifies the upload.
fn upload_device(upload: &[u8]) -> Option<DeviceAddress> {
    Some(DeviceAddress {
        identity: upload.get(1..33)?.try_into().ok()?,
        device_id: u32::from_be_bytes(upload.get(33..37)?.try_into().ok()?),
    })
}

fn binary(status: StatusCode, bytes: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `length (4, big-endian) || encoded envelope`, for each envelope
/// ([`encode_envelope_list`]).
fn envelopes_response(envelopes: &[Envelope]) -> Response {
    binary(StatusCode::OK, encode_envelope_list(envelopes))
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

type AppState<S> = State<Arc<Shared<S>>>;

async fn no_route() -> ApiError {
    ApiError::new(Reason::NoRoute, "no such route")
}

/// What no route takes: a static file ([`ServerConfig::web_root`]), else
/// `404 no_route`.
async fn fallback<S: Storage>(State(shared): AppState<S>, request: Request) -> Response {
    let root = match &shared.web_root {
        Some(root) if web::is_web_request(request.method(), request.uri().path()) => root.clone(),
        _ => return no_route().await.into_response(),
    };
    match web::serve(root, &request).await {
        Ok(response) => response,
        Err(web::Miss::Malformed) => ApiError::bad(
            "malformed path: `.` and `..` segments, empty segments, percent-encoding, \
             backslashes, colons and control characters are not accepted",
        )
        .into_response(),
        Err(web::Miss::NotFound) => no_route().await.into_response(),
    }
}

/// `HEAD` on the bundle route: `405` (see [`Route::method_router`]).
async fn no_head() -> Response {
    let mut response = ApiError::new(
        Reason::MethodNotAllowed,
        "HEAD is not served on this route (a bundle fetch claims a one-time prekey); use GET",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

async fn health<S: Storage>(State(shared): AppState<S>) -> Result<Response, ApiError> {
    shared
        .call(|core, _, _| {
            core.relay
                .storage()
                .mailbox_exists(&MailboxId([0; 32]))
                .map_err(storage_failed)
        })
        .await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "status": "ok" })))
}

async fn metrics<S: Storage>(State(shared): AppState<S>) -> Response {
    let text = shared.metrics.render(Live {
        long_polls: shared.waiters.parked(),
        connections: shared.connections.open() as u64,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

async fn publish<S: Storage>(State(shared): AppState<S>, body: Body) -> Result<Response, ApiError> {
    let upload = read_body(body).await?;
    shared
        .call(move |core, metrics, now| {
            let device = upload_device(&upload);
            let new = device.is_some_and(|d| matches!(core.relay.storage().device(&d), Ok(None)));
            core.relay.publish(now, &upload)?;
            if new {
                metrics.devices.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn bundle<S: Storage>(
    State(shared): AppState<S>,
    ip: Option<Extension<ClientIp>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let device = parse_device(path)?;
    shared.check_rate(client(ip), Kind::Claim, Reason::RateClaims)?;
    let bundle = shared
        .call(move |core, _, now| core.relay.fetch_bundle(now, &device))
        .await?;
    Ok(binary(StatusCode::OK, bundle))
}

async fn one_time_prekeys<S: Storage>(
    State(shared): AppState<S>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let device = parse_device(path)?;
    let count = shared
        .call(move |core, _, _| core.relay.one_time_prekeys_left(&device))
        .await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "count": count })))
}

async fn deposit<S: Storage>(
    State(shared): AppState<S>,
    ip: Option<Extension<ClientIp>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mailbox = parse_mailbox(path)?;
    let pass = parse_pass(&headers)?;
    shared.check_rate(client(ip), Kind::Deposit, Reason::RateDeposits)?;
    let bytes = read_body(body).await?;
    let envelope = decode_envelope(&bytes).map_err(ApiError::from_transport)?;
    let (reply, answer) = oneshot::channel();
    let job = DepositJob {
        mailbox,
        envelope,
        pass,
        reply,
    };
    shared
        .jobs
        .send(Job::Deposit(job))
        .await
        .map_err(|_| ApiError::new(Reason::Unavailable, "the relay is shutting down"))?;
    let stored = answer.await.map_err(|_| {
        ApiError::new(
            Reason::Unavailable,
            "the deposit could not be stored; retry",
        )
    })??;
    Ok(if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
    .into_response())
}

async fn challenge<S: Storage>(
    State(shared): AppState<S>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let mailbox = parse_mailbox(path)?;
    let challenge = shared
        .call(move |core, _, now| core.relay.challenge(now, &mut OsRng, &mailbox))
        .await?;
    Ok(binary(StatusCode::OK, challenge.to_vec()))
}

async fn fetch<S: Storage>(
    State(shared): AppState<S>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let mailbox = parse_mailbox(path)?;
    let (limit, wait_ms) = parse_fetch_query(query.as_deref())?;
    let bytes = read_body(body).await?;
    let auth = decode_auth(&bytes, &mailbox)?;
    let wait = Duration::from_millis(u64::from(wait_ms.min(shared.limits.max_wait_ms)));
    if wait.is_zero() || limit == 0 {
        let envelopes = shared
            .call(move |core, _, now| core.relay.fetch(now, &auth, limit))
            .await?;
        return Ok(envelopes_response(&envelopes));
    }
    // Register before the first listing, so that a deposit between the
    // listing and the wait still wakes this request.
    let waiter = shared.waiters.register(mailbox);
    let mut woken = std::pin::pin!(waiter.notify().notified());
    woken.as_mut().enable();
    let envelopes = shared
        .call(move |core, _, now| core.relay.fetch(now, &auth, limit))
        .await?;
    if !envelopes.is_empty() {
        return Ok(envelopes_response(&envelopes));
    }
    // Parked: from here on a deposit to the mailbox wakes this request
    // (the `cubbyhole_relay_long_polls` gauge counts it).
    waiter.park();
    let deadline = tokio::time::Instant::now() + wait;
    while !shared.waiters.is_closing()
        && tokio::time::timeout_at(deadline, woken.as_mut())
            .await
            .is_ok()
    {
        woken.set(waiter.notify().notified());
        woken.as_mut().enable();
        let envelopes = shared
            .call(move |core, _, now| core.list(now, &mailbox, limit))
            .await?;
        if !envelopes.is_empty() {
            return Ok(envelopes_response(&envelopes));
        }
    }
    Ok(envelopes_response(&[]))
}

async fn acknowledge<S: Storage>(
    State(shared): AppState<S>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let mailbox = parse_mailbox(path)?;
    let bytes = read_body(body).await?;
    let (auth, ids) = decode_acknowledge(&bytes).map_err(ApiError::from_transport)?;
    let auth = for_mailbox(auth, &mailbox)?;
    shared
        .call(move |core, metrics, now| {
            core.relay.acknowledge(now, &auth, &ids)?;
            if !ids.is_empty() {
                if let Err(e) = core.refresh_usage(mailbox, metrics) {
                    warn!(error = %e, "could not read a mailbox's usage");
                }
            }
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn publish_devices<S: Storage>(
    State(shared): AppState<S>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let account = parse_account(path)?;
    let signed = read_body(body).await?;
    // Decoded here for the path check; the relay core decodes it again
    // and verifies it.
    let list = DeviceList::decode(&signed)
        .map_err(|e| ApiError::from_device_list(device_list_error(&e)))?;
    if *list.account_id() != account {
        return Err(ApiError::bad(
            "the device list is for another account than the path's",
        ));
    }
    shared
        .call(move |core, _, _| Ok(core.relay.publish_device_list(&signed)))
        .await?
        .map_err(ApiError::from_device_list)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn devices<S: Storage>(
    State(shared): AppState<S>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let account = parse_account(path)?;
    let after = parse_devices_query(query.as_deref())?;
    let lists = shared
        .call(move |core, _, _| core.relay.fetch_device_lists(&account, after))
        .await?;
    Ok(binary(StatusCode::OK, encode_device_lists(&lists)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush that fails its first call and succeeds after (as a disk may
    /// once its failed pages are dropped), counting its calls.
    #[derive(Default)]
    struct FailsOnce(std::sync::atomic::AtomicUsize);

    impl Flush for FailsOnce {
        fn flush(&self) -> std::io::Result<()> {
            match self.0.fetch_add(1, Ordering::SeqCst) {
                0 => Err(std::io::Error::other("EIO")),
                _ => Ok(()),
            }
        }
    }

    /// A turn of one call whose answer (durable or not) goes to `answers`.
    fn turn(answers: &std::sync::mpsc::Sender<bool>) -> Synced {
        let answers = answers.clone();
        Synced {
            answers: vec![Box::new(move |durable| answers.send(durable).unwrap())],
            stored: Vec::new(),
        }
    }

    #[test]
    fn after_a_failed_flush_the_sync_thread_never_flushes_nor_answers_durable_again() {
        let flush = Arc::new(FailsOnce::default());
        let fail_stop = Arc::new(FailStop::default());
        let (syncs, turns) = std::sync::mpsc::sync_channel(MAX_TURNS_AWAITING_SYNC);
        let (answer, answered) = std::sync::mpsc::channel();
        let thread = {
            let (flush, fail_stop) = (Arc::clone(&flush), Arc::clone(&fail_stop));
            std::thread::spawn(move || {
                sync_thread(&Waiters::default(), &*flush, &turns, &fail_stop)
            })
        };
        syncs.send(turn(&answer)).unwrap();
        assert!(!answered.recv().unwrap(), "the failed flush's turn");
        assert!(fail_stop.has_failed());
        assert!(fail_stop.enter().is_none(), "the storage is closed to all");
        assert!(matches!(
            fail_stop.error(),
            Some(ServerError::LogFlushFailed(_))
        ));
        for _ in 0..3 {
            syncs.send(turn(&answer)).unwrap();
            assert!(!answered.recv().unwrap(), "a turn after the failure");
        }
        drop(syncs);
        thread.join().unwrap();
        assert_eq!(
            flush.0.load(Ordering::SeqCst),
            1,
            "flushed after the failure"
        );
    }

    #[test]
    fn tables_follow_the_enums() {
        assert_eq!(ROUTES.len(), Route::ALL.len());
        for (i, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(ROUTES[i], route.spec());
            assert_eq!(
                Route::from_axum_path(route.spec().0, &route.axum_path()),
                Some(route)
            );
        }
        assert_eq!(REASONS.len(), Reason::ALL.len());
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(REASONS[i], reason.spec());
            assert_eq!(reason.status().as_u16(), reason.spec().1);
        }
        assert_eq!(
            Route::Bundle.axum_path(),
            "/v1/directory/:identity/:device/bundle"
        );
        assert_eq!(
            Route::from_axum_path("GET", "/v1/directory/:x/:device/bundle"),
            None
        );
        assert_eq!(
            Route::from_axum_path("HEAD", "/v1/directory/:identity/:device/bundle"),
            Some(Route::Bundle)
        );
        assert_eq!(
            Route::from_axum_path("DELETE", "/v1/accounts/:account/devices"),
            Some(Route::PublishDevices)
        );
    }

    #[test]
    fn maps_every_core_error() {
        let cases = [
            (TransportError::BadRequest("x"), "bad_request", 400),
            (TransportError::Unauthorized, "unauthorized", 401),
            (TransportError::NotFound, "not_found", 404),
            (TransportError::Replayed, "replayed", 409),
            (
                TransportError::LimitExceeded(core_reason::ENVELOPE_SIZE),
                "envelope_size",
                413,
            ),
            (
                TransportError::LimitExceeded(core_reason::ACKNOWLEDGE_IDS),
                "acknowledge_ids",
                413,
            ),
            (
                TransportError::LimitExceeded(core_reason::ONE_TIME_PREKEYS),
                "one_time_prekeys",
                422,
            ),
            (
                TransportError::LimitExceeded(core_reason::PENDING_ENVELOPES),
                "pending_envelopes",
                507,
            ),
            (
                TransportError::LimitExceeded(core_reason::PENDING_BYTES),
                "pending_bytes",
                507,
            ),
            (TransportError::LimitExceeded("new bound"), "limit", 422),
            (TransportError::Unavailable("x"), "unavailable", 503),
            (TransportError::Conflict, "device_list_conflict", 409),
        ];
        for (error, name, status) in cases {
            let e = ApiError::from_transport(error);
            assert_eq!(e.reason.spec(), (name, status));
        }
        // Device lists (SPEC.md 25.12).
        use device_list_reason as r;
        let cases = [
            (TransportError::Replayed, "stale_device_list", 409),
            (TransportError::Conflict, "device_list_conflict", 409),
            (TransportError::BadRequest(r::GAP), "device_list_gap", 409),
            (TransportError::Unauthorized, "unauthorized", 401),
            (TransportError::BadRequest(r::MALFORMED), "bad_request", 400),
            (
                TransportError::BadRequest(r::DEVICE_ID_REUSED),
                "bad_request",
                400,
            ),
            (TransportError::Unavailable("x"), "unavailable", 503),
        ];
        for (error, name, status) in cases {
            let e = ApiError::from_device_list(error);
            assert_eq!(e.reason.spec(), (name, status));
        }
        let e = ApiError::from_device_list(TransportError::BadRequest(r::NOT_GENESIS));
        assert_eq!(e.message, r::NOT_GENESIS);
    }

    #[test]
    fn parses_paths_and_queries() {
        assert!(parse_hex32(&"ab".repeat(32), "x").is_ok());
        assert!(parse_hex32(&"AB".repeat(32), "x").is_err());
        assert!(parse_hex32(&"ab".repeat(31), "x").is_err());
        assert!(parse_hex32(&"zz".repeat(32), "x").is_err());
        assert!(parse_hex32("ééé", "x").is_err());
        assert_eq!(parse_u32("4294967295", "d").unwrap(), u32::MAX);
        for bad in ["", "+1", "-1", "4294967296", "1e3", "99999999999", " 1"] {
            assert!(parse_u32(bad, "d").is_err(), "{bad}");
        }
        assert_eq!(parse_fetch_query(None).unwrap(), (100, 0));
        assert_eq!(
            parse_fetch_query(Some("wait_ms=5&limit=7&x=y&&")).unwrap(),
            (7, 5)
        );
        assert!(parse_fetch_query(Some("limit=")).is_err());
        assert!(parse_fetch_query(Some("wait_ms=-1")).is_err());
        assert_eq!(parse_devices_query(None).unwrap(), 0);
        assert_eq!(
            parse_devices_query(Some("x=1&after=18446744073709551615")).unwrap(),
            u64::MAX
        );
        for bad in [
            "after=",
            "after=-1",
            "after=18446744073709551616",
            "after=0x1",
        ] {
            assert!(parse_devices_query(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn budgets_include_the_long_poll() {
        let limits = Limits::default();
        assert_eq!(
            limits.budget(Some(Route::Fetch)),
            Some(Duration::from_millis(60_000))
        );
        assert_eq!(
            limits.budget(Some(Route::Deposit)),
            Some(Duration::from_millis(30_000))
        );
        let off = Limits {
            request_timeout_ms: 0,
            ..Limits::default()
        };
        assert_eq!(off.budget(None), None);
    }

    #[test]
    fn storage_config_hides_the_postgres_url() {
        let shown = format!(
            "{:?}",
            StorageConfig::Postgres("postgres://u:secret@h/db".into())
        );
        assert!(!shown.contains("secret"));
    }

    #[test]
    fn forwarded_for_only_when_trusted() {
        let mut request = Request::new(Body::empty());
        request
            .extensions_mut()
            .insert(PeerAddr("192.0.2.1:5000".parse().unwrap()));
        request.headers_mut().insert(
            "x-forwarded-for",
            HeaderValue::from_static("198.51.100.7, 10.0.0.1"),
        );
        assert_eq!(
            client_ip(&request, false),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(&request, true),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        request
            .headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(
            client_ip(&request, true),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }
}
