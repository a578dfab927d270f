//! A conformance suite for [`PrekeyDirectory`] and [`Mailbox`]
//! implementations: for applications that bring their own transport (a
//! relay client over another protocol, a relay of their own), a way to
//! check it keeps the contract of the traits the way
//! [`InProcessRelay`](crate::relay::InProcessRelay), the reference, and the
//! relay crate's HTTP server and client do.
//!
//! The traits are async, so the suite is too: [`check_all`] runs every
//! check of [`CHECKS`] on any executor; [`try_run`] and [`run`] drive it on
//! the current thread with [`block_on`](crate::client::block_on), for
//! implementations whose futures need no runtime (a transport over a
//! runtime, such as an HTTP client on Tokio, awaits [`check_all`] inside
//! that runtime instead). Each check runs on a fresh implementation from
//! the closure it is given, which returns the directory and the mailbox
//! (the same relay, twice, for most implementations: the mailbox checks
//! publish their devices through the directory first). [`run`] panics
//! with a message naming each check that failed and why ("transport
//! conformance: fetch_order: ..."); [`try_run`] and [`check_all`] return the
//! [`Violation`]s instead. Each check is also a function of its own
//! (`check_*`), for running one at a time.
//!
//! ```
//! use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
//! use cubbyhole::transport::conformance::{self, Options};
//!
//! let make = || {
//!     let relay = InProcessRelay::new(Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()));
//!     (relay.clone(), relay)
//! };
//! conformance::run(make, &Options::default());
//! ```
//!
//! In an async test of your own transport (any executor):
//!
//! ```
//! # use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
//! use cubbyhole::transport::conformance::{self, Options};
//!
//! # fn connect() -> InProcessRelay<MemoryRelayStorage> {
//! #     InProcessRelay::new(Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()))
//! # }
//! async fn conforms() {
//!     // A fresh relay for each check (here: a made-up `connect`).
//!     let make = || {
//!         let relay = connect();
//!         (relay.clone(), relay)
//!     };
//!     let options = Options {
//!         supports_waiting: false, // true if fetch_waiting long-polls
//!         ..Options::default()
//!     };
//!     if let Err(violations) = conformance::check_all(make, &options).await {
//!         for v in &violations {
//!             eprintln!("{v}");
//!         }
//!         panic!("{} checks failed", violations.len());
//!     }
//!     // One check, on a relay made here:
//!     let relay = connect();
//!     conformance::check_fetch_order(&relay, &relay, &options).await.unwrap();
//! }
//! # cubbyhole::client::block_on(conforms());
//! ```
//!
//! # What is checked
//!
//! The contract stated on [`PrekeyDirectory`] and [`Mailbox`]. The checks,
//! by name (see each `check_*` function):
//!
//! | name | contract |
//! |---|---|
//! | `publish` | a signed upload is accepted; the bundle fetched is the one published and verifies |
//! | `publish_replay` | an upload whose counter is not above the last is [`TransportError::Replayed`] and changes nothing |
//! | `publish_signature` | a bad upload or signed-prekey signature is [`TransportError::Unauthorized`] and changes nothing |
//! | `not_found` | [`TransportError::NotFound`] for devices that never published |
//! | `one_time_prekeys` | each bundle claims at most one one-time prekey, never the same twice; the count goes down |
//! | `deposit_idempotent` | an envelope id is stored once (the first payload), also after acknowledging it |
//! | `fetch_order` | pending envelopes oldest first (deposit order), at most `limit`, per mailbox; fetching deletes nothing |
//! | `challenge_single_use` | a proof's challenge works once; a challenge never issued never works |
//! | `proof_binding` | a proof for another mailbox, another operation or signed by another key is [`TransportError::Unauthorized`] |
//! | `acknowledge` | deletes exactly the named envelopes; unknown ids are ignored |
//! | `fetch_waiting` | with nothing pending: empty; with [`Options::supports_waiting`], a deposit made during the wait is returned |
//! | `bounds` | an envelope of [`Options::max_envelope_bytes`] is accepted, one byte more is [`TransportError::LimitExceeded`] |
//!
//! An error the implementation returns where the contract promises success
//! fails the check that met it, naming the method and the error. A panic is
//! not caught.
//!
//! # What the suite assumes
//!
//! - Each implementation from the closure starts empty, or at least has
//!   never seen the suite's devices (their keys are derived from fixed
//!   seeds, and their uploads use counters 1 to 3: running the suite twice
//!   against one persistent relay fails with [`TransportError::Replayed`]).
//! - The implementation has its own clock: the traits take no time. The
//!   suite expects that clock to move less than a challenge's lifetime
//!   within a check (a few requests) and no envelope to expire during it.
//!   Signed prekeys are created at a fixed time in 2027; the directory does
//!   not judge their freshness (senders do).
//! - Deposits go only to mailboxes of devices that published (a relay may
//!   refuse others, [`RelayConfig::require_published_mailbox`](crate::relay::RelayConfig::require_published_mailbox)).
//! - Rate limits, if any, allow a few dozen requests per check.
//!
//! What the traits cannot show is not checked: expiry and retention (they
//! need the implementation's clock), bounds other than the envelope size,
//! several clients racing, durability. For relays built on
//! [`RelayStorage`](crate::relay::RelayStorage), the storage's own suite
//! ([`crate::relay::conformance`]) covers expiry and the other bounds.

use core::future::{poll_fn, Future};
use core::pin::{pin, Pin};
use core::task::Poll;
use std::boxed::Box;
use std::fmt;
use std::format;
use std::string::String;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::vec;
use std::vec::Vec;

use super::stamp::Stamp;
use super::{
    AccessKey, BundleSetUpload, DepositPass, DeviceAddress, DeviceDirectory, Envelope, EnvelopeId,
    Mailbox, MailboxAuth, MailboxId, MailboxOp, PrekeyDirectory, TransportError,
    DEVICE_LIST_RETENTION,
};
use crate::protocol::bundle::{FreshnessPolicy, PrekeyBundle};
use crate::protocol::devices::{AccountId, DeviceEntry, DeviceList, VerifiedDeviceList};
use crate::protocol::keys::{IdentityKeyPair, OneTimePrekey, SignedPrekey};

/// A broken promise: which check found it and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The check's name (as in [`CHECKS`]).
    pub check: &'static str,
    /// What the implementation did wrong (or the error it returned).
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transport conformance: {}: {}", self.check, self.message)
    }
}

impl std::error::Error for Violation {}

