//! cubbyhole-http: the client transport of [cubbyhole] over HTTP.
//!
//! [`HttpRelay`] implements [`cubbyhole::transport::PrekeyDirectory`],
//! [`cubbyhole::transport::DeviceDirectory`] and
//! [`cubbyhole::transport::Mailbox`] over the HTTP API of the relay server
//! (the `cubbyhole-relay` crate; `relay/API.md` in the repository), so a
//! [`cubbyhole::client::Client`] talks to a remote relay exactly as it
//! talks to an in-process one. The crate depends on the protocol crate,
//! `reqwest` (with rustls) and a minimal Tokio, and on nothing of the
//! server; on `wasm32` it uses the browser's `fetch` instead (no `reqwest`,
//! no Tokio: see [In the browser](#in-the-browser)). [`wire`] holds what
//! the client and the server share of the API's syntax.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cubbyhole::client::{Client, ClientConfig};
//! use cubbyhole::storage::MemoryStore;
//! use cubbyhole_http::HttpRelay;
//!
//! let relay = HttpRelay::new("http://127.0.0.1:8080")?;
//! let mut me = Client::open(
//!     MemoryStore::new(),
//!     relay.clone(),
//!     relay,
//!     ClientConfig::default(),
//!     &mut cubbyhole::OsRng,
//! )
//! .await?;
//! me.maintain_prekeys(&mut cubbyhole::OsRng, 1_700_000_000).await?;
//! # Ok(()) }
//! ```
//!
//! # Runtimes
//!
//! (Natively; a browser has none: see [In the browser](#in-the-browser).)
//! The HTTP library (`reqwest`, on `hyper`) needs a Tokio reactor and
//! timer. So every request of an [`HttpRelay`] runs as a task spawned on a
//! Tokio runtime, chosen once, when the relay is built
//! ([`HttpRelay::new`], [`HttpRelay::with_config`]):
//!
//! - built **inside a Tokio runtime** (in a task, or under
//!   `Runtime::enter`), the relay uses that runtime;
//! - built **outside any**, it starts a private runtime of one worker
//!   thread (named `cubbyhole-http`) that its clones share; the last
//!   clone's drop shuts it down without blocking
//!   (`Runtime::shutdown_background`, which is allowed inside an async
//!   context too), cancelling the requests still running.
//!
//! [`HttpRelay::has_private_runtime`] tells which. The futures returned by
//! the relay's methods only wait for their request's task: they are `Send`,
//! own everything they need (the inherent [`HttpRelay::health`]'s future
//! is `'static`), need no runtime context when polled, and can be polled
//! by any executor.
//!
//! ## Using it from Tokio
//!
//! Build the relay inside the runtime (in `main` under `#[tokio::main]`, or
//! in a task) and use it as any Tokio I/O type: clone it into
//! `tokio::spawn`ed tasks (the futures are `Send`), run it beside other
//! work, on a multi-thread or current-thread runtime. A current-thread
//! runtime runs the requests only while it is driven: do not block its
//! thread waiting for one (for instance with
//! [`cubbyhole::client::block_on`] inside a task), or it never completes.
//!
//! ## Using it from another executor
//!
//! Build the relay outside any Tokio runtime (for instance before starting
//! `async-std`, `smol` or `futures::executor`): its private runtime does
//! the I/O on its own thread, and the other executor only polls futures
//! that wait for a result, woken when it comes.
//!
//! ## Using it from synchronous code
//!
//! Same: build it outside any runtime and drive each call to completion
//! with [`cubbyhole::client::block_on`] (or any `block_on`). The calling
//! thread sleeps until the private runtime's thread has the answer:
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cubbyhole::client::{block_on, Client, ClientConfig};
//! use cubbyhole::storage::MemoryStore;
//! use cubbyhole_http::HttpRelay;
//!
//! let relay = HttpRelay::new("http://127.0.0.1:8080")?;
//! assert!(relay.has_private_runtime());
//! let mut me = block_on(Client::open(
//!     MemoryStore::new(),
//!     relay.clone(),
//!     relay,
//!     ClientConfig::default(),
//!     &mut cubbyhole::OsRng,
//! ))?;
//! block_on(me.maintain_prekeys(&mut cubbyhole::OsRng, 1_700_000_000))?;
//! # Ok(()) }
//! ```
//!
//! ## A relay built in one runtime and used from another
//!
//! The requests stay on the runtime the relay was built in, whoever polls
//! them. That works as long as that runtime runs: a multi-thread runtime
//! does the I/O on its workers while another runtime or thread waits. Once
//! it is shut down, every call answers
//! [`TransportError::Unavailable`](cubbyhole::transport::TransportError::Unavailable)
//! (a call then in flight too); no call panics. So build a relay where it
//! lives: inside the runtime that outlives its use, or outside every
//! runtime to give it its own.
//!
//! # Cancellation
//!
//! Dropping a future returned by an [`HttpRelay`] method aborts its task,
//! as dropping an in-place `reqwest` future would cancel it: the request
//! stops at its next suspension point (connecting, sending, waiting for or
//! reading the answer, or sleeping before a retry), and a connection it
//! was using is not reused. Whether the relay has already received and
//! applied it is then unknown, so for each call:
//!
//! - [`Mailbox::deposit`](cubbyhole::transport::Mailbox::deposit) is
//!   idempotent by envelope id: deposit the same envelope again (the
//!   client's outbox does) and it is stored once;
//! - [`PrekeyDirectory::publish`](cubbyhole::transport::PrekeyDirectory::publish)
//!   may have been applied: republish with a higher counter (the client
//!   does on its next prekey maintenance);
//! - [`PrekeyDirectory::fetch_bundle`](cubbyhole::transport::PrekeyDirectory::fetch_bundle)
//!   may have claimed a one-time prekey that nobody receives (the
//!   recipient's pool is one key shorter; the session falls back to the
//!   signed prekey if the pool runs out);
//! - [`Mailbox::fetch`](cubbyhole::transport::Mailbox::fetch) and
//!   [`Mailbox::fetch_waiting`](cubbyhole::transport::Mailbox::fetch_waiting)
//!   may have consumed their challenge; the envelopes stay on the relay
//!   until acknowledged, so nothing is lost (an aborted long poll also
//!   frees its connection at once instead of holding it for the wait);
//! - [`Mailbox::acknowledge`](cubbyhole::transport::Mailbox::acknowledge)
//!   may have deleted the envelopes: acknowledging them again is harmless
//!   (unknown ids are ignored);
//! - [`DeviceDirectory::publish_device_list`](cubbyhole::transport::DeviceDirectory::publish_device_list)
//!   may have been applied: publishing the same list again is accepted
//!   (the relay holds it already);
//! - challenges, counts and device-list fetches have no effect worth
//!   undoing.
//!
//! Aborting rather than detaching means a dropped future leaves no work
//! behind: a cancelled receive loop does not keep long polls open, and the
//! relay's clones can be dropped as soon as the caller is done.
//!
//! # Errors
//!
//! Every refusal of the relay comes back as the
//! [`TransportError`](cubbyhole::transport::TransportError) the in-process
//! relay would give: `400` is `BadRequest`, `401` `Unauthorized`, `404`
//! `NotFound`, `409` `Replayed` (but `409 device_list_conflict` is
//! `Conflict` and `409 device_list_gap` is `BadRequest` with
//! [`device_list_reason::GAP`](cubbyhole::relay::device_list_reason::GAP);
//! a `400` whose message is a
//! [`device_list_reason`](cubbyhole::relay::device_list_reason) carries
//! it); `413`, `422`, `429` and `507` are
//! `LimitExceeded` whose reason is the core's [`cubbyhole::relay::reason`]
//! constant for the bounds of the relay rules (`envelope_size` is
//! [`reason::ENVELOPE_SIZE`](cubbyhole::relay::reason::ENVELOPE_SIZE), ...)
//! and one of this crate's [`reason`] constants for the bounds of the HTTP
//! server (body size, rates, total storage). `404 no_route` and `405` (a
//! base URL or version that does not match the server) are `BadRequest`.
//! `408`, `5xx`, network failures, timeouts, malformed answers and a shut
//! down runtime are `Unavailable`.
//!
//! # Retries
//!
//! A call is attempted at most [`HttpRelayConfig::retries`] + 1 times,
//! sleeping between attempts with exponential backoff and jitter
//! ([`HttpRelayConfig::backoff_base`], doubled at every retry, capped at
//! [`HttpRelayConfig::backoff_max`]; each sleep is drawn uniformly from the
//! upper half of that delay). What is retried depends on the call:
//!
//! - **idempotent** calls are retried on every `Unavailable` (network
//!   failure, timeout, `408`, `5xx`): `deposit` (idempotent by envelope id:
//!   a retry after a lost reply is stored once), `challenge` (a spare
//!   challenge is harmless), `one_time_prekeys_left`,
//!   `publish_device_list` (the same list again is accepted: a retry after
//!   a lost reply is harmless), `fetch_device_lists` and
//!   [`HttpRelay::health`];
//! - `publish` and `fetch_bundle` are retried only when the connection
//!   could not be made, so the request certainly never reached the relay
//!   (never in the browser, which cannot tell: see
//!   [In the browser](#in-the-browser)): a
//!   publish whose reply was lost may have been applied, and sending the
//!   same bytes again would answer `409` (`Replayed`) although it landed
//!   (the caller re-signs with a higher counter instead); a bundle fetch
//!   claims a one-time prekey;
//! - `fetch`, `fetch_waiting` and `acknowledge` are never retried here:
//!   each consumes its single-use challenge, so a retry needs a new proof
//!   (the [`cubbyhole::client::Client`] asks for one on its next receive).
//!
//! Refusals (`4xx` other than `408`, `507`) are never retried.
//!
//! # In the browser
//!
//! On `wasm32` (`wasm32-unknown-unknown`, in a page or a Web Worker) the
//! crate has the same API, and [`HttpRelay`] the same paths, headers
//! (`Cubbyhole-Access`, `Cubbyhole-Stamp`; bodies sent as
//! `Content-Type: application/octet-stream`), retry policy and backoff,
//! timeouts, status and error mapping and answer bound as natively, with
//! its requests made by the global scope's `fetch` (wasm-bindgen,
//! `web-sys`). What differs:
//!
//! - **No runtime.** A request runs in the future that awaits it, driven
//!   by whoever polls it (typically `wasm_bindgen_futures::spawn_local`
//!   or a promise returned to JavaScript); the sleeps between retries are
//!   the global scope's `setTimeout`, so a relay works in a window and in
//!   a worker alike (anywhere else every call answers
//!   [`TransportError::Unavailable`](cubbyhole::transport::TransportError::Unavailable)).
//!   The futures are not `Send` (the traits bound them by
//!   [`cubbyhole::MaybeSend`], which is no bound on `wasm32`);
//!   [`HttpRelay::health`]'s is still `'static`.
//!   [`HttpRelay::has_private_runtime`] is always `false`, and
//!   [`HttpRelayError`] has no `Client` or `Runtime` variant.
//! - **Settings without effect**: [`HttpRelayConfig::connect_timeout`],
//!   [`HttpRelayConfig::pool_idle_timeout`] and
//!   [`HttpRelayConfig::local_address`] (the browser connects and pools).
//!   The request timeout ([`HttpRelayConfig::request_timeout`]; for a long
//!   poll its wait plus [`HttpRelayConfig::long_poll_margin`]) is a timer
//!   that aborts the `fetch`, from sending to the answer's last byte, as
//!   natively (`Unavailable("relay timed out")`).
//! - **Cancellation.** Dropping a future aborts its `fetch` (an
//!   `AbortController`), with the consequences listed under
//!   [Cancellation](#cancellation).
//! - **Network failures.** A rejected `fetch` (no connection, a DNS or TLS
//!   failure, a CORS refusal, a redirect) is
//!   `Unavailable("cannot connect to the relay")`. The browser does not
//!   tell whether the request had left, so it counts as possibly sent:
//!   idempotent calls are retried as natively, but `publish` and
//!   `fetch_bundle` are not retried on it: they answer `Unavailable` (the
//!   client's next prekey maintenance publishes again; a send that needed
//!   the bundle fails and can be tried again). Deposits are idempotent, so
//!   their retries lose nothing.
//! - **The request.** `credentials: "omit"` (no cookies or HTTP
//!   authentication), `redirect: "error"` (a relay never redirects),
//!   `cache: "no-store"`; no `User-Agent` of this crate (the browser's).
//!   The content type and the `Cubbyhole-*` headers make the browser send
//!   a CORS preflight: a relay on another origin must allow the page's
//!   origin (`cubbyhole-relay`'s `cors_origins`).
//! - **The answer bound** ([`HttpRelayConfig::max_response_bytes`]): an
//!   answer is refused by its `Content-Length` when that says too much,
//!   else read from its body stream chunk by chunk, stopping (and
//!   aborting the `fetch`) at the first chunk that would go above. A
//!   compressed answer is bounded after the browser decompressed it.
//! - **The access key's header** is copied into a JavaScript string, which
//!   cannot be wiped (natively it is marked sensitive and the crate's copy
//!   is wiped; here too the crate's copy is).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod client;
pub mod wire;

pub use client::{reason, HttpRelay, HttpRelayConfig, HttpRelayError};
