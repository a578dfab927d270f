//! [`HttpRelay`]: the relay's HTTP API (`relay/API.md`) as a
//! [`PrekeyDirectory`], a [`DeviceDirectory`] and a [`Mailbox`]. The crate docs describe its
//! errors, retries, runtime and cancellation.
//!
//! What does not depend on the target is here: the paths, the retry
//! policy and its loop, the mapping of answers to transport errors, the
//! headers of a deposit. One attempt of a request and the sleep between
//! attempts are an engine's: `native` (`reqwest` on a Tokio runtime) or,
//! on `wasm32`, `web` (the browser's `fetch`).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cubbyhole::protocol::devices::{AccountId, DeviceList};
use cubbyhole::relay::{device_list_error, device_list_reason, reason as core_reason};
use cubbyhole::transport::{
    decode_envelope_list, encode_acknowledge, encode_envelope, DepositPass, DeviceAddress,
    DeviceDirectory, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, PrekeyDirectory,
    TransportError,
};
use cubbyhole::MaybeSend;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::wire::{decode_device_lists, DeviceListQuery, FetchQuery, ACCESS_HEADER, STAMP_HEADER};

#[cfg(not(target_arch = "wasm32"))]
mod native;
#[cfg(not(target_arch = "wasm32"))]
use native as engine;
#[cfg(target_arch = "wasm32")]
mod web;
#[cfg(target_arch = "wasm32")]
use web as engine;

/// The reasons carried by [`TransportError::LimitExceeded`] for the bounds
/// the HTTP server adds to the relay rules (the rules' own bounds use the
/// constants of [`cubbyhole::relay::reason`]).
pub mod reason {
    /// `413 body_size`: the request body is above the server's body limit.
    pub const BODY_SIZE: &str = "request body size";
    /// `429 rate_deposits`: deposits per client address per minute.
    pub const RATE_DEPOSITS: &str = "deposits per minute";
    /// `429 rate_claims`: bundle fetches (one-time prekey claims) per client
    /// address per minute.
    pub const RATE_CLAIMS: &str = "bundle fetches per minute";
    /// `429 rate_requests`: requests per client address per minute.
    pub const RATE_REQUESTS: &str = "requests per minute";
    /// `507 total_storage`: the relay holds its configured total (or is
    /// nearly full and the mailbox holds more than its fair share).
    pub const TOTAL_STORAGE: &str = "relay total storage";
    /// `507 strangers_total`: strangers' deposits hold their part of the
    /// relay's total.
    pub const STRANGERS_TOTAL: &str = "strangers' total storage";
    /// A `413`, `422`, `429` or `507` with a reason this client does not
    /// know (a newer server).
    pub const OTHER: &str = "relay limit";
}

/// The [`TransportError::LimitExceeded`] reason for an API error reason.
fn limit_reason(wire: &str) -> &'static str {
    match wire {
        "envelope_size" => core_reason::ENVELOPE_SIZE,
        "pending_envelopes" => core_reason::PENDING_ENVELOPES,
        "pending_bytes" => core_reason::PENDING_BYTES,
        "one_time_prekeys" => core_reason::ONE_TIME_PREKEYS,
        "acknowledge_ids" => core_reason::ACKNOWLEDGE_IDS,
        "stranger_envelopes" => core_reason::STRANGER_ENVELOPES,
        "stranger_bytes" => core_reason::STRANGER_BYTES,
        "strangers_closed" => core_reason::STRANGERS_CLOSED,
        "body_size" => reason::BODY_SIZE,
        "rate_deposits" => reason::RATE_DEPOSITS,
        "rate_claims" => reason::RATE_CLAIMS,
        "rate_requests" => reason::RATE_REQUESTS,
        "total_storage" => reason::TOTAL_STORAGE,
        "strangers_total" => reason::STRANGERS_TOTAL,
        _ => reason::OTHER,
    }
}

/// The device-list reason ([`device_list_reason`]) an error message names,
/// if it is one of them (the relay answers a refused device list with its
/// reason as the message).
fn device_list_bad_request(message: &str) -> Option<&'static str> {
    use device_list_reason as r;
    [
        r::MALFORMED,
        r::NOT_GENESIS,
        r::WRONG_ACCOUNT,
        r::GAP,
        r::DEVICE_ID_CHANGED,
        r::DEVICE_ID_REUSED,
    ]
    .into_iter()
    .find(|reason| *reason == message)
}