/// What the suite expects of the implementation beyond the traits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The largest envelope payload the mailbox accepts, in bytes: the
    /// `bounds` check deposits one of this size (accepted) and one a byte
    /// larger ([`TransportError::LimitExceeded`]). Default: the relay's,
    /// [`RelayConfig::DEFAULT_MAX_ENVELOPE_BYTES`](crate::relay::RelayConfig::DEFAULT_MAX_ENVELOPE_BYTES)
    /// (256 KiB).
    pub max_envelope_bytes: u32,
    /// Whether [`Mailbox::fetch_waiting`] waits for an envelope when none
    /// is pending (a long poll). If so, the `fetch_waiting` check deposits
    /// while a fetch waits and expects the fetch to return the envelope.
    /// Default `false` (the trait's default does not wait).
    pub supports_waiting: bool,
    /// How long that waiting fetch may wait, in milliseconds (the check
    /// fails if it comes back empty). Default 10 000.
    pub wait_ms: u32,
    /// How the `fetch_waiting` check learns that the server has parked the
    /// waiting fetch, so that it deposits only then. Without one (the
    /// default) it deposits [`DEPOSIT_DELAY_MS`] after the fetch started,
    /// which a slow network or a loaded machine can turn upside down (the
    /// deposit arrives first, and a server that does not wait passes); give
    /// one for a server across a network.
    pub parked: Option<ParkedProbe>,
}

/// Asks the server under test whether a fetch is parked on an empty
/// mailbox, waiting for a deposit (for a relay server: its
/// `cubbyhole_relay_long_polls` gauge). The `fetch_waiting` check calls it
/// every [`PROBE_INTERVAL_MS`] until it answers `true` or the fetch
/// returns, and deposits then.
#[derive(Clone)]
pub struct ParkedProbe(Arc<ProbeFn>);

type ProbeFn = dyn Fn() -> Pin<Box<dyn Future<Output = bool>>> + Send + Sync;

impl ParkedProbe {
    /// A probe from an async function answering "is a fetch parked now?".
    pub fn new<F, Fut>(probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + 'static,
    {
        ParkedProbe(Arc::new(move || Box::pin(probe())))
    }

    async fn parked(&self) -> bool {
        (self.0)().await
    }
}

impl fmt::Debug for ParkedProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ParkedProbe(..)")
    }
}

/// Two probes are equal when they are the same probe (clones of one).
impl PartialEq for ParkedProbe {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ParkedProbe {}

/// How often the `fetch_waiting` check asks its [`ParkedProbe`], in
/// milliseconds.
pub const PROBE_INTERVAL_MS: u64 = 5;

impl Default for Options {
    fn default() -> Self {
        Options {
            max_envelope_bytes: crate::relay::RelayConfig::DEFAULT_MAX_ENVELOPE_BYTES,
            supports_waiting: false,
            wait_ms: 10_000,
            parked: None,
        }
    }
}

/// One check of the suite: its name, and [`Check::run`].
#[derive(Clone, Copy)]
pub struct Check {
    /// Its name (the `check_*` function's, without the prefix).
    pub name: &'static str,
    which: Which,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Runs every check of [`CHECKS`], each on a fresh directory and mailbox
/// from `make`, on whatever executor awaits it; returns the violations
/// found (every check runs, whatever the others found).
///
/// # Errors
/// The violations, in the order of [`CHECKS`], if any check failed.
pub async fn check_all<D: PrekeyDirectory, M: Mailbox>(
    mut make: impl FnMut() -> (D, M),
    options: &Options,
) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    for check in CHECKS {
        let (directory, mailbox) = make();
        if let Err(v) = check.run(&directory, &mailbox, options).await {
            violations.push(v);
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// [`check_all`] on the current thread ([`block_on`](crate::client::block_on)),
/// for implementations whose futures need no runtime.
///
/// # Errors
/// The violations, in the order of [`CHECKS`], if any check failed.
pub fn try_run<D: PrekeyDirectory, M: Mailbox>(
    make: impl FnMut() -> (D, M),
    options: &Options,
) -> Result<(), Vec<Violation>> {
    crate::client::block_on(check_all(make, options))
}

/// [`try_run`], panicking if any check fails.
///
/// # Panics
/// If any check fails, with a message naming each failed check and what
/// was wrong ("transport conformance: fetch_order: ...").
pub fn run<D: PrekeyDirectory, M: Mailbox>(make: impl FnMut() -> (D, M), options: &Options) {
    if let Err(violations) = try_run(make, options) {
        panic!("{}", report(&violations));
    }
}

/// The message [`run`] panics with: each violation, one a line.
pub fn report(violations: &[Violation]) -> String {
    match violations {
        [] => String::from("transport conformance: every check passed"),
        [one] => one.to_string(),
        all => {
            let lines: Vec<String> = all.iter().map(|v| format!("  {v}")).collect();
            format!(
                "transport conformance: {} of {} checks failed:\n{}",
                all.len(),
                CHECKS.len(),
                lines.join("\n")
            )
        }
    }
}

macro_rules! checks {
    ($( $(#[$doc:meta])* $public:ident => $name:literal, $variant:ident, $body:ident; )+) => {
        #[derive(Clone, Copy)]
        enum Which { $( $variant ),+ }

        $(
            $(#[$doc])*
            ///
            /// `directory` and `mailbox` must be fresh (see the module docs).
            ///
            /// # Errors
            /// A [`Violation`] naming the check and what was wrong.
            pub async fn $public<D: PrekeyDirectory, M: Mailbox>(
                directory: &D,
                mailbox: &M,
                options: &Options,
            ) -> Result<(), Violation> {
                let t = Under { d: directory, m: mailbox, options, seed: Which::$variant as u8 };
                $body(&t).await.map_err(|message| Violation { check: $name, message })
            }
        )+

        impl Check {
            /// Runs the check on a fresh directory and mailbox.
            ///
            /// # Errors
            /// A [`Violation`] naming the check and what was wrong.
            pub async fn run<D: PrekeyDirectory, M: Mailbox>(
                &self,
                directory: &D,
                mailbox: &M,
                options: &Options,
            ) -> Result<(), Violation> {
                match self.which {
                    $( Which::$variant => $public(directory, mailbox, options).await, )+
                }
            }
        }

        /// Every check, in the order [`check_all`] runs them.
        pub const CHECKS: &[Check] = &[$( Check { name: $name, which: Which::$variant } ),+];
    };
}

checks! {
    /// `publish`: [`PrekeyDirectory::publish`] accepts an upload signed by
    /// the device's identity key; [`PrekeyDirectory::fetch_bundle`] returns
    /// a bundle (the profile's encoding) that verifies, with the device's
    /// identity key, the signed prekey published and one of the one-time
    /// prekeys published; [`PrekeyDirectory::one_time_prekeys_left`]
    /// counts the pool; a later upload (higher counter) with a new signed
    /// prekey replaces it.
    check_publish => "publish", Publish, publish;
    /// `publish_replay`: publishing the same upload again, or one with a
    /// lower counter, is [`TransportError::Replayed`] and changes nothing
    /// (the signed prekey and the pool stay); a higher counter is accepted.
    check_publish_replay => "publish_replay", PublishReplay, publish_replay;
    /// `publish_signature`: an upload whose signature fails, one signed by
    /// another identity key than the device's, and one whose signed prekey's
    /// signature fails are [`TransportError::Unauthorized`] and publish
    /// nothing (the device stays [`TransportError::NotFound`]).
    check_publish_signature => "publish_signature", PublishSignature, publish_signature;
    /// `not_found`: [`PrekeyDirectory::fetch_bundle`] and
    /// [`PrekeyDirectory::one_time_prekeys_left`] of a device that never
    /// published (an unknown key, or another device number of a known key)
    /// are [`TransportError::NotFound`].
    check_not_found => "not_found", NotFound, not_found;
    /// `one_time_prekeys`: each [`PrekeyDirectory::fetch_bundle`] claims at
    /// most one one-time prekey and never hands out the same one twice:
    /// three published, three bundles with three different ones of them,
    /// then bundles without; [`PrekeyDirectory::one_time_prekeys_left`]
    /// goes 3, 2, 1, 0.
    check_one_time_prekeys => "one_time_prekeys", OneTimePrekeys, one_time_prekeys;
    /// `deposit_idempotent`: [`Mailbox::deposit`] of an envelope id already
    /// pending is accepted and stores nothing (the first payload stays);
    /// after the envelope is acknowledged, depositing its id again is
    /// accepted and stores nothing either.
    check_deposit_idempotent => "deposit_idempotent", DepositIdempotent, deposit_idempotent;
    /// `fetch_order`: [`Mailbox::fetch`] returns the pending envelopes
    /// whole, oldest first (in deposit order, whatever their ids), at most
    /// `limit`, only those of the proof's mailbox, and deletes none.
    check_fetch_order => "fetch_order", FetchOrder, fetch_order;
    /// `challenge_single_use`: a proof over a challenge from
    /// [`Mailbox::challenge`] is accepted once; presented again (to fetch,
    /// or re-signed to acknowledge) it is [`TransportError::Unauthorized`];
    /// so is a proof over a challenge the mailbox never issued.
    check_challenge_single_use => "challenge_single_use", ChallengeSingleUse, challenge_single_use;
    /// `proof_binding`: a proof over another mailbox's challenge, an
    /// [`MailboxOp::Acknowledge`] proof presented to fetch (and a
    /// [`MailboxOp::Fetch`] proof to acknowledge), and a proof naming the
    /// owner but signed by another key are [`TransportError::Unauthorized`]
    /// (and delete nothing).
    check_proof_binding => "proof_binding", ProofBinding, proof_binding;
    /// `acknowledge`: [`Mailbox::acknowledge`] deletes exactly the named
    /// envelopes of the proof's mailbox; unknown ids are ignored (no
    /// error); an empty list succeeds.
    check_acknowledge => "acknowledge", Acknowledge, acknowledge;
    /// `fetch_waiting`: [`Mailbox::fetch_waiting`] with nothing pending
    /// returns nothing; with [`Options::supports_waiting`], an envelope
    /// deposited while it waits is returned.
    check_fetch_waiting => "fetch_waiting", FetchWaiting, fetch_waiting;
    /// `bounds`: [`Mailbox::deposit`] accepts a payload of
    /// [`Options::max_envelope_bytes`] and refuses one a byte larger with
    /// [`TransportError::LimitExceeded`], storing nothing.
    check_bounds => "bounds", Bounds, bounds;
}

// ---------------------------------------------------------------------------
// Helpers.

/// When the test data's signed prekeys were made (unix seconds, 2027).
const NOW: u64 = 1_800_000_000;

/// Envelopes asked for per fetch.
const LIMIT: u32 = 100;

type Outcome = Result<(), String>;

/// Fails the check unless `cond`, with a formatted message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Turns a transport error into the check's failure, naming the method.
trait OrFail<T> {
    fn or_fail(self, method: &str) -> Result<T, String>;
}

impl<T> OrFail<T> for Result<T, TransportError> {
    fn or_fail(self, method: &str) -> Result<T, String> {
        self.map_err(|e| format!("{method} returned an error: {e} ({e:?})"))
    }
}

/// `got == want`, or a failure describing both.
fn same<T: PartialEq + fmt::Debug + ?Sized>(what: &str, got: &T, want: &T) -> Outcome {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, expected {want:?}"))
    }
}

/// `result` is the error `want` (any reason for reasoned errors).
fn refused<T: fmt::Debug>(
    what: &str,
    result: Result<T, TransportError>,
    want: &TransportError,
) -> Outcome {
    let matches = match (&result, want) {
        (Err(TransportError::LimitExceeded(_)), TransportError::LimitExceeded(_))
        | (Err(TransportError::BadRequest(_)), TransportError::BadRequest(_)) => true,
        (Err(e), want) => e == want,
        (Ok(_), _) => false,
    };
    if matches {
        return Ok(());
    }
    match result {
        Ok(value) => {
            let shown = format!("{value:?}");
            let shown = if shown.len() > 80 {
                format!(
                    "{}..",
                    &shown[..shown.char_indices().nth(80).map_or(0, |(i, _)| i)]
                )
            } else {
                shown
            };
            Err(format!("{what}: succeeded ({shown}), expected {want:?}"))
        }
        Err(e) => Err(format!("{what}: got {e:?}, expected {want:?}")),
    }
}

/// Polls both futures until both are done, `a` first (so a request `b`
/// makes comes after `a` started). No runtime needed.
async fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut ra, mut rb) = (None, None);
    poll_fn(move |cx| {
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        match (ra.take(), rb.take()) {
            (Some(x), Some(y)) => Poll::Ready((x, y)),
            (x, y) => {
                ra = x;
                rb = y;
                Poll::Pending
            }
        }
    })
    .await
}

/// A timer that works on any executor: a thread sleeps `ms` milliseconds,
/// then wakes the task. (The suite has no runtime of its own.)
async fn delay(ms: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    struct Shared {
        done: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }
    let shared = Arc::new(Shared {
        done: AtomicBool::new(false),
        waker: Mutex::new(None),
    });
    let timer = Arc::clone(&shared);
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        timer.done.store(true, Ordering::SeqCst);
        if let Some(w) = timer.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    });
    poll_fn(move |cx| {
        let mut waker = shared.waker.lock().unwrap_or_else(|e| e.into_inner());
        if shared.done.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        *waker = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// How long the `fetch_waiting` check lets a waiting fetch start before it
/// deposits, when [`Options::parked`] gives it no way to know (a server
/// that does not wait has answered by then, unless the fetch is slow to
/// reach it).
pub const DEPOSIT_DELAY_MS: u64 = 500;

/// A device of the test data, from a fixed seed.
struct Device {
    keys: IdentityKeyPair,
    device_id: u32,
    signed_prekey: SignedPrekey,
    one_time_prekeys: Vec<OneTimePrekey>,
    access: AccessKey,
}

impl Device {
    /// Device `n` of the check with seed `seed`: its own identity key, a
    /// signed prekey and three one-time prekeys (ids 101 to 103).
    fn new(seed: u8, n: u8) -> Device {
        let mut secret = [0x42; 32];
        secret[0] = seed;
        secret[1] = n;
        let keys = IdentityKeyPair::from_seed(&secret);
        secret[2] = 1;
        let signed_prekey =
            SignedPrekey::from_secret(&keys, 1, NOW, secret).expect("a time in range");
        let one_time_prekeys = (1..=3u8)
            .map(|i| {
                secret[2] = 1 + i;
                OneTimePrekey::from_secret(100 + u32::from(i), secret)
            })
            .collect();
        secret[2] = 0xac;
        let mut access = [0u8; 16];
        access.copy_from_slice(&secret[..16]);
        Device {
            keys,
            device_id: 1 + u32::from(n),
            signed_prekey,
            one_time_prekeys,
            access: AccessKey::from_bytes(access),
        }
    }

    fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.keys.public(), self.device_id)
    }

    fn mailbox(&self) -> MailboxId {
        self.address().mailbox()
    }

    /// The upload of its signed prekey and all its one-time prekeys,
    /// registering its mailbox's access key (SPEC.md 16.10).
    fn upload(&self, counter: u64) -> BundleSetUpload {
        let opks: Vec<&OneTimePrekey> = self.one_time_prekeys.iter().collect();
        let mut upload = BundleSetUpload::new(
            self.device_id,
            &self.keys,
            counter,
            &self.signed_prekey,
            &opks,
            true,
        );
        upload.access_verifier = Some(self.access.verifier(&self.mailbox()));
        upload
    }

    /// The pass of a deposit to its mailbox: its access key (the checks
    /// deposit as a contact would, so a relay that prices strangers'
    /// deposits admits them without work).
    fn pass(&self) -> DepositPass {
        DepositPass::with_access(self.access.clone())
    }

    /// Another signed prekey (id 2).
    fn rotate(&mut self) {
        let mut secret = *self.signed_prekey.secret_bytes();
        secret[3] ^= 0xff;
        self.signed_prekey =
            SignedPrekey::from_secret(&self.keys, 2, NOW + 1, secret).expect("a time in range");
    }

    fn opk_ids(&self) -> Vec<u32> {
        self.one_time_prekeys
            .iter()
            .map(OneTimePrekey::id)
            .collect()
    }
}

/// Envelope `k`: id `[k; 16]`, `len` bytes of `fill`.
fn env(k: u8, len: usize, fill: u8) -> Envelope {
    Envelope {
        id: EnvelopeId([k; 16]),
        payload: vec![fill; len],
    }
}

fn ids(envelopes: &[Envelope]) -> Vec<u8> {
    envelopes.iter().map(|e| e.id.0[0]).collect()
}

/// The implementation under test, for one check.
struct Under<'a, D, M> {
    d: &'a D,
    m: &'a M,
    options: &'a Options,
    /// Seeds the check's devices (distinct per check).
    seed: u8,
}

impl<D: PrekeyDirectory, M: Mailbox> Under<'_, D, M> {
    fn device(&self, n: u8) -> Device {
        Device::new(self.seed, n)
    }