/// Maps an error answer (status, the JSON `error` reason and `message`, if
/// any) to the transport error the in-process relay would have given.
/// `what` names the request for [`TransportError::BadRequest`] (unless the
/// message is a [`device_list_reason`]).
fn error_for(
    status: u16,
    wire: Option<&str>,
    message: Option<&str>,
    what: &'static str,
) -> TransportError {
    match status {
        400 => {
            TransportError::BadRequest(message.and_then(device_list_bad_request).unwrap_or(what))
        }
        401 => TransportError::Unauthorized,
        403 if wire == Some("strangers_closed") => {
            TransportError::LimitExceeded(core_reason::STRANGERS_CLOSED)
        }
        404 if wire == Some("no_route") => TransportError::BadRequest("no such route on the relay"),
        404 => TransportError::NotFound,
        405 => TransportError::BadRequest("method not allowed by the relay"),
        408 => TransportError::Unavailable("relay request timeout"),
        409 if wire == Some("device_list_conflict") => TransportError::Conflict,
        409 if wire == Some("device_list_gap") => {
            TransportError::BadRequest(device_list_reason::GAP)
        }
        409 => TransportError::Replayed,
        413 | 422 | 429 | 507 => TransportError::LimitExceeded(limit_reason(wire.unwrap_or(""))),
        503 => TransportError::Unavailable("relay unavailable"),
        500..=599 => TransportError::Unavailable("relay error"),
        _ => TransportError::Unavailable("unexpected relay status"),
    }
}

/// The settings of an [`HttpRelay`]. The defaults are documented on each
/// field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRelayConfig {
    /// How long to wait for a connection (TCP and TLS). Default 5 s. No
    /// effect in the browser (the browser connects; `request_timeout`
    /// covers the connection there).
    pub connect_timeout: Duration,
    /// How long one attempt of a request may take, from sending it to the
    /// last byte of the answer. Default 15 s.
    pub request_timeout: Duration,
    /// What a long poll ([`Mailbox::fetch_waiting`]) gets on top of its
    /// wait: its timeout is the wait plus this. Default 10 s.
    pub long_poll_margin: Duration,
    /// How many times a retryable call is retried (see
    /// [Retries](crate#retries)). Default 3 (four attempts).
    pub retries: u32,
    /// The first retry's delay; every further retry doubles it. Each sleep
    /// is drawn uniformly between half the delay and the delay. Default
    /// 100 ms.
    pub backoff_base: Duration,
    /// The longest delay between two attempts. Default 2 s.
    pub backoff_max: Duration,
    /// How long an idle pooled connection is kept for the next request.
    /// Keep it below the relay's idle timeout (its `header_timeout_ms`,
    /// 10 s by default), so a request is not sent on a connection the relay
    /// is closing. Default 5 s. No effect in the browser (it pools the
    /// connections itself).
    pub pool_idle_timeout: Duration,
    /// The largest answer accepted; a larger one is
    /// [`TransportError::Unavailable`]. Default 32 MiB (a fetch answers at
    /// most the relay's 8 MiB per fetch by default).
    pub max_response_bytes: usize,
    /// The local address to connect from (a multi-homed host, or a test
    /// that gives each device its own loopback address). Default `None`:
    /// the system picks. No effect in the browser (it picks).
    pub local_address: Option<std::net::IpAddr>,
}

impl Default for HttpRelayConfig {
    fn default() -> Self {
        HttpRelayConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            long_poll_margin: Duration::from_secs(10),
            retries: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(5),
            max_response_bytes: 32 * 1024 * 1024,
            local_address: None,
        }
    }
}

impl HttpRelayConfig {
    /// The sleep before retry number `retry` (0 for the first), without
    /// jitter: `backoff_base * 2^retry`, capped at `backoff_max`. The actual
    /// sleep is between half of it and all of it.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }
}