    async fn publish(&self, device: &Device, counter: u64) -> Outcome {
        let mut upload = device.upload(counter);
        let mut result = self.d.publish(&upload.sign(&device.keys)).await;
        if let Err(TransportError::StampRequired(difficulty)) = result {
            // A relay that prices new identities: pay, as a client does.
            upload.identity_stamp = Stamp::mint_identity(
                &device.address(),
                difficulty,
                // The relay's clock is taken to be the system's.
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                0,
                u64::MAX,
            )
            .map_err(|e| format!("minting an identity stamp: {e}"))?
            .ok();
            result = self.d.publish(&upload.sign(&device.keys)).await;
        }
        result.or_fail(&format!("publish (a valid upload, counter {counter})"))
    }

    /// A device, published.
    async fn published(&self, n: u8) -> Result<Device, String> {
        let device = self.device(n);
        self.publish(&device, 1).await?;
        Ok(device)
    }

    async fn bundle(&self, device: &Device) -> Result<PrekeyBundle, String> {
        let bytes = self
            .d
            .fetch_bundle(&device.address())
            .await
            .or_fail("fetch_bundle of a published device")?;
        let bundle = PrekeyBundle::decode(&bytes)
            .map_err(|e| format!("fetch_bundle returned bytes that are not a bundle: {e:?}"))?;
        bundle
            .clone()
            .verify(NOW, FreshnessPolicy::default())
            .map_err(|e| format!("fetch_bundle returned a bundle that does not verify: {e:?}"))?;
        same(
            "the bundle's identity key",
            bundle.identity().as_bytes(),
            device.keys.public().as_bytes(),
        )?;
        Ok(bundle)
    }

    async fn left(&self, device: &Device) -> Result<u32, String> {
        self.d
            .one_time_prekeys_left(&device.address())
            .await
            .or_fail("one_time_prekeys_left of a published device")
    }

    async fn deposit(&self, to: &Device, envelope: &Envelope) -> Outcome {
        self.m
            .deposit(&to.mailbox(), envelope, &to.pass())
            .await
            .or_fail("deposit")
    }

    async fn auth(&self, owner: &Device, op: MailboxOp) -> Result<MailboxAuth, String> {
        let challenge = self
            .m
            .challenge(&owner.mailbox())
            .await
            .or_fail("challenge")?;
        Ok(MailboxAuth::sign(
            &owner.keys,
            owner.device_id,
            op,
            challenge,
        ))
    }

    /// Fetches with a fresh proof.
    async fn fetch(&self, owner: &Device, limit: u32) -> Result<Vec<Envelope>, String> {
        let auth = self.auth(owner, MailboxOp::Fetch).await?;
        self.m
            .fetch(&auth, limit)
            .await
            .or_fail("fetch (a fresh proof)")
    }

    /// Acknowledges with a fresh proof.
    async fn acknowledge(&self, owner: &Device, ks: &[u8]) -> Outcome {
        let auth = self.auth(owner, MailboxOp::Acknowledge).await?;
        let ids: Vec<EnvelopeId> = ks.iter().map(|&k| EnvelopeId([k; 16])).collect();
        self.m
            .acknowledge(&auth, &ids)
            .await
            .or_fail("acknowledge (a fresh proof)")
    }
}

// ---------------------------------------------------------------------------
// The checks.

async fn publish<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let mut a = t.published(0).await?;
    let bundle = t.bundle(&a).await?;
    same(
        "the bundle's signed prekey (id, public key, signature)",
        &(
            bundle.signed_prekey_id(),
            bundle.signed_prekey_created(),
            *bundle.signed_prekey(),
            *bundle.signature(),
        ),
        &(
            a.signed_prekey.id(),
            a.signed_prekey.created(),
            *a.signed_prekey.public(),
            *a.signed_prekey.signature(),
        ),
    )?;
    let published: Vec<(u32, [u8; 32])> = a
        .one_time_prekeys
        .iter()
        .map(|k| (k.id(), *k.public()))
        .collect();
    let opk = bundle.one_time_prekey().map(|(id, key)| (id, *key));
    ensure!(
        opk.is_some_and(|k| published.contains(&k)),
        "the bundle's one-time prekey is {opk:?}, not one of those published ({:?})",
        a.opk_ids()
    );
    same(
        "one_time_prekeys_left after one bundle",
        &t.left(&a).await?,
        &2,
    )?;

    a.rotate();
    t.publish(&a, 2).await?;
    let bundle = t.bundle(&a).await?;
    same(
        "the bundle's signed prekey id after a new upload",
        &bundle.signed_prekey_id(),
        &2,
    )?;
    same(
        "the bundle's signed prekey after a new upload",
        bundle.signed_prekey(),
        a.signed_prekey.public(),
    )?;
    Ok(())
}

async fn publish_replay<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let mut a = t.device(0);
    let first = a.upload(2).sign(&a.keys);
    t.d.publish(&first)
        .await
        .or_fail("publish (a valid upload, counter 2)")?;
    refused(
        "publish of the same upload again",
        t.d.publish(&first).await,
        &TransportError::Replayed,
    )?;
    a.rotate();
    refused(
        "publish of a new upload with counter 2 again",
        t.d.publish(&a.upload(2).sign(&a.keys)).await,
        &TransportError::Replayed,
    )?;
    refused(
        "publish of an upload with counter 1 after 2",
        t.d.publish(&a.upload(1).sign(&a.keys)).await,
        &TransportError::Replayed,
    )?;
    same(
        "the signed prekey id after refused uploads",
        &t.bundle(&a).await?.signed_prekey_id(),
        &1,
    )?;
    same(
        "one_time_prekeys_left after refused uploads (3 published, 1 claimed)",
        &t.left(&a).await?,
        &2,
    )?;
    t.publish(&a, 3).await?;
    same(
        "the signed prekey id after counter 3",
        &t.bundle(&a).await?.signed_prekey_id(),
        &2,
    )?;
    Ok(())
}

async fn publish_signature<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let (a, b) = (t.device(0), t.device(1));
    let mut tampered = a.upload(1).sign(&a.keys);
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    refused(
        "publish of an upload with a bad signature",
        t.d.publish(&tampered).await,
        &TransportError::Unauthorized,
    )?;
    refused(
        "publish of an upload for one device signed by another's key",
        t.d.publish(&a.upload(1).sign(&b.keys)).await,
        &TransportError::Unauthorized,
    )?;
    let mut bad_spk = a.upload(1);
    bad_spk.signed_prekey.signature[0] ^= 0x01;
    refused(
        "publish of a signed upload whose signed prekey's signature fails",
        t.d.publish(&bad_spk.sign(&a.keys)).await,
        &TransportError::Unauthorized,
    )?;
    refused(
        "fetch_bundle after refused uploads",
        t.d.fetch_bundle(&a.address()).await,
        &TransportError::NotFound,
    )?;
    // The refusals took no counter.
    t.publish(&a, 1).await?;
    Ok(())
}

async fn not_found<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    let stranger = t.device(1);
    refused(
        "fetch_bundle of a device that never published",
        t.d.fetch_bundle(&stranger.address()).await,
        &TransportError::NotFound,
    )?;
    refused(
        "one_time_prekeys_left of a device that never published",
        t.d.one_time_prekeys_left(&stranger.address()).await,
        &TransportError::NotFound,
    )?;
    let sibling = DeviceAddress {
        device_id: a.device_id + 1,
        ..a.address()
    };
    refused(
        "fetch_bundle of another device number of a published key",
        t.d.fetch_bundle(&sibling).await,
        &TransportError::NotFound,
    )?;
    refused(
        "one_time_prekeys_left of another device number of a published key",
        t.d.one_time_prekeys_left(&sibling).await,
        &TransportError::NotFound,
    )?;
    Ok(())
}

async fn one_time_prekeys<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    same(
        "one_time_prekeys_left after publishing 3",
        &t.left(&a).await?,
        &3,
    )?;
    let mut handed_out = Vec::new();
    for left in [2, 1, 0] {
        let bundle = t.bundle(&a).await?;
        let Some((id, key)) = bundle.one_time_prekey() else {
            return Err(format!(
                "a bundle without a one-time prekey while {} were left",
                left + 1
            ));
        };
        ensure!(
            a.one_time_prekeys
                .iter()
                .any(|k| k.id() == id && k.public() == key),
            "fetch_bundle handed out one-time prekey {id}, which was not published"
        );
        ensure!(
            !handed_out.contains(&id),
            "fetch_bundle handed out one-time prekey {id} twice"
        );
        handed_out.push(id);
        same(
            &format!("one_time_prekeys_left after {} bundles", handed_out.len()),
            &t.left(&a).await?,
            &left,
        )?;
    }
    for _ in 0..2 {
        let bundle = t.bundle(&a).await?;
        same(
            "the one-time prekey of a bundle of an exhausted pool",
            &bundle.one_time_prekey().map(|(id, _)| id),
            &None,
        )?;
    }
    same(
        "one_time_prekeys_left when exhausted",
        &t.left(&a).await?,
        &0,
    )?;
    Ok(())
}

async fn deposit_idempotent<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    t.deposit(&a, &env(1, 20, 0xaa)).await?;
    t.deposit(&a, &env(1, 30, 0xbb))
        .await
        .map_err(|e| format!("a repeated deposit (same id): {e}"))?;
    t.deposit(&a, &env(2, 10, 0x22)).await?;
    t.deposit(&a, &env(1, 20, 0xaa))
        .await
        .map_err(|e| format!("a repeated deposit (same envelope): {e}"))?;
    same(
        "fetch after depositing id 1 three times",
        &t.fetch(&a, LIMIT).await?,
        &vec![env(1, 20, 0xaa), env(2, 10, 0x22)],
    )?;
    t.acknowledge(&a, &[1]).await?;
    t.deposit(&a, &env(1, 20, 0xaa))
        .await
        .map_err(|e| format!("a deposit of an acknowledged id: {e}"))?;
    same(
        "fetch after depositing an acknowledged id again",
        &ids(&t.fetch(&a, LIMIT).await?),
        &vec![2],
    )?;
    Ok(())
}

async fn fetch_order<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    let b = t.published(1).await?;
    let order = [9u8, 3, 7, 1, 5];
    for (i, &k) in order.iter().enumerate() {
        t.deposit(&a, &env(k, 10 + i, k)).await?;
    }
    t.deposit(&b, &env(4, 4, 4)).await?;
    let all = t.fetch(&a, LIMIT).await?;
    same("fetch (deposit order)", &ids(&all), &order.to_vec())?;
    same(
        "fetch: the second envelope whole",
        &all.get(1).cloned(),
        &Some(env(3, 11, 3)),
    )?;
    same(
        "fetch with limit 2",
        &ids(&t.fetch(&a, 2).await?),
        &vec![9, 3],
    )?;
    same("fetch with limit 1", &ids(&t.fetch(&a, 1).await?), &vec![9])?;
    same(
        "fetch again (fetching deletes nothing)",
        &ids(&t.fetch(&a, LIMIT).await?),
        &order.to_vec(),
    )?;
    same(
        "fetch of another mailbox",
        &t.fetch(&b, LIMIT).await?,
        &vec![env(4, 4, 4)],
    )?;
    Ok(())
}