/// Why an [`HttpRelay`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum HttpRelayError {
    /// The base URL is not an absolute `http` or `https` URL (the reason
    /// says what is wrong).
    InvalidUrl(&'static str),
    /// The HTTP client could not be built (its TLS setup failed). Not on
    /// `wasm32` (the browser's `fetch` needs no client).
    #[cfg(not(target_arch = "wasm32"))]
    Client(reqwest::Error),
    /// Built outside a Tokio runtime, the relay could not start its private
    /// runtime (the operating system refused a thread). Not on `wasm32`
    /// (no runtime there: the requests run in the future that awaits them).
    #[cfg(not(target_arch = "wasm32"))]
    Runtime(std::io::Error),
}

impl fmt::Display for HttpRelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpRelayError::InvalidUrl(why) => write!(f, "invalid relay URL: {why}"),
            #[cfg(not(target_arch = "wasm32"))]
            HttpRelayError::Client(e) => write!(f, "HTTP client: {e}"),
            #[cfg(not(target_arch = "wasm32"))]
            HttpRelayError::Runtime(e) => write!(f, "HTTP runtime: {e}"),
        }
    }
}

impl std::error::Error for HttpRelayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpRelayError::InvalidUrl(_) => None,
            #[cfg(not(target_arch = "wasm32"))]
            HttpRelayError::Client(e) => Some(e),
            #[cfg(not(target_arch = "wasm32"))]
            HttpRelayError::Runtime(e) => Some(e),
        }
    }
}

/// Which failures of a call are retried (see [Retries](crate#retries)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Every [`TransportError::Unavailable`].
    Idempotent,
    /// Only failures to connect: the request never left.
    Unsent,
    /// Nothing.
    Never,
}

/// The HTTP methods of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
}

/// A request header: its (lowercase) name and value. The value of
/// [`ACCESS_HEADER`] is a key: wiped on drop, and an engine marks it
/// sensitive where it can.
type Header = (&'static str, Zeroizing<String>);

/// The most bytes of an error answer's body an engine reads (it is small
/// JSON): a larger or unreadable one counts as no body.
const ERROR_BODY_MAX: usize = 64 * 1024;

/// One failed attempt.
struct Failure {
    error: TransportError,
    /// The request certainly did not reach the relay.
    unsent: bool,
}

impl Failure {
    fn answered(error: TransportError) -> Self {
        Failure {
            error,
            unsent: false,
        }
    }
}

/// A relay reached over HTTP: implements [`PrekeyDirectory`] and
/// [`Mailbox`] per `relay/API.md`, with timeouts and retries (see
/// [Retries](crate#retries)).
///
/// Clones are cheap and share the connection pool and the runtime, so one
/// `HttpRelay` can be both the directory and the mailbox of a client.
///
/// Every request runs as a task on the Tokio runtime chosen when the relay
/// is built (the runtime it was built in, or else a private one it owns:
/// see [the crate docs](crate#runtimes)); the futures its methods return
/// only wait for that task. So they are `Send` and `'static`, and any
/// executor can poll them, [`cubbyhole::client::block_on`] included.
/// Dropping one of them aborts its request ([Cancellation](crate#cancellation)).
///
/// On `wasm32` the requests are the browser's `fetch`, run by the futures
/// themselves, which are not `Send` ([In the browser](crate#in-the-browser)).
#[derive(Clone)]
pub struct HttpRelay {
    /// What a request needs (natively a request task holds a clone of
    /// this, never the runtime's owner, so that the last user handle shuts
    /// a private runtime down from the user's side, not from one of its
    /// own tasks).
    inner: Arc<Inner>,
    /// Where the requests run (natively: the runtime, and the private
    /// runtime if the relay owns one).
    exec: engine::Executor,
}

struct Inner {
    engine: engine::Engine,
    base: String,
    config: HttpRelayConfig,
}

impl fmt::Debug for HttpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRelay")
            .field("base", &self.inner.base)
            .field("config", &self.inner.config)
            .field("private_runtime", &self.has_private_runtime())
            .finish_non_exhaustive()
    }
}