async fn challenge_single_use<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    t.deposit(&a, &env(1, 10, 1)).await?;
    let auth = t.auth(&a, MailboxOp::Fetch).await?;
    same(
        "fetch with a fresh proof",
        &ids(&t
            .m
            .fetch(&auth, LIMIT)
            .await
            .or_fail("fetch (a fresh proof)")?),
        &vec![1],
    )?;
    refused(
        "fetch with a proof whose challenge was used",
        t.m.fetch(&auth, LIMIT).await,
        &TransportError::Unauthorized,
    )?;
    let again = MailboxAuth::sign(&a.keys, a.device_id, MailboxOp::Acknowledge, auth.challenge);
    refused(
        "acknowledge with a proof over a challenge used to fetch",
        t.m.acknowledge(&again, &[EnvelopeId([1; 16])]).await,
        &TransportError::Unauthorized,
    )?;
    let made_up = MailboxAuth::sign(&a.keys, a.device_id, MailboxOp::Fetch, [0x5c; 32]);
    refused(
        "fetch with a proof over a challenge never issued",
        t.m.fetch(&made_up, LIMIT).await,
        &TransportError::Unauthorized,
    )?;
    // Two outstanding challenges: each works once, in any order.
    let first = t.auth(&a, MailboxOp::Fetch).await?;
    let second = t.auth(&a, MailboxOp::Fetch).await?;
    t.m.fetch(&second, LIMIT)
        .await
        .or_fail("fetch with the second of two fresh proofs")?;
    t.m.fetch(&first, LIMIT)
        .await
        .or_fail("fetch with the first of two fresh proofs")?;
    refused(
        "fetch with the second proof again",
        t.m.fetch(&second, LIMIT).await,
        &TransportError::Unauthorized,
    )?;
    same(
        "fetch after the refusals (nothing deleted)",
        &ids(&t.fetch(&a, LIMIT).await?),
        &vec![1],
    )?;
    Ok(())
}

async fn proof_binding<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    let b = t.published(1).await?;
    t.deposit(&a, &env(1, 10, 1)).await?;
    t.deposit(&b, &env(2, 10, 2)).await?;
    let ids_a = [EnvelopeId([1; 16])];

    // B's proof over a challenge issued for A's mailbox.
    let for_a = t.m.challenge(&a.mailbox()).await.or_fail("challenge")?;
    let b_over_a = MailboxAuth::sign(&b.keys, b.device_id, MailboxOp::Fetch, for_a);
    refused(
        "fetch with a proof for one mailbox over a challenge issued for another",
        t.m.fetch(&b_over_a, LIMIT).await,
        &TransportError::Unauthorized,
    )?;

    // The wrong operation.
    let ack_proof = t.auth(&a, MailboxOp::Acknowledge).await?;
    refused(
        "fetch with an Acknowledge proof",
        t.m.fetch(&ack_proof, LIMIT).await,
        &TransportError::Unauthorized,
    )?;
    let fetch_proof = t.auth(&a, MailboxOp::Fetch).await?;
    refused(
        "acknowledge with a Fetch proof",
        t.m.acknowledge(&fetch_proof, &ids_a).await,
        &TransportError::Unauthorized,
    )?;

    // A proof naming A, signed by B.
    for op in [MailboxOp::Fetch, MailboxOp::Acknowledge] {
        let challenge = t.m.challenge(&a.mailbox()).await.or_fail("challenge")?;
        let mut forged = MailboxAuth::sign(&b.keys, a.device_id, op, challenge);
        forged.device = a.address();
        let result = match op {
            MailboxOp::Fetch => t.m.fetch(&forged, LIMIT).await.map(|_| ()),
            MailboxOp::Acknowledge => t.m.acknowledge(&forged, &ids_a).await,
        };
        refused(
            &format!("{op:?} with a proof naming the owner but signed by another key"),
            result,
            &TransportError::Unauthorized,
        )?;
    }

    same(
        "fetch of A after the refusals (nothing deleted)",
        &ids(&t.fetch(&a, LIMIT).await?),
        &vec![1],
    )?;
    same(
        "fetch of B after the refusals",
        &ids(&t.fetch(&b, LIMIT).await?),
        &vec![2],
    )?;
    Ok(())
}

async fn acknowledge<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    let b = t.published(1).await?;
    for k in 1..=4 {
        t.deposit(&a, &env(k, 10, k)).await?;
    }
    t.deposit(&b, &env(2, 10, 2)).await?;
    t.acknowledge(&a, &[2, 4, 99]).await?;
    same(
        "fetch after acknowledging 2, 4 and an unknown id",
        &ids(&t.fetch(&a, LIMIT).await?),
        &vec![1, 3],
    )?;
    same(
        "fetch of another mailbox holding an acknowledged id",
        &ids(&t.fetch(&b, LIMIT).await?),
        &vec![2],
    )?;
    t.acknowledge(&a, &[]).await?;
    t.acknowledge(&a, &[2]).await?;
    same(
        "fetch after acknowledging nothing and an id already acknowledged",
        &ids(&t.fetch(&a, LIMIT).await?),
        &vec![1, 3],
    )?;
    t.acknowledge(&a, &[3, 1]).await?;
    same(
        "fetch when all acknowledged",
        &t.fetch(&a, LIMIT).await?,
        &Vec::new(),
    )?;
    Ok(())
}

async fn fetch_waiting<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    let auth = t.auth(&a, MailboxOp::Fetch).await?;
    same(
        "fetch_waiting (100 ms) with nothing pending",
        &t.m.fetch_waiting(&auth, LIMIT, 100)
            .await
            .or_fail("fetch_waiting")?,
        &Vec::new(),
    )?;
    refused(
        "fetch_waiting with a used challenge",
        t.m.fetch_waiting(&auth, LIMIT, 100).await,
        &TransportError::Unauthorized,
    )?;
    if t.options.supports_waiting {
        let auth = t.auth(&a, MailboxOp::Fetch).await?;
        let envelope = env(1, 10, 1);
        let wait_ms = t.options.wait_ms;
        // The deposit comes once the server says the fetch is parked (or,
        // without a probe, DEPOSIT_DELAY_MS after the fetch started): a
        // server that does not wait has answered (empty) by then, so only a
        // waiting fetch that a deposit wakes passes.
        let answered = AtomicBool::new(false);
        let fetch = async {
            let fetched = t.m.fetch_waiting(&auth, LIMIT, wait_ms).await;
            answered.store(true, AtomicOrdering::SeqCst);
            fetched
        };
        let deposit = async {
            match &t.options.parked {
                Some(probe) => {
                    while !answered.load(AtomicOrdering::SeqCst) && !probe.parked().await {
                        delay(PROBE_INTERVAL_MS).await;
                    }
                }
                None => delay(DEPOSIT_DELAY_MS).await,
            }
            t.m.deposit(&a.mailbox(), &envelope, &a.pass()).await
        };
        let (fetched, deposited) = join(fetch, deposit).await;
        deposited.or_fail("deposit (during a waiting fetch)")?;
        same(
            &format!("fetch_waiting ({wait_ms} ms) while an envelope is deposited"),
            &fetched.or_fail("fetch_waiting")?,
            &vec![envelope],
        )?;
    }
    t.deposit(&a, &env(2, 10, 2)).await?;
    let auth = t.auth(&a, MailboxOp::Fetch).await?;
    let pending = t.m.fetch_waiting(&auth, LIMIT, 100).await;
    let want: Vec<u8> = if t.options.supports_waiting {
        vec![1, 2]
    } else {
        vec![2]
    };
    same(
        "fetch_waiting with envelopes pending",
        &ids(&pending.or_fail("fetch_waiting")?),
        &want,
    )?;
    Ok(())
}

async fn bounds<D: PrekeyDirectory, M: Mailbox>(t: &Under<'_, D, M>) -> Outcome {
    let a = t.published(0).await?;
    let max = t.options.max_envelope_bytes as usize;
    t.deposit(&a, &env(1, max, 1))
        .await
        .map_err(|e| format!("a deposit of max_envelope_bytes ({max}): {e}"))?;
    refused(
        &format!("deposit of max_envelope_bytes + 1 ({})", max + 1),
        t.m.deposit(&a.mailbox(), &env(2, max + 1, 2), &a.pass())
            .await,
        &TransportError::LimitExceeded(""),
    )?;
    let got = t.fetch(&a, LIMIT).await?;
    same("fetch after the bounds", &ids(&got), &vec![1])?;
    same(
        "the largest envelope's payload length",
        &got.first().map(|e| e.payload.len()),
        &Some(max),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The device directory (SPEC.md 25.12): a suite of its own, so that a
// transport without device lists still runs the checks above.

/// The names of the [`DeviceDirectory`] checks, in the order
/// [`check_device_directory`] runs them:
///
/// | name | contract |
/// |---|---|
/// | `device_genesis` | an unknown account is [`TransportError::NotFound`]; a valid first version is stored and served byte for byte; the same upload again is `Ok` and changes nothing; a first upload that is not a valid first version is [`TransportError::BadRequest`] |
/// | `device_stranger` | a list signed only by a device not in the newest list (one adding itself, one replacing every device) and a list with a bad signature are [`TransportError::Unauthorized`]; an added device that did not countersign is too; nothing changes |
/// | `device_conflict` | another list of a held version signed by a listed device is [`TransportError::Conflict`]; a version past the newest + 1 is [`TransportError::BadRequest`]; nothing changes |
/// | `device_fetch_after` | `fetch_device_lists(after)` returns exactly the versions above `after`, oldest first; accounts are separate |
/// | `device_retention` | after 66 versions the newest [`DEVICE_LIST_RETENTION`] are served; a version no longer held (the same list or another) is [`TransportError::Replayed`] (stale) |
pub const DEVICE_CHECKS: [&str; 5] = [
    "device_genesis",
    "device_stranger",
    "device_conflict",
    "device_fetch_after",
    "device_retention",
];

/// Runs every device-directory check ([`DEVICE_CHECKS`]), each on a fresh
/// directory from `make` (it must never have seen the suite's accounts,
/// whose keys are derived from fixed seeds).
///
/// # Errors
/// The violations, in the order of [`DEVICE_CHECKS`], if any check failed.
pub async fn check_device_directory<D: DeviceDirectory>(
    mut make: impl FnMut() -> D,
) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    for name in DEVICE_CHECKS {
        // Each check names itself: a check added to the table must be
        // dispatched below.
        let d = make();
        let outcome = match name {
            "device_genesis" => device_genesis(&d).await,
            "device_stranger" => device_stranger(&d).await,
            "device_conflict" => device_conflict(&d).await,
            "device_fetch_after" => device_fetch_after(&d).await,
            _ => device_retention(&d).await,
        };
        if let Err(message) = outcome {
            violations.push(Violation {
                check: name,
                message,
            });
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// [`check_device_directory`] on the current thread
/// ([`block_on`](crate::client::block_on)).
///
/// # Panics
/// If any check fails, with a message naming each failed check.
pub fn run_device_directory<D: DeviceDirectory>(make: impl FnMut() -> D) {
    if let Err(violations) = crate::client::block_on(check_device_directory(make)) {
        panic!("{}", report(&violations));
    }
}

/// A device of the device-list checks (keys from a fixed seed).
fn dkey(n: u8) -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0xd0 ^ n; 32])
}

fn entry(n: u8) -> DeviceEntry {
    DeviceEntry {
        identity: *dkey(n).public(),
        device_id: u32::from(n),
    }
}

/// The successor of `prev` listing devices `devices`, signed by `signers`.
fn next_list(prev: &VerifiedDeviceList, devices: &[u8], signers: &[u8]) -> DeviceList {
    let entries: Vec<DeviceEntry> = devices.iter().map(|n| entry(*n)).collect();
    let mut list = prev.successor(&entries).expect("a well-formed list");
    for s in signers {
        list.sign(&dkey(*s)).expect("a listed signer");
    }
    list.into_list().expect("signed")
}

/// The account founded by device `founder`, and its chain of `extra`
/// successors (each keeping the founder alone, so each has a new body).
fn chain(founder: u8, extra: usize) -> Vec<VerifiedDeviceList> {
    let first = DeviceList::genesis(&dkey(founder), u32::from(founder))
        .verify_genesis()
        .expect("a valid first version");
    let mut out = vec![first];
    for i in 0..extra {
        // Alternate between the founder alone and the founder with
        // device 0x40 + i (added and countersigned), so bodies differ.
        let prev = out.last().expect("not empty");
        let next = if i % 2 == 0 {
            let added = 0x40 + u8::try_from(i % 64).unwrap_or(0);
            next_list(prev, &[founder, added], &[founder, added])
        } else {
            next_list(prev, &[founder], &[founder])
        };
        let verified = next.verify_successor(prev).expect("a valid successor");
        out.push(verified);
    }
    out
}

async fn publish_all<D: DeviceDirectory>(d: &D, lists: &[VerifiedDeviceList]) -> Outcome {
    for l in lists {
        d.publish_device_list(&l.encode())
            .await
            .or_fail(&format!("publish_device_list(version {})", l.version()))?;
    }
    Ok(())
}

async fn fetched<D: DeviceDirectory>(
    d: &D,
    account: &AccountId,
    after: u64,
) -> Result<Vec<Vec<u8>>, String> {
    d.fetch_device_lists(account, after)
        .await
        .or_fail(&format!("fetch_device_lists(after {after})"))
}

/// `got == want` for lists, failing with their versions (not their bytes).
fn same_lists(what: &str, got: &[Vec<u8>], want: &[Vec<u8>]) -> Outcome {
    if got == want {
        return Ok(());
    }
    let versions = |lists: &[Vec<u8>]| -> Vec<String> {
        lists
            .iter()
            .map(|l| match DeviceList::decode(l) {
                Ok(list) => format!("v{} ({} bytes)", list.version(), l.len()),
                Err(_) => format!("undecodable ({} bytes)", l.len()),
            })
            .collect()
    };
    Err(format!(
        "{what}: got {:?}, expected {:?} (or other bytes)",
        versions(got),
        versions(want)
    ))
}

fn encodings(lists: &[VerifiedDeviceList]) -> Vec<Vec<u8>> {
    lists.iter().map(|l| l.encode()).collect()
}

async fn device_genesis<D: DeviceDirectory>(d: &D) -> Outcome {
    let lists = chain(1, 0);
    let account = *lists[0].account_id();
    refused(
        "fetch_device_lists of an unknown account",
        d.fetch_device_lists(&account, 0).await,
        &TransportError::NotFound,
    )?;
    // A second version first: not a first version.
    let later = chain(2, 1);
    refused(
        "publish_device_list(version 2 of an account the directory does not know)",
        d.publish_device_list(&later[1].encode()).await,
        &TransportError::BadRequest(""),
    )?;
    refused(
        "publish_device_list(bytes that are not a list)",
        d.publish_device_list(&[1, 2, 3]).await,
        &TransportError::BadRequest(""),
    )?;
    publish_all(d, &lists).await?;
    same_lists(
        "fetch_device_lists(after 0) after a first version",
        &fetched(d, &account, 0).await?,
        &encodings(&lists),
    )?;
    same_lists(
        "fetch_device_lists(after 1) of an account at version 1",
        &fetched(d, &account, 1).await?,
        &[],
    )?;
    // A retry of the same upload (its answer was lost) is not an error.
    d.publish_device_list(&lists[0].encode())
        .await
        .or_fail("publish_device_list(the same first version again)")?;
    same_lists(
        "fetch_device_lists(after 0) after the same upload twice",
        &fetched(d, &account, 0).await?,
        &encodings(&lists),
    )?;
    refused(
        "fetch_device_lists of an account never published",
        d.fetch_device_lists(later[0].account_id(), 0).await,
        &TransportError::NotFound,
    )?;
    Ok(())
}

async fn device_stranger<D: DeviceDirectory>(d: &D) -> Outcome {
    // Founder 1 with device 2.
    let lists = chain(1, 0);
    let account = *lists[0].account_id();
    let v2 = next_list(&lists[0], &[1, 2], &[1, 2])
        .verify_successor(&lists[0])
        .expect("valid");
    publish_all(d, &[lists[0].clone(), v2.clone()]).await?;
    let held = encodings(&[lists[0].clone(), v2.clone()]);
    // Stranger 9 adds itself, signing alone.
    let add = next_list(&v2, &[1, 2, 9], &[9]);
    refused(
        "publish_device_list(a stranger adding itself, signed by it alone)",
        d.publish_device_list(&add.encode()).await,
        &TransportError::Unauthorized,
    )?;
    // Stranger 9 replaces every device (removes 1 and 2).
    let takeover = next_list(&v2, &[9], &[9]);
    refused(
        "publish_device_list(a stranger removing every device, signed by it alone)",
        d.publish_device_list(&takeover.encode()).await,
        &TransportError::Unauthorized,
    )?;
    // Device 1 adds 9 without 9's countersignature.
    let unsigned_add = next_list(&v2, &[1, 2, 9], &[1]);
    refused(
        "publish_device_list(an added device that did not countersign)",
        d.publish_device_list(&unsigned_add.encode()).await,
        &TransportError::Unauthorized,
    )?;
    // A valid removal of device 2 with its signature bytes damaged.
    let mut bad = next_list(&v2, &[1], &[1]).encode();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    refused(
        "publish_device_list(a removal whose signature does not verify)",
        d.publish_device_list(&bad).await,
        &TransportError::Unauthorized,
    )?;
    same_lists(
        "fetch_device_lists(after 0) after refused uploads",
        &fetched(d, &account, 0).await?,
        &held,
    )?;
    // The listed device 2 may remove the founder.
    let removal = next_list(&v2, &[2], &[2]);
    d.publish_device_list(&removal.encode())
        .await
        .or_fail("publish_device_list(device 2 removing the founder)")?;
    Ok(())
}

async fn device_conflict<D: DeviceDirectory>(d: &D) -> Outcome {
    let lists = chain(3, 2);
    let account = *lists[0].account_id();
    publish_all(d, &lists).await?;
    let held = encodings(&lists);
    // Version 2 again: the same list is fine, another one a conflict.
    d.publish_device_list(&lists[1].encode())
        .await
        .or_fail("publish_device_list(the held version 2 again)")?;
    let sibling = next_list(&lists[0], &[3, 7], &[3, 7]);
    refused(
        "publish_device_list(another version 2, signed by the founder)",
        d.publish_device_list(&sibling.encode()).await,
        &TransportError::Conflict,
    )?;
    // The newest version's sibling (the thief's race).
    let head_sibling = next_list(&lists[1], &[3, 0x41], &[3, 0x41]);
    refused(
        "publish_device_list(another version 3, signed by the founder)",
        d.publish_device_list(&head_sibling.encode()).await,
        &TransportError::Conflict,
    )?;
    // A gap: version 5 over version 3.
    let v4 = next_list(&lists[2], &[3, 5], &[3, 5])
        .verify_successor(&lists[2])
        .expect("valid");
    let v5 = next_list(&v4, &[3], &[3]);
    refused(
        "publish_device_list(version 5 over version 3)",
        d.publish_device_list(&v5.encode()).await,
        &TransportError::BadRequest(""),
    )?;
    same_lists(
        "fetch_device_lists(after 0) after refused uploads",
        &fetched(d, &account, 0).await?,
        &held,
    )?;
    Ok(())
}

async fn device_fetch_after<D: DeviceDirectory>(d: &D) -> Outcome {
    let a = chain(4, 3);
    let b = chain(6, 1);
    publish_all(d, &a).await?;
    publish_all(d, &b).await?;
    let account = *a[0].account_id();
    for after in 0..=4u64 {
        let from = usize::try_from(after).unwrap_or(usize::MAX).min(a.len());
        same_lists(
            &format!("fetch_device_lists(after {after}) of versions 1 to 4"),
            &fetched(d, &account, after).await?,
            &encodings(&a[from..]),
        )?;
    }
    same_lists(
        "fetch_device_lists(after u64::MAX)",
        &fetched(d, &account, u64::MAX).await?,
        &[],
    )?;
    same_lists(
        "fetch_device_lists(after 0) of the other account",
        &fetched(d, b[0].account_id(), 0).await?,
        &encodings(&b),
    )?;
    Ok(())
}

async fn device_retention<D: DeviceDirectory>(d: &D) -> Outcome {
    let lists = chain(8, 65);
    let account = *lists[0].account_id();
    publish_all(d, &lists).await?;
    let kept = &lists[lists.len() - DEVICE_LIST_RETENTION..];
    same_lists(
        "fetch_device_lists(after 0) after 66 versions",
        &fetched(d, &account, 0).await?,
        &encodings(kept),
    )?;
    same_lists(
        "fetch_device_lists(after 64) after 66 versions",
        &fetched(d, &account, 64).await?,
        &encodings(&lists[64..]),
    )?;
    refused(
        "publish_device_list(version 1, no longer held)",
        d.publish_device_list(&lists[0].encode()).await,
        &TransportError::Replayed,
    )?;
    let other_v2 = next_list(&lists[0], &[8, 9], &[8, 9]);
    refused(
        "publish_device_list(another version 2, whose version 1 is no longer held)",
        d.publish_device_list(&other_v2.encode()).await,
        &TransportError::Replayed,
    )?;
    Ok(())
}