impl HttpRelay {
    /// A relay at `base_url` (such as `https://relay.example` or
    /// `http://127.0.0.1:8080/prefix`: the API's paths are appended to it),
    /// with the default [`HttpRelayConfig`].
    ///
    /// Called inside a Tokio runtime, the relay's requests run on that
    /// runtime; called outside any, it starts a private runtime of one
    /// thread (see [Runtimes](crate#runtimes)). On `wasm32` there is no
    /// runtime: the requests run in the futures that await them.
    ///
    /// # Errors
    /// [`HttpRelayError::InvalidUrl`]; natively also
    /// `HttpRelayError::Client` and `HttpRelayError::Runtime`.
    pub fn new(base_url: &str) -> Result<Self, HttpRelayError> {
        Self::with_config(base_url, HttpRelayConfig::default())
    }

    /// A relay at `base_url` with these settings (the runtime is chosen as
    /// by [`HttpRelay::new`]).
    ///
    /// # Errors
    /// [`HttpRelayError::InvalidUrl`]; natively also
    /// `HttpRelayError::Client` and `HttpRelayError::Runtime`.
    pub fn with_config(base_url: &str, config: HttpRelayConfig) -> Result<Self, HttpRelayError> {
        let base = engine::parse_base(base_url)?;
        let (engine, exec) = engine::build(&config)?;
        Ok(HttpRelay {
            inner: Arc::new(Inner {
                engine,
                base,
                config,
            }),
            exec,
        })
    }

    /// The base URL (without a trailing slash).
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// The settings.
    pub fn config(&self) -> &HttpRelayConfig {
        &self.inner.config
    }

    /// Whether the requests run on a private runtime of this relay (it was
    /// built outside any Tokio runtime) rather than on the runtime it was
    /// built in (see [Runtimes](crate#runtimes)). Always `false` on
    /// `wasm32`, which has no runtime.
    pub fn has_private_runtime(&self) -> bool {
        self.exec.is_private()
    }

    /// Checks `GET /v1/health` (retried like an idempotent call).
    ///
    /// # Errors
    /// [`TransportError::Unavailable`] when the relay or its storage does
    /// not answer.
    pub fn health(&self) -> impl Future<Output = Result<(), TransportError>> + MaybeSend + 'static {
        let timeout = self.inner.config.request_timeout;
        self.run(move |inner| async move {
            inner
                .call(
                    Method::Get,
                    "/v1/health".to_owned(),
                    None,
                    timeout,
                    Retry::Idempotent,
                    "health",
                )
                .await
                .map(drop)
        })
    }

    fn device_path(device: &DeviceAddress, what: &str) -> String {
        format!(
            "/v1/directory/{}/{}/{what}",
            hex::encode(device.identity),
            device.device_id
        )
    }

    fn devices_path(account: &AccountId) -> String {
        format!("/v1/accounts/{}/devices", hex::encode(account.0))
    }

    fn mailbox_path(mailbox: &MailboxId, what: &str) -> String {
        format!("/v1/mailboxes/{}/{what}", hex::encode(mailbox.0))
    }

    /// A fetch, waiting up to `wait_ms` on the relay when nothing is
    /// pending.
    fn fetch_inner(
        &self,
        auth: &MailboxAuth,
        limit: u32,
        wait_ms: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + MaybeSend + 'static {
        let mut path = Self::mailbox_path(&auth.mailbox(), "fetch");
        path.push('?');
        path.push_str(&FetchQuery { limit, wait_ms }.encode());
        let body = auth.encode();
        self.run(move |inner| async move {
            let timeout = if wait_ms > 0 {
                Duration::from_millis(u64::from(wait_ms)) + inner.config.long_poll_margin
            } else {
                inner.config.request_timeout
            };
            let answer = inner
                .call(
                    Method::Post,
                    path,
                    Some(body),
                    timeout,
                    Retry::Never,
                    "fetch proof",
                )
                .await?;
            decode_envelopes(&answer)
        })
    }
}

impl Inner {
    /// Sends a request with the call's retry policy; the answer's body on
    /// a `2xx`.
    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
        timeout: Duration,
        retry: Retry,
        what: &'static str,
    ) -> Result<Vec<u8>, TransportError> {
        self.call_with(method, path, body, &[], timeout, retry, what)
            .await
    }

    /// [`Inner::call`] with extra request headers.
    #[allow(clippy::too_many_arguments)]
    async fn call_with(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
        headers: &[Header],
        timeout: Duration,
        retry: Retry,
        what: &'static str,
    ) -> Result<Vec<u8>, TransportError> {
        let url = format!("{}{path}", self.base);
        let mut retries = 0;
        loop {
            let failure = match self
                .attempt(method, &url, body.as_deref(), headers, timeout, what)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            let retryable = match retry {
                Retry::Idempotent => matches!(failure.error, TransportError::Unavailable(_)),
                Retry::Unsent => failure.unsent,
                Retry::Never => false,
            };
            if !retryable || retries >= self.config.retries {
                return Err(failure.error);
            }
            engine::sleep(jitter(self.config.backoff(retries))).await;
            retries += 1;
        }
    }

    /// One attempt: the engine's exchange, then the answer's status mapped
    /// to the body or to the error.
    async fn attempt(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        headers: &[Header],
        timeout: Duration,
        what: &'static str,
    ) -> Result<Vec<u8>, Failure> {
        let (status, bytes) = self
            .engine
            .attempt(
                method,
                url,
                body,
                headers,
                timeout,
                self.config.max_response_bytes,
            )
            .await?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        // The error body is small JSON; an unreadable one (the engine gives
        // it as empty) still has a status.
        let body = serde_json::from_slice::<ErrorBody>(&bytes).ok();
        let (wire, message) = match &body {
            Some(b) => (Some(b.error.as_str()), b.message.as_deref()),
            None => (None, None),
        };
        if status == 403 && wire == Some("stamp_required") {
            if let Some(difficulty) = body.as_ref().and_then(|b| b.difficulty) {
                return Err(Failure::answered(TransportError::StampRequired(difficulty)));
            }
        }
        Err(Failure::answered(error_for(status, wire, message, what)))
    }
}

/// The request headers of a deposit's pass (relay/API.md): the access
/// key (`Cubbyhole-Access`) and the stamp (`Cubbyhole-Stamp`), each 32
/// lowercase hex digits. The key's value is wiped on drop; the native
/// engine marks it sensitive (an HTTP/2 encoder never indexes it; `Debug`
/// does not show it).
fn pass_headers(pass: &DepositPass) -> Vec<Header> {
    let mut headers = Vec::new();
    if let Some(key) = &pass.access {
        headers.push((ACCESS_HEADER, Zeroizing::new(hex::encode(key.as_bytes()))));
    }
    if let Some(stamp) = &pass.stamp {
        headers.push((STAMP_HEADER, Zeroizing::new(hex::encode(stamp.encode()))));
    }
    headers
}

/// The JSON error body.
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: Option<String>,
    /// With `403 stamp_required`: the difficulty to mint at.
    #[serde(default)]
    difficulty: Option<u8>,
}

/// A delay drawn uniformly from `[delay / 2, delay]`.
fn jitter(delay: Duration) -> Duration {
    let half = delay / 2;
    let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    let extra = if span == 0 {
        0
    } else {
        OsRng.next_u64() % (span + 1)
    };
    half + Duration::from_micros(extra)
}

/// Decodes a fetch answer: `length (4) || encoded envelope`, repeated
/// ([`decode_envelope_list`]).
fn decode_envelopes(bytes: &[u8]) -> Result<Vec<Envelope>, TransportError> {
    decode_envelope_list(bytes).map_err(|_| TransportError::Unavailable("malformed relay answer"))
}

/// The `GET .../one-time-prekeys` answer.
#[derive(serde::Deserialize)]
struct CountBody {
    count: u32,
}

impl PrekeyDirectory for HttpRelay {
    fn publish(
        &self,
        upload: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        let body = upload.to_vec();
        self.run(move |inner| async move {
            let timeout = inner.config.request_timeout;
            inner
                .call(
                    Method::Post,
                    "/v1/directory".to_owned(),
                    Some(body),
                    timeout,
                    Retry::Unsent,
                    "upload",
                )
                .await
                .map(drop)
        })
    }

    fn fetch_bundle(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + MaybeSend {
        let path = Self::device_path(device, "bundle");
        self.run(move |inner| async move {
            let timeout = inner.config.request_timeout;
            inner
                .call(
                    Method::Get,
                    path,
                    None,
                    timeout,
                    Retry::Unsent,
                    "device address",
                )
                .await
        })
    }

    fn one_time_prekeys_left(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<u32, TransportError>> + MaybeSend {
        let path = Self::device_path(device, "one-time-prekeys");
        self.run(move |inner| async move {
            let timeout = inner.config.request_timeout;
            let answer = inner
                .call(
                    Method::Get,
                    path,
                    None,
                    timeout,
                    Retry::Idempotent,
                    "device address",
                )
                .await?;
            serde_json::from_slice::<CountBody>(&answer)
                .map(|b| b.count)
                .map_err(|_| TransportError::Unavailable("malformed relay answer"))
        })
    }
}

impl DeviceDirectory for HttpRelay {
    /// `PUT /v1/accounts/{account}/devices`. A publish is idempotent on
    /// the relay (the same list again is accepted), so it is retried as a
    /// deposit is. Bytes that do not decode as a device list are refused
    /// here ([`TransportError::BadRequest`], as the relay would): the path
    /// needs their account id.
    fn publish_device_list(
        &self,
        signed: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        let path = DeviceList::decode(signed)
            .map(|list| Self::devices_path(list.account_id()))
            .map_err(|e| device_list_error(&e));
        let body = signed.to_vec();
        self.run(move |inner| async move {
            let path = path?;
            let timeout = inner.config.request_timeout;
            inner
                .call(
                    Method::Put,
                    path,
                    Some(body),
                    timeout,
                    Retry::Idempotent,
                    "device list",
                )
                .await
                .map(drop)
        })
    }

    /// `GET /v1/accounts/{account}/devices?after=N`, retried as the other
    /// reads are.
    fn fetch_device_lists(
        &self,
        account: &AccountId,
        after: u64,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, TransportError>> + MaybeSend {
        let mut path = Self::devices_path(account);
        path.push('?');
        path.push_str(&DeviceListQuery { after }.encode());
        self.run(move |inner| async move {
            let timeout = inner.config.request_timeout;
            let answer = inner
                .call(
                    Method::Get,
                    path,
                    None,
                    timeout,
                    Retry::Idempotent,
                    "account",
                )
                .await?;
            decode_device_lists(&answer)
        })
    }
}

impl Mailbox for HttpRelay {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        let path = Self::mailbox_path(to, "envelopes");
        let body = encode_envelope(envelope);
        let headers = pass_headers(pass);
        self.run(move |inner| async move {
            let timeout = inner.config.request_timeout;
            inner
                .call_with(
                    Method::Post,
                    path,
                    Some(body),
                    &headers,
                    timeout,
                    Retry::Idempotent,
                    "envelope",
                )
                .await
                .map(drop)
        })
    }

    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + MaybeSend {
        let path = Self::mailbox_path(mailbox, "challenge");
        self.run(move |inner| async move {
            let timeout = inner.config.request_timeout;
            let answer = inner
                .call(
                    Method::Post,
                    path,
                    None,
                    timeout,
                    Retry::Idempotent,
                    "mailbox",
                )
                .await?;
            <[u8; 32]>::try_from(answer.as_slice())
                .map_err(|_| TransportError::Unavailable("malformed relay answer"))
        })
    }

    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + MaybeSend {
        self.fetch_inner(auth, limit, 0)
    }

    fn fetch_waiting(
        &self,
        auth: &MailboxAuth,
        limit: u32,
        wait_ms: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + MaybeSend {
        self.fetch_inner(auth, limit, wait_ms)
    }

    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        let path = Self::mailbox_path(&auth.mailbox(), "acknowledge");
        let body = encode_acknowledge(auth, ids);
        self.run(move |inner| async move {
            let body = body.ok_or(TransportError::LimitExceeded(core_reason::ACKNOWLEDGE_IDS))?;
            let timeout = inner.config.request_timeout;
            inner
                .call(
                    Method::Post,
                    path,
                    Some(body),
                    timeout,
                    Retry::Never,
                    "acknowledgement",
                )
                .await
                .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses_and_reasons() {
        let s = |n: u16| n;
        assert_eq!(
            error_for(s(400), Some("bad_request"), None, "x"),
            TransportError::BadRequest("x")
        );
        assert_eq!(
            error_for(s(401), None, None, "x"),
            TransportError::Unauthorized
        );
        assert_eq!(
            error_for(s(404), Some("not_found"), None, "x"),
            TransportError::NotFound
        );
        assert!(matches!(
            error_for(s(404), Some("no_route"), None, "x"),
            TransportError::BadRequest(_)
        ));
        assert!(matches!(
            error_for(s(405), Some("method_not_allowed"), None, "x"),
            TransportError::BadRequest(_)
        ));
        assert_eq!(
            error_for(s(409), Some("replayed"), None, "x"),
            TransportError::Replayed
        );
        assert_eq!(
            error_for(s(409), Some("stale_device_list"), None, "x"),
            TransportError::Replayed
        );
        assert_eq!(
            error_for(s(409), Some("device_list_conflict"), None, "x"),
            TransportError::Conflict
        );
        assert_eq!(
            error_for(s(409), Some("device_list_gap"), None, "x"),
            TransportError::BadRequest(device_list_reason::GAP)
        );
        assert_eq!(
            error_for(
                s(400),
                Some("bad_request"),
                Some(device_list_reason::DEVICE_ID_REUSED),
                "x"
            ),
            TransportError::BadRequest(device_list_reason::DEVICE_ID_REUSED)
        );
        assert_eq!(
            error_for(s(400), Some("bad_request"), Some("something else"), "x"),
            TransportError::BadRequest("x")
        );
        for (status, wire, reason) in [
            (413, "envelope_size", core_reason::ENVELOPE_SIZE),
            (413, "body_size", reason::BODY_SIZE),
            (413, "acknowledge_ids", core_reason::ACKNOWLEDGE_IDS),
            (422, "one_time_prekeys", core_reason::ONE_TIME_PREKEYS),
            (429, "rate_deposits", reason::RATE_DEPOSITS),
            (429, "rate_claims", reason::RATE_CLAIMS),
            (429, "rate_requests", reason::RATE_REQUESTS),
            (507, "pending_envelopes", core_reason::PENDING_ENVELOPES),
            (507, "pending_bytes", core_reason::PENDING_BYTES),
            (507, "total_storage", reason::TOTAL_STORAGE),
            (422, "limit", reason::OTHER),
            (429, "something_new", reason::OTHER),
        ] {
            assert_eq!(
                error_for(s(status), Some(wire), None, "x"),
                TransportError::LimitExceeded(reason)
            );
        }
        for status in [408, 500, 502, 503, 504, 302] {
            assert!(matches!(
                error_for(s(status), None, None, "x"),
                TransportError::Unavailable(_)
            ));
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let config = HttpRelayConfig::default();
        assert_eq!(config.backoff(0), Duration::from_millis(100));
        assert_eq!(config.backoff(1), Duration::from_millis(200));
        assert_eq!(config.backoff(4), Duration::from_millis(1600));
        assert_eq!(config.backoff(5), Duration::from_secs(2));
        assert_eq!(config.backoff(100), Duration::from_secs(2));
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }

    #[test]
    fn decodes_fetch_answers_and_refuses_malformed_ones() {
        let a = Envelope {
            id: EnvelopeId([1; 16]),
            payload: b"hello".to_vec(),
        };
        let b = Envelope {
            id: EnvelopeId([2; 16]),
            payload: Vec::new(),
        };
        let mut bytes = Vec::new();
        for e in [&a, &b] {
            let encoded = encode_envelope(e);
            bytes.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&encoded);
        }
        assert_eq!(decode_envelopes(&bytes).unwrap(), vec![a, b]);
        assert_eq!(decode_envelopes(&[]).unwrap(), Vec::new());
        assert!(decode_envelopes(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_envelopes(&[0, 0, 0]).is_err());
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_static<T: Send + 'static>(_: T) {}
        let relay = HttpRelay::new("http://127.0.0.1:1").unwrap();
        let device = DeviceAddress {
            identity: [0; 32],
            device_id: 1,
        };
        send_static(relay.health());
        send(&relay.fetch_bundle(&device));
        send(&relay.challenge(&device.mailbox()));
    }

    #[test]
    fn refuses_bad_base_urls() {
        for url in ["", "relay.example", "ftp://relay.example", "http://x/?q=1"] {
            assert!(HttpRelay::new(url).is_err(), "{url}");
        }
        let relay = HttpRelay::new("http://127.0.0.1:8080/prefix/").unwrap();
        assert_eq!(relay.base_url(), "http://127.0.0.1:8080/prefix");
    }
}
